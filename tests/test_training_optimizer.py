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


def test_bf16_mixed_fuses_adamw_and_still_clips_gradients(tmp_path):
    """bf16 autocast has no grad scaler, so the fused step is exact there; the module clips the gradients itself
    (Lightning's mixed-precision plugin refuses to for any fused optimizer): fused and unfused runs agree, and a
    tiny clip value changes the run as much for the fused optimizer as for the unfused one."""
    def run(clip: float, **kwargs) -> tuple[lightning.Trainer, MMR1LightningModule]:
        model = module(tmp_path, **kwargs)
        trainer = lightning.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=clip,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        trainer.fit(model, torch.utils.data.DataLoader(batches(3, model.tokenizer.vocab_size), batch_size=None))
        return trainer, model

    trainer, fused = run(1.0)
    assert trainer.optimizers[0].param_groups[0]["fused"] is True
    assert trainer.callback_metrics["train/step_s"] > 0  # what benchmarks/fused_adamw_fit.py reads
    _, plain = run(1.0, fused_adamw=False)
    _, fused_clipped = run(1e-4)
    _, plain_clipped = run(1e-4, fused_adamw=False)
    for a, b, c, d in zip(fused.parameters(), plain.parameters(), fused_clipped.parameters(),
                          plain_clipped.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(fused.parameters(), fused_clipped.parameters()))


def test_only_scaler_free_mixed_precision_counts_as_bf16_autocast():
    """fp16 autocast (CUDA only in Lightning) scales the loss: a fused optimizer would unscale inside its step,
    after clipping ran, so only the scaler-free bf16 plugin lets the module fuse AdamW and clip itself."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from mmr1.training import _bf16_autocast

    assert _bf16_autocast(MixedPrecision("bf16-mixed", "cpu"))
    assert not _bf16_autocast(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
    assert not _bf16_autocast(Precision())


def test_fp16_autocast_keeps_the_unfused_optimizer_and_refuses_a_forced_one(tmp_path):
    """Lightning runs fp16 autocast on CUDA only, so the plugin is handed to the module directly here."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    fp16 = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
    auto, forced = module(tmp_path), module(tmp_path, fused_adamw=True)
    auto._trainer = forced._trainer = fp16
    assert auto._fused_adamw_allowed() is False
    with pytest.raises(ValueError, match="fused_adamw: true cannot be honoured: the MixedPrecision plugin"):
        forced._fused_adamw_allowed()


def test_fused_adamw_fit_benchmark_reads_the_logged_step_times(tmp_path):
    """The seed-geometry benchmark (minutes, run by hand) compares exactly one switch and reads every step's time."""
    from benchmarks.fused_adamw_fit import VARIANTS, step_seconds

    assert VARIANTS == {"fused": (), "unfused": ("--model.fused_adamw", "false")}
    log = tmp_path / "logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,train/step_s\n0,0,5.0,\n0,0,,2.5\n0,1,,1.5\n0,2,,1.25\n")
    assert step_seconds(tmp_path, skip=1) == [1.5, 1.25]
