"""Distillation from a trained model (mmr1.distill): the loss is the temperature-scaled KL on supervised tokens,
training with it moves a student's next-token distributions to the teacher's (and leaves the teacher out of the
student's parameters and checkpoints), and a teacher that cannot read the student's batches is refused up front."""
from __future__ import annotations

import dataclasses
import re
import warnings

import lightning
import numpy as np
import pytest
import torch

from mmr1.distill import DistillConfig, distillation_loss, load_teacher
from mmr1.model import MultimodalR1, TokenSource
from mmr1.pipeline import Pipeline
from mmr1.tokenizer import IGNORE_INDEX, R1Tokenizer
from mmr1.training import MMR1LightningModule
from test_model import batch_inputs, tiny_config


def test_loss_is_the_scaled_kl_over_supervised_tokens():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = IGNORE_INDEX
    for T in (1.0, 2.0):
        kept = targets != IGNORE_INDEX
        p = (teacher[kept] / T).softmax(-1)
        expected = (p * (p.log() - (student[kept] / T).log_softmax(-1))).sum(-1).mean() * T * T
        torch.testing.assert_close(distillation_loss(student, teacher, targets, T), expected)
    assert distillation_loss(teacher, teacher, targets).abs().item() < 1e-6
    nothing = torch.full_like(targets, IGNORE_INDEX)
    assert distillation_loss(student, teacher, nothing).item() == 0.0


