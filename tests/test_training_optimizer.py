"""The optimizer the LightningModule builds: torch's fused AdamW wherever Lightning allows it, the same updates as
the unfused one, and a clear error where it was asked for but cannot be used."""
from __future__ import annotations

import lightning
import pytest
import torch

from mmr1.config import MoEConfig, R1Config
from mmr1.tokenizer import R1Tokenizer
from mmr1.training import MMR1LightningModule
from test_moe_routing import batches


def module(tmp_path, **kwargs) -> MMR1LightningModule:
    R1Tokenizer.train(["what color is the square", "red green blue"], vocab_size=300).save(tmp_path / "tok.json")
    backbone = R1Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16,
                        moe=MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=16))
    torch.manual_seed(0)
    return MMR1LightningModule(str(tmp_path / "tok.json"), backbone=backbone, lr=1e-2, warmup_steps=1, **kwargs)


def fit(model: MMR1LightningModule, precision: str = "32-true", steps: int = 3) -> lightning.Trainer:
    trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", precision=precision, gradient_clip_val=1.0,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    data = batches(steps, model.tokenizer.vocab_size)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_fused_adamw_by_default_with_the_unfused_updates(tmp_path):
    fused, plain = module(tmp_path), module(tmp_path, fused_adamw=False)
    assert fit(fused).optimizers[0].param_groups[0]["fused"] is True
    assert not fit(plain).optimizers[0].param_groups[0]["fused"]
    for (name, a), (_, b) in zip(fused.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)  # same AdamW, other rounding
    assert any(not torch.equal(a, b) for a, b in zip(fused.model.parameters(), module(tmp_path).model.parameters()))


def test_mixed_precision_keeps_the_unfused_optimizer_and_refuses_a_forced_one(tmp_path):
    assert not fit(module(tmp_path), precision="bf16-mixed", steps=1).optimizers[0].param_groups[0]["fused"]
    with pytest.raises(ValueError, match="fused_adamw: true cannot be honoured: the MixedPrecision plugin"):
        fit(module(tmp_path, fused_adamw=True), precision="bf16-mixed", steps=1)
