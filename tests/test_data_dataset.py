"""MultimodalDataset: validation errors located by manifest, record and file; skip_bad; caching; examples."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_pipelines import InputError, MultimodalDataset, read_manifest
from mmr1.tokenizer import IGNORE_INDEX, R1Tokenizer
from test_data_processors import AudioProcessor, DepthProcessor, ImageProcessor

TEXTS = ["What color is the shape?", "red", "How many beeps do you hear?", "two", "A red circle.",
         "How deep is it?", "far"]


@pytest.fixture(scope="module")
def tokenizer():
    return R1Tokenizer.train(TEXTS, vocab_size=300, modalities=["image", "audio", "depth"])


def _good_files(root):
    Image.new("RGB", (20, 12), (255, 0, 0)).save(root / "red.png")
    sf.write(root / "beep.wav", np.full(4000, 0.25, dtype=np.float32), 8000, subtype="FLOAT")
    np.save(root / "d.npy", np.arange(12, dtype=np.float64).reshape(3, 4))


def _manifest(root, rows, name="m.jsonl"):
    path = root / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _dataset(root, rows, tokenizer, processors=None, **kwargs):
    processors = processors if processors is not None else {"image": ImageProcessor(), "audio": AudioProcessor()}
    path = _manifest(root, rows)
    records = read_manifest(path, list(processors))
    return MultimodalDataset(records, processors, tokenizer, manifest=str(path), **kwargs), path


GOOD = [
    {"id": "both", "audio": "beep.wav", "image": "red.png", "question": "How many beeps do you hear?",
     "answer": "two", "type": "both/compare"},
    {"id": "img", "image": "red.png", "question": "What color is the shape?", "answer": "red",
     "type": "image/color"},
    {"id": "txt", "text": "A red circle."},
]


def test_examples_follow_processor_order_and_chat_format(tmp_path, tokenizer):
    _good_files(tmp_path)
    dataset, _ = _dataset(tmp_path, GOOD, tokenizer)
    assert dataset.validate() == {"records": 3, "skipped": 0, "errors": []}
    both, img, txt = dataset[0], dataset[1], dataset[2]
    # Markers follow the processor order (image before audio) whatever the manifest's key order.
    expected_ids, expected_labels = tokenizer.encode_example("How many beeps do you hear?", "two",
                                                             modalities=["image", "audio"])
    assert both["input_ids"] == expected_ids and both["labels"] == expected_labels
    assert list(both["modalities"]) == ["image", "audio"]
    assert both["modalities"]["image"].shape == (3, 16, 16)
    assert torch.allclose(both["modalities"]["audio"], torch.full((4000,), 0.25))
    assert (both["id"], both["question"], both["answer"], both["type"]) == (
        "both", "How many beeps do you hear?", "two", "both/compare")
    assert img["input_ids"] == tokenizer.encode_example("What color is the shape?", "red", ["image"])[0]
    assert txt["input_ids"] == tokenizer.encode_text("A red circle.")[0] and txt["modalities"] == {}
    assert txt["labels"][0] == IGNORE_INDEX and txt["labels"][1:] == txt["input_ids"][1:]


def _bad_image_rows(root):
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    (root / "notes.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "trunc.png")
    (root / "trunc.png").write_bytes((root / "trunc.png").read_bytes()[:400])
    return {"missing.png": "not found", "empty.png": "empty", "corrupt.png": "corrupt", "tiny.png": "1x1",
            "notes.png": "cannot identify", "trunc.png": "truncated"}


def test_every_bad_file_names_manifest_record_and_file(tmp_path, tokenizer):
    _good_files(tmp_path)
    cases = _bad_image_rows(tmp_path)
    sf.write(tmp_path / "long.wav", np.zeros(8000 * 3, dtype=np.float32), 8000)
    sf.write(tmp_path / "nan.wav", np.array([0, np.nan], dtype=np.float32), 8000, subtype="FLOAT")
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), dtype=np.float32), 8000)
    rows = [("image", name, expected) for name, expected in cases.items()]
    rows += [("audio", "long.wav", "3.00 s long"), ("audio", "nan.wav", "NaN"), ("audio", "zero.wav", "zero samples"),
             ("audio", "missing.wav", "audio file not found")]
    for key, name, expected in rows:
        row = {"id": f"bad-{name}", key: name, "question": "What color is the shape?", "answer": "red"}
        dataset, manifest = _dataset(tmp_path, [GOOD[1], row], tokenizer)
        with pytest.raises(InputError, match=expected) as info:
            dataset.validate()
        message = str(info.value)
        assert f"manifest {manifest}" in message, message
        assert f"record 'bad-{name}'" in message, message
        assert str(tmp_path / name) in message, message


def test_skip_bad_drops_counts_reports_and_warns(tmp_path, tokenizer, caplog):
    _good_files(tmp_path)
    cases = _bad_image_rows(tmp_path)
    bad = [{"id": f"bad{i}", "image": name, "question": "What color is the shape?", "answer": "red"}
           for i, name in enumerate(cases)]
    dataset, manifest = _dataset(tmp_path, GOOD[:2] + bad + GOOD[2:], tokenizer)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.dataset"):
        report = dataset.validate(skip_bad=True)
    assert report["records"] == 3 and report["skipped"] == len(cases) == 6
    assert [r.id for r in dataset.records] == ["both", "img", "txt"] and len(dataset) == 3
    for i, (name, expected) in enumerate(cases.items()):
        assert f"record 'bad{i}'" in report["errors"][i] and name in report["errors"][i]
        assert expected in report["errors"][i]
    assert "skipped 6 bad record(s) of 9" in caplog.text and str(manifest) in caplog.text
    assert dataset[2]["id"] == "txt"


def test_cache_keeps_validated_tensors(tmp_path, tokenizer):
    _good_files(tmp_path)
    for cache, loads_after_two_epochs in ((True, 2), (False, 6)):
        image = ImageProcessor()
        dataset, _ = _dataset(tmp_path, GOOD, tokenizer, {"image": image, "audio": AudioProcessor()}, cache=cache)
        dataset.validate()
        assert image.loads == 2  # validation decodes each image once
        first = [dataset[i] for i in range(len(dataset))]
        second = [dataset[i] for i in range(len(dataset))]
        assert image.loads == loads_after_two_epochs
        assert torch.equal(first[0]["modalities"]["image"], second[0]["modalities"]["image"])


def test_key_without_processor_is_named(tmp_path, tokenizer):
    _good_files(tmp_path)
    path = _manifest(tmp_path, [{"id": "d1", "depth": "d.npy", "question": "How deep is it?", "answer": "far"}])
    records = read_manifest(path, ["image", "depth"])
    dataset = MultimodalDataset(records, {"image": ImageProcessor()}, tokenizer, manifest=str(path))
    with pytest.raises(InputError, match=r"uses modality 'depth' but the model has no processor") as info:
        dataset.validate()
    assert "record 'd1'" in str(info.value) and str(path) in str(info.value)
    assert str(tmp_path / "d.npy") in str(info.value)


def test_processor_exceptions_are_wrapped_with_location(tmp_path, tokenizer):
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    for name, expected in (("obj.npy", r"cannot load depth \(ValueError: .*allow_pickle"),
                           ("flat.npy", "expected a 2-D depth map")):
        rows = [{"id": "d", "depth": name, "question": "How deep is it?", "answer": "far"}]
        dataset, manifest = _dataset(tmp_path, rows, tokenizer, {"depth": DepthProcessor()})
        with pytest.raises(InputError, match=expected) as info:
            dataset.validate()
        assert f"manifest {manifest}, record 'd', file {tmp_path / name}" in str(info.value)


def test_too_long_examples_are_errors_not_truncated(tmp_path, tokenizer):
    _good_files(tmp_path)
    long_text = " ".join(["red circle"] * 40)
    rows = [GOOD[1], {"id": "long", "text": long_text}]
    n_tokens = len(tokenizer.encode_text(long_text)[0])
    dataset, manifest = _dataset(tmp_path, rows, tokenizer, max_length=n_tokens - 1)
    with pytest.raises(InputError, match=f"example is {n_tokens} tokens, over max_length={n_tokens - 1}") as info:
        dataset.validate()
    assert "record 'long'" in str(info.value) and str(manifest) in str(info.value)
    dataset, _ = _dataset(tmp_path, rows, tokenizer, max_length=n_tokens)
    assert dataset.validate()["records"] == 2 and len(dataset[1]["input_ids"]) == n_tokens


def test_prediction_records_have_prompt_only(tmp_path, tokenizer):
    _good_files(tmp_path)
    path = _manifest(tmp_path, [{"id": "p", "image": "red.png", "question": "What color is the shape?"}])
    processors = {"image": ImageProcessor()}
    dataset = MultimodalDataset(read_manifest(path, ["image"], require_answer=False), processors, tokenizer)
    dataset.validate()
    item = dataset[0]
    assert item["input_ids"] == tokenizer.encode_prompt("What color is the shape?", ["image"])
    assert item["labels"] == [IGNORE_INDEX] * len(item["input_ids"]) and item["answer"] is None
