"""Expert telemetry: routing statistics by hand on small index tensors, modality groups of a batch, and the
Lightning callback in a real (CPU, few-step) Trainer run: metrics in the CSV log, heatmap PNGs, one warning
per layer for a dead expert and for a collapsed router."""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from mmr1.telemetry import (ExpertTelemetry, ExpertTelemetryWarning, experts_per_token, group_stats, layer_name,
                            layer_stats, load_imbalance, save_load_heatmap, token_groups, tokens_per_expert)


@dataclass
class FakeRouting:
    """What an MoE layer hands to the telemetry (see mmr1.telemetry.MoELayerRouting)."""

    expert_indices: torch.Tensor  # (N, k_max), -1 = empty slot
    token_mask: Optional[torch.Tensor]  # (N,) bool
    router_entropy: torch.Tensor
    mean_experts_per_token: torch.Tensor
    dropped_tokens: torch.Tensor
    num_experts: int = 4
    layer_idx: Optional[int] = None
    token_entropy: Optional[torch.Tensor] = None
    token_dropped: Optional[torch.Tensor] = None


# Four tokens, the last one padding; token 1 uses one of its two slots.
INDICES = torch.tensor([[0, 2], [1, -1], [2, 1], [3, 0]])
REAL = torch.tensor([True, True, True, False])


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)  # exact expectations: no float32 rounding in the inputs


def routing(**overrides) -> FakeRouting:
    fields = dict(expert_indices=INDICES, token_mask=REAL, router_entropy=scalar(0.8),
                  mean_experts_per_token=scalar(5 / 3), dropped_tokens=torch.tensor(2))
    return FakeRouting(**{**fields, **overrides})


# ---- pure statistics ---------------------------------------------------------------------------------------
def test_tokens_per_expert_skips_empty_slots_and_padding():
    # real slots: token 0 -> 0, 2; token 1 -> 1; token 2 -> 2, 1
    assert tokens_per_expert(INDICES, 4, REAL).tolist() == [1, 2, 2, 0]
    assert tokens_per_expert(INDICES, 4).tolist() == [2, 2, 2, 1]
    assert tokens_per_expert(INDICES, 6, REAL).tolist() == [1, 2, 2, 0, 0, 0]  # experts never chosen count 0
    assert tokens_per_expert(torch.full((3, 2), -1), 4).tolist() == [0, 0, 0, 0]


def test_load_imbalance_is_max_over_mean():
    assert load_imbalance(torch.tensor([1, 2, 2, 0])).item() == 2 / (5 / 4)
    assert load_imbalance(torch.tensor([3, 3, 3, 3])).item() == 1.0
    assert load_imbalance(torch.tensor([8, 0, 0, 0])).item() == 4.0  # one expert takes all: E
    assert math.isnan(load_imbalance(torch.zeros(4, dtype=torch.long)).item())


def test_experts_per_token_counts_used_slots_of_real_tokens():
    assert experts_per_token(INDICES, REAL).item() == pytest.approx(5 / 3, abs=1e-15)
    assert experts_per_token(INDICES).item() == 7 / 4


def test_layer_stats_use_the_layers_reported_scalars():
    summary = layer_stats(routing(), 4).summary()
    assert summary == pytest.approx({"tokens": 3.0, "imbalance": 1.6, "max_share": 2 / 5, "idle_experts": 1.0,
                                     "experts_per_token": 5 / 3, "dropped_tokens": 2.0, "router_entropy": 0.8},
                                    abs=1e-12)


def test_group_stats_select_the_groups_real_tokens():
    group = torch.tensor([True, False, True, True])  # token 3 is in the group but padding
    with_per_token = routing(token_entropy=torch.tensor([0.5, 1.0, 1.5, 9.0]),
                             token_dropped=torch.tensor([0, 1, 1, 5]))
    stats = group_stats(with_per_token, 4, group)
    assert stats.load.tolist() == [1, 1, 2, 0]  # tokens 0 and 2
    assert stats.summary() == pytest.approx({"tokens": 2.0, "imbalance": 2.0, "max_share": 0.5,
                                             "idle_experts": 1.0, "experts_per_token": 2.0,
                                             "dropped_tokens": 1.0, "router_entropy": 1.0}, abs=1e-12)
    # Without per-token entropy / drops a group reports neither, rather than a guess.
    summary = group_stats(routing(), 4, group).summary()
    assert "router_entropy" not in summary and "dropped_tokens" not in summary
    assert summary["experts_per_token"] == 2.0
    # A group without real tokens reports only its (zero) size.
    assert group_stats(routing(), 4, torch.tensor([False, False, False, True])).summary() == {"tokens": 0.0}


def test_stats_add_up_over_batches_weighted_by_tokens():
    first = layer_stats(routing(), 4)  # 3 real tokens, entropy 0.8
    second = layer_stats(routing(token_mask=torch.tensor([False, True, False, False]),
                                 router_entropy=scalar(0.4), mean_experts_per_token=scalar(1.0),
                                 dropped_tokens=torch.tensor(1)), 4)  # 1 real token
    total = (first + second).summary()
    assert (first + second).load.tolist() == [1, 3, 2, 0]
    assert total["tokens"] == 4.0
    assert total["router_entropy"] == pytest.approx((3 * 0.8 + 0.4) / 4, abs=1e-12)
    assert total["experts_per_token"] == pytest.approx((5 + 1) / 4, abs=1e-12)
    assert total["dropped_tokens"] == 3.0


