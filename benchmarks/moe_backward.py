"""The padded expert block's backward: mmr1's hand-written one (moe_kernels.PaddedSwiGLU) vs autograd's own.

    HF_HUB_OFFLINE=1 python -m benchmarks.moe_backward --out benchmarks/results/moe_backward   # ~1 min, 2 cores
    HF_HUB_OFFLINE=1 python -m benchmarks.moe_backward --quick                                  # smoke run

Both sides compute the same block -- padded (E, C, D) rows, SwiGLU experts, routing weight per row -- with the
same batched matmuls: `weighted_padded_swiglu_reference` as plain ops differentiated by autograd, PaddedSwiGLU
with a hand-written backward that accumulates the up term of the input gradient into the gate term's batched
matmul (no separate (E, C, D) sum) and runs the element-wise work as one fused kernel each way
(mmr1.moe_elementwise). The block is what the bf16 CPU path of a MoE layer runs between its gather and
its combine (moe_kernels._padded_routed). Its capacity C comes from real routing at the seed geometry: a random
router (Mixtral's top-k softmax over 128 experts) on 4096 random tokens, as in benchmarks/moe.py, so the padding
is what that benchmark's layers pad. Outputs and gradients of the two are checked against each other first;
timings alternate between them in rounds (median of the rounds' medians), so a drift of the machine hits both.
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
from mmr1.host_memory import keep_freed_memory
from mmr1.moe_kernels import PaddedSwiGLU, weighted_padded_swiglu_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seed_block(top_k: int, dtype: torch.dtype, dim: int = 512, hidden: int = 256, experts: int = 128,
               tokens: int = 4096, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(padded (E, C, D), w_gate, w_up, w_down, weight (E, C, 1)) for `tokens` routed top-k by a random router;
    padding rows are zero and carry weight 0, as in the layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    router = torch.randn(dim, experts, generator=g) / dim ** 0.5
    probs, chosen = (x @ router).softmax(-1).topk(top_k, dim=-1)  # (N, k)
    chosen, probs = chosen.reshape(-1), (probs / probs.sum(-1, keepdim=True)).reshape(-1)
    order = chosen.argsort(stable=True)
    counts = torch.bincount(chosen, minlength=experts)
    capacity = int(counts.max())
    rank = torch.arange(order.numel()) - (counts.cumsum(0) - counts)[chosen[order]]  # row within its expert
    slot = chosen[order] * capacity + rank
    padded = torch.zeros(experts * capacity, dim).index_copy_(0, slot, x[order // top_k])
    weight = torch.zeros(experts * capacity).index_copy_(0, slot, probs[order])
    w_gate, w_up = (torch.randn(experts, dim, hidden, generator=g) / dim ** 0.5 for _ in range(2))
    w_down = torch.randn(experts, hidden, dim, generator=g) / hidden ** 0.5
    tensors = (padded.view(experts, capacity, dim), w_gate, w_up, w_down, weight.view(experts, capacity, 1))
    return tuple(t.to(dtype).requires_grad_(True) for t in tensors)


def forward_backward(fn, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def check_same(inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> float:
    """Both give the same output and gradients within the dtype's rounding (the fused element-wise kernel rounds
    once where the plain ops round after each op); returns the largest difference relative to that tensor's
    largest value."""
    ours, ours_grads = forward_backward(PaddedSwiGLU.apply, inputs, grad_out)
    ref, ref_grads = forward_backward(weighted_padded_swiglu_reference, inputs, grad_out)
    tol = 1e-5 if ours.dtype == torch.float32 else 2e-2
    worst = 0.0
    for name, a, b in zip(("output", "d_padded", "d_w_gate", "d_w_up", "d_w_down", "d_weight"), (ours, *ours_grads),
                          (ref, *ref_grads)):
        scale = b.abs().max().clamp_min(1e-12)
        rel = ((a.float() - b.float()).abs().max() / scale).item()
        assert rel <= tol, f"{name}: {rel:.2e} of its largest value (tolerance {tol:g})"
        worst = max(worst, rel)
    return worst


def median_ms(call, repeats: int, warmup: int) -> float:
    """Median milliseconds of `call()` over `repeats` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_case(top_k: int, dtype_name: str, rounds: int, repeats: int, warmup: int, **geometry) -> dict:
    inputs = seed_block(top_k, DTYPES[dtype_name], **geometry)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(inputs[0].dtype)
    worst = check_same(inputs, grad_out)
    passes = {"autograd": [], "mmr1": []}
    for _ in range(rounds):
        for name, fn in (("autograd", weighted_padded_swiglu_reference), ("mmr1", PaddedSwiGLU.apply)):
            passes[name].append(median_ms(lambda: forward_backward(fn, inputs, grad_out), repeats, warmup))
    E, C, D = inputs[0].shape
    rows = int((inputs[4] != 0).sum())
    autograd_ms, ours_ms = (statistics.median(passes[k]) for k in ("autograd", "mmr1"))
    return {"top_k": top_k, "dtype": dtype_name, "experts": E, "capacity": C, "dim": D, "rows": rows,
            "padding_rows_per_row": E * C / rows - 1, "autograd_ms": autograd_ms, "mmr1_ms": ours_ms,
            "speedup": autograd_ms / ours_ms, "passes_ms": passes, "max_rel_grad_diff": worst}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}, torch threads {m['torch_threads']}), "
             f"torch {m['torch']}; host allocator: {m['host_allocator']}; the padded expert block's forward+backward, "
             f"median of {result['rounds']} alternating rounds of {result['repeats']} timed calls "
             f"(after {result['warmup']} warm-up); total {result['total_seconds']:.0f} s.", "",
             "| dtype | top-k | E x C x D (padding per row) | fwd+bwd ms, autograd's backward | fwd+bwd ms, mmr1's | speed-up | "
             "max grad diff (rel.) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['top_k']} | {r['experts']} x {r['capacity']} x {r['dim']} "
                     f"({r['padding_rows_per_row']:.2f}) | {r['autograd_ms']:.1f} | {r['mmr1_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['max_rel_grad_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny geometry, one round: a smoke run")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--top-k", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed host memory for reuse (mmr1.host_memory); default: as started")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    kept = args.allocator == "keep" and keep_freed_memory()
    geometry = dict(dim=32, hidden=16, experts=8, tokens=64) if args.quick else {}
    rounds, repeats = (1, 2) if args.quick else (args.rounds, args.repeats)
    start = time.perf_counter()
    rows = [bench_case(k, d, rounds, repeats, args.warmup, **geometry) for d in args.dtypes for k in args.top_k]
    result = {"command": "python -m benchmarks.moe_backward " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cores": os.cpu_count(), "cpu": platform.machine(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "host_allocator": "freed memory kept (mmr1.host_memory)" if kept else "glibc default"},
              "rounds": rounds, "repeats": repeats, "warmup": args.warmup, "geometry": geometry or "seed",
              "rows": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
