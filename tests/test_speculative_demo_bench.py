"""benchmarks/speculative_demo.py runs end to end on tiny random exports of a target and a draft."""
from __future__ import annotations

import dataclasses
import json

import torch

from benchmarks import speculative_demo
from data_pipelines.synth import synthesize
from mmr1.model import MultimodalR1
from mmr1.tokenizer import R1Tokenizer
from test_model import tiny_config


def tiny_export(path, tokenizer, seed, **backbone):
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, vocab_size=tokenizer.vocab_size,
                                                                max_seq_len=48, **backbone))
    MultimodalR1(cfg).eval().save_pretrained(path, tokenizer)
    return path


def test_speculative_demo_benchmark_smoke(tmp_path):
    data = tmp_path / "data"
    synthesize(data, num_train=12, num_val=4, num_test=6, text_records=4, seed=2)
    tokenizer = R1Tokenizer.from_file(data / "tokenizer.json")
    target = tiny_export(tmp_path / "target", tokenizer, 0)
    draft = tiny_export(tmp_path / "draft", tokenizer, 1, n_layers=1, cross_attn_layers=[0])
    out = tmp_path / "result"
    result = speculative_demo.main(["--target", str(target), "--draft", str(draft), "--data", str(data),
                                    "--requests", "3", "--repeats", "1", "--out", str(out)])
    for workload in ("text", "questions"):
        rows = result[workload]
        assert rows["requests"] == 3 and rows["output_tokens"] > 0
        assert all(rows[m]["identical"] and rows[m]["seconds"] > 0 for m in ("plain", "draft", "prompt_lookup"))
    assert json.loads(out.with_suffix(".json").read_text())["text"]["draft"]["speedup"] > 0
    assert "| text |" in out.with_suffix(".md").read_text()
