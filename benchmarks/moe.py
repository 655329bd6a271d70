"""Tokens/s of ONE MoE layer: mmr1's MoEFeedForward vs transformers' Mixtral and Qwen2-MoE blocks, same weights.

    HF_HUB_OFFLINE=1 python -m benchmarks.moe --out benchmarks/results/moe_cpu   # seed geometry (~3 min, 2 cores)
    HF_HUB_OFFLINE=1 python -m benchmarks.moe --quick         # tiny smoke run (seconds)
    HF_HUB_OFFLINE=1 python -m benchmarks.moe --device cuda --dtypes bf16 --out benchmarks/results/moe_gpu

Geometry (seed): hidden 512, expert width 256, 128 routed experts, 4096 tokens. For a like-for-like comparison
our layer is configured to transformers' routing (softmax top-k over all experts, num_groups=1; Mixtral
renormalises the top-k weights, Qwen2-MoE does not), the weights are copied across, and the outputs are asserted
to match before anything is timed. Qwen2-MoE's sigmoid-gated shared expert is reproduced exactly by zeroing its
gate (sigmoid(0) = 0.5) and folding the 0.5 into our shared expert's down projection. Every transformers
`experts_implementation` that runs without extra kernel packages is timed (eager loop, batched_mm, grouped_mm;
deepgemm and sonicmoe need CUDA kernel libraries that are not installed). batched_mm gathers one (2H, D) + (D, H) weight copy per (token, expert) pair -- 1.5 MB
each in fp32, 25 GB for 4096 tokens x top-4 -- so it is timed at --batched-tokens, next to our layer at that size.
Neither layer computes a balance loss unless asked (transformers computes its loss at the model level from router
logits; mmr1's MoEAux when the trainer reads it), so the "mmr1" rows time the layer alone, as transformers' rows do,
and the "mmr1 (+ balance losses)" rows time it as a trainer runs it, with its three losses read and backpropagated.
Where our layer runs its fp32 experts on MKL's grouped GEMM (mmr1.cpu_grouped_gemm), a "mmr1 (torch._grouped_mm
experts)" row times the same layer with its experts forced onto torch._grouped_mm -- transformers' kernel -- so
the kernel's own share of the ratio shows in the same run.
Numbers are medians over up to --repeats timed calls after --warmup calls, capped at --budget seconds per
measurement (the eager loop's fwd+bwd takes seconds per call); CPU timings are noisy, compare ratios within one run.
Ours and transformers' fast options are measured in --rounds alternating passes and each reports the median of its
passes, so a drift in the machine's speed during the run hits both sides alike.
The process keeps freed host memory for reuse (`mmr1.host_memory.keep_freed_memory`, both sides alike; `--allocator
default` leaves glibc's defaults): otherwise every call maps its 32-64 MB weight-gradient buffers in afresh and a
third of the run is kernel time spent faulting pages, which side pays more depending on what ran before it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from benchmarks.report import publish
from mmr1 import cpu_grouped_gemm
from mmr1.config import MoEConfig
from mmr1.host_memory import keep_freed_memory
from mmr1.moe import MoEFeedForward, select_experts
from mmr1.moe_kernels import cpu_path, grouped_mm_available, kernel_choice

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # deepgemm / sonicmoe need CUDA kernel packages
SLOW_CALL_S = 3.0
# (model, top-k): Mixtral at the seed's top-2 and at top-4; Qwen2-MoE at its own top-4 (its eager loop is the same
# code as Mixtral's, so a Qwen2-MoE top-2 case would add minutes and little information).
CASES = (("mixtral", 2), ("mixtral", 4), ("qwen2_moe", 4))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Geometry:
    dim: int = 512
    expert_hidden: int = 256
    num_experts: int = 128
    num_groups: int = 16  # the seed's routing, reported as an extra row of ours
    topk_groups: int = 4
    tokens: int = 4096
    batched_tokens: int = 128


def hf_block(model: str, geo: Geometry, top_k: int) -> torch.nn.Module:
    """A transformers MoE block with random weights (its own init is `empty`, so initialise here)."""
    if model == "mixtral":
        cfg = MixtralConfig(hidden_size=geo.dim, intermediate_size=geo.expert_hidden, num_local_experts=geo.num_experts,
                            num_experts_per_tok=top_k, router_jitter_noise=0.0)
        block = MixtralSparseMoeBlock(cfg)
    else:
        cfg = Qwen2MoeConfig(hidden_size=geo.dim, moe_intermediate_size=geo.expert_hidden, num_experts=geo.num_experts,
                             num_experts_per_tok=top_k, shared_expert_intermediate_size=geo.expert_hidden,
                             norm_topk_prob=False)
        block = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.uniform_(-fan_in ** -0.5, fan_in ** -0.5)
        if model == "qwen2_moe":
            block.shared_expert_gate.weight.zero_()  # sigmoid(0) = 0.5: a constant we can fold into our weights
    return block


def ours_like(block: torch.nn.Module, model: str, geo: Geometry, top_k: int, seed_routing: bool = False) -> MoEFeedForward:
    """MoEFeedForward with transformers' routing and the block's weights (their gate_up_proj (E, 2H, D) is
    [gate; up] in nn.Linear layout, ours is w_gate/w_up (E, D, H); their down_proj (E, D, H), ours (E, H, D))."""
    groups = (geo.num_groups, geo.topk_groups) if seed_routing else (1, 1)
    cfg = MoEConfig(num_experts=geo.num_experts, num_groups=groups[0], topk_groups=groups[1], top_k=top_k,
                    expert_hidden=geo.expert_hidden, num_shared_experts=int(model == "qwen2_moe"),
                    score_func="softmax", norm_topk_prob=model == "mixtral")
    ours = MoEFeedForward(geo.dim, cfg)
    H = geo.expert_hidden
    with torch.no_grad():
        ours.router.gate.weight.copy_(block.gate.weight)
        gate_up = block.experts.gate_up_proj
        ours.experts.w_gate.copy_(gate_up[:, :H].transpose(1, 2))
        ours.experts.w_up.copy_(gate_up[:, H:].transpose(1, 2))
        ours.experts.w_down.copy_(block.experts.down_proj.transpose(1, 2))
        if model == "qwen2_moe":
            shared = block.shared_expert
            ours.shared.gate_proj.weight.copy_(shared.gate_proj.weight)
            ours.shared.up_proj.weight.copy_(shared.up_proj.weight)
            ours.shared.down_proj.weight.copy_(0.5 * shared.down_proj.weight)
    return ours


class WithBalanceLosses(torch.nn.Module):
    """Our layer as a trainer runs it: its balance losses (switch/GShard, sequence-wise, z-loss) are read and
    backpropagated too. Read or not is the only difference: MoEAux computes them when first read, and transformers'
    block leaves its load-balancing loss to the model (from router logits, when asked)."""

    def __init__(self, layer: MoEFeedForward):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux = self.layer(x)
        losses = aux.aux_loss + aux.seq_aux_loss + aux.z_loss
        return out + (0.0 * losses).to(out.dtype)  # zero-weighted: the output is unchanged, the backward runs


class MKLOwnThreads(torch.nn.Module):
    """Our layer with its MKL batches left to MKL's own threading instead of one slice per OpenMP thread
    (mmr1.cpu_threaded_batch): the threshold is raised for this layer's forward and restored when its backward
    reaches the input (the last gradient it computes), or right after a forward without autograd."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def _restore(self, *_):
        cpu_grouped_gemm.MIN_GEMMS_PER_THREAD = self._saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._saved, cpu_grouped_gemm.MIN_GEMMS_PER_THREAD = cpu_grouped_gemm.MIN_GEMMS_PER_THREAD, 2**31
        if not (torch.is_grad_enabled() and x.requires_grad):
            try:
                return run_layer(self.layer, x)
            finally:
                self._restore()
        x = x.view_as(x)
        x.register_hook(self._restore)
        return run_layer(self.layer, x)