def test_config_is_checked():
    with pytest.raises(ValueError, match="weight"):
        DistillConfig("teacher", weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig("teacher", temperature=0.0)
    with pytest.raises(ValueError, match="modality_tokens"):
        DistillConfig("teacher", modality_tokens="both")


def _tokenizer(tmp_path, words="what color is the square red green blue") -> R1Tokenizer:
    tokenizer = R1Tokenizer.train([words, "one two three beeps"], vocab_size=300, modalities=["image", "audio"])
    tokenizer.save(tmp_path / "tok.json")
    return tokenizer


def _teacher(tmp_path, tokenizer: R1Tokenizer, name: str = "teacher", gate: float = 0.0):
    """gate: the cross-attention gates' value (0, as built: the teacher's outputs ignore its modality tokens); with
    a gate, larger weights too, so that its next-token distributions are peaked and differ with the inputs."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, vocab_size=tokenizer.vocab_size))
    teacher = MultimodalR1(cfg).eval()
    if gate:
        teacher.backbone.init_weights(std=0.3)
    with torch.no_grad():
        for block in teacher.backbone.layers:
            block.cross_attn.gate.fill_(gate)
    teacher.save_pretrained(tmp_path / name, tokenizer)
    return tmp_path / name


def _student(tmp_path, teacher_dir, weight: float = 1.0, encoders=None) -> MMR1LightningModule:
    cfg = tiny_config()
    backbone = dataclasses.replace(cfg.backbone, n_layers=1, cross_attn_layers=[0], moe=None)
    torch.manual_seed(1)
    return MMR1LightningModule(str(tmp_path / "tok.json"), backbone=backbone, encoders=encoders or cfg.encoders,
                               lr=1e-2, warmup_steps=1, distill=DistillConfig(str(teacher_dir), weight=weight))


def test_training_moves_the_student_to_the_teacher(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    teacher_dir = _teacher(tmp_path, tokenizer)
    module = _student(tmp_path, teacher_dir)
    teacher, _ = MultimodalR1.from_pretrained(teacher_dir)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, tokenizer.vocab_size, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "modalities": batch_inputs(teacher)}
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)

    def kl() -> float:
        with torch.no_grad():
            student_logits = module.model(ids, mask, batch["modalities"]).logits
            return distillation_loss(student_logits, teacher(ids, mask, batch["modalities"]).logits, targets).item()

    before = kl()
    trainer = lightning.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 30, batch_size=None))
    assert kl() < 0.2 * before
    # The teacher ran (frozen) beside the student, but is not part of it: not trained, not in its state.
    assert module._teacher is not None and all(not p.requires_grad and p.grad is None
                                               for p in module._teacher.model.parameters())
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
    assert module.hparams["distill"] == {"teacher": str(teacher_dir), "weight": 1.0, "temperature": 1.0,
                                         "modality_tokens": "own"}


def test_a_teacher_that_cannot_read_the_batches_is_refused(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    teacher_dir = _teacher(tmp_path, tokenizer)
    student = _student(tmp_path, teacher_dir)
    (tmp_path / "other").mkdir()
    other_tokenizer = _tokenizer(tmp_path / "other", words="a completely different corpus of words")
    stranger = _teacher(tmp_path, other_tokenizer, "stranger")
    with pytest.raises(ValueError, match="tokenizer"):
        load_teacher(DistillConfig(str(stranger)), student.model, student.tokenizer)
    encoders = tiny_config().encoders
    image = encoders["image"]
    vision = {**image.kwargs["vision_cfg"], "image_size": 2 * image.kwargs["vision_cfg"]["image_size"]}
    encoders["image"] = dataclasses.replace(image, kwargs={**image.kwargs, "vision_cfg": vision})
    bigger_images = _student(tmp_path, teacher_dir, encoders=encoders)
    with pytest.raises(ValueError, match="'image' inputs are prepared differently"):
        load_teacher(DistillConfig(str(teacher_dir)), bigger_images.model, bigger_images.tokenizer)
    with pytest.raises(FileNotFoundError, match="distill.teacher"):
        load_teacher(DistillConfig(str(tmp_path / "missing")), student.model, student.tokenizer)


def test_the_teacher_follows_the_students_device_and_dtype(tmp_path):
    """bf16-true turns the student's weights and the batch's float inputs to bf16: the teacher runs in bf16 too."""
    tokenizer = _tokenizer(tmp_path)
    module = _student(tmp_path, _teacher(tmp_path, tokenizer), weight=0.5)
    teacher, _ = MultimodalR1.from_pretrained(tmp_path / "teacher")
    ids = torch.randint(5, tokenizer.vocab_size, (3, 10), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones(3, 10, dtype=torch.bool), "labels": ids,
             "modalities": batch_inputs(teacher)}
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", precision="bf16-true", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    assert {p.dtype for p in module._teacher.model.parameters()} == {torch.bfloat16}


def _token_reader(tmp_path, teacher_dir, **backbone) -> MMR1LightningModule:
    """A student with no encoders whose cross-attention reads the teacher's modality tokens (width 32)."""
    cfg = dataclasses.replace(tiny_config().backbone, dim=16, n_layers=1, cross_attn_layers=[0], moe=None,
                              cross_attn_memory_dim=32)
    torch.manual_seed(1)
    return MMR1LightningModule(str(tmp_path / "tok.json"), backbone=dataclasses.replace(cfg, **backbone),
                               lr=1e-2, warmup_steps=1, gate_lr_scale=10.0,
                               distill=DistillConfig(str(teacher_dir), weight=1.0, modality_tokens="teacher"))


def test_a_student_can_read_the_teachers_modality_tokens(tmp_path, capsys):
    """modality_tokens: teacher -- the student has no encoders; its cross-attention learns to read the teacher's
    modality tokens, and what it exports reads them too (the engine hands a draft its target's tokens)."""
    tokenizer = _tokenizer(tmp_path)
    teacher_dir = _teacher(tmp_path, tokenizer, gate=1.0)  # its next-token distributions depend on the inputs
    teacher, teacher_tokenizer = MultimodalR1.from_pretrained(teacher_dir)
    module = _token_reader(tmp_path, teacher_dir)
    assert module.model.modalities == [] and list(module.processors()) == ["image", "audio"]
    assert module.tokenizer.tok.get_vocab() == teacher_tokenizer.tok.get_vocab()  # the teacher's modality markers
    # One text, three different image/audio inputs: the teacher's distributions differ between the rows only
    # through its modality tokens, so the student can only follow them by reading those tokens.
    np.random.seed(0)  # batch_inputs' images and waveforms
    ids = torch.randint(5, tokenizer.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2)).expand(3, 10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "modalities": batch_inputs(teacher)}
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)
    memory = teacher.encode_batch(batch["modalities"], 3)

    def kl(with_memory: bool = True) -> float:
        with torch.no_grad():
            states, memory_mask = memory if with_memory else (None, None)
            student = module.model.backbone(ids, attention_mask=mask, cross_states=states, cross_mask=memory_mask)
            return distillation_loss(student.logits, teacher(ids, mask, batch["modalities"]).logits, targets).item()

    before = kl()
    trainer = lightning.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 30, batch_size=None))
    assert kl() < 0.5 * before  # 0.25-0.29 of it over four image/audio draws
    gate = module.model.backbone.layers[0].cross_attn.gate
    assert gate.abs().item() > 0.1 and kl(with_memory=False) > 1.2 * kl()  # it uses the teacher's tokens (1.3-1.5x)
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
    assert not any(k.startswith("model.encoders") for k in module.state_dict())
    exported, _ = MultimodalR1.from_pretrained(module.model.save_pretrained(tmp_path / "student", module.tokenizer))
    assert exported.config.backbone.cross_attn_memory_dim == 32 and exported.modalities == []
    # It records the teacher whose tokens it reads, so the engine can tell when it drafts for another target.
    assert exported.config.token_source == TokenSource(str(teacher_dir), teacher.modality_fingerprint())
    # On its own it takes no image: the refusal says why and how such a model runs.
    with pytest.raises(TypeError, match=r"takes \[\] \(it has no encoders: .* reads another model's modality.*"
                                        + re.escape(f"distilled from {teacher_dir}: Pipeline.from_pretrained("
                                                    f"'{teacher_dir}', draft=")):
        Pipeline(exported, module.tokenizer)("what color is the square", image=np.zeros((8, 8, 3), np.uint8))
    # As the teacher's draft, through the Pipeline and `mmr1 ask --draft`: the answers are the teacher's own.
    images = [np.random.randint(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["what color is the square", "is it red", "what is the square"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # its own teacher: no warning about another target
        plain, drafted = Pipeline.from_pretrained(teacher_dir), Pipeline.from_pretrained(teacher_dir,
                                                                                         draft=tmp_path / "student")
    try:
        assert drafted(questions, image=images, max_new_tokens=6) == plain(questions, image=images, max_new_tokens=6)
        assert drafted.engine.draft_multimodal is None and drafted.engine.stats["drafted"] > 0
    finally:
        plain.close()
        drafted.close()
    from PIL import Image

    from mmr1.cli import main
    Image.fromarray(images[0]).save(tmp_path / "x.png")
    capsys.readouterr()
    for extra in ([], ["--draft", str(tmp_path / "student")]):
        assert main(["ask", "--model", str(teacher_dir), "is it red", "--image", str(tmp_path / "x.png"), *extra]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]


def test_a_student_that_cannot_read_the_teachers_tokens_is_refused(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    teacher_dir = _teacher(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="cross_attn_memory_dim: 32"):
        _token_reader(tmp_path, teacher_dir, cross_attn_memory_dim=None)
    with pytest.raises(ValueError, match="cross_attn_layers"):
        _token_reader(tmp_path, teacher_dir, cross_attn_layers=[])
    with pytest.raises(ValueError, match="remove model.encoders"):
        MMR1LightningModule(str(tmp_path / "tok.json"), backbone=tiny_config().backbone,
                            encoders=tiny_config().encoders,
                            distill=DistillConfig(str(teacher_dir), modality_tokens="teacher"))
    with pytest.raises(FileNotFoundError, match="distill.teacher"):
        _token_reader(tmp_path, tmp_path / "missing")
    own_encoders = tiny_config()
    with pytest.raises(ValueError, match="cross_attn_memory_dim=24"):  # its projectors give width dim
        MultimodalR1(dataclasses.replace(own_encoders, backbone=dataclasses.replace(own_encoders.backbone,
                                                                                    cross_attn_memory_dim=24)))
