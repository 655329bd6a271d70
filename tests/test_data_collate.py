"""MultimodalCollator shapes and masks, batches where items lack modalities, and a plug-in "depth" modality."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_pipelines import InputError, MultimodalCollator, MultimodalDataset, read_manifest
from mmr1.tokenizer import IGNORE_INDEX, R1Tokenizer
from test_data_processors import AudioProcessor, DepthProcessor, ImageProcessor


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["What color is the shape?", "red", "How many beeps?", "two", "How deep is it?", "near far"]
    return R1Tokenizer.train(texts, vocab_size=300, modalities=["image", "audio", "depth"])


def _dataset(root, rows, processors, tokenizer):
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = MultimodalDataset(read_manifest(path, list(processors)), processors, tokenizer, manifest=str(path))
    dataset.validate()
    return dataset


def test_batch_with_items_lacking_modalities(tmp_path, tokenizer):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    Image.new("RGB", (9, 5), (255, 0, 0)).save(tmp_path / "red.png")
    sf.write(tmp_path / "short.wav", np.full(800, 0.5, dtype=np.float32), 8000, subtype="FLOAT")
    rows = [
        {"id": "a", "image": "blue.png", "question": "What color is the shape?", "answer": "blue"},
        {"id": "t", "text": "red"},
        {"id": "b", "image": "red.png", "audio": "short.wav", "question": "How many beeps?", "answer": "two"},
    ]
    processors = {"image": ImageProcessor(size=4), "audio": AudioProcessor()}
    dataset = _dataset(tmp_path, rows, processors, tokenizer)
    examples = [dataset[i] for i in range(3)]
    batch = MultimodalCollator(tokenizer.pad_id, processors)(examples)

    lengths = [len(ex["input_ids"]) for ex in examples]
    B, L = 3, max(lengths)
    assert batch["ids"] == ["a", "t", "b"]
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].shape == (B, L)
    for i, ex in enumerate(examples):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][i, n:] == tokenizer.pad_id).all()
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()

    image, audio = batch["modalities"]["image"], batch["modalities"]["audio"]
    assert image["present"].tolist() == [True, False, True] and image["mask"] is None
    assert image["values"].shape == (2, 3, 4, 4)
    assert torch.equal(image["values"][0], examples[0]["modalities"]["image"])  # j-th present item
    assert torch.equal(image["values"][1], examples[2]["modalities"]["image"])
    assert audio["present"].tolist() == [False, False, True]
    assert audio["values"].shape == (1, 800) and audio["mask"].shape == (1, 800) and audio["mask"].all()
    assert batch["questions"] == ["What color is the shape?", None, "How many beeps?"]
    assert batch["answers"] == ["blue", None, "two"] and batch["types"] == [None, None, None]

    no_audio = MultimodalCollator(tokenizer.pad_id, processors)(examples[:2])
    assert list(no_audio["modalities"]) == ["image"]
    text_only = MultimodalCollator(tokenizer.pad_id, processors)(examples[1:2])
    assert text_only["modalities"] == {}


def test_audio_of_different_lengths_is_padded_and_masked(tokenizer):
    processors = {"audio": AudioProcessor()}
    ids, labels = tokenizer.encode_example("How many beeps?", "two", ["audio"])
    examples = [{"id": str(n), "input_ids": ids, "labels": labels, "modalities": {"audio": torch.ones(n)}}
                for n in (5, 9)]
    audio = MultimodalCollator(tokenizer.pad_id, processors)(examples)["modalities"]["audio"]
    assert audio["values"].shape == (2, 9) and audio["mask"].sum(1).tolist() == [5, 9]
    assert audio["values"][0, 5:].abs().sum() == 0


def test_unknown_modality_in_an_example_is_named(tokenizer):
    ids, labels = tokenizer.encode_text("red")
    examples = [{"id": "x", "input_ids": ids, "labels": labels, "modalities": {"depth": torch.zeros(1, 2, 2)}}]
    with pytest.raises(InputError, match="record 'x', batch item 0: carries modality 'depth'"):
        MultimodalCollator(tokenizer.pad_id, {"image": ImageProcessor()})(examples)


def test_plugin_modality_needs_no_change_to_data_pipelines(tmp_path, tokenizer):
    (tmp_path / "depth").mkdir()
    for name, value in (("near", 1.0), ("far", 9.0)):
        np.save(tmp_path / "depth" / f"{name}.npy", np.full((3, 5), value))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    rows = [
        {"id": "n", "depth": "depth/near.npy", "question": "How deep is it?", "answer": "near", "type": "depth/dist"},
        {"id": "i", "image": "blue.png", "question": "What color is the shape?", "answer": "blue"},
        {"id": "f", "depth": "depth/far.npy", "image": "blue.png", "question": "How deep is it?", "answer": "far"},
    ]
    processors = {"image": ImageProcessor(size=4), "depth": DepthProcessor()}
    dataset = _dataset(tmp_path, rows, processors, tokenizer)
    assert dataset.records[0].sources == {"depth": tmp_path / "depth" / "near.npy"}
    assert dataset[2]["input_ids"][:4] == [tokenizer.bos_id, tokenizer.user_id, tokenizer.marker_id("image"),
                                           tokenizer.marker_id("depth")]
    batch = MultimodalCollator(tokenizer.pad_id, processors)([dataset[i] for i in range(3)])
    depth = batch["modalities"]["depth"]
    assert depth["present"].tolist() == [True, False, True] and depth["mask"] is None
    assert depth["values"].shape == (2, 1, 3, 5) and depth["values"].dtype == torch.float32
    assert depth["values"][:, 0, 0, 0].tolist() == [1.0, 9.0]
    assert batch["modalities"]["image"]["present"].tolist() == [False, True, True]
    assert batch["types"] == ["depth/dist", None, None]
