"""What a lent GPU should check and measure, in one short run (`benchmarks/gpu_run.sh` calls it).

    HF_HUB_OFFLINE=1 python -m benchmarks.gpu_checks --device cuda --out benchmarks/results/gpu_checks
    HF_HUB_OFFLINE=1 python -m benchmarks.gpu_checks --device cpu --quick     # the same code on CPU (a test runs it)

Correctness on the device, each asserted (a failure stops the run and names the check):
  kernels  grouped_swiglu (torch._grouped_mm in bf16 on CUDA, padded bmm in fp32) equals the per-expert loop,
           outputs and all gradients;
  engine   a mixed batch of text, image, audio and image+audio requests: mmr1.Engine greedy on the device equals
           generate() on the device token for token (fp32; packed steps and padded groups), and INT8 KV runs.
Measured side by side on the device (issue 5 items 2 and 6; on CPU they are in benchmarks/results/engine.md):
  engine steps with torch's default attention backends (cuDNN first on Hopper) vs mmr1.sdpa's (no cuDNN),
  continuous vs static batching of the same engine on the 200-request log-normal mix (bf16 137 MB model), and
  configs/profiles/low_latency.yaml vs the default and the seed's baseline (INT8 KV + static) P99 under load.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import engine_cases as cases
from benchmarks.report import publish
from mmr1.config import MoEConfig, R1Config
from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.generation import generate_with_inputs
from mmr1.model import MultimodalConfig, MultimodalR1
from mmr1.moe_kernels import grouped_swiglu, loop_swiglu
from mmr1.sdpa import sdpa as mmr1_sdpa


def check_kernels(device: str, experts: int = 128, max_rows: int = 128) -> dict:
    """`experts` experts of width 256 over hidden 512 (the seed's shape), 0..max_rows rows each: fast path ==
    loop in fp32 and bf16."""
    torch.manual_seed(0)
    out = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        counts = torch.randint(0, max_rows, (experts,), device=device)
        x = torch.randn(int(counts.sum()), 512, device=device, dtype=dtype, requires_grad=True)
        weights = [(torch.randn(experts, a, b, device=device) * a ** -0.5).to(dtype).requires_grad_()
                   for a, b in ((512, 256), (512, 256), (256, 512))]
        grad_out = torch.randn(x.shape[0], 512, device=device, dtype=dtype)
        results = []
        for fn in (grouped_swiglu, loop_swiglu):
            y = fn(x, counts, *weights)
            grads = torch.autograd.grad(y, [x, *weights], grad_out)
            results.append((y, grads))
        (y, grads), (ref, ref_grads) = results
        for a, b in zip((y, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(a.float(), b.float(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
        out[str(dtype).removeprefix("torch.")] = "fast path == loop (output and 4 gradients)"
    return out


def tiny_multimodal(device: str) -> MultimodalR1:
    backbone = R1Config(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                        cross_attn_layers=[0, 1], cross_attn_heads=2,
                        moe=MoEConfig(num_experts=8, num_groups=2, topk_groups=1, top_k=2, expert_hidden=32))
    vit = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0}}
    w2v = {"max_seconds": 1.0, "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "intermediate_size": 64, "conv_dim": [16, 16], "conv_kernel": [10, 3],
                                          "conv_stride": [5, 2], "num_conv_pos_embeddings": 8,
                                          "num_conv_pos_embedding_groups": 2}}
    config = MultimodalConfig.from_dict({"backbone": backbone, "encoders": {
        "image": {"name": "clip_vit", "kwargs": vit, "projector": {"kind": "mlp"}},
        "audio": {"name": "wav2vec2", "kwargs": w2v, "projector": {"kind": "mlp"}}}})
    torch.manual_seed(0)
    model = MultimodalR1(config).eval()
    model.backbone.init_weights(std=0.3)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.cross_attn.gate.fill_(0.8)  # open the gates so the modalities change the answers
    return model.to(device)


def check_engine(device: str) -> dict:
    model = tiny_multimodal(device)
    rng = np.random.default_rng(0)
    kinds = [("image",), ("audio",), ("image", "audio"), (), ("audio", "image"), (), ("image",)]
    requests = []
    for i, kind in enumerate(kinds):
        raw = {"image": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
               "audio": (rng.standard_normal(4000 + 1000 * i).astype(np.float32), 16000)}
        prompt = [1 + i, 3, *range(10, 10 + 3 * i), 4]
        requests.append({"prompt": prompt, **{k: raw[k] for k in kind},
                         "sampling": SamplingParams(max_new_tokens=6 + i % 4)})
    refs = [generate_with_inputs(model, r["prompt"], {k: r[k] for k in ("image", "audio") if k in r},
                                 r["sampling"].max_new_tokens) for r in requests]
    assert len({tuple(r) for r in refs}) > 1, "engine check: the references are all alike; the check proves little"
    out = {}
    for name, cfg in {"packed": EngineConfig(block_size=4, max_batch=4, max_num_batched_tokens=16, prefill_chunk=8),
                      "padded": EngineConfig(block_size=4, max_batch=4, max_num_batched_tokens=16, prefill_chunk=8,
                                             packed_steps=False),
                      "int8": EngineConfig(block_size=4, max_batch=4, kv_cache_dtype="int8")}.items():
        engine = Engine(model, config=cfg)
        try:
            outs = [o.token_ids for o in engine.generate(requests)]
            engine.check_no_leaks()
        finally:
            engine.close()
        if name == "int8":
            same = sum(a == b for o, r in zip(outs, refs) for a, b in zip(o, r)) / sum(map(len, refs))
            out[name] = f"ran; greedy agreement with fp32 reference {same:.0%}"
        else:
            assert outs == refs, f"engine check ({name}): engine output != generate() on {device}"
            out[name] = f"{len(requests)} requests == generate() token for token"
    # prefix caching: the same requests again reuse the first round's blocks (text-only ones for sure; image/audio
    # ones when the encoders give the same tokens again) and still equal generate()
    engine = Engine(model, config=EngineConfig(block_size=4, max_batch=4, max_num_batched_tokens=16, prefill_chunk=8))
    try:
        first = [o.token_ids for o in engine.generate(requests)]
        again = [o.token_ids for o in engine.generate(requests)]
        engine.check_no_leaks()
    finally:
        engine.close()
    hits = engine.scheduler.prefix_hit_tokens
    assert first == refs and again == refs and hits > 0, f"prefix caching check on {device}: hits {hits}"
    out["prefix_cache"] = f"{len(requests)} requests twice == generate(); {hits} prompt tokens reused"
    return out


@contextlib.contextmanager
def torch_default_sdpa():
    """Every module that calls mmr1.sdpa.sdpa calls F.scaled_dot_product_attention instead: torch's own backend
    choice (cuDNN first for masked attention on Hopper), the way the engine ran before mmr1.sdpa."""
    ours = ("mmr1", "encoders", "fusion", "data_pipelines", "benchmarks")  # other modules may warn on getattr
    users = [m for name, m in list(sys.modules.items())
             if name.split(".")[0] in ours and name != "mmr1.sdpa" and getattr(m, "sdpa", None) is mmr1_sdpa]
    for module in users:
        module.sdpa = F.scaled_dot_product_attention
    try:
        yield
    finally:
        for module in users:
            module.sdpa = mmr1_sdpa


def sdpa_backends(device: str, n_requests: int, weight_bound: bool) -> dict:
    """Continuous engine steps with torch's default SDPA backends vs mmr1.sdpa's (no cuDNN on CUDA). Each timed
    run gets request lengths neither has seen (a server keeps seeing new ones); default runs first, so any plan it
    builds cannot help ours."""
    model = (cases.weight_bound_model() if weight_bound else cases.serving_model()).to(device)
    res = {"model": "bf16 137 MB" if weight_bound else "fp32 13 MB", "requests": n_requests}
    for name, context in (("torch_default", torch_default_sdpa), ("mmr1", contextlib.nullcontext)):
        with context():
            cases.run_offline(Engine(model, config=EngineConfig(max_batch=16)), cases.mixed_workload(8, seed=1))
            run = cases.run_offline(Engine(model, config=EngineConfig(max_batch=16)),
                                    cases.mixed_workload(n_requests, seed=2))
        res[name] = {**run, "ms_per_step": 1000 * run["wall_s"] / run["steps"]}
    res["speedup"] = res["torch_default"]["wall_s"] / res["mmr1"]["wall_s"]
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run of the same code")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    start = time.perf_counter()
    result = {"command": "python -m benchmarks.gpu_checks " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                          else platform.machine(), "torch": torch.__version__}}
    stages = {
        "kernels": lambda: check_kernels(args.device, *((16, 8) if args.quick else (128, 128))),
        "engine": lambda: check_engine(args.device),
        "sdpa_backends": lambda: sdpa_backends(args.device, 16 if args.quick else 48, weight_bound=not args.quick),
        # --quick: 16 requests on the 13 MB fp32 serving model instead of 200 on the 137 MB bf16 one
        "continuous_vs_static": lambda: cases.continuous_vs_static(16 if args.quick else 200, 16,
                                                                   weight_bound=not args.quick, device=args.device),
        "low_latency": lambda: cases.low_latency_vs_default(16 if args.quick else 120, 0.7, device=args.device),
    }
    for name, stage in stages.items():
        result[name] = stage()
        result["total_seconds"] = time.perf_counter() - start
        print(f"{name} done ({result['total_seconds']:.0f}s)", file=sys.stderr)
        if args.out is not None:  # what is done is kept, should a later stage overrun the device's time
            publish(result, markdown(result), args.out)
    if args.out is None:
        publish(result, markdown(result), None)
    return result


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}` on {r['machine']['device']}, torch {r['machine']['torch']}; "
             f"{r['total_seconds']:.0f} s.", "", "| check | result |", "|---|---|"]
    lines += [f"| kernels {k} | {v} |" for k, v in r.get("kernels", {}).items()]
    lines += [f"| engine {k} | {v} |" for k, v in r.get("engine", {}).items()]
    if "continuous_vs_static" in r:
        c = r["continuous_vs_static"]
        lines += ["", "| measurement | ours | baseline | ratio | target |", "|---|---|---|---|---|",
                  f"| continuous vs static, {c['requests']} requests, {c['model']}, output tok/s (one-token-per-row "
                  f"bound {c['ideal_steps']['ratio']:.2f}x) | {c['continuous']['tok_s']:.0f} | "
                  f"{c['static']['tok_s']:.0f} | {c['throughput_ratio']:.2f}x | >= 3x |",
                  f"| packed steps vs padded groups (continuous) | {c['continuous']['tok_s']:.0f} | "
                  f"{c['continuous_padded_groups']['tok_s']:.0f} | {c['packed_gain']:.2f}x | |"]
    lo = r.get("low_latency")
    for base, label in (("default", "default"), ("throughput_int8", "throughput.yaml"),
                        ("seed_baseline", "seed baseline (INT8 KV + static)")) if lo else ():
        lines.append(f"| P99 latency s, low_latency.yaml vs {label} | {lo['low_latency']['p99_latency_s']:.3f} | "
                     f"{lo[base]['p99_latency_s']:.3f} | {lo[f'p99_change_vs_{base}']:+.0%} | -65 % (seed) |")
    sb = r.get("sdpa_backends")
    if sb:
        lines += ["", "| SDPA backends, continuous engine, " f"{sb['requests']} requests, {sb['model']} | ms/step | "
                  "output tok/s |", "|---|---|---|"]
        lines += [f"| {label} | {sb[k]['ms_per_step']:.1f} | {sb[k]['tok_s']:.0f} |" for k, label in
                  (("torch_default", "torch's default (cuDNN first on Hopper)"), ("mmr1", "mmr1.sdpa (no cuDNN)"))]
        lines.append(f"| speed-up | {sb['speedup']:.2f}x | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
