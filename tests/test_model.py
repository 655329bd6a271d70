"""MultimodalR1 assembly: gate-0 equivalence with the text-only backbone, fusion masks, save/load, the modality
fingerprint and token source, README plug-in."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmr1.config import MoEConfig, R1Config
from mmr1.model import MultimodalConfig, MultimodalR1, TokenSource
from mmr1.tokenizer import R1Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}
TINY_W2V = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "conv_dim": [16, 16], "conv_kernel": [32, 4], "conv_stride": [16, 5],
                       "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2}}


def tiny_config(projector: str = "mlp") -> MultimodalConfig:
    backbone = R1Config(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=32,
                        cross_attn_layers=[0, 1], cross_attn_heads=2,
                        moe=MoEConfig(num_experts=4, num_groups=2, topk_groups=1, top_k=2, expert_hidden=16))
    proj = {"kind": projector, "num_latents": 4, "heads": 2}
    return MultimodalConfig.from_dict({"backbone": backbone, "encoders": {
        "image": {"name": "clip_vit", "kwargs": TINY_VIT, "projector": proj},
        "audio": {"name": "wav2vec2", "kwargs": TINY_W2V, "projector": proj}}})


def batch_inputs(model: MultimodalR1, present_image=(True, False, True), present_audio=(False, True, True)):
    torch.manual_seed(1)
    image = model.encoders["image"].processor
    audio = model.encoders["audio"].processor
    images = [image(np.random.randint(0, 255, (40, 40, 3), dtype=np.uint8)) for p in present_image if p]
    waves = [audio((np.random.randn(n).astype(np.float32), 16000)) for n, p in zip((4000, 6000, 8000), present_audio)
             if p]
    return {"image": {**image.collate(images), "present": torch.tensor(present_image)},
            "audio": {**audio.collate(waves), "present": torch.tensor(present_audio)}}


@pytest.mark.parametrize("projector", ["mlp", "resampler"])
def test_fresh_model_equals_text_only_backbone(projector):
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config(projector)).eval()
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        fused = model(ids, modalities=batch_inputs(model)).logits
        text_only = model.backbone(ids).logits
    assert torch.equal(fused, text_only)
    with torch.no_grad():  # once the gates open, the modality tokens do change the answer
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.5)
        assert not torch.allclose(model(ids, modalities=batch_inputs(model)).logits, text_only)


def test_fuse_places_tokens_on_the_rows_that_carry_them():
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config()).eval()
    with torch.no_grad():
        states, mask = model.encode_batch(batch_inputs(model), batch_size=3)
    n_image = 16  # (32 / 8) ** 2 patch tokens
    assert states.shape[0] == 3 and mask.shape == states.shape[:2]
    assert mask[:, :n_image].tolist() == [[True] * n_image, [False] * n_image, [True] * n_image]
    assert not mask[0, n_image:].any() and mask[1, n_image:].any() and mask[2, n_image:].any()
    assert torch.equal(states[1, :n_image], torch.zeros(n_image, 32))
    # the shorter clip (row 1) has fewer real frames than the longer one (row 2)
    assert mask[1, n_image:].sum() < mask[2, n_image:].sum()


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config()).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.3)
    tokenizer = R1Tokenizer.train(["what color is it red blue"] * 3, vocab_size=64)
    model.save_pretrained(tmp_path / "m", tokenizer)
    loaded, tok = MultimodalR1.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 64, (3, 10))
    inputs = batch_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids, modalities=inputs).logits, loaded(ids, modalities=inputs).logits)
    assert loaded.modalities == ["image", "audio"]
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        (tmp_path / "m" / "model.safetensors").unlink()
        MultimodalR1.from_pretrained(tmp_path / "m")


def test_modality_fingerprint_covers_what_makes_the_modality_tokens():
    """Equal for a bf16 copy and after a backbone change; different once an encoder or projector weight moves."""
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config()).eval()
    fingerprint = model.modality_fingerprint()
    assert len(fingerprint) == 16 and MultimodalR1(MultimodalConfig()).modality_fingerprint() == ""
    assert copy.deepcopy(model).to(torch.bfloat16).modality_fingerprint() == fingerprint
    with torch.no_grad():
        model.backbone.tok_embeddings.weight.add_(1.0)
        assert model.modality_fingerprint() == fingerprint
        for name in ("projectors", "encoders"):
            changed = copy.deepcopy(model)
            next(getattr(changed, name).parameters()).add_(1e-2)
            assert changed.modality_fingerprint() != fingerprint, name


def test_token_source_round_trips_and_is_absent_otherwise(tmp_path):
    source = TokenSource(model="runs/demo/export", fingerprint="0123456789abcdef")
    draft = MultimodalConfig(backbone=dataclasses.replace(tiny_config().backbone, cross_attn_memory_dim=48),
                             token_source=source)
    assert MultimodalConfig.from_dict(json.loads(json.dumps(draft.to_dict()))) == draft
    assert "token_source" not in tiny_config().to_dict()  # other models' config.json files are unchanged
    tokenizer = R1Tokenizer.train(["what color is it red blue"] * 3, vocab_size=64)
    saved = json.loads((MultimodalR1(draft).save_pretrained(tmp_path / "d", tokenizer) / "config.json").read_text())
    assert saved["token_source"] == {"model": "runs/demo/export", "fingerprint": "0123456789abcdef"}
    assert MultimodalR1.from_pretrained(tmp_path / "d")[0].config.token_source == source


def test_model_config_errors_are_clear():
    cfg = tiny_config()
    cfg.backbone.cross_attn_layers = []
    with pytest.raises(ValueError, match="cross_attn_layers is empty"):
        MultimodalR1(cfg)
    with pytest.raises(ValueError, match="unknown encoder|not registered|available"):
        MultimodalR1(MultimodalConfig.from_dict({"backbone": {"cross_attn_layers": [0]},
                                                 "encoders": {"image": {"name": "no_such_encoder"}}}))


def test_readme_plugin_example_runs(tmp_path):
    """The encoder plug-in in the README is complete, working code."""
    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "class DepthEncoder" in block)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    encoder = namespace["DepthEncoder"](size=16, patch=8, width=24)
    path = tmp_path / "d.npy"
    np.save(path, np.random.rand(20, 30).astype(np.float32))
    batch = encoder.processor.collate([encoder.processor(str(path)), encoder.processor(str(path))])
    tokens, mask = encoder(batch["values"], batch["mask"])
    assert tokens.shape == (2, 4, 24) and mask.all()
    from data_pipelines import InputError

    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(InputError, match="bad.npy"):
        encoder.processor(str(tmp_path / "bad.npy"))


def test_frozen_encoder_gets_no_gradients_and_stays_in_eval():
    cfg = tiny_config()
    cfg.encoders["image"].freeze = True
    model = MultimodalR1(cfg).train()
    assert not model.encoders["image"].training and model.encoders["audio"].training
    assert not any(p.requires_grad for p in model.encoders["image"].parameters())
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.5)
    out = model(torch.randint(0, 64, (3, 10)), modalities=batch_inputs(model))
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.encoders["image"].parameters())
    assert any(p.grad is not None for p in model.encoders["audio"].parameters())
    assert model.projectors["image"].fc1.weight.grad is not None
