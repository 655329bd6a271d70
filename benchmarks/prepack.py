"""Engine steps with oneDNN-packed CPU linear weights (EngineConfig.cpu_prepacked_weights) against plain ones.

    HF_HUB_OFFLINE=1 python -m benchmarks.prepack --out benchmarks/results/prepack   # ~4 min, 2 cores
    HF_HUB_OFFLINE=1 python -m benchmarks.prepack --quick                            # smoke run

Continuous batching on engine.md item 2's log-normal workload (200 requests) and batch-1 greedy decoding, each with
the bf16 137 MB weight-bound model and the fp32 13 MB serving model of benchmarks/engine_cases.py, packed and
plain alternating in one process (median of the rounds), 1 torch thread as engine.md. Outputs are compared too.
The fp32 rows pack fp32 weights as well, which the engine does not do (prepack.PACKED_DTYPES is bf16): they are
why. Variants: plain (torch's products), packed (oneDNN-packed weights), loop (mmr1.engine.cpu_linear's few-row
loop, the engine's default), packed+loop (packed weights, few-row products on the loop: what
`cpu_prepacked_weights=True` runs with the default `cpu_few_row_linears`); speed-ups are against plain. The
Mixtral-shaped bf16 model's batch-1 row shows the loop on its stacked experts (cpu_linear.rows_times) with and
without packed weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.engine_cases import mixed_workload, serving_model, weight_bound_model
from benchmarks.report import machine_info, publish
from mmr1.engine import Engine, EngineConfig, SamplingParams, prepack

VARIANTS = {"plain": (False, False), "packed": (True, False), "loop": (False, True), "packed+loop": (True, True)}


def timed_generate(model, requests, max_batch: int, variant: str) -> tuple[float, list[list[int]]]:
    packed, loop = VARIANTS[variant]
    engine = Engine(model, config=EngineConfig(max_batch=max_batch, cpu_prepacked_weights=packed,
                                               cpu_few_row_linears=loop))
    start = time.perf_counter()
    outs = engine.generate(requests)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def compare(model, requests, max_batch: int, rounds: int) -> dict:
    dtype = next(model.parameters()).dtype
    saved = prepack.PACKED_DTYPES
    prepack.PACKED_DTYPES = (dtype,)  # fp32 too, for the rows that show why it is not packed by default
    try:
        return _compare(model, requests, max_batch, rounds)
    finally:
        prepack.PACKED_DTYPES = saved


def _compare(model, requests, max_batch: int, rounds: int) -> dict:
    walls = {v: [] for v in VARIANTS}
    tokens = {}
    for _ in range(rounds):
        for variant in VARIANTS:
            wall, tokens[variant] = timed_generate(model, requests, max_batch, variant)
            walls[variant].append(wall)
    n = sum(len(t) for t in tokens["plain"])
    tok_s = {v: n / statistics.median(walls[v]) for v in VARIANTS}
    same = {v: sum(a == b for x, y in zip(tokens["plain"], tokens[v]) for a, b in zip(x, y)) / n for v in VARIANTS}
    return {"output_tokens": n, "walls_s": walls, "tok_s": tok_s,
            "speedup": {v: tok_s[v] / tok_s["plain"] for v in VARIANTS}, "same_tokens": same}


def cases(quick: bool) -> list[tuple[str, str, object, list, int]]:
    """(model, workload, model builder, requests, max_batch)."""
    n = 16 if quick else 200
    mix = [{"prompt": p, "sampling": SamplingParams(max_new_tokens=k, ignore_eos=True)} for p, k in mixed_workload(n)]
    g = torch.Generator().manual_seed(5)
    solo = [{"prompt": torch.randint(0, 2048, (24,), generator=g).tolist(),
             "sampling": SamplingParams(max_new_tokens=8 if quick else 64, ignore_eos=True)} for _ in range(2)]
    out = [("fp32 13 MB", "continuous, 200 requests (log-normal)", serving_model, mix, 16),
           ("fp32 13 MB", "batch 1, 2 x 64 new tokens", serving_model, solo, 1)]
    if not quick:
        out += [("bf16 137 MB, weight-bound", "continuous, 200 requests (log-normal)", weight_bound_model, mix, 16),
                ("bf16 137 MB, weight-bound", "batch 1, 2 x 64 new tokens", weight_bound_model, solo, 1),
                ("bf16 Mixtral-shaped 61 MB", "batch 1, 2 x 64 new tokens", mixtral_bf16, solo, 1)]
    return out


def mixtral_bf16():
    """benchmarks/cpu_linear.py's Mixtral-shaped model (imported from transformers) in bf16: its stacked experts are
    not nn.Linear layers, so packing leaves them alone and the loop variants run them on cpu_linear.rows_times."""
    from benchmarks.cpu_linear import hf_shaped
    return hf_shaped("mixtral").to(torch.bfloat16)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} "
             f"({m['torch_threads']} thread); the variants alternating, median of {result['rounds']} rounds; "
             f"load average at start {m['load_average_at_start']:.1f}; total {result['total_seconds']:.0f} s. "
             "tok/s, speed-up against plain, and the share of plain's tokens each variant reproduced.", "",
             "| model | workload | plain | packed | loop | packed+loop | same tokens (packed / loop / both) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r['tok_s'][v]:.0f}" + ("" if v == "plain" else f" ({r['speedup'][v]:.2f}x)") for v in VARIANTS]
        same = " / ".join(f"{100 * r['same_tokens'][v]:.1f}%" for v in list(VARIANTS)[1:])
        lines.append(f"| {r['model']} | {r['workload']} | {' | '.join(cells)} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 requests, the fp32 model, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 1 if args.quick else args.rounds
    machine, start, rows, built = machine_info(), time.perf_counter(), [], {}  # load before this run adds its own
    for name, workload, build, requests, max_batch in cases(args.quick):
        model = built.setdefault(name, build())
        rows.append({"model": name, "workload": workload, "max_batch": max_batch,
                     **compare(model, requests, max_batch, rounds)})
    result = {"command": "python -m benchmarks.prepack " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine,
              "rounds": rounds, "rows": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
