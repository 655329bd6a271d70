"""A small synthetic multimodal QA dataset with real PNG and WAV files, made in seconds on one core.

Images hold 1-3 shapes of one kind and one colour in distinct cells of a 2x2 grid; clips hold 1-4 beeps of one
pitch class. Questions ask about colour, shape, count, beep count, pitch, and whether there are as many shapes
as beeps. Answers are balanced exactly within each question type, and the files vary in sample rate, channel
count and image mode so the loaders' conversions are exercised. `mmr1 data synth --out DIR` calls `synthesize`.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from mmr1.tokenizer import R1Tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
PITCH_HZ = {"low": (300.0, 500.0), "high": (1200.0, 2000.0)}
SAMPLE_RATES = (8000, 11025, 16000, 22050, 44100, 48000)
IMAGE_SIZE, CELL = 224, 112  # a 2x2 grid of cells; a shape (80-100 px) never leaves its cell
MIN_GAP_S = 0.1  # silence between beeps
BEEP_S, CLIP_S = 0.12, 1.2  # seconds

# Question type -> (share of the records, its answers). Shares: 27 % image, 38 % audio, 35 % both: counting beeps
# and comparing counts take a from-scratch model the longest to learn, so they get the most examples.
QUESTION_TYPES = {
    "image/color": (0.09, tuple(COLORS)),
    "image/shape": (0.09, SHAPES),
    "image/count": (0.09, NUMBERS[1:4]),
    "audio/count": (0.25, NUMBERS[1:5]),
    "audio/pitch": (0.13, ("high", "low")),
    "both/compare": (0.35, ("yes", "no")),
}


def synthesize(out_dir: str | Path, *, num_train: int = 6000, num_val: int = 200, num_test: int = 300,
               seed: int = 0, text_records: int = 100, overwrite: bool = False) -> dict:
    """Write images/, audio/, train/val/test.jsonl and tokenizer.json under `out_dir`; return a summary.

    Refuses a non-empty `out_dir` unless `overwrite`, which only rewrites the files this function writes.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory or pass --overwrite "
                              "(overwrite=True), which rewrites only the files synthesize writes")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    summary: dict = {"out_dir": str(out), "seed": seed, "splits": {}, "images": 0, "audio": 0}
    strings: list[str] = []
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        rows = [_make_record(f"{split}-{i:05d}", qtype, answer, rng, out)
                for i, (qtype, answer) in enumerate(_schedule(n, rng))]
        if split == "train":
            rows += [{"id": f"text-{i:05d}", "text": _sentence(rng)} for i in range(text_records)]
        _write_jsonl(out / f"{split}.jsonl", rows)
        strings += [row[k] for row in rows for k in ("question", "answer", "text") if k in row]
        summary["images"] += sum("image" in row for row in rows)
        summary["audio"] += sum("audio" in row for row in rows)
        summary["splits"][split] = {"records": len(rows), "manifest": str(out / f"{split}.jsonl"),
                                    "answers": _answer_counts(rows)}

    tokenizer = R1Tokenizer.train(strings, vocab_size=512, modalities=["image", "audio"])
    tokenizer.save(out / "tokenizer.json")
    summary["tokenizer"] = str(out / "tokenizer.json")
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _schedule(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n (type, answer) pairs: types in their shares (largest remainder), answers cycled so each is balanced."""
    shares = np.array([share for share, _ in QUESTION_TYPES.values()]) * n
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares)[: n - counts.sum()]] += 1
    pairs = []
    for (qtype, (_, answers)), count in zip(QUESTION_TYPES.items(), counts):
        cycle = [answers[i % len(answers)] for i in range(count)]
        pairs += [(qtype, cycle[i]) for i in rng.permutation(count)]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _make_record(record_id: str, qtype: str, answer: str, rng: np.random.Generator, out: Path) -> dict:
    """Draw a scene consistent with `answer`, render its files, and return the manifest row."""
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    n_shapes = int(rng.integers(1, 4))
    n_beeps = int(rng.integers(1, 5))
    pitch = str(rng.choice(list(PITCH_HZ)))
    if qtype == "image/color":
        color = answer
    elif qtype == "image/shape":
        shape = answer
    elif qtype == "image/count":
        n_shapes = NUMBERS.index(answer)
    elif qtype == "audio/count":
        n_beeps = NUMBERS.index(answer)
    elif qtype == "audio/pitch":
        pitch = answer
    elif qtype == "both/compare":
        n_beeps = n_shapes if answer == "yes" else _different_count(n_shapes, rng)

    plural = n_shapes > 1
    question = {
        "image/color": "What color are the shapes?" if plural else "What color is the shape?",
        "image/shape": "What shape are they?" if plural else "What shape is it?",
        "image/count": "How many shapes are there?",
        "audio/count": "How many beeps do you hear?",
        "audio/pitch": "Is the pitch high or low?",
        "both/compare": "Are there as many shapes as beeps?",
    }[qtype]
    row: dict = {"id": record_id, "type": qtype, "question": question, "answer": answer}
    meta: dict = {}
    if qtype.startswith(("image", "both")):
        row["image"] = f"images/{record_id}.png"
        meta.update(shape=shape, color=color, shapes=n_shapes,
                    mode=_write_image(out / row["image"], shape, color, n_shapes, rng))
    if qtype.startswith(("audio", "both")):
        row["audio"] = f"audio/{record_id}.wav"
        sample_rate, channels = _write_audio(out / row["audio"], n_beeps, pitch, rng)
        meta.update(beeps=n_beeps, pitch=pitch, sample_rate=sample_rate, channels=channels)
    row["meta"] = meta
    return row


def _different_count(n_shapes: int, rng: np.random.Generator) -> int:
    """A beep count != n_shapes; usually off by one, so "no" is not answerable from a rough count."""
    near = [c for c in (n_shapes - 1, n_shapes + 1) if 1 <= c <= 4]
    if rng.random() < 0.75:
        return int(rng.choice(near))
    return int(rng.choice([c for c in range(1, 5) if c != n_shapes]))


# ---- images -------------------------------------------------------------------------------------
def _write_image(path: Path, shape: str, color: str, count: int, rng: np.random.Generator) -> str:
    """Render and save; returns the saved Pillow mode (a few RGBA / palette / grey-background images)."""
    variant = rng.random()
    if variant < 0.05:
        image, background = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0, 0)), None  # transparent
    else:
        grey = variant < 0.15
        level = int(rng.integers(200, 236)) if grey else 0
        background = (level,) * 3 if grey else tuple(int(v) for v in rng.integers(228, 256, size=3))
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[color])
    for cell in rng.permutation(4)[:count]:
        size = int(rng.integers(80, 101))
        x = (cell % 2) * CELL + int(rng.integers(4, CELL - size - 3))
        y = (cell // 2) * CELL + int(rng.integers(4, CELL - size - 3))
        if shape == "circle":
            draw.ellipse((x, y, x + size, y + size), fill=fill)
        elif shape == "square":
            draw.rectangle((x, y, x + size, y + size), fill=fill)
        else:
            draw.polygon([(x, y + size), (x + size, y + size), (x + size / 2, y)], fill=fill)
    if 0.05 <= variant < 0.10:
        image = image.quantize(colors=8)  # palette ("P") image
    image.save(path, compress_level=1)
    return image.mode


# ---- audio --------------------------------------------------------------------------------------
def _write_audio(path: Path, n_beeps: int, pitch: str, rng: np.random.Generator) -> tuple[int, int]:
    """1-4 faded sine bursts of one pitch class, >= 0.1 s apart at random times, in a 1.2 s clip with a little noise.

    Beeps and clips have one length so that a beep's share of the clip is the same everywhere: how many beeps
    there are is then what the audio says, not a guess from their lengths.
    """
    sample_rate = int(rng.choice(SAMPLE_RATES))
    channels = int(rng.integers(1, 3))
    total_s = CLIP_S
    beep_s = np.full(n_beeps, BEEP_S)
    # Spare time beyond the beeps, the minimum gaps and a 0.05 s margin at each end, shared out at random.
    slack = max(total_s - beep_s.sum() - MIN_GAP_S * (n_beeps - 1) - 0.1, 0.0)
    extra = rng.dirichlet(np.ones(n_beeps + 1)) * slack
    signal = np.zeros(int(round(total_s * sample_rate)), dtype=np.float64)
    t = 0.05 + extra[0]
    for i, duration in enumerate(beep_s):
        start, length = int(t * sample_rate), int(duration * sample_rate)
        freq = rng.uniform(*PITCH_HZ[pitch])
        tone = np.sin(2 * np.pi * freq * np.arange(length) / sample_rate) * rng.uniform(0.4, 0.6)
        fade = min(int(0.01 * sample_rate), length // 2)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)  # raised-cosine fades avoid clicks
        tone[:fade] *= ramp
        tone[length - fade:] *= ramp[::-1]
        signal[start:start + length] = tone
        t += duration + MIN_GAP_S + extra[i + 1]
    samples = signal[:, None] + rng.normal(0.0, 0.004, size=(signal.size, channels))  # (T, C)
    sf.write(path, np.clip(samples, -1, 1).astype(np.float32), sample_rate, subtype="PCM_16")
    return sample_rate, channels


# ---- text ---------------------------------------------------------------------------------------
def _sentence(rng: np.random.Generator) -> str:
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    count, beeps, pitch = NUMBERS[int(rng.integers(1, 4))], NUMBERS[int(rng.integers(1, 5))], str(rng.choice(["high", "low"]))
    plural_s = "" if count == "one" else "s"
    templates = [
        f"The picture shows {count} {color} {shape}{plural_s} on a light background.",
        f"A {color} {shape} sits in one corner of the picture.",
        f"The clip has {beeps} {pitch} beep{'' if beeps == 'one' else 's'} with silence between them.",
        f"A {pitch} beep sounds {'above 1200' if pitch == 'high' else 'below 500'} hertz.",
        f"{count.capitalize()} {shape}{plural_s} and {beeps} beep{'' if beeps == 'one' else 's'} "
        f"{'match' if count == beeps else 'do not match'} in number.",
        f"Every {shape} in a picture has the same color, and here it is {color}.",
    ]
    return templates[int(rng.integers(len(templates)))]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _answer_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for row in rows:
        if "type" in row:
            counts.setdefault(row["type"], Counter())[row["answer"]] += 1
    return {qtype: dict(sorted(c.items())) for qtype, c in sorted(counts.items())}
