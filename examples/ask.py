"""Ask an exported demo model a few held-out questions through the Python Pipeline.

    python examples/ask.py runs/demo/export data/demo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import soundfile as sf
from PIL import Image

from mmr1 import Pipeline


def main(model_dir: str, data_dir: str) -> None:
    data = Path(data_dir)
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    by_type = {}
    for r in records:
        by_type.setdefault(r.get("type"), r)
    qa = Pipeline.from_pretrained(model_dir)
    try:
        for qtype, r in sorted(by_type.items(), key=lambda kv: str(kv[0])):
            if "question" not in r:
                continue
            inputs = {}
            if "image" in r:  # a PIL image
                inputs["image"] = Image.open(data / r["image"])
            if "audio" in r:  # a (waveform, sample_rate) pair, as a numpy array
                wave, rate = sf.read(data / r["audio"], dtype="float32")
                inputs["audio"] = (wave, rate)
            answer = qa(r["question"], **inputs)
            print(f"[{qtype}] {r['question']!r} -> {answer!r} (expected {r['answer']!r})")
        image_records = [r for r in records if "image" in r and "audio" not in r][:4]
        batch = qa([r["question"] for r in image_records], image=[str(data / r["image"]) for r in image_records])
        print("batch:", list(zip([r["question"] for r in image_records], batch)))
    finally:
        qa.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