def run_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out  # ours returns (out, aux)


def assert_same_outputs(ours: MoEFeedForward, block: torch.nn.Module, x: torch.Tensor) -> float:
    """Outputs must match on every token both routers send to the same experts (in bf16 their router rounds
    its logits to bf16, ours computes them in fp32, so a few near-ties may flip); returns that share."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        ours_idx = ours.router(flat).indices.sort(dim=-1).values
        theirs_idx = block.gate(flat)[2].sort(dim=-1).values
        same = (ours_idx == theirs_idx).all(dim=-1)  # (N,)
        a, b = run_layer(ours, x).reshape(flat.shape), run_layer(block, x).reshape(flat.shape)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    share = same.float().mean().item()
    assert share > (0.999 if x.dtype == torch.float32 else 0.9), f"routing agrees on only {share:.3%} of tokens"
    torch.testing.assert_close(a[same].float(), b[same].float(), atol=tol, rtol=tol)
    return share


def median_seconds(layer: torch.nn.Module, x: torch.Tensor, backward: bool, repeats: int, warmup: int,
                   budget_s: float) -> tuple[float, int]:
    """Median wall time of one forward (no_grad) or forward+backward call, and how many calls it is over.

    Stops early once the timed calls add up to `budget_s` (at least one is timed); a warm-up call slower than
    SLOW_CALL_S is timed too -- at that length warm-up effects are noise -- so the eager loop (tens of seconds
    per fwd+bwd at 4096 tokens) doesn't dominate the run."""
    params = list(layer.parameters())
    grad_out = torch.randn_like(x)
    times, calls = [], 0
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # time the kernels, not their launch
    while len(times) < repeats and not (times and sum(times) > budget_s):
        for p in params:
            p.grad = None
        x.grad = None
        sync()
        start = time.perf_counter()
        if backward:
            run_layer(layer, x).backward(grad_out)
        else:
            with torch.no_grad():
                run_layer(layer, x)
        sync()
        elapsed = time.perf_counter() - start
        calls += 1
        if calls > warmup or elapsed > SLOW_CALL_S:
            times.append(elapsed)
    return statistics.median(times), len(times)


