"""`benchmarks/engine.py --quick` runs all six comparisons end to end (so the benchmark cannot rot unnoticed);
the timings themselves are only meaningful in a full run (benchmarks/results/engine.md)."""
from __future__ import annotations

import json

import pytest
import torch


def quick_run(main, out):
    """main(["--quick", "--out", out]) with torch's thread count restored after (the benchmarks pin their own)."""
    threads = torch.get_num_threads()
    try:
        return main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_engine_benchmark_quick_run_writes_every_item(tmp_path):
    from benchmarks.engine import main

    result = quick_run(main, tmp_path / "engine")
    assert json.loads((tmp_path / "engine.json").read_text())["targets"] == result["targets"]
    table = (tmp_path / "engine.md").read_text()
    for item in range(1, 7):
        assert f"\n| {item} |" in table
    assert all(d["greedy_token_agreement"] > 0.9 and d["speedup"] > 0 for d in result["decode"])
    assert result["continuous_vs_static"]["throughput_ratio"] > 0 and result["async_encoding"]["speedup"] > 0
    c = result["continuous_vs_static"]  # every schedule delivers each request's own tokens, no more
    assert c["continuous"]["output_tokens"] == c["static"]["output_tokens"] == c["classic_static"]["output_tokens"]
    assert c["classic_static"]["steps"] >= c["static"]["steps"] > c["continuous"]["steps"]


def test_prefix_cache_benchmark_quick_run(tmp_path):
    from benchmarks.prefix_cache import main

    result = main(["--quick", "--rounds", "1", "--out", str(tmp_path / "prefix_cache")])
    assert json.loads((tmp_path / "prefix_cache.json").read_text())["turns"] == 2
    for workload in ("system_prompt_offline", "system_prompt_stream", "multi_turn"):
        w = result[workload]
        assert w["off"]["hit_rate"] == 0 and w["on"]["hit_rate"] > 0.3  # shared prefixes found, and only with it on
    # greedy outputs unchanged by the cache; a streamed workload's batches depend on timing, so a near-tie could
    # round the other way there (one tolerated), the others are deterministic
    for workload in ("system_prompt_offline", "multi_turn"):
        assert result[workload]["identical_outputs"] == result[workload]["n_outputs"]
    assert result["system_prompt_stream"]["identical_outputs"] >= result["system_prompt_stream"]["n_outputs"] - 1


def test_attention_groups_benchmark_quick_run(tmp_path):
    from benchmarks.attention_groups import RULES, main

    result = quick_run(main, tmp_path / "attention_groups")
    row = json.loads((tmp_path / "attention_groups.json").read_text())["rows"][0]
    assert row["output_tokens"] == result["rows"][0]["output_tokens"] > 0
    # the cost model pads less than one shared call, and never below the work the rows need
    assert 1.0 <= row["padded_over_needed"][RULES[1]] < row["padded_over_needed"][RULES[0]]


def test_prepack_benchmark_quick_run(tmp_path):
    from benchmarks.prepack import main
    from mmr1.engine.prepack import available

    if not available():
        pytest.skip("this torch build has no oneDNN linear packing")
    result = quick_run(main, tmp_path / "prepack")
    rows = json.loads((tmp_path / "prepack.json").read_text())["rows"]
    assert len(rows) == len(result["rows"]) == 2
    assert all(r["output_tokens"] > 0 and set(r["same_tokens"]) == {"plain", "packed", "loop", "packed+loop"}
               and all(share == 1.0 for share in r["same_tokens"].values()) for r in rows)  # fp32: identical tokens
    from mmr1.engine.prepack import PACKED_DTYPES
    assert PACKED_DTYPES == (torch.bfloat16,)  # the fp32 rows' widening was undone


def test_decode_attention_benchmark_quick_run(tmp_path):
    from benchmarks.decode_attention import main
    from mmr1.engine import decode_attention

    if decode_attention.function() is None:
        pytest.skip("no AVX-512, C compiler or GNU OpenMP here: the loop is not built")
    result = quick_run(main, tmp_path / "decode_attention")
    saved = json.loads((tmp_path / "decode_attention.json").read_text())
    assert [(r["dtype"], r["kv"]) for r in saved["layer"]] == [("bfloat16", "model"), ("float32", "model"),
                                                                ("bfloat16", "int8")]
    assert saved["layer"][1]["max_abs_diff"] < 1e-5  # fp32: the loop computes SDPA's result
    serving = result["serving"][0]
    assert serving["identical_requests"] == serving["requests"] == 20


def test_cpu_linear_benchmark_quick_run(tmp_path):
    from benchmarks.cpu_linear import main
    from mmr1.engine import cpu_linear

    if not cpu_linear.available():
        pytest.skip("no AVX-512, C compiler or GNU OpenMP here: the loop is not built")
    result = quick_run(main, tmp_path / "cpu_linear")
    saved = json.loads((tmp_path / "cpu_linear.json").read_text())
    bf16 = cpu_linear.available(torch.bfloat16)
    dtypes = ["float32"] + ["bfloat16"] * bf16
    assert [(p["dtype"], p["rows"]) for p in saved["products"]] == [(d, r) for d in dtypes for r in (1, 2, 4, 5, 8, 16)]
    assert saved["weights"] == 29 and saved["bf16_weights"] == 43 * bf16
    families = ["llama", "mixtral", "serving 13 MB"] + ["bf16 weight-bound", "llama bf16", "mixtral bf16"] * bf16
    assert [(d["family"], d["compile_decode"]) for d in result["decoding"]] == [
        (name, compiled) for name in families for compiled in (False, True)]
    # fp32 greedy decoding is unchanged by the loop (bf16 results may round the other way: see the benchmark)
    assert all(d["same_tokens"] for d in result["decoding"] if "bf16" not in d["family"])


@pytest.mark.slow
def test_speculative_compiled_benchmark_quick_run(tmp_path):
    """Eager and compile_decode runs of each method; every method's greedy tokens equal plain decoding's in the same
    mode."""
    from benchmarks.speculative_compiled import main

    result = quick_run(main, tmp_path / "spec")
    rows = json.loads((tmp_path / "spec.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [r["method"] for r in result["rows"]] == \
        ["plain", "prompt_lookup", "draft_first_layer"]
    assert all(r["identical"] and r["eager_tok_s"] > 0 and r["compiled_tok_s"] > 0 for r in rows)
    assert rows[0]["eager_vs_plain"] == rows[0]["compiled_vs_plain"] == 1.0
    assert "| engine.md item 3, looping | prompt_lookup |" in (tmp_path / "spec.md").read_text()


def test_async_fronts_benchmark_quick_run(tmp_path):
    """Streams and the synchronous generate give the same greedy tokens (the benchmark asserts it) and every
    setting is reported against the default step thread."""
    from benchmarks.async_fronts import main

    result = quick_run(main, tmp_path / "async_fronts")
    rows = result["settings"]
    assert "sync generate" in rows and sum(name.endswith("(default)") for name in rows) == 1
    assert [r["vs_default"] for name, r in rows.items() if name.endswith("(default)")] == [1.0]
    assert json.loads((tmp_path / "async_fronts.json").read_text())["settings"].keys() == rows.keys()
