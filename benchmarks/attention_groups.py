"""What splitting a packed step's short rows into attention calls is worth (mmr1/engine/packed.py).

    HF_HUB_OFFLINE=1 python -m benchmarks.attention_groups --out benchmarks/results/attention_groups  # ~4 min
    HF_HUB_OFFLINE=1 python -m benchmarks.attention_groups --quick                                   # smoke run

In a packed step every row feeding at most SHORT_ROW tokens (decode rows, short prompt chunks) attends in padded
calls. Before, they shared ONE call: each decode row was padded to the step's longest short chunk in queries and
to its longest context in keys. `packed.short_row_groups` now splits them by a cost model. This runs benchmark
item 2's continuous-batching workload (200 requests, log-normal lengths, engine.md) with both rules, alternating in
one process, on the fp32 serving model and the bf16 weight-bound one, and counts the attention work each rule
pads to against the work the rows need. Where the CPU decode-attention loop runs (AVX-512, model-dtype KV), decode
rows skip these calls; the comparison here turns it off, measuring the SDPA path that other machines take.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.engine_cases import decode_loop, mixed_workload, run_offline, serving_model, weight_bound_model
from benchmarks.report import machine_info, publish
from mmr1.engine import Engine, EngineConfig, SamplingParams, packed

RULES = ("one call", "cost model")


def one_call(rows: list[int], cached: list[int], new: list[int]) -> list[list[int]]:
    """The previous rule: every short row in one padded call."""
    return [rows] if rows else []


def attention_work(model, workload, max_batch: int) -> dict:
    """Query-key pairs the attention calls compute (padded) against those the rows need (causal), per rule."""
    counted = {}
    init = packed._AttentionGroup.__init__

    def counting(self, rows, offsets, cached, new, tables, block_size):
        init(self, rows, offsets, cached, new, tables, block_size)
        G, Lg = self.real.shape
        tally[0] += G * Lg * self.mask.shape[-1]
        tally[1] += sum(new[r] * cached[r] + new[r] * (new[r] + 1) // 2 for r in rows)

    packed._AttentionGroup.__init__ = counting
    try:
        for rule, groups in zip(RULES, (one_call, packed.short_row_groups)):
            tally = [0, 0]
            with _rule(groups):
                run_offline(Engine(model, config=EngineConfig(max_batch=max_batch)), workload)
            counted[rule] = tally[0] / tally[1]
    finally:
        packed._AttentionGroup.__init__ = init
    return counted


@contextlib.contextmanager
def _rule(groups):
    """packed.short_row_groups replaced by `groups` inside, with decode rows grouped too: the CPU decode-attention
    loop (mmr1/engine/decode_attention.py) is off, as it is on CPUs without AVX-512, for INT8 pools and on GPUs."""
    saved, packed.short_row_groups = packed.short_row_groups, groups
    try:
        with decode_loop(False):
            yield
    finally:
        packed.short_row_groups = saved


def compare(name: str, model, workload, max_batch: int, rounds: int) -> dict:
    walls = {rule: [] for rule in RULES}
    outputs = {}
    for _ in range(rounds):
        for rule, groups in zip(RULES, (one_call, packed.short_row_groups)):
            with _rule(groups):
                engine = Engine(model, config=EngineConfig(max_batch=max_batch))
                start = time.perf_counter()
                outs = engine.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n, ignore_eos=True)}
                                        for p, n in workload])
                walls[rule].append(time.perf_counter() - start)
                outputs[rule] = [o.token_ids for o in outs]
    median = {rule: statistics.median(v) for rule, v in walls.items()}
    tokens = sum(len(t) for t in outputs[RULES[1]])
    return {"model": name, "requests": len(workload), "output_tokens": tokens, "walls_s": walls,
            "tok_s": {rule: tokens / median[rule] for rule in RULES},
            "speedup": median[RULES[0]] / median[RULES[1]],
            "identical_outputs": outputs[RULES[0]] == outputs[RULES[1]],
            "padded_over_needed": attention_work(model, workload, max_batch)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} "
             f"({m['torch_threads']} thread); continuous batching, max_batch {result['max_batch']}, the log-normal "
             f"workload of engine.md item 2; median of {result['rounds']} alternating runs per rule; total "
             f"{result['total_seconds']:.0f} s.", "",
             "| model | one call tok/s | cost model tok/s | speed-up | attention work padded / needed (one call -> "
             "cost model) | identical outputs |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        work = r["padded_over_needed"]
        lines.append(f"| {r['model']} | {r['tok_s'][RULES[0]]:.0f} | {r['tok_s'][RULES[1]]:.0f} | "
                     f"{r['speedup']:.3f}x | {work[RULES[0]]:.2f}x -> {work[RULES[1]]:.2f}x | "
                     f"{r['identical_outputs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 requests, the fp32 model, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine.md runs with 1)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    requests, rounds = (20, 1) if args.quick else (200, args.rounds)
    workload = mixed_workload(requests)
    models = {"fp32 13 MB": serving_model}
    if not args.quick:
        models["bf16 137 MB, weight-bound"] = weight_bound_model
    machine, start = machine_info(), time.perf_counter()  # the load before this run adds its own
    rows = [compare(name, build(), workload, 16, rounds) for name, build in models.items()]
    result = {"command": "python -m benchmarks.attention_groups " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine,
              "max_batch": 16, "rounds": rounds, "rows": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
