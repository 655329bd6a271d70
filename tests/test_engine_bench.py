"""`benchmarks/engine.py --quick` runs all six comparisons end to end (so the benchmark cannot rot unnoticed);
the timings themselves are only meaningful in a full run (benchmarks/results/engine.md)."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_engine_benchmark_quick_run_writes_every_item(tmp_path):
    from benchmarks.engine import main

    threads = torch.get_num_threads()
    try:
        result = main(["--quick", "--out", str(tmp_path / "engine")])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread for itself
    assert json.loads((tmp_path / "engine.json").read_text())["targets"] == result["targets"]
    table = (tmp_path / "engine.md").read_text()
    for item in range(1, 7):
        assert f"\n| {item} |" in table
    assert all(d["greedy_token_agreement"] > 0.9 and d["speedup"] > 0 for d in result["decode"])
    assert result["continuous_vs_static"]["throughput_ratio"] > 0 and result["async_encoding"]["speedup"] > 0