def measure(layer, x, repeats, warmup, budget_s) -> dict:
    n = x.shape[0] * x.shape[1]
    fb, n_fb = median_seconds(layer, x, True, repeats, warmup, budget_s)
    f, n_f = median_seconds(layer, x, False, repeats, warmup, budget_s)
    return {"tokens": n, "fwd_bwd_s": fb, "fwd_s": f, "fwd_bwd_tok_s": n / fb, "fwd_tok_s": n / f,
            "timed_calls": [n_fb, n_f]}


class HFImplementation(torch.nn.Module):
    """transformers' block with one `experts_implementation` (its config is read at every call, so each timed
    call sets its own: the implementations can be measured in alternation on one block)."""

    def __init__(self, block: torch.nn.Module, impl: str):
        super().__init__()
        self.block, self.impl = block, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.block.experts.config._experts_implementation = self.impl
        return run_layer(self.block, x)


def measure_together(layers: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, repeats: int, warmup: int,
                     budget_s: float) -> dict[str, dict]:
    """measure() of each layer in `rounds` alternating passes, each layer's times the median of its passes: a
    drift in the machine's speed (this CPU's moves by 20 % over minutes) hits every layer alike."""
    passes: dict[str, list[dict]] = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            passes[name].append(measure(layer, x, repeats, warmup, budget_s))
    n = x.shape[0] * x.shape[1]
    out = {}
    for name, results in passes.items():
        fb = statistics.median(r["fwd_bwd_s"] for r in results)
        f = statistics.median(r["fwd_s"] for r in results)
        out[name] = {"tokens": n, "fwd_bwd_s": fb, "fwd_s": f, "fwd_bwd_tok_s": n / fb, "fwd_tok_s": n / f,
                     "timed_calls": [sum(r["timed_calls"][i] for r in results) for i in (0, 1)], "rounds": rounds}
    return out


