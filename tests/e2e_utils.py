"""Helpers for end-to-end tests: a tiny synthetic data set and a tiny version of configs/demo.yaml."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_demo_config(tmp_path: Path, data_dir: Path, *, max_steps: int = 4, extra_encoders: dict | None = None,
                     train_manifest: str | None = None) -> Path:
    """configs/demo.yaml shrunk to a few CPU steps, writing everything under tmp_path."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    trainer = cfg["trainer"]
    trainer.update(max_steps=max_steps, max_epochs=100, precision="32-true", log_every_n_steps=1,
                   limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "run")
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
            cb["init_args"]["every_n_train_steps"] = 2
        if cb["class_path"].endswith("ExpertTelemetry"):
            cb["init_args"]["every_n_steps"] = 2
    model = cfg["model"]
    model["tokenizer"] = str(data_dir / "tokenizer.json")
    model["warmup_steps"] = 1
    model["backbone"].update(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, cross_attn_layers=[0, 1],
                             cross_attn_heads=2)
    model["backbone"]["moe"].update(num_experts=4, num_groups=2, topk_groups=1, top_k=2, expert_hidden=16)
    model["encoders"]["image"]["kwargs"]["vision_cfg"] = {"image_size": 32, "patch_size": 8, "width": 32,
                                                          "layers": 1, "heads": 2, "mlp_ratio": 2.0}
    model["encoders"]["audio"]["kwargs"]["config"].update(hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64)
    if extra_encoders:
        model["encoders"].update(extra_encoders)
    data = cfg["data"]
    data.update(train_manifest=train_manifest or str(data_dir / "train.jsonl"),
                val_manifest=str(data_dir / "val.jsonl"), test_manifest=str(data_dir / "test.jsonl"),
                batch_size=4)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
