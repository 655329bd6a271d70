"""What the CPU decode-attention loop (mmr1/engine/decode_attention.py) is worth, against the SDPA path it replaces.

    HF_HUB_OFFLINE=1 python -m benchmarks.decode_attention --out benchmarks/results/decode_attention  # ~4 min
    HF_HUB_OFFLINE=1 python -m benchmarks.decode_attention --quick                                    # smoke run

1. One layer's attention for 16 decoding rows in a packed step (`PackedBatch.attend`: the new K/V written to the
   pool, then every row against its cached tokens), loop on and off, at three context lengths, bf16 and fp32 pools
   and a bf16 model's INT8 pool (16 heads of 64 over 4 KV heads, the bf16 serving model's geometry). Median of
   alternating repeats.
2. Benchmark item 2's continuous-batching workload (200 requests, log-normal lengths, engine.md) on the fp32
   serving model and the bf16 weight-bound one, loop on and off in alternating rounds: output tokens/s, and
   whether the greedy outputs are the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.engine_cases import decode_loop, mixed_workload, serving_model, weight_bound_model
from benchmarks.report import machine_info, publish
from mmr1.engine import Engine, EngineConfig, SamplingParams, decode_attention
from mmr1.engine.packed import PackedBatch
from mmr1.engine.paged_cache import PagedKVPool

MODES = ("SDPA", "loop")


def one_layer(dtype: torch.dtype, context: int, kv: str = "model", rows: int = 16, repeats: int = 30) -> dict:
    """Median microseconds of PackedBatch.attend for `rows` one-token rows `context` tokens in (pages shuffled),
    K/V in the model's dtype or INT8."""
    heads, kv_heads, head_dim, block = 16, 4, 64, 16
    g = torch.Generator().manual_seed(context)
    per_row = -(-(context + 1) // block)
    pool = PagedKVPool(1, rows * per_row, block, kv_heads, head_dim, dtype, kv_cache_dtype=kv)
    every_slot = torch.arange(rows * per_row * block)
    pool.write(0, every_slot, *(torch.randn(len(every_slot), kv_heads, head_dim, generator=g).to(dtype)
                                for _ in range(2)))
    tables = torch.randperm(rows * per_row, generator=g).view(rows, per_row).tolist()
    q = torch.randn(1, heads, rows, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, kv_heads, rows, head_dim, generator=g).to(dtype) for _ in range(2))
    times, outs = {mode: [] for mode in MODES}, {}
    for _ in range(repeats):
        for mode in MODES:
            with decode_loop(mode == "loop"):
                batch = PackedBatch(pool, tables, [context] * rows, [1] * rows)
                start = time.perf_counter()
                outs[mode] = batch.attend(0, q, k, v)
                times[mode].append(time.perf_counter() - start)
    us = {mode: statistics.median(t) * 1e6 for mode, t in times.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "kv": kv, "rows": rows, "context": context, "us": us,
            "speedup": us["SDPA"] / us["loop"],
            "max_abs_diff": (outs["loop"].float() - outs["SDPA"].float()).abs().max().item()}


def serving(name: str, model, workload, rounds: int) -> dict:
    tok_s, outputs = {mode: [] for mode in MODES}, {}
    for _ in range(rounds):
        for mode in MODES:
            with decode_loop(mode == "loop"):
                engine = Engine(model, config=EngineConfig(max_batch=16))
                start = time.perf_counter()
                outs = engine.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n, ignore_eos=True)}
                                        for p, n in workload])
                outputs[mode] = [o.token_ids for o in outs]
                tok_s[mode].append(sum(map(len, outputs[mode])) / (time.perf_counter() - start))
    median = {mode: statistics.median(v) for mode, v in tok_s.items()}
    same = sum(a == b for a, b in zip(outputs["SDPA"], outputs["loop"]))
    return {"model": name, "tok_s_rounds": tok_s, "tok_s": median, "speedup": median["loop"] / median["SDPA"],
            "identical_requests": same, "requests": len(workload)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} "
             f"({m['torch_threads']} thread), load average at start {m['load_average_at_start']:.1f}; total "
             f"{result['total_seconds']:.0f} s.", "",
             "| one layer, 16 decoding rows | context | SDPA path, us | loop, us | speed-up | max abs difference |",
             "|---|---|---|---|---|---|"]
    for r in result["layer"]:
        pool = f"{r['dtype']} model, INT8 pool" if r["kv"] == "int8" else f"{r['dtype']} pool"
        lines.append(f"| {pool} | {r['context']} | {r['us']['SDPA']:.0f} | {r['us']['loop']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    requests = result["serving"][0]["requests"]
    lines += ["", f"| continuous batching, {requests} requests (engine.md item 2), max_batch 16 | SDPA path tok/s | "
              f"loop tok/s | speed-up | identical greedy outputs |", "|---|---|---|---|---|"]
    for r in result["serving"]:
        lines.append(f"| {r['model']} (median of {len(r['tok_s_rounds']['loop'])} alternating rounds) | "
                     f"{r['tok_s']['SDPA']:.0f} | {r['tok_s']['loop']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['identical_requests']} / {r['requests']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one context, 20 requests on the fp32 model, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine.md runs with 1)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if decode_attention.function() is None:
        raise SystemExit("benchmarks.decode_attention: the loop is not available here (it needs AVX-512, a C "
                         "compiler and PyTorch's GNU OpenMP)")
    torch.set_num_threads(args.threads)
    machine, start = machine_info(), time.perf_counter()
    contexts, requests, rounds = ((64,), 20, 1) if args.quick else ((64, 256, 1024), 200, args.rounds)
    layer = [one_layer(dtype, c, kv, repeats=5 if args.quick else 30)
             for dtype, kv in ((torch.bfloat16, "model"), (torch.float32, "model"), (torch.bfloat16, "int8"))
             for c in contexts]
    workload = mixed_workload(requests)
    models = {"fp32 13 MB": serving_model}
    if not args.quick:
        models["bf16 137 MB, weight-bound"] = weight_bound_model
    rows = [serving(name, build(), workload, rounds) for name, build in models.items()]
    command = "python -m benchmarks.decode_attention " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command,
              "machine": machine, "layer": layer, "serving": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
