"""Speculative decoding on the demo: the exported target answers held-out questions with and without its draft
(configs/demo_draft.yaml) and with prompt lookup; greedy answers must be identical, acceptance rates and speeds
against plain decoding are printed. The answers are one or two tokens, too short for drafts to save much; on longer
outputs see benchmarks/speculative_demo.py.

    python examples/speculative.py runs/demo/export runs/demo_draft/export data/demo
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.model import MultimodalR1


def main(target_dir: str, draft_dir: str, data_dir: str, n: int = 64) -> dict:
    data = Path(data_dir)
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    questions = [{"prompt": r["question"], **{k: str(data / r[k]) for k in ("image", "audio") if k in r}}
                 for r in records if "question" in r]
    requests, warm_up = questions[:n], questions[n:n + 4]  # other files: the timed run must not find them cached
    target, tokenizer = MultimodalR1.from_pretrained(target_dir)
    draft, _ = MultimodalR1.from_pretrained(draft_dir)
    params = SamplingParams(max_new_tokens=8)
    setups = {"plain": (None, None), "draft": (SpeculativeConfig("draft", 3), draft),
              "prompt_lookup": (SpeculativeConfig("ngram", 3), None)}
    report, baseline, plain_seconds = {}, None, None
    for name, (spec, draft_model) in setups.items():
        engine = Engine(target, tokenizer, EngineConfig(max_batch=1, speculative=spec), draft=draft_model)
        engine.generate(warm_up, params)  # first calls (encoder workers, kernels) are not what is timed
        engine.stats.update(drafted=0, accepted=0)
        start = time.perf_counter()
        answers = [o.text for o in engine.generate(requests, params)]
        seconds = time.perf_counter() - start
        engine.close()
        baseline = answers if baseline is None else baseline
        plain_seconds = plain_seconds or seconds
        drafted, accepted = engine.stats["drafted"], engine.stats["accepted"]
        report[name] = {"seconds": seconds, "identical": answers == baseline,
                        "acceptance_rate": accepted / drafted if drafted else None}
        rate = "" if drafted == 0 else f", acceptance {accepted / drafted:.0%} of {drafted} drafted tokens"
        print(f"{name}: {len(requests)} questions at batch 1 in {seconds:.2f} s ({plain_seconds / seconds:.2f}x "
              f"plain), answers identical to plain greedy: {answers == baseline}{rate}")
    return report


if __name__ == "__main__":
    main(*sys.argv[1:4])
