"""synthesize(): real, decodable, balanced data whose files match their answers; it loads through the data module."""
from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_pipelines import InputError, MultimodalDataModule, load_audio, load_image, synthesize
from data_pipelines.synth import COLORS, NUMBERS, SAMPLE_RATES
from mmr1.tokenizer import R1Tokenizer
from test_data_processors import AudioProcessor, ImageProcessor

SIZES = {"train": 24, "val": 12, "test": 12}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, num_train=24, num_val=12, num_test=12, seed=3, text_records=5)
    return out, summary


def _rows(out, split):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def _processors():
    return {"image": ImageProcessor(size=8), "audio": AudioProcessor(sample_rate=8000, max_seconds=2.0)}


def _count_shapes(path, color):
    """Cells of the 2x2 grid holding a solid patch of the shape colour (and no other shape colour)."""
    pixels = np.asarray(load_image(path), dtype=np.int32)  # (224, 224, 3)
    cells = 0
    for name, rgb in COLORS.items():
        near = np.abs(pixels - np.array(rgb)).max(axis=2) <= 20  # (224, 224)
        per_cell = near.reshape(2, 112, 2, 112).sum(axis=(1, 3))
        if name == color:
            cells = int((per_cell > 1000).sum())  # a 56 px triangle covers ~1500 pixels
        else:
            assert per_cell.max() < 50, f"{path} has {name} pixels but is {color}"
    return cells


def _beeps_and_peak(path):
    """Runs of 10 ms frames louder than the noise floor, and the clip's dominant frequency."""
    audio = load_audio(path, target_sr=16000).numpy()
    frames = audio[: audio.size // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.1
    runs = int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))
    spectrum = np.abs(np.fft.rfft(audio))
    return runs, np.fft.rfftfreq(audio.size, 1 / 16000)[spectrum.argmax()]


def test_files_are_real_and_match_their_answers(synth_dir):
    out, summary = synth_dir
    modes, rates, channels = Counter(), Counter(), Counter()
    for split in SIZES:
        for row in _rows(out, split):
            meta = row.get("meta", {})
            if "image" in row:
                with Image.open(out / row["image"]) as image:
                    assert image.format == "PNG" and image.size == (224, 224) and image.mode == meta["mode"]
                    modes[image.mode] += 1
                assert _count_shapes(out / row["image"], meta["color"]) == meta["shapes"]
            if "audio" in row:
                info = sf.info(str(out / row["audio"]))
                assert info.format == "WAV" and info.samplerate == meta["sample_rate"] in SAMPLE_RATES
                assert info.channels == meta["channels"] in (1, 2) and 1.0 <= info.duration <= 1.4 + 1e-3
                rates[info.samplerate] += 1
                channels[info.channels] += 1
                beeps, peak = _beeps_and_peak(out / row["audio"])
                assert beeps == meta["beeps"], row
                assert (300 <= peak <= 500) if meta["pitch"] == "low" else (1200 <= peak <= 2000)
            answer, qtype = row.get("answer"), row.get("type")
            if qtype == "image/color":
                assert answer == meta["color"]
            elif qtype == "image/shape":
                assert answer == meta["shape"]
            elif qtype == "image/count":
                assert answer == NUMBERS[meta["shapes"]]
            elif qtype == "audio/count":
                assert answer == NUMBERS[meta["beeps"]]
            elif qtype == "audio/pitch":
                assert answer == meta["pitch"]
            elif qtype == "both/compare":
                assert answer == ("yes" if meta["shapes"] == meta["beeps"] else "no")
    assert len(rates) >= 3 and set(channels) == {1, 2} and modes["RGB"] > 0
    assert summary["images"] == sum(modes.values()) and summary["audio"] == sum(rates.values())
    assert (out / "tokenizer.json").is_file() and summary["seconds"] < 30


def test_answers_and_types_are_balanced(tmp_path):
    summary = synthesize(tmp_path, num_train=200, num_val=0, num_test=0, seed=1, text_records=7)
    rows = _rows(tmp_path, "train")
    texts = [row for row in rows if "text" in row]
    assert len(texts) == 7 and all(set(row) == {"id", "text"} for row in texts)
    examples = [row for row in rows if "type" in row]
    assert len(examples) == 200
    kinds = Counter(row["type"].split("/")[0] for row in examples)
    assert kinds == {"image": 54, "audio": 76, "both": 70}  # 27 / 38 / 35 %
    for qtype, answers in summary["splits"]["train"]["answers"].items():
        expected = {"image/color": 4, "image/shape": 3, "image/count": 3, "audio/count": 4, "audio/pitch": 2,
                    "both/compare": 2}[qtype]
        assert len(answers) == expected and max(answers.values()) - min(answers.values()) <= 1, qtype
    no_cases = [row["meta"] for row in examples if row["type"] == "both/compare" and row["answer"] == "no"]
    off_by_one = sum(abs(m["shapes"] - m["beeps"]) == 1 for m in no_cases)
    assert off_by_one / len(no_cases) > 0.6
    questions = {row["question"] for row in examples if row["type"] == "image/color"}
    assert questions == {"What color is the shape?", "What color are the shapes?"}


def test_refuses_non_empty_dir_and_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(tmp_path / "a", num_train=2, num_val=1, num_test=1, text_records=1)
    synthesize(tmp_path / "a", num_train=6, num_val=2, num_test=2, text_records=1, overwrite=True, seed=5)
    assert (tmp_path / "a" / "mine.txt").read_text() == "user data"
    synthesize(tmp_path / "b", num_train=6, num_val=2, num_test=2, text_records=1, seed=5)
    written = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert len(written) > 10
    for name in written:  # same seed, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---- the data module over synthetic data ----------------------------------------------------------