def test_token_groups_overlap_for_multi_modality_samples_and_skip_padding():
    batch = {"attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool),
             "modalities": {"image": {"present": torch.tensor([True, False, True])},
                            "audio": {"present": torch.tensor([False, False, True])}}}
    groups = token_groups(batch)
    assert list(groups) == ["text", "image", "audio"]
    assert groups["text"].tolist() == [[False] * 3, [True, True, False], [False] * 3]
    assert groups["image"].tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert groups["audio"].tolist() == [[False] * 3, [False] * 3, [True, False, False]]
    text_only = token_groups({"attention_mask": batch["attention_mask"], "modalities": {}})
    assert list(text_only) == ["text"] and text_only["text"].equal(batch["attention_mask"])


def test_layer_names_and_argument_checks():
    assert layer_name(routing(layer_idx=3), 0) == "layer3"
    assert layer_name(routing(), 1) == "moe1"
    with pytest.raises(ValueError, match="collapse_share"):
        ExpertTelemetry(collapse_share=1.5)
    with pytest.raises(ValueError, match="every_n_steps"):
        ExpertTelemetry(every_n_steps=0)
    ExpertTelemetry().on_train_batch_end(None, None, torch.tensor(1.0), {}, 0)  # a plain loss: nothing to do


def test_heatmap_is_a_png(tmp_path):
    path = save_load_heatmap({"layer1": torch.tensor([3, 2, 2, 0]), "layer2": torch.tensor([7, 1, 1, 1])},
                             tmp_path / "sub" / "load.png", title="t")
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"


# ---- the callback in a real Trainer run -----------------------------------------------------------------------
# Two samples of 4 tokens (N = 8, the last token padding); sample 0 carries an image.
BATCH = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
         "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
         "modalities": {"image": {"values": torch.zeros(1, 3), "mask": None, "present": torch.tensor([True, False])}}}


def routed_layers() -> list[FakeRouting]:
    n = torch.arange(8)
    mask = BATCH["attention_mask"].reshape(-1)
    # layer 1: one expert per token, n % 3 -> expert 3 never gets a token (dead). Real load [3, 2, 2, 0].
    layer1 = FakeRouting(expert_indices=torch.stack([n % 3, torch.full_like(n, -1)], dim=1), token_mask=mask,
                         router_entropy=torch.tensor(0.25), mean_experts_per_token=torch.tensor(1.0),
                         dropped_tokens=torch.tensor(0), layer_idx=1, token_entropy=torch.full((8,), 0.25),
                         token_dropped=torch.zeros(8, dtype=torch.long))
    # layer 2: expert 0 for every token, odd tokens add expert 1 + n % 3. Real load [7, 1, 1, 1]: 70% on one.
    second = torch.where(n % 2 == 1, 1 + n % 3, torch.full_like(n, -1))
    layer2 = FakeRouting(expert_indices=torch.stack([torch.zeros_like(n), second], dim=1), token_mask=mask,
                         router_entropy=torch.tensor(0.5), mean_experts_per_token=scalar(10 / 7),
                         dropped_tokens=torch.tensor(0), layer_idx=2)
    return [layer1, layer2]


class TinyMoEModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return {"loss": (self.weight ** 2).sum(), "moe_aux": routed_layers()}

    def train_dataloader(self):
        return torch.utils.data.DataLoader([BATCH] * 3, batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_logs_saves_heatmaps_and_warns_once(tmp_path):
    telemetry = ExpertTelemetry(every_n_steps=2, dead_after_steps=3, collapse_share=0.5)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=logger, callbacks=[telemetry],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyMoEModule())

    ours = [str(w.message) for w in caught if issubclass(w.category, ExpertTelemetryWarning)]
    assert len(ours) == 2, ours
    dead = [m for m in ours if "dead" in m]
    collapsed = [m for m in ours if "collapsed" in m]
    # Expert 3 of layer 1 is silent from step 1; at the step-4 check it has been so for 4 >= 3 steps.
    assert len(dead) == 1 and dead[0].startswith("MoE layer1: expert(s) [3]") and "step 4" in dead[0]
    assert len(collapsed) == 1 and collapsed[0].startswith("MoE layer2: expert 0 took 70%")

    pngs = sorted((tmp_path / "run" / "version_0" / "expert_load").glob("*.png"))
    assert [p.name for p in pngs] == ["step0000002.png", "step0000004.png", "step0000006.png"]
    assert telemetry.heatmap_paths == pngs
    for path in pngs:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("moe/layer1/imbalance")]
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    expected = {"moe/layer1/imbalance": 3 / (7 / 4), "moe/layer1/experts_per_token": 1.0,
                "moe/layer1/router_entropy": 0.25, "moe/layer1/dropped_tokens": 0.0,
                "moe/layer1/tokens": 14.0,  # 7 real tokens a step, 2 steps a window
                "moe/layer1/image/imbalance": 2 / 1, "moe/layer1/image/router_entropy": 0.25,
                "moe/layer1/text/imbalance": 1 / (3 / 4), "moe/layer1/text/tokens": 6.0,
                "moe/layer2/imbalance": 7 / (10 / 4), "moe/layer2/experts_per_token": 10 / 7,
                "moe/layer2/max_share": 0.7, "moe/layer2/router_entropy": 0.5,
                "moe/layer2/image/imbalance": 4 / (6 / 4), "moe/layer2/image/experts_per_token": 6 / 4}
    for row in rows:
        assert {k: float(row[k]) for k in expected} == pytest.approx(expected, abs=1e-12)
        assert not row.get("moe/layer2/image/router_entropy")  # layer 2 gives no per-token entropy
    assert telemetry.last_metrics["moe/layer1/idle_experts"] == 1.0
