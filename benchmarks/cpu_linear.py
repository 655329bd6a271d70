"""fp32 and bf16 linear products of a few rows: mmr1's AVX-512 loop (mmr1/engine/cpu_linear.py) against torch's
F.linear, and batch-1 engine decoding with it on and off.

    HF_HUB_OFFLINE=1 python -m benchmarks.cpu_linear --out benchmarks/results/cpu_linear   # ~2 min, 2 cores
    HF_HUB_OFFLINE=1 python -m benchmarks.cpu_linear --quick                              # smoke run

1. products: every nn.Linear weight of engine.md item 1's Llama-shaped model (29 weights, 50 MB in fp32), each
   multiplied by the same 1-16 rows in turn, the way a decode step reads them; median of --repeats passes, both
   paths alternating; bandwidth = weight bytes / time. bf16: the 43 weights of engine.md's bf16 weight-bound model
   (137 MB: read from memory like the fp32 ones), against torch's bf16 F.linear (oneDNN);
2. engine: batch-1 greedy decoding of that model, of the Mixtral-shaped one and of engine.md's 13 MB fp32 serving model
   (EngineConfig.cpu_few_row_linears on and off; eager and compile_decode), tok/s, median of --repeats alternating
   runs, outputs compared. The loop is forced on for the 13 MB model, whose weights fit in the last-level cache
   (there the engine takes it only for products of 2-8 rows): that row shows why. bf16: the weight-bound model and
   the Llama- and Mixtral-shaped ones cast to bf16 (the Mixtral one's stacked experts take `rows_times`). bf16
   greedy tokens need not match: torch's bf16 product and the loop both round an fp32 sum to bf16 once, but sum in
   another order, and a random model's near-ties then flip.
One torch thread unless --threads says otherwise, as benchmarks/engine.py.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.engine_cases import hf_model, serving_model, weight_bound_model
from benchmarks.report import machine_info, publish
from mmr1.backbone import R1Model
from mmr1.engine import Engine, EngineConfig, SamplingParams, cpu_linear


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def products(weights: list[torch.Tensor], rows: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=g) for w in weights}
    dtype = weights[0].dtype
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    paths = {"torch": F.linear, "loop": cpu_linear.linear_rows}
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: both round to bf16 once (relative step 2^-8)
    for w in weights:  # the same products, within the dtype's rounding
        x = inputs[w.shape[1]]
        assert torch.allclose(paths["loop"](x, w).float(), F.linear(x, w).float(), rtol=tol, atol=tol)
    passes = {name: (lambda fn=fn: [fn(inputs[w.shape[1]], w) for w in weights]) for name, fn in paths.items()}
    times = {name: [] for name in paths}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in passes.items():
            times[name].append(timed_ms(run))
    ms = {name: statistics.median(t[1:]) for name, t in times.items()}
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "ms": ms,
            "gb_s": {k: nbytes / v / 1e6 for k, v in ms.items()},
            "speedup": ms["torch"] / ms["loop"]}


def hf_shaped(family: str) -> R1Model:
    with tempfile.TemporaryDirectory() as tmp:
        hf_model(family).save_pretrained(tmp)
        return R1Model.from_hf(tmp).eval()


@contextlib.contextmanager
def loop_even_if_cached():
    """Inside, the engine takes the loop for single rows too, whatever the model's size (it does so only for models
    larger than the last-level cache)."""
    saved = cpu_linear.last_level_cache_bytes
    cpu_linear.last_level_cache_bytes = lambda: 0
    try:
        yield
    finally:
        cpu_linear.last_level_cache_bytes = saved


def decoding(name: str, model: R1Model, new_tokens: int, repeats: int) -> list[dict]:
    prompt = torch.randint(0, 2048, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    with loop_even_if_cached():
        variants = {(compiled, on): Engine(model, config=EngineConfig(max_batch=1, compile_decode=compiled,
                                                                      cpu_few_row_linears=on))
                    for compiled in (False, True) for on in (False, True)}
    tokens = {k: e.generate([prompt], params)[0].token_ids for k, e in variants.items()}  # warm-up, compiles
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, e in variants.items():
            start = time.perf_counter()
            e.generate([prompt], params)
            times[k].append(time.perf_counter() - start)
    tok_s = {k: new_tokens / statistics.median(t) for k, t in times.items()}
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    rows = []
    for compiled in (False, True):
        off, on = tok_s[compiled, False], tok_s[compiled, True]
        rows.append({"family": name, "model_mb": mb, "compile_decode": compiled, "off_tok_s": off, "on_tok_s": on,
                     "speedup": on / off, "same_tokens": tokens[compiled, True] == tokens[compiled, False]})
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} "
             f"threads); load average at start {m['load_average_at_start']:.1f}; total {r['total_seconds']:.0f} s.",
             "", f"Products: the {r['weights']} weights of the Llama-shaped model ({r['weight_mb']:.1f} MB fp32) and "
             f"the {r['bf16_weights']} of the bf16 weight-bound model ({r['bf16_weight_mb']:.1f} MB; none without "
             "AVX512_BF16), each times the same rows, median ms per pass over all of them:", "",
             "| dtype | rows | torch F.linear ms (GB/s) | loop ms (GB/s) | speed-up |", "|---|---|---|---|---|"]
    for p in r["products"]:
        lines.append(f"| {p['dtype']} | {p['rows']} | {p['ms']['torch']:.2f} ({p['gb_s']['torch']:.1f}) | "
                     f"{p['ms']['loop']:.2f} ({p['gb_s']['loop']:.1f}) | {p['speedup']:.2f}x |")
    lines += ["", "Engine, batch-1 greedy decoding, the loop off / on (forced on for every product of up to 8 rows "
              f"fp32, 4 rows bf16, also for a model within the {r['last_level_cache_mb']:.0f} MB last-level cache, "
              "where the engine takes it for fp32 only for 2-8 rows); bf16 tokens may differ (a different order of "
              "fp32 sums rounds some bf16 results the other way):", "",
              "| model | parameters MB | compile_decode | off tok/s | on tok/s | speed-up | same tokens |",
              "|---|---|---|---|---|---|---|"]
    for d in r["decoding"]:
        lines.append(f"| {d['family']} | {d['model_mb']:.1f} | {d['compile_decode']} | {d['off_tok_s']:.0f} | "
                     f"{d['on_tok_s']:.0f} | {d['speedup']:.2f}x | {d['same_tokens']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short decodes")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not cpu_linear.available():
        raise SystemExit("benchmarks.cpu_linear: the loop is not available here (AVX-512, C compiler, GNU OpenMP)")
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    machine, start = machine_info(), time.perf_counter()
    weights = [m.weight.detach() for m in hf_model("llama").modules() if isinstance(m, torch.nn.Linear)]
    models = [("llama", hf_shaped("llama")), ("mixtral", hf_shaped("mixtral")), ("serving 13 MB", serving_model())]
    bf16_weights = []
    if cpu_linear.available(torch.bfloat16):  # a CPU with AVX512_BF16
        bound = weight_bound_model()
        bf16_weights = [m.weight.detach() for m in bound.modules() if isinstance(m, torch.nn.Linear)]
        models += [("bf16 weight-bound", bound), ("llama bf16", hf_shaped("llama").to(torch.bfloat16)),
                   ("mixtral bf16", hf_shaped("mixtral").to(torch.bfloat16))]
    result = {"command": "python -m benchmarks.cpu_linear " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "weights": len(weights),
              "weight_mb": sum(w.numel() * w.element_size() for w in weights) / 1e6,
              "bf16_weights": len(bf16_weights),
              "bf16_weight_mb": sum(w.numel() * w.element_size() for w in bf16_weights) / 1e6,
              "products": [products(ws, rows, repeats) for ws in (weights, bf16_weights) if ws
                           for rows in (1, 2, 4, 5, 8, 16)],
              "decoding": [row for name, model in models
                           for row in decoding(name, model, 16 if args.quick else 96, repeats)],
              "last_level_cache_mb": cpu_linear.last_level_cache_bytes() / 2**20}
    result["total_seconds"] = time.perf_counter() - start
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
