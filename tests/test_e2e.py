"""The three user journeys end to end on a tiny model: synth data -> `mmr1 fit` -> export -> Pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_pipelines.errors import InputError
from data_pipelines.synth import synthesize
from e2e_utils import tiny_demo_config
from mmr1 import __version__
from mmr1.checkpoint import export_checkpoint, model_from_checkpoint, read_checkpoint
from mmr1.cli import main
from mmr1.engine import SamplingParams
from mmr1.model import MultimodalR1
from mmr1.pipeline import Pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    synthesize(data, num_train=24, num_val=8, num_test=8, text_records=4, seed=1)
    config = tiny_demo_config(tmp, data, max_steps=4)
    assert main(["fit", "--config", str(config)]) == 0
    return tmp, data, config


def test_fit_writes_checkpoints_and_logs(trained):
    tmp, _, _ = trained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    checkpoint = read_checkpoint(ckpt)  # weights_only=True load
    assert checkpoint["global_step"] == 4
    metrics = list((tmp / "run" / "logs").rglob("metrics.csv"))
    header = metrics[0].read_text().splitlines()[0]
    assert metrics and "train/loss" in header
    # expert telemetry from configs/demo.yaml: per-layer load metrics and heatmaps in the log dir
    assert "moe/layer1/imbalance" in header
    heatmaps = list((tmp / "run" / "logs").rglob("expert_load/step*.png"))
    assert len(heatmaps) >= 2


def test_resume_from_last_continues(trained, recwarn):
    tmp, data, config = trained
    text = config.read_text().replace("max_steps: 4", "max_steps: 6")
    resumed = tmp / "resume.yaml"
    resumed.write_text(text)
    progress = read_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]
    assert progress["epoch_loop.batch_progress"]["current"]["completed"] > 0  # taken in the middle of an epoch
    assert main(["fit", "--config", str(resumed), "--ckpt_path", "last"]) == 0
    assert read_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6
    # The DataModule resumes mid-epoch exactly (tests/test_resume.py): Lightning's "not resumable" warning is false.
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]


def test_export_roundtrip_identical_logits(trained, tmp_path):
    tmp, _, _ = trained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(ckpt, out)
    reference, tokenizer = model_from_checkpoint(ckpt)
    loaded, tokenizer2 = MultimodalR1.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode_prompt("What color is the shape?", ["image", "audio"])])
    image = reference.encoders["image"].processor(Image.new("RGB", (40, 40), "red"))[None]
    wave = reference.encoders["audio"].processor((np.sin(np.arange(8000) / 5.0).astype(np.float32), 16000))
    modalities = {"image": {"values": image, "mask": None, "present": torch.tensor([True])},
                  "audio": {**reference.encoders["audio"].processor.collate([wave]), "present": torch.tensor([True])}}
    with torch.no_grad():
        a = reference(ids, modalities=modalities).logits
        b = loaded(ids, modalities=modalities).logits
    assert torch.equal(a, b)
    assert tokenizer2.encode("red circle") == tokenizer.encode("red circle")


def test_pipeline_answers_paths_objects_and_batches(trained, tmp_path):
    tmp, data, _ = trained
    out = tmp_path / "export"
    export_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt", out)
    images = sorted((data / "images").glob("*.png"))[:2]
    wavs = sorted((data / "audio").glob("*.wav"))[:2]
    qa = Pipeline.from_pretrained(out)
    try:
        assert isinstance(qa("What color is the shape?", image=str(images[0]), max_new_tokens=4), str)
        wave, rate = sf.read(wavs[0], dtype="float32")
        answer = qa("Are there as many shapes as beeps?", image=Image.open(images[0]), audio=(wave, rate),
                    max_new_tokens=4)
        assert isinstance(answer, str)
        batch = qa(["What color is the shape?", "How many beeps do you hear?"], image=[str(images[1]), None],
                   audio=[None, str(wavs[1])], max_new_tokens=4)
        assert isinstance(batch, list) and len(batch) == 2
        # the batch answer equals the single answer: batching doesn't change greedy outputs
        assert batch[0] == qa("What color is the shape?", image=str(images[1]), max_new_tokens=4)
        sampled = [qa("What color is the shape?", image=str(images[0]), temperature=1.0, top_p=0.9, seed=3,
                      max_new_tokens=4) for _ in range(2)]
        assert sampled[0] == sampled[1]
        empty = tmp_path / "empty.wav"
        empty.write_bytes(b"")
        with pytest.raises(InputError, match=r"batch item 1.*empty\.wav"):
            qa(["q", "q"], audio=[str(wavs[0]), str(empty)])
        tiny = tmp_path / "tiny.png"
        Image.new("RGB", (1, 1), "red").save(tiny)
        with pytest.raises(InputError, match=r"batch item 1.*tiny\.png"):
            qa(["q", "q"], image=[str(images[0]), str(tiny)])
        with pytest.raises(InputError, match="missing.png"):
            qa("q", image=str(tmp_path / "missing.png"))
        with pytest.raises(TypeError, match="unknown input"):
            qa("q", video="x.mp4")
    finally:
        qa.close()


def test_validate_test_and_predict_subcommands(trained, capsys):
    tmp, data, config = trained
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    assert main(["validate", "--config", str(config), "--ckpt_path", ckpt]) == 0
    assert main(["test", "--config", str(config), "--ckpt_path", ckpt]) == 0
    out = capsys.readouterr().out
    assert "test/answer_acc" in out and "val/answer_acc" in out
    assert main(["predict", "--config", str(config), "--ckpt_path", ckpt,
                 "--data.predict_manifest", str(data / "test.jsonl")]) == 0


def test_ask_command_answers_like_the_pipeline(trained, tmp_path, capsys):
    tmp, data, _ = trained
    out = tmp_path / "export"
    export_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt", out)
    image, wav = sorted((data / "images").glob("*.png"))[0], sorted((data / "audio").glob("*.wav"))[0]
    qa = Pipeline.from_pretrained(out)
    try:
        expected = qa("Are there as many shapes as beeps?", image=str(image), audio=str(wav), max_new_tokens=4)
        assert qa("Are there as many shapes as beeps?", image=str(image), audio=str(wav),
                  sampling=SamplingParams(max_new_tokens=4)) == expected
    finally:
        qa.close()
    capsys.readouterr()
    assert main(["ask", "--model", str(out), "Are there as many shapes as beeps?", "--image", str(image),
                 "--audio", str(wav), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # bad input: a clear message and exit status 2, no traceback
    assert main(["ask", "--model", str(out), "q", "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: image file not found" in capsys.readouterr().err
    assert main(["ask", "--model", str(tmp_path / "nowhere"), "q"]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ask", "--model", str(out), "q", "--input", "depth=x.npy"])
    assert "takes ['image', 'audio'], not ['depth']" in capsys.readouterr().err


def test_top_level_help_version_and_unknown_command(capsys):
    assert main([]) == 0 and main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "export", "evaluate", "ask"):
        assert f"\n  {command} " in usage
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mmr1 {__version__}\n"
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_user_errors_are_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch):
    assert main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"mmr1 export: checkpoint not found: {tmp_path / 'nope.ckpt'}\n"
    assert main(["evaluate", "--model", str(tmp_path), "--manifest", str(tmp_path / "nope.jsonl")]) == 2
    assert "mmr1 evaluate: " in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert main(["data", "synth", "--out", str(tmp_path / "taken")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    monkeypatch.setenv("MMR1_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x")])


def test_pipeline_scores_answers_by_teacher_forced_log_probability(trained, tmp_path):
    tmp, data, _ = trained
    out = tmp_path / "export"
    export_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt", out)
    image = str(sorted((data / "images").glob("*.png"))[0])
    qa = Pipeline.from_pretrained(out)
    try:
        scores = qa.score("What color is the shape?", ["red", "green", "dark blue"], image=image)
    finally:
        qa.close()
    model, tokenizer = MultimodalR1.from_pretrained(out)
    proc = model.encoders["image"].processor
    modalities = {"image": {**proc.collate([proc(image)]), "present": torch.tensor([True])}}
    for answer, score in scores.items():  # reference: one full forward over question + answer
        ids, labels = tokenizer.encode_example("What color is the shape?", answer, ["image"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]), modalities=modalities).logits[0], dim=-1)
        expected = sum(logp[p - 1, ids[p]].item() for p in range(1, len(ids)) if labels[p] >= 0)
        assert score == pytest.approx(expected, abs=1e-3)
        assert score < 0
