"""Long context on CPU: attention cost of full vs sliding vs hybrid, and KV-cache memory / decode speed.

    HF_HUB_OFFLINE=1 python -m benchmarks.long_context --out benchmarks/results/long_context   # ~13 min on 2 shared cores
    HF_HUB_OFFLINE=1 python -m benchmarks.long_context --quick       # tiny smoke run (seconds)

1. Attention alone (no projections), batch 1, 8 heads of 64 dims, window 512, fp32, at 1K/4K/16K tokens forward
   and forward+backward, and 64K forward:
     full            F.scaled_dot_product_attention(is_causal=True), the fastest full path on CPU (flash kernel)
     sliding         mmr1.local_attention blocked window attention, all 8 heads (SelfAttention kind="sliding")
     hybrid          4 heads sliding + 4 heads full causal (SelfAttention kind="hybrid")
     hybrid+tokens   4 heads sliding + 4 heads sliding plus designated global tokens (BOS and one marker every
                     256 tokens; SelfAttention kind="hybrid" with global_tokens)
   The sliding/hybrid rows call SelfAttention's own attention core on the same q/k/v.
   Time: median of REPEATS[L] calls after a first call (5 at 1K, 3 at 4K, 1 at 16K; at 64K the single first
   call is the time). Every case runs with --threads torch threads (default 1: the 2-core machine is shared, and
   one thread per process keeps the ratios stable under contention).
   Peak memory: each case runs in a fresh subprocess; the kernel's peak-RSS mark is reset (`5` written to
   /proc/self/clear_refs) after the inputs exist, and peak = VmHWM after the first call - VmRSS before it: the
   resident memory the call itself needed (its outputs and, for fwd+bwd, the gradients included).
2. Decoding at 16K context with an R1 backbone (dim 512, 8 heads over 2 KV heads, 4 layers, dense FFN): all-full
   vs configs/profiles/long_context.yaml (3 of 4 layers sliding, window 512). The context is prefilled in chunks of
   --chunk tokens through the KV cache; then --decode-steps greedy tokens are timed one by one (median step).
   KV bytes = KVCache.nbytes(): every K/V tensor the cache allocated (full buffers + ring buffers).
CPU timings on a shared machine are noisy; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from benchmarks.report import publish

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "configs" / "profiles" / "long_context.yaml"
PATTERNS = ("full", "sliding", "hybrid", "hybrid+tokens")
HEADS, HEAD_DIM, WINDOW, MARKER_EVERY = 8, 64, 512, 256
REPEATS = {1024: 5, 4096: 3, 16384: 1, 65536: 0}  # timed calls after the first; 0: the first call is timed


# ---- 1. attention kernels (one subprocess per case) ----------------------------------------------------------

def attention_fn(pattern: str, L: int):
    """The attention core of `pattern` as a function of (q, k, v), each (1, HEADS, L, HEAD_DIM)."""
    from mmr1.attention import SelfAttention

    if pattern == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kind = "sliding" if pattern == "sliding" else "hybrid"
    attn = SelfAttention(HEADS * HEAD_DIM, HEADS, HEADS, kind=kind, window=WINDOW, local_heads=HEADS // 2,
                         global_tokens=pattern == "hybrid+tokens")
    if pattern == "hybrid+tokens":
        marks = torch.zeros(1, L, dtype=torch.bool)
        marks[:, ::MARKER_EVERY] = True  # <bos> at 0 and a modality marker every 256 tokens
        return lambda q, k, v: attn._local_global_tokens(q, k, v, None, None, None, marks)
    return lambda q, k, v: attn._local_global(q, k, v, None, None, None)


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(pattern: str, L: int, backward: bool, repeats: int) -> dict:
    """In a fresh process: peak memory of the first call, then the median time of `repeats` more."""
    torch.manual_seed(0)
    fn = attention_fn(pattern, L)
    q, k, v = (torch.randn(1, HEADS, L, HEAD_DIM, requires_grad=backward) for _ in range(3))
    grad = torch.randn(1, HEADS, L, HEAD_DIM) if backward else None

    def call():
        if backward:
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _proc_status_kb("VmRSS")
    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    peak_mb = (_proc_status_kb("VmHWM") - before) / 1024
    times = [] if repeats else [first_s]
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"pattern": pattern, "tokens": L, "mode": "fwd+bwd" if backward else "fwd",
            "seconds": statistics.median(times), "first_call_s": first_s, "timed_calls": len(times),
            "peak_mb": peak_mb}


def kernel_rows(lengths: list[int], long_fwd: list[int], repeats: dict[int, int], threads: int) -> list[dict]:
    rows = []
    cases = [(L, bwd) for L in lengths for bwd in (False, True)] + [(L, False) for L in long_fwd]
    for L, bwd in cases:
        for pattern in PATTERNS:
            spec = json.dumps({"pattern": pattern, "L": L, "backward": bwd, "repeats": repeats.get(L, 1),
                               "threads": threads})
            out = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--worker", spec], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {row['mode']:8s} {L:6d} {pattern:14s} {row['seconds']:8.3f} s  {row['peak_mb']:8.1f} MB",
                  flush=True)
    full = {(r["tokens"], r["mode"]): r["seconds"] for r in rows if r["pattern"] == "full"}
    for r in rows:
        r["speedup_vs_full"] = full[(r["tokens"], r["mode"])] / r["seconds"]
    return rows


def growth_exponents(rows: list[dict], lo: int) -> dict:
    """t ~ L^e from `lo` tokens to the longest length measured in that mode: e ~ 2 is quadratic, ~ 1 linear."""
    t = {(r["pattern"], r["mode"], r["tokens"]): r["seconds"] for r in rows}
    out = {}
    for p in PATTERNS:
        for m in ("fwd", "fwd+bwd"):
            hi = max((L for (pp, mm, L) in t if pp == p and mm == m), default=lo)
            if hi > lo and (p, m, lo) in t:
                out[f"{p} {m} ({lo}->{hi})"] = math.log(t[(p, m, hi)] / t[(p, m, lo)]) / math.log(hi / lo)
    return out


# ---- 2. decoding with the KV cache ---------------------------------------------------------------------------

def profile_backbone() -> dict:
    return yaml.safe_load(PROFILE.read_text())["model"]["backbone"]


def decode_model(long_context: bool, max_seq_len: int):
    from mmr1.backbone import R1Model
    from mmr1.config import R1Config, RopeScaling

    fields = dict(vocab_size=512, dim=HEADS * HEAD_DIM, n_layers=4, n_heads=HEADS, n_kv_heads=2, ffn_hidden=1376,
                  max_seq_len=max_seq_len)
    if long_context:
        profile = {k: v for k, v in profile_backbone().items() if k != "max_seq_len"}
        if profile.get("rope_scaling"):
            profile["rope_scaling"] = RopeScaling(**profile["rope_scaling"])
        fields.update(profile)
    torch.manual_seed(0)
    return R1Model(R1Config(**fields)).eval()


@torch.inference_mode()
def decode_row(long_context: bool, context: int, steps: int, chunk: int) -> dict:
    from mmr1.kv_cache import KVCache

    model = decode_model(long_context, max_seq_len=max(context + steps, 32768))
    ids = torch.randint(1, 512, (1, context), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model.cfg, 1, max_len=context + steps)
    start = time.perf_counter()
    for lo in range(0, context, chunk):
        logits = model(ids[:, lo:lo + chunk], cache=cache).logits
    prefill_s = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])  # the first step may still allocate
    return {"model": "long_context profile" if long_context else "all full", "context": context,
            "layers": model.cfg.layer_kinds(), "window": model.cfg.window, "kv_cache_bytes": cache.nbytes(),
            "decode_tok_s": 1.0 / step, "decode_step_ms": 1000 * step, "prefill_s": prefill_s,
            "prefill_tok_s": context / prefill_s}


# ---- report --------------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def markdown(result: dict) -> str:
    lines = ["# Long-context attention and KV cache (CPU)", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. {result['geometry']}", "",
             "## Attention: time (median) and peak memory", "",
             "| mode | tokens | pattern | seconds | speedup vs full | peak MB |", "|---|---|---|---|---|---|"]
    for r in result["attention"]:
        lines.append(f"| {r['mode']} | {r['tokens']} | {r['pattern']} | {r['seconds']:.3f} | "
                     f"{r['speedup_vs_full']:.2f}x | {r['peak_mb']:.0f} |")
    lines += ["", "Growth exponent e of time ~ L^e (2 = quadratic, 1 = linear):",
              "", "| pattern / mode | e |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["growth_exponents"].items()]
    lines += ["", f"## Decoding at {result['decode'][0]['context']} tokens of context", "",
              "| model | layers | KV cache MB | decode tok/s | prefill tok/s |", "|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['model']} | {' '.join(r['layers'])} | {r['kv_cache_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} |")
    lines += ["", "## Targets", ""] + [f"- {t['name']}: {t['value']} -> **{'met' if t['met'] else 'NOT met'}**"
                                       for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(attention: list[dict], decode: list[dict], at: int) -> list[dict]:
    out = []
    for pattern in PATTERNS[1:]:
        row = next((r for r in attention if r["pattern"] == pattern and r["tokens"] == at and r["mode"] == "fwd+bwd"),
                   None)
        if row:
            out.append({"name": f"{pattern} fwd+bwd at {at} >= 4x faster than full",
                        "value": f"{row['speedup_vs_full']:.2f}x", "met": row["speedup_vs_full"] >= 4.0})
    full, profile = decode
    saving = 1 - profile["kv_cache_bytes"] / full["kv_cache_bytes"]
    out.append({"name": "KV cache memory -40 % or better", "value": f"{-100 * saving:.0f} %", "met": saving >= 0.4})
    out.append({"name": "decode not slower", "value": f"{profile['decode_tok_s']:.1f} vs {full['decode_tok_s']:.1f} "
                "tok/s", "met": profile["decode_tok_s"] >= full["decode_tok_s"]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.json and <out>.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per forward)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(run_case(spec["pattern"], spec["L"], spec["backward"], spec["repeats"])))
        return

    if args.quick:
        lengths, long_fwd, context, steps = [1024, 2048], [4096], 2048, 8
    else:
        lengths, long_fwd, context, steps = [1024, 4096, 16384], [65536], args.context, args.decode_steps
    command = "python -m benchmarks.long_context " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"attention: {HEADS} heads x {HEAD_DIM}, window {WINDOW}", flush=True)
    attention = kernel_rows(lengths, long_fwd, REPEATS, args.threads)
    print(f"decode at {context} tokens", flush=True)
    decode = [decode_row(False, context, steps, args.chunk), decode_row(True, context, steps, args.chunk)]
    for r in decode:
        print(f"  {r['model']:22s} KV {r['kv_cache_bytes'] / 2**20:7.1f} MB  {r['decode_tok_s']:6.1f} tok/s",
              flush=True)
    result = {"command": command, "machine": machine(),
              "geometry": f"Attention: batch 1, {HEADS} heads x {HEAD_DIM}, window {WINDOW}, fp32; "
                          f"hybrid = {HEADS // 2} local + {HEADS // 2} global heads; +tokens: global heads see "
                          f"their window + <bos> and one marker per {MARKER_EVERY} tokens.",
              "attention": attention, "growth_exponents": growth_exponents(attention, lengths[-2]), "decode": decode,
              "targets": targets(attention, decode, lengths[-1])}
    publish(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
