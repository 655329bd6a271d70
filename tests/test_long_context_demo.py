"""configs/profiles/demo_hybrid.yaml: the demo model with sliding/hybrid attention trains through `mmr1 fit`."""
from __future__ import annotations

import csv
import math

import torch
import yaml

from data_pipelines.synth import synthesize
from e2e_utils import ROOT, tiny_demo_config
from mmr1.checkpoint import export_checkpoint, model_from_checkpoint
from mmr1.cli import main
from mmr1.model import MultimodalR1


def test_demo_hybrid_profile_fits_a_few_steps(tmp_path):
    data = tmp_path / "data"
    synthesize(data, num_train=24, num_val=8, num_test=8, text_records=4, seed=1)
    config = tiny_demo_config(tmp_path, data, max_steps=6)
    cfg = yaml.safe_load(config.read_text())
    overlay = yaml.safe_load((ROOT / "configs" / "profiles" / "demo_hybrid.yaml").read_text())["model"]["backbone"]
    # The tiny demo has 2 layers and 2 heads over 1 KV head; the profile schedules 4 layers, and with 2 KV heads
    # one head is local and one global in its hybrid layer.
    cfg["model"]["backbone"].update(overlay, n_layers=4, n_kv_heads=2)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["fit", "--config", str(config)]) == 0

    model, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    kinds = [block.attn.kind for block in model.backbone.layers]
    assert kinds == ["sliding", "hybrid", "sliding", "full"]
    assert model.backbone.layers[0].attn.window == overlay["window"] < cfg["data"]["max_length"]
    rows = list(csv.DictReader(next((tmp_path / "run" / "logs").rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    export_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "export")  # config.json round trip
    loaded, _ = MultimodalR1.from_pretrained(tmp_path / "export")
    assert loaded.config.backbone == model.config.backbone
