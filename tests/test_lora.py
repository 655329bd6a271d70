"""LoRA through peft: adapters on every target change the model and merge back exactly; a LoRA run through
`mmr1 fit` trains only adapters (+ what the config keeps), its loss falls, `mmr1 export --merge-lora` writes a
plain model that answers like the unmerged one. The `trainable:` selector of staged recipes."""
from __future__ import annotations

import pytest
import torch

from data_pipelines.synth import synthesize
from e2e_utils import tiny_demo_config
from mmr1.checkpoint import model_from_checkpoint
from mmr1.cli import main
from mmr1.generation import generate
from mmr1.lora import LoRAConfig, apply_lora, has_lora, merge_lora, parameter_counts, select_trainable
from mmr1.model import MultimodalR1
from scale_utils import run_fit, scale_config, train_losses
from test_model import batch_inputs, tiny_config

ALL = ["attention", "cross_attention", "mlp", "shared_experts", "routed_experts"]


@pytest.mark.parametrize("targets", [[t] for t in ALL] + [ALL], ids=[*ALL, "all"])
def test_adapters_change_the_model_and_merge_exactly(targets):
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config())
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.5)
    ids, inputs = torch.randint(0, 64, (3, 10)), batch_inputs(model)
    model.eval()
    with torch.no_grad():
        base = model(ids, modalities=inputs).logits
    names = [n for n, _ in model.named_parameters()]
    model = apply_lora(model, LoRAConfig(targets=targets)).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("projectors.") for n in trainable)
    assert any("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids, modalities=inputs).logits, base)  # B starts at 0: no change yet
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        adapted = model(ids, modalities=inputs).logits
        merged = merge_lora(model)(ids, modalities=inputs).logits
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not has_lora(model) and [n for n, _ in model.named_parameters()] == names


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="lora.targets"):
        LoRAConfig(targets=["attn"])
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRAConfig(targets=["routed_experts"], dropout=0.1)
    with pytest.raises(ValueError, match="model.trainable"):
        select_trainable(MultimodalR1(tiny_config()), ["^nothing_like_this"])


def test_trainable_selector_projector_alignment():
    model = select_trainable(MultimodalR1(tiny_config()), ["^projectors\\.", "^modality_embeddings\\.",
                                                           "\\.cross_attn\\."])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projectors", "modality_embeddings", "backbone"}
    assert all(".cross_attn." in n for n, p in model.backbone.named_parameters(prefix="backbone") if p.requires_grad)
    assert all(enc.frozen for enc in model.encoders.values())


@pytest.mark.slow
def test_lora_fit_trains_merges_exports_and_answers_alike(tmp_path, capsys):
    data = tmp_path / "data"
    synthesize(data, num_train=12, num_val=8, num_test=8, text_records=4, seed=3)
    base = tiny_demo_config(tmp_path, data, max_steps=12)
    lora = {"r": 4, "alpha": 8.0, "targets": ALL, "train": ["cross_attn\\.gate$"]}
    config = scale_config(base, tmp_path / "run", batch_size=8, model={"lora": lora, "lr": 1.0e-2},
                          trainer={"overfit_batches": 1})
    run_fit(config)
    losses = train_losses(tmp_path / "run")
    assert losses[11] < losses[0] - 0.25, losses  # it learns the batch through the adapters alone
    counts = train_losses(tmp_path / "run", key="params/trainable")
    assert 0 < counts[0] < 0.5 * train_losses(tmp_path / "run", key="params/total")[0]

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "export")]) == 2
    assert "--merge-lora" in capsys.readouterr().err and not (tmp_path / "export").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "export"), "--merge-lora"]) == 0
    merged, tokenizer = MultimodalR1.from_pretrained(tmp_path / "export")
    unmerged, _ = model_from_checkpoint(ckpt, merge=False)
    assert has_lora(unmerged) and not has_lora(merged)
    prompts = [tokenizer.encode_prompt(q, []) for q in ("What color is the shape?", "How many beeps do you hear?")]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-5, atol=1e-5)
        answers = [generate(m.backbone, prompts, max_new_tokens=6, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
                   for m in (merged, unmerged)]
    assert answers[0] == answers[1]
    assert parameter_counts(merged)["total"] < parameter_counts(unmerged)["total"]
