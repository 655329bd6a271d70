"""Speculative decoding with the trained demo models: the demo target with its trained draft
(configs/demo_draft.yaml) and with prompt lookup, against plain decoding of the same engine, at batch 1.

    python -m benchmarks.speculative_demo --target runs/demo/export --draft runs/demo_draft/export \\
        --data data/demo --out benchmarks/results/speculative_demo

Two workloads from the demo data:
  questions  the held-out image/audio/text questions, answered in the chat format: answers are 1-2 tokens, so
             drafting has almost nothing to speed up (reported for the record);
  text       continuation of the demo's text records (the descriptive sentences the models were also trained on):
             the first three words as a raw prompt (`<bos>` + words, no chat turn), up to 24 new tokens.
The headline rows draft up to k = --draft-tokens (8: the demo's outputs are 5-13 tokens, and a draft distilled
from the target agrees with it on most of them, so one verification can take a whole answer); `draft, k=4` is the
engine's default length beside it. `draft_fixed` is the draft with a fixed draft length
(SpeculativeConfig(adaptive=False)); the other rows adapt each request's draft length to its acceptance (the
default).
Greedy outputs must be identical to plain decoding (asserted); times are medians of --repeats interleaved runs
after one warm-up run, one torch thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import publish
from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.model import MultimodalR1


def workloads(data: Path, tokenizer, n: int) -> dict[str, tuple[list, SamplingParams]]:
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    questions = [{"prompt": r["question"], **{k: str(data / r[k]) for k in ("image", "audio") if k in r}}
                 for r in rows if "question" in r][:n]
    texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()
             if '"text"' in line][:n]
    continuations = [[tokenizer.bos_id] + tokenizer.encode(" " + " ".join(t.split()[:3])) for t in texts]
    return {"questions": (questions, SamplingParams(max_new_tokens=8)),
            "text": (continuations, SamplingParams(max_new_tokens=24))}


def run_setups(target, tokenizer, draft, requests, params, k: int, repeats: int, short_k: int = 4,
               compile_decode: bool = False) -> dict:
    setups = {"plain": (None, None), "draft": (SpeculativeConfig("draft", k), draft),
              "prompt_lookup": (SpeculativeConfig("ngram", k), None),
              # every step drafts k tokens whatever the acceptance (the adaptive length is the default)
              "draft_fixed": (SpeculativeConfig("draft", k, adaptive=False), draft),
              # the engine's default draft length, for comparison with the longer headline one
              "draft_short": (SpeculativeConfig("draft", short_k), draft)}
    engines = {name: Engine(target, tokenizer, EngineConfig(max_batch=1, speculative=spec,
                                                            compile_decode=compile_decode), draft=d)
               for name, (spec, d) in setups.items()}
    outputs, times = {}, {name: [] for name in engines}
    for name, engine in engines.items():  # warm-up
        outputs[name] = [o.token_ids for o in engine.generate(requests, params)]
        engine.stats.update(drafted=0, accepted=0)
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.generate(requests, params)
            times[name].append(time.perf_counter() - start)
    tokens = sum(map(len, outputs["plain"]))
    res = {"requests": len(requests), "output_tokens": tokens, "draft_tokens": k, "short_draft_tokens": short_k}
    for name, engine in engines.items():
        assert outputs[name] == outputs["plain"], f"{name}: greedy output differs from plain decoding"
        median = statistics.median(times[name])
        drafted, accepted = engine.stats["drafted"], engine.stats["accepted"]
        res[name] = {"seconds": median, "tok_s": tokens / median, "identical": True,
                     "acceptance_rate": accepted / drafted if drafted else None,
                     "speedup": statistics.median(times["plain"]) / median}
        engine.close()
    return res


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}` on {r['machine']}, 1 torch thread; demo target `{r['target']}`, draft "
             f"`{r['draft']}`; median of {r['repeats']} runs; draft length k={r['text']['draft_tokens']} unless "
             f"the row says otherwise. Greedy outputs identical to plain decoding in every row.",
             "", "| workload | requests / output tokens | method | tok/s | acceptance | speed-up vs plain | target |",
             "|---|---|---|---|---|---|---|"]
    for name in ("text", "questions"):
        w = r[name]
        for method in ("plain", "draft", "prompt_lookup", "draft_fixed", "draft_short"):
            m = w[method]
            acc = "" if m["acceptance_rate"] is None else f"{m['acceptance_rate']:.0%}"
            target = "" if method in ("plain", "draft_fixed", "draft_short") or name == "questions" else \
                (">= 1.5x met" if m["speedup"] >= 1.5 else ">= 1.5x **missed**")
            label = {"draft_short": f"draft, k={w['short_draft_tokens']}"}.get(method, method)
            lines.append(f"| {name} | {w['requests']} / {w['output_tokens']} | {label} | {m['tok_s']:.0f} | {acc} | "
                         f"{m['speedup']:.2f}x | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="runs/demo/export")
    parser.add_argument("--draft", default="runs/demo_draft/export")
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=8,
                        help="the longest draft (k) of the headline rows; a row with the engine's default 4 is beside")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target, tokenizer = MultimodalR1.from_pretrained(args.target)
    draft, _ = MultimodalR1.from_pretrained(args.draft)
    result = {"command": "python -m benchmarks.speculative_demo " + " ".join(argv if argv is not None else []),
              "machine": f"{platform.machine()}, torch {torch.__version__}", "target": args.target,
              "draft": args.draft, "repeats": args.repeats}
    for name, (requests, params) in workloads(args.data, tokenizer, args.requests).items():
        result[name] = run_setups(target, tokenizer, draft, requests, params, args.draft_tokens, args.repeats)
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
