"""Speculative decoding with EngineConfig.compile_decode on, against plain decoding with it on, at batch 1.

    HF_HUB_OFFLINE=1 python -m benchmarks.speculative_compiled --out benchmarks/results/speculative_compiled
    HF_HUB_OFFLINE=1 python -m benchmarks.speculative_compiled --demo runs/demo/export runs/demo_draft/export \\
        data/demo --out benchmarks/results/speculative_compiled          # the demo models' text workload too
    HF_HUB_OFFLINE=1 python -m benchmarks.speculative_compiled --quick   # smoke run

compile_decode compiles the target's single-token steps (mmr1.engine.solo). A speculative step verifies 1 + k tokens
at once, and a draft model's steps run through its own fast path, so both stay eager: turning compilation on speeds
up plain decoding more than speculative decoding. Each case runs its methods eager and compiled, and reports the
speed-up over plain decoding in the same mode, and over eager plain decoding.

Cases: engine.md item 3's two 6-layer targets and prompts (benchmarks/engine_cases.speculative_setups: prompt lookup
and a draft made of the target's first layer, up to 4 drafted tokens) and, with --demo, the trained demo target and
draft on speculative_demo.py's text workload (up to 8 drafted tokens; its run_setups asserts identical outputs).
All engines of a case alternate in each round; tok/s from the median round. Greedy outputs of every method are
compared with plain decoding in the same mode ("same tokens").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.engine_cases import SPECULATIVE_TARGETS, speculative_requests, speculative_setups, speculative_target
from benchmarks.report import machine_info, publish
from mmr1.engine import Engine, EngineConfig

MODES = {"eager": False, "compiled": True}


def item3_targets(new_tokens: int, repeats: int, rounds: int, quick: bool) -> list[dict]:
    """engine.md item 3's targets, prompts and methods (engine_cases.speculative_*), every method in both modes, the
    engines alternating in each round (median of the rounds)."""
    rows = []
    for target in ("looping",) if quick else SPECULATIVE_TARGETS:
        model = speculative_target(target, n_layers=2 if quick else 6)
        prompts, params = speculative_requests(repeats, new_tokens)
        methods = {name: setup for name, setup in speculative_setups(model).items()
                   if name in ("plain", "prompt_lookup", "draft_first_layer")}
        engines = {(method, mode): Engine(model, config=EngineConfig(max_batch=1, speculative=spec,
                                                                     compile_decode=compiled), draft=d)
                   for method, (spec, d) in methods.items() for mode, compiled in MODES.items()}
        tokens = {key: [e.generate([p], params)[0].token_ids for p in prompts]  # warm-up (and compilation)
                  for key, e in engines.items()}
        for e in engines.values():
            e.stats.update(drafted=0, accepted=0)
        walls = {key: [] for key in engines}
        for _ in range(rounds):
            for key, e in engines.items():
                start = time.perf_counter()
                for p in prompts:
                    e.generate([p], params)
                walls[key].append(time.perf_counter() - start)
        tok_s = {key: new_tokens * len(prompts) / statistics.median(w) for key, w in walls.items()}
        for method in methods:
            drafted, accepted = (engines[method, "eager"].stats[k] for k in ("drafted", "accepted"))
            rows.append({"case": f"engine.md item 3, {target}", "method": method,
                         **{f"{mode}_tok_s": tok_s[method, mode] for mode in MODES},
                         **{f"{mode}_vs_plain": tok_s[method, mode] / tok_s["plain", mode] for mode in MODES},
                         "compiled_vs_eager_plain": tok_s[method, "compiled"] / tok_s["plain", "eager"],
                         "acceptance": accepted / drafted if drafted else None,
                         "identical": all(tokens[method, mode] == tokens["plain", mode] for mode in MODES)})
    return rows


def demo_models(target_dir: str, draft_dir: str, data: Path, requests: int, repeats: int) -> list[dict]:
    from benchmarks.speculative_demo import run_setups, workloads
    from mmr1.model import MultimodalR1

    target, tokenizer = MultimodalR1.from_pretrained(target_dir)
    draft, _ = MultimodalR1.from_pretrained(draft_dir)
    prompts, params = workloads(data, tokenizer, requests)["text"]
    runs = {mode: run_setups(target, tokenizer, draft, prompts, params, 8, repeats, compile_decode=c)
            for mode, c in MODES.items()}
    eager_plain = runs["eager"]["plain"]["tok_s"]
    return [{"case": "demo models, text", "method": method,
             **{f"{mode}_tok_s": runs[mode][method]["tok_s"] for mode in MODES},
             **{f"{mode}_vs_plain": runs[mode][method]["speedup"] for mode in MODES},
             "compiled_vs_eager_plain": runs["compiled"][method]["tok_s"] / eager_plain,
             "acceptance": runs["eager"][method]["acceptance_rate"],
             "identical": all(runs[m][method]["identical"] for m in MODES)}
            for method in ("plain", "prompt_lookup", "draft")]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']} (1 thread); load "
             f"average at start {m['load_average_at_start']:.1f}; total {result['total_seconds']:.0f} s. tok/s at "
             "batch 1; speed-ups over plain decoding in the same mode, and over eager plain decoding; greedy outputs "
             "equal to plain decoding in the same mode.", "",
             "| case | method | eager tok/s | compiled tok/s | eager vs plain | compiled vs plain | compiled vs "
             "eager plain | acceptance (eager) | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        ratios = " | ".join(f"{r[k]:.2f}x" for k in ("eager_vs_plain", "compiled_vs_plain", "compiled_vs_eager_plain"))
        lines.append(f"| {r['case']} | {r['method']} | {r['eager_tok_s']:.0f} | {r['compiled_tok_s']:.0f} | {ratios} "
                     f"| {acc} | {'yes' if r['identical'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 2-layer target, few tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="item 3's prompts per timed pass")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per engine, alternating; the median")
    parser.add_argument("--demo", nargs=3, metavar=("TARGET", "DRAFT", "DATA"), default=None,
                        help="the demo's exported target and draft and its data directory")
    parser.add_argument("--requests", type=int, default=64, help="demo text requests")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine, start = machine_info(), time.perf_counter()
    new_tokens, prompts, rounds = (8, 1, 1) if args.quick else (args.new_tokens, args.prompts, args.rounds)
    rows = item3_targets(new_tokens, prompts, rounds, args.quick)
    if args.demo:
        rows += demo_models(args.demo[0], args.demo[1], Path(args.demo[2]), args.requests, rounds)
    result = {"command": "python -m benchmarks.speculative_compiled " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:]),
              "machine": machine, "rows": rows, "total_seconds": time.perf_counter() - start}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
