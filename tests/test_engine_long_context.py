"""The engine on sliding-window / hybrid-attention models: every request of a mixed continuous batch equals
single-request greedy `generate` (contiguous ring-buffer KVCache), generation running well past the window."""
from __future__ import annotations

import pytest
import torch

from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.paged_cache import PagedKVPool
from engine_stub import paged_logits
from mmr1.generation import generate
from test_long_context import long_model

# Prompts longer and shorter than the window (5), decode lengths that run 3-6 windows past it.
PROMPTS = [[1, 9, 2, 33, 7, 41, 12, 3, 8], [1, 7], [1, 12, 40, 3, 3, 18, 60, 5, 6, 2, 44, 13, 9], [1, 22, 2]]
NEW = [14, 22, 10, 27]


@pytest.mark.parametrize("schedule", ["sliding", "hybrid", "mixed", "alibi"])
@pytest.mark.parametrize("chunked", [False, True])
def test_mixed_batch_equals_single_request_greedy_past_the_window(schedule, chunked):
    model = long_model(schedule, window=5, block=4, seed=1)
    with torch.no_grad():  # peaked logits so greedy paths vary (not one repeated token)
        model.init_weights(std=0.3)
    small = dict(block_size=4, max_batch=3, max_num_batched_tokens=8, prefill_chunk=3)
    eng = Engine(model, config=EngineConfig(**small) if chunked else EngineConfig(block_size=4))
    ids = [eng.add_request(p, sampling=SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, NEW)]
    while eng.has_unfinished():
        eng.step()
    refs = [generate(model, [p], max_new_tokens=n)[0] for p, n in zip(PROMPTS, NEW)]
    assert [eng.output(i).token_ids for i in ids] == refs
    assert all(len(set(r)) > 3 for r in refs)  # real, varied continuations
    eng.check_no_leaks()


@pytest.mark.parametrize("schedule", ["sliding", "mixed"])
def test_paged_logits_equal_contiguous_cache_logits(schedule):
    """Rows with different cached lengths in one forward (the left-padded layout): logits match a full
    recompute of each sequence (no cache, fp32, 1e-5)."""
    model = long_model(schedule, window=4, block=4, seed=2)
    torch.manual_seed(5)
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (15, 6, 11)]
    with torch.no_grad():
        reference_logits = [model(torch.tensor([s])).logits[0] for s in seqs]
    pool = PagedKVPool.for_model(model.cfg, num_blocks=16, block_size=4, dtype=torch.float32)
    tables = [[0, 5, 9, 3], [2, 4], [7, 1, 6]]
    schedule_ = [(5, 4, 2), (1, 0, 3), (4, 2, 1), (1, 0, 5), (4, 0, 0)]  # tokens fed per row per step
    paged = paged_logits(model, pool, seqs, tables, schedule_)
    for i in range(3):
        torch.testing.assert_close(paged[i], reference_logits[i], atol=1e-5, rtol=0)


def test_global_tokens_models_are_refused_early():
    model = long_model("global_tokens")
    with pytest.raises(ValueError, match="global_tokens"):
        Engine(model)
