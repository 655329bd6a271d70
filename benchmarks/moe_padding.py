"""Where the bf16 CPU path should stop padding: the padded bmm path vs grouped GEMM as the expert load skews.

    HF_HUB_OFFLINE=1 python -m benchmarks.moe_padding --out benchmarks/results/moe_padding   # ~1 min, 2 cores
    HF_HUB_OFFLINE=1 python -m benchmarks.moe_padding --quick                                 # smoke run

`moe_kernels.routed_swiglu` (dispatch, experts, weighted combine), forward+backward in bf16 at the seed's width
(128 experts, hidden 512, expert width 256, top-2), with each path forced. A share of the (token, slot)
assignments goes to 4 hot experts and the rest are spread uniformly, so the padding per real row -- E * C / M, the
largest expert's rows over the mean, which is also the load imbalance the telemetry reports -- grows with that
share. The padded path's cost grows with the padded rows, grouped GEMM's does not; `moe_kernels.MAX_PADDING_WASTE`
is where the CPU switches. Both paths run on the same inputs, alternating, in one process.
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

from benchmarks.moe_backward import median_ms
from benchmarks.report import publish
from mmr1.host_memory import keep_freed_memory
from mmr1.moe_kernels import MAX_PADDING_WASTE, routed_swiglu

PATHS = ("grouped", "padded")


def assignments(tokens: int, top_k: int, experts: int, hot_share: float, generator: torch.Generator) -> torch.Tensor:
    """(tokens * top_k,) experts: `hot_share` of them among experts 0-3, the rest uniform over all."""
    n = tokens * top_k
    hot = int(n * hot_share)
    chosen = torch.cat([torch.randint(0, 4, (hot,), generator=generator),
                        torch.randint(0, experts, (n - hot,), generator=generator)])
    return chosen[torch.randperm(n, generator=generator)]


def bench(tokens: int, hot_share: float, weights: list[torch.Tensor], top_k: int, rounds: int, repeats: int,
          warmup: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    experts, dim = weights[0].shape[0], weights[0].shape[1]
    flat = torch.randn(tokens, dim, generator=g).bfloat16()
    slot_experts = assignments(tokens, top_k, experts, hot_share, g)
    slot_weights = torch.rand(tokens * top_k, generator=g)
    counts = torch.bincount(slot_experts, minlength=experts)
    waste = experts * int(counts.max()) / (tokens * top_k)

    def run(path: str):
        x = flat.detach().requires_grad_(True)
        routed_swiglu(x, slot_experts, slot_weights, *weights, path=path).float().sum().backward()
        for w in weights:
            w.grad = None
        return x.grad

    grads = {path: run(path) for path in PATHS}
    torch.testing.assert_close(grads["padded"].float(), grads["grouped"].float(), atol=3e-2, rtol=3e-2)
    passes = {path: [] for path in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            passes[path].append(median_ms(lambda: run(path), repeats, warmup))
    ms = {path: statistics.median(v) for path, v in passes.items()}
    return {"tokens": tokens, "hot_share": hot_share, "padding_per_row": waste, "grouped_ms": ms["grouped"],
            "padded_ms": ms["padded"], "padded_over_grouped": ms["padded"] / ms["grouped"],
            "default_path": "padded" if waste <= MAX_PADDING_WASTE else "grouped", "passes_ms": passes}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}, torch threads {m['torch_threads']}), "
             f"torch {m['torch']}; routed experts fwd+bwd in bf16, E={result['experts']}, top-{result['top_k']}; "
             f"median of {result['rounds']} alternating rounds of {result['repeats']} calls; the CPU switches to "
             f"grouped GEMM above {result['max_padding_waste']:g} padded rows per real row; total "
             f"{result['total_seconds']:.0f} s.", "",
             "| tokens | hot share | padding per row (E*C/M) | grouped ms | padded ms | padded / grouped | default |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tokens']} | {r['hot_share']:.2f} | {r['padding_per_row']:.2f} | {r['grouped_ms']:.1f} | "
                     f"{r['padded_ms']:.1f} | {r['padded_over_grouped']:.2f} | {r['default_path']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny geometry, one round: a smoke run")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1216, 4096])
    parser.add_argument("--hot-shares", nargs="+", type=float, default=[0.0, 0.03, 0.05, 0.1, 0.2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not args.quick:
        keep_freed_memory()  # as benchmarks.moe: no page-fault noise from the 32 MB gradient buffers
    experts, dim, hidden, top_k = (8, 32, 16, 2) if args.quick else (128, 512, 256, 2)
    tokens = [64] if args.quick else args.tokens
    rounds, repeats = (1, 1) if args.quick else (args.rounds, args.repeats)
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(experts, a, b, generator=g) / a ** 0.5).bfloat16().requires_grad_(True)
               for a, b in ((dim, hidden), (dim, hidden), (hidden, dim))]
    start = time.perf_counter()
    rows = [bench(n, share, weights, top_k, rounds, repeats, args.warmup) for n in tokens for share in args.hot_shares]
    result = {"command": "python -m benchmarks.moe_padding " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cores": os.cpu_count(), "cpu": platform.machine(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "experts": experts, "top_k": top_k, "rounds": rounds, "repeats": repeats,
              "max_padding_waste": MAX_PADDING_WASTE, "rows": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