def bench_case(model: str, dtype_name: str, top_k: int, geo: Geometry, repeats: int, warmup: int,
               budget_s: float, device: str = "cpu", rounds: int = 3) -> list[dict]:
    """All rows of one (model, dtype, top-k): ours and each transformers implementation, with ratios. Ours and
    transformers' grouped_mm (and, at the small size, batched_mm) are measured in alternation; the eager loop,
    seconds per call, once."""
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    block = hf_block(model, geo, top_k).to(device, dtype)
    ours = ours_like(block, model, geo, top_k).to(device, dtype)
    x = torch.randn(1, geo.tokens, geo.dim, dtype=dtype, device=device, requires_grad=True)
    x_small = x.detach()[:, : geo.batched_tokens].clone().requires_grad_(True)
    block.experts.config._experts_implementation = "eager"
    agree = assert_same_outputs(ours, block, x)
    for impl in HF_IMPLEMENTATIONS:
        block.experts.config._experts_implementation = impl
        assert_same_outputs(ours, block, x_small if impl == "batched_mm" else x)
    base = {"model": model, "dtype": dtype_name, "top_k": top_k}
    full = {"mmr1": ours, "mmr1 (+ balance losses)": WithBalanceLosses(ours)}
    if model == "mixtral":  # the seed's group-limited routing (16 groups of 8, best 4 groups): same expert cost
        full["mmr1 (seed routing)"] = ours_like(block, model, geo, top_k, seed_routing=True).to(device, dtype)
    if experts_kernel(ours, x) == "mkl":  # the same layer with torch._grouped_mm experts
        full["mmr1 (torch._grouped_mm experts)"] = ours_like(block, model, geo, top_k).to(device, dtype)
        full["mmr1 (torch._grouped_mm experts)"].experts.kernel = "grouped"
        if cpu_grouped_gemm.thread_slices() is not None:
            full["mmr1 (MKL's own threads)"] = MKLOwnThreads(ours)
    full["grouped_mm"] = HFImplementation(block, "grouped_mm")
    timed = measure_together(full, x, rounds, repeats, warmup, budget_s)
    timed["eager"] = measure(HFImplementation(block, "eager"), x, repeats, warmup, budget_s)
    small = measure_together({"mmr1": ours, "batched_mm": HFImplementation(block, "batched_mm")}, x_small, rounds,
                             repeats, warmup, budget_s)
    rows = [{**base, "impl": name, **timed[name]} for name in full if name != "grouped_mm"]
    rows[0]["routing_agreement"] = agree
    for impl, mine in (("eager", timed["mmr1"]), ("grouped_mm", timed["mmr1"]), ("batched_mm", small["mmr1"])):
        theirs = (small if impl == "batched_mm" else timed)[impl]
        if impl == "batched_mm":
            rows.append({**base, "impl": "mmr1", **mine})
        rows.append({**base, "impl": impl, **theirs,
                     "ours_over_theirs_fwd_bwd": mine["fwd_bwd_tok_s"] / theirs["fwd_bwd_tok_s"],
                     "ours_over_theirs_fwd": mine["fwd_tok_s"] / theirs["fwd_tok_s"]})
    return rows


def experts_kernel(layer: MoEFeedForward, x: torch.Tensor) -> str:
    """The kernel moe_kernels.kernel_choice picks for this layer's experts on the load its router gives x."""
    with torch.no_grad():
        indices = layer.router(x.reshape(-1, x.shape[-1])).indices.reshape(-1)
    counts = torch.bincount(indices, minlength=layer.cfg.num_experts)
    return kernel_choice(x.device, x.dtype, counts, indices.numel(), *layer.experts.parameters())[0]


def dynamic_activation_savings(geo: Geometry, thresholds=(0.3, 0.5), logit_scales=(1.0, 8.0, 32.0),
                               min_k: int = 2, max_k: int = 4) -> list[dict]:
    """Mean experts per token under dynamic activation vs fixed top-`max_k`, and the expert FLOPs saved.

    mmr1's own routing (`select_experts` with `dynamic_threshold`, softmax over all experts) on the router
    probabilities of random inputs: a token takes experts in order of probability until their sum reaches the
    threshold, at least `min_k` and at most `max_k`. An untrained router is nearly uniform over 128 experts
    (always max_k), so sharper routers are emulated by scaling the router logits.
    """
    torch.manual_seed(0)
    gate = torch.nn.Linear(geo.dim, geo.num_experts, bias=False)
    x = torch.randn(geo.tokens, geo.dim)
    with torch.no_grad():
        logits = gate(x)
    flops_per_expert = 3 * 2 * geo.dim * geo.expert_hidden  # three matmuls per (token, expert), forward
    rows = []
    for scale in logit_scales:
        probs = (logits * scale).softmax(dim=-1)
        for threshold in thresholds:
            cfg = MoEConfig(num_experts=geo.num_experts, num_groups=1, topk_groups=1, top_k=max_k,
                            expert_hidden=geo.expert_hidden, dynamic_threshold=threshold, min_k=min_k, max_k=max_k)
            _, indices = select_experts(probs, cfg)
            mean_k = (indices >= 0).sum(dim=-1).float().mean().item()
            rows.append({"logit_scale": scale, "threshold": threshold, "mean_experts_per_token": mean_k,
                         "expert_gflops_per_1k_tokens": 1e3 * mean_k * flops_per_expert / 1e9,
                         "saved_vs_top4": 1 - mean_k / max_k})
    return rows