def _datamodule(out, **kwargs):
    return MultimodalDataModule(str(out / "train.jsonl"), val_manifest=str(out / "val.jsonl"),
                                test_manifest=str(out / "test.jsonl"), **kwargs)


def test_datamodule_loads_synth_with_its_tokenizer(synth_dir):
    out, _ = synth_dir
    tokenizer = R1Tokenizer.from_file(out / "tokenizer.json")
    dm = _datamodule(out, batch_size=5).attach(_processors(), tokenizer)
    dm.setup("fit")
    assert dm.skip_report["train"] == {"records": 24 + 5, "skipped": 0, "errors": []}
    assert dm.skip_report["val"]["records"] == 12 and "test" not in dm.skip_report
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [5] * 5 + [4]
    seen = [i for b in batches for i in b["ids"]]
    assert sorted(seen) == sorted(r.id for r in dm.datasets["train"].records)
    by_id = {ex["id"]: ex for ex in dm.datasets["train"]}
    for batch in batches:
        assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
        for key in ("image", "audio"):
            carriers = [i for i in batch["ids"] if key in by_id[i]["modalities"]]
            if not carriers:
                assert key not in batch["modalities"]
                continue
            mod = batch["modalities"][key]
            assert mod["present"].tolist() == [key in by_id[i]["modalities"] for i in batch["ids"]]
            for j, record_id in enumerate(carriers):  # values[j] is the j-th carrier's tensor
                tensor = by_id[record_id]["modalities"][key]
                assert torch.equal(mod["values"][j, ..., : tensor.shape[-1]], tensor)
                if key == "audio":
                    assert int(mod["mask"][j].sum()) == tensor.shape[0]
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == [f"val-{i:05d}" for i in range(5)]  # not shuffled
    dm.setup("test")
    assert len(dm.datasets["test"]) == 12 and dm.skip_report["test"]["skipped"] == 0


def test_train_order_is_seeded(synth_dir):
    out, _ = synth_dir
    tokenizer = R1Tokenizer.from_file(out / "tokenizer.json")

    def order(seed):
        dm = _datamodule(out, batch_size=29, seed=seed).attach(_processors(), tokenizer)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["ids"]

    assert order(0) == order(0) and order(0) != order(1)


def test_datamodule_takes_processors_from_the_trainers_model(synth_dir):
    out, _ = synth_dir
    tokenizer = R1Tokenizer.from_file(out / "tokenizer.json")
    dm = _datamodule(out, batch_size=4)
    with pytest.raises(RuntimeError, match="attach"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(processors=_processors, tokenizer=tokenizer))
    dm.setup("fit")
    assert list(dm.processors) == ["image", "audio"] and dm.tokenizer is tokenizer


def test_bad_record_fails_setup_or_is_skipped(synth_dir, tmp_path):
    out, _ = synth_dir
    rows = _rows(out, "train")
    bad = next(row for row in rows if "image" in row)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    manifest = tmp_path / "train.jsonl"
    lines = []
    for row in rows:
        row = dict(row)
        for key in ("image", "audio"):
            if key in row:
                row[key] = str(out / row[key])
        if row["id"] == bad["id"]:
            row["image"] = "broken.png"
        lines.append(json.dumps(row))
    manifest.write_text("\n".join(lines) + "\n")
    tokenizer = R1Tokenizer.from_file(out / "tokenizer.json")
    dm = MultimodalDataModule(str(manifest), batch_size=4).attach(_processors(), tokenizer)
    with pytest.raises(InputError) as info:
        dm.setup("fit")
    assert f"manifest {manifest}, record {bad['id']!r}, file {tmp_path / 'broken.png'}" in str(info.value)
    dm = MultimodalDataModule(str(manifest), batch_size=4, skip_bad_records=True).attach(_processors(), tokenizer)
    dm.setup("fit")
    assert dm.skip_report["train"]["records"] == 28 and dm.skip_report["train"]["skipped"] == 1
    assert bad["id"] in dm.skip_report["train"]["errors"][0]
    assert dm.val_dataloader() == []  # no val manifest: nothing to validate on


def test_workers_receive_a_picklable_pipeline(synth_dir):
    out, _ = synth_dir
    tokenizer = R1Tokenizer.from_file(out / "tokenizer.json")
    dm = _datamodule(out, batch_size=6, num_workers=1).attach(_processors(), tokenizer)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    ids = [i for batch in loader for i in batch["ids"]]
    assert ids == [f"val-{i:05d}" for i in range(12)]


class _TinyModel(lightning.LightningModule):
    """Owns processors and tokenizer, as the real model does; learns nothing useful."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = torch.nn.Embedding(tokenizer.vocab_size, 4)
        self.seen: list[str] = []

    def processors(self):
        return _processors()

    def training_step(self, batch, batch_idx):
        self.seen += batch["ids"]
        return self.embed(batch["input_ids"])[batch["attention_mask"]].pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen += batch["ids"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_fit(synth_dir):
    out, _ = synth_dir
    model = _TinyModel(R1Tokenizer.from_file(out / "tokenizer.json"))
    dm = _datamodule(out, batch_size=8)
    trainer = lightning.Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and len(model.seen) == 16 + 8
    assert model.seen[16:] == [f"val-{i:05d}" for i in range(8)]  # validation ran after step 2
    assert dm.skip_report["train"]["records"] == 29
