"""Speculative decoding on the demo: the exported target answers held-out questions with and without its draft
(configs/demo_draft.yaml, which reads the target's image/audio tokens instead of encoding the inputs again) and
with prompt lookup; greedy answers must be identical, acceptance rates and speeds against plain decoding are
printed. The answers are one or two tokens: the draft's gain is the decode step after the answer word, which it
guesses from the target's tokens; on longer outputs see benchmarks/speculative_demo.py.

    python examples/speculative.py runs/demo/export runs/demo_draft/export data/demo
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.model import MultimodalR1


def main(target_dir: str, draft_dir: str, data_dir: str, n: int = 64, rounds: int = 3) -> dict:
    data = Path(data_dir)
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    questions = [{"prompt": r["question"], **{k: str(data / r[k]) for k in ("image", "audio") if k in r}}
                 for r in records if "question" in r]
    rounds = max(1, min(rounds, (len(questions) - 4) // n))
    # Each round asks other questions (other files: an engine encodes a file once and keeps it), the same for
    # every setup, in turn (whichever runs first in a round reads the files from disk); the warm-up asks none.
    batches, warm_up = [questions[i * n:(i + 1) * n] for i in range(rounds)], questions[rounds * n:rounds * n + 4]
    target, tokenizer = MultimodalR1.from_pretrained(target_dir)
    draft, _ = MultimodalR1.from_pretrained(draft_dir)
    params = SamplingParams(max_new_tokens=8)
    setups = {"plain": (None, None), "draft": (SpeculativeConfig("draft", 3), draft),
              "prompt_lookup": (SpeculativeConfig("ngram", 3), None)}
    seconds = {name: [] for name in setups}
    answers = {name: [] for name in setups}
    stats = {name: {"drafted": 0, "accepted": 0} for name in setups}
    names = list(setups)
    for r, batch in enumerate(batches):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each setup goes first in one round
            # One engine at a time, as an application has: engines alive side by side run their encoder workers
            # and decoders on the same cores.
            spec, draft_model = setups[name]
            engine = Engine(target, tokenizer, EngineConfig(max_batch=1, speculative=spec), draft=draft_model)
            try:
                engine.generate(warm_up, params)  # first calls (encoder workers, kernels) are not what is timed
                engine.stats.update(drafted=0, accepted=0)
                start = time.perf_counter()
                answers[name] += [o.text for o in engine.generate(batch, params)]
                seconds[name].append(time.perf_counter() - start)
            finally:
                engine.close()
            for key in stats[name]:
                stats[name][key] += engine.stats[key]
    report = {}
    for name in setups:
        speedup = statistics.median(p / s for p, s in zip(seconds["plain"], seconds[name]))
        identical = answers[name] == answers["plain"]
        drafted, accepted = stats[name]["drafted"], stats[name]["accepted"]
        report[name] = {"seconds": seconds[name], "speedup": speedup, "identical": identical,
                        "acceptance_rate": accepted / drafted if drafted else None}
        rate = "" if drafted == 0 else f", acceptance {accepted / drafted:.0%} of {drafted} drafted tokens"
        print(f"{name}: {rounds} x {n} questions at batch 1 in {statistics.median(seconds[name]):.2f} s (median), "
              f"{speedup:.2f}x plain, answers identical to plain greedy: {identical}{rate}")
    return report


if __name__ == "__main__":
    main(*sys.argv[1:4])