def kernel_used(device: torch.device, dtype: torch.dtype) -> str:
    """The expert kernel mmr1.moe_kernels.grouped_swiglu picks on `device` for `dtype` (balanced load)."""
    if device.type == "cpu":
        return cpu_path(dtype)
    return "grouped_mm" if grouped_mm_available(device, dtype) else "padded_bmm"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}, torch threads {m['torch_threads']}), "
             f"timed on: {m.get('device', 'cpu')}; torch {m['torch']}, transformers {m['transformers']}; mmr1 kernel per dtype "
             f"{result['mmr1_kernel']}; median over <= {result['repeats']} timed calls after {result['warmup']} "
             f"warm-up (<= {result['budget_s']:g} s each), ours and transformers' grouped_mm / batched_mm in "
             f"{result.get('rounds', 1)} alternating rounds (median of the rounds); host allocator: "
             f"{m.get('host_allocator', 'glibc default')}; total "
             f"{result['total_seconds']:.0f} s.", "",
             ]
    lines += ["| model | dtype | top-k | impl | tokens | fwd+bwd tok/s | fwd tok/s | ours/theirs fwd+bwd | ours/theirs fwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = lambda key: f"{r[key]:.2f}x" if key in r else ""  # noqa: E731
        lines.append(f"| {r['model']} | {r['dtype']} | {r['top_k']} | {r['impl']} | {r['tokens']} | "
                     f"{r['fwd_bwd_tok_s']:,.0f} | {r['fwd_tok_s']:,.0f} | {ratio('ours_over_theirs_fwd_bwd')} | "
                     f"{ratio('ours_over_theirs_fwd')} |")
    lines += ["", "Dynamic activation (threshold rule on random-input router probabilities, see JSON note):", "",
              "| logit scale | threshold | mean experts/token | expert GFLOPs per 1k tokens | saved vs top-4 |",
              "|---|---|---|---|---|"]
    for d in result["dynamic_activation"]["rows"]:
        lines.append(f"| {d['logit_scale']:g} | {d['threshold']:g} | {d['mean_experts_per_token']:.2f} | "
                     f"{d['expert_gflops_per_1k_tokens']:.2f} | {d['saved_vs_top4']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny geometry, fp32, top-2 only: a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating passes of ours vs transformers' fast options")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--top-k", nargs="+", type=int, default=[2, 4], help="filters CASES")
    parser.add_argument("--models", nargs="+", default=["mixtral", "qwen2_moe"], choices=["mixtral", "qwen2_moe"])
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls per measurement")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batched-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is there")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: glibc keeps freed host memory for reuse (mmr1.host_memory); default: as started")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    allocator = "glibc default"
    if args.allocator == "keep":
        allocator = ("freed memory kept (mmr1.host_memory.keep_freed_memory)" if keep_freed_memory()
                     else "default (not glibc)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    geo = Geometry(tokens=args.tokens, batched_tokens=args.batched_tokens)
    if args.quick:
        geo = Geometry(dim=64, expert_hidden=32, num_experts=16, num_groups=4, topk_groups=2, tokens=256,
                       batched_tokens=32)
        args.repeats, args.warmup, args.rounds, args.dtypes = 1, 1, 1, ["fp32"]
    cases = [(m, k) for m, k in CASES if m in args.models and k in args.top_k]
    if args.quick:
        cases = [(m, 2) for m in args.models]

    start = time.perf_counter()
    rows = []
    for dtype_name in args.dtypes:
        for model, top_k in cases:
            rows += bench_case(model, dtype_name, top_k, geo, args.repeats, args.warmup, args.budget, args.device,
                               args.rounds)
            print(f"done {model} {dtype_name} top-{top_k} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    result = {
        "command": "python -m benchmarks.moe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "gpu": torch.cuda.is_available(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "host_allocator": allocator},
        "geometry": vars(geo), "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget,
        "rounds": args.rounds,
        "mmr1_kernel": {d: kernel_used(device, DTYPES[d]) for d in args.dtypes},
        "rows": rows,
        "dynamic_activation": {"note": dynamic_activation_savings.__doc__.split("\n\n")[1].strip(),
                               "rows": dynamic_activation_savings(geo)},
        "total_seconds": time.perf_counter() - start,
    }
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
