"""Journey 2: a third-party encoder for a NEW modality (depth maps in .npy), found only through its entry point,
trains through `mmr1 fit` from YAML in a fresh process, exports, and answers through the Pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from data_pipelines.synth import synthesize
from e2e_utils import ROOT, tiny_demo_config


def add_depth_maps(data_dir):
    """Give every image record of the tiny train/val manifests a depth map, as a plug-in user would."""
    rng = np.random.default_rng(0)
    (data_dir / "depth").mkdir()
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for r in records:
            if "image" in r:
                np.save(data_dir / "depth" / f"{r['id']}.npy", rng.random((24, 24)).astype(np.float32))
                r["depth"] = f"depth/{r['id']}.npy"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_entry_point_encoder_trains_through_cli(depth_plugin, tmp_path):
    import encoders

    assert depth_plugin in encoders.list_encoders()
    data = tmp_path / "data"
    synthesize(data, num_train=16, num_val=4, num_test=4, text_records=2, seed=2)
    add_depth_maps(data)
    config = tiny_demo_config(tmp_path, data, max_steps=2, extra_encoders={
        "depth": {"name": depth_plugin, "kwargs": {"size": 16, "patch_size": 8, "width": 32},
                  "projector": {"kind": "resampler", "num_latents": 4, "heads": 2}}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fit = subprocess.run([sys.executable, "-m", "mmr1.cli", "fit", "--config", str(config)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export = subprocess.run([sys.executable, "-m", "mmr1.cli", "export", "--checkpoint", str(ckpt),
                             "--output", str(tmp_path / "export")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    config_json = json.loads((tmp_path / "export" / "config.json").read_text())
    assert list(config_json["encoders"]) == ["image", "audio", "depth"]

    from mmr1 import Pipeline

    qa = Pipeline.from_pretrained(tmp_path / "export")
    try:
        record = next(json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()
                      if "depth" in line)
        answer = qa(record["question"], image=str(data / record["image"]), depth=str(data / record["depth"]),
                    max_new_tokens=3)
        assert isinstance(answer, str)
        assert qa.tokenizer.marker_id("depth") >= 0
    finally:
        qa.close()
