"""The engine's MoE for a few tokens (mmr1/engine/solo.py `_moe_few`: route together, one matmul chain per chosen
expert) and `_moe_every_expert` (every expert on every token in three batched matmuls, for tiny experts) vs
MoEFeedForward's own forward (router statistics, sort, grouped GEMMs), at the sizes a speculative verification or a
short prompt chunk has. Sets `FEW_EXPERT_CALLS`, the budget up to which the fast path uses `_moe_few`, and
`EVERY_EXPERT_WEIGHTS` / `EVERY_EXPERT_WORK`, up to which it runs every expert instead.

    python -m benchmarks.moe_few_tokens --out benchmarks/results/moe_few_tokens     # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import publish
from mmr1.config import MoEConfig
from mmr1.engine.solo import (EVERY_EXPERT_WEIGHTS, FEW_EXPERT_CALLS, _moe_every_expert, _moe_few, every_expert_path,
                              few_tokens_path)
from mmr1.moe import MoEFeedForward

LAYERS = {  # name: (hidden, config)
    "demo (8 x 64)": (128, MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=64)),
    "seed (128 x 256)": (512, MoEConfig(num_experts=128, num_groups=16, topk_groups=4, top_k=2,
                                        expert_hidden=256)),
}


def median_us(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_round)


@torch.inference_mode()
def measure(tokens: list[int], calls: int) -> list[dict]:
    rows = []
    for name, (dim, cfg) in LAYERS.items():
        torch.manual_seed(0)
        layer = MoEFeedForward(dim, cfg).eval()
        for L in tokens:
            h = torch.randn(L, dim)
            torch.testing.assert_close(_moe_few(layer, h), layer(h[None])[0][0], atol=1e-5, rtol=1e-4)
            layer_us = median_us(lambda: layer(h[None]), calls)
            few_us = median_us(lambda: _moe_few(layer, h), calls)
            every_us = None
            if layer.experts.w_gate.numel() <= EVERY_EXPERT_WEIGHTS:  # the seed's experts are far too big for it
                torch.testing.assert_close(_moe_every_expert(layer, h), layer(h[None])[0][0], atol=1e-5, rtol=1e-4)
                every_us = median_us(lambda: _moe_every_expert(layer, h), calls)
            rows.append({"layer": name, "tokens": L, "expert_calls_max": min(L * cfg.top_k, cfg.num_experts),
                         "module_us": layer_us, "few_us": few_us, "speedup": layer_us / few_us,
                         "every_expert_us": every_us,
                         "fast_path": "every expert" if every_expert_path(layer, L) else
                         "_moe_few" if few_tokens_path(layer, L) else "MoEFeedForward"})
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} "
             f"thread), fp32, eager; median of 5 rounds; FEW_EXPERT_CALLS = {r['few_expert_calls']}.", "",
             "| layer | tokens | expert calls (max) | MoEFeedForward us | _moe_few us | speed-up | every expert us "
             "| fast path takes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        every = "" if row["every_expert_us"] is None else f"{row['every_expert_us']:.0f}"
        lines.append(f"| {row['layer']} | {row['tokens']} | {row['expert_calls_max']} | {row['module_us']:.0f} | "
                     f"{row['few_us']:.0f} | {row['speedup']:.2f}x | {every} | {row['fast_path']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"command": "python -m benchmarks.moe_few_tokens " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "few_expert_calls": FEW_EXPERT_CALLS,
              "rows": measure([2, 3, 5, 8, 16, 32], 5 if args.quick else 100)}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
