"""Packed engine forwards (mmr1/engine/packed.py): every row's tokens in one sequence must give the logits the
padded per-group forwards give, with MoE, cross-attention rows beside text rows, long and short rows, INT8 KV."""
from __future__ import annotations

import pytest
import torch

from fusion.cross_attention import GatedCrossAttention
from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.packed import SHORT_ROW, packable
from mmr1.engine.paged_cache import PagedKVPool
from mmr1.engine.runner import cross_kv_for, forward_packed, forward_paged
from mmr1.engine.solo import SoloCache, solo_forward
from test_generation import tiny_model

# Tokens fed per row per step (0 = idle): prefill chunks longer than SHORT_ROW, short chunks and decode steps mixed.
SCHEDULE = [(20, 3, 0, 5), (1, 4, 2, 1), (1, 1, 17, 0), (1, 0, 1, 6), (2, 1, 1, 1)]
TABLES = [[0, 5, 9, 3, 12, 14, 21], [2, 11, 19], [7, 1, 4, 13, 10, 23], [6, 8, 15, 17]]  # scattered 4-token pages


def run(forward, model, kv_dtype: str, seqs, cross):
    pool = PagedKVPool.for_model(model.cfg, num_blocks=24, block_size=4, dtype=torch.float32,
                                 kv_cache_dtype=kv_dtype)
    done, out = [0] * len(seqs), [[] for _ in seqs]
    for step in SCHEDULE:
        rows = [i for i in range(len(seqs)) if step[i]]
        logits = forward(model, pool, [seqs[i][done[i]:done[i] + step[i]] for i in rows], [done[i] for i in rows],
                         [TABLES[i] for i in rows], [cross[i] for i in rows])
        for r, i in enumerate(rows):
            out[i].append(logits[r][:step[i]])
            done[i] += step[i]
    return [torch.cat(parts) for parts in out]


@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_packed_forward_equals_padded_groups(kv_dtype):
    model = tiny_model()  # MoE feed-forward, cross-attention in layer 1
    assert packable(model) and max(max(s) for s in SCHEDULE) > SHORT_ROW
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (sum(s[i] for s in SCHEDULE),), generator=g).tolist() for i in range(4)]
    memories = [torch.randn(1, t, 32, generator=g) for t in (5, 3)]
    cross = [cross_kv_for(model, memories[0]), None, cross_kv_for(model, memories[1]), None]  # image rows + text
    packed = run(forward_packed, model, kv_dtype, seqs, cross)
    padded = run(forward_paged, model, kv_dtype, seqs, cross)
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_logits_only_where_sampled_equal_the_full_logits():
    """The output head on a few positions (R1Model logits_at, forward_packed tails, solo_forward tail) gives
    exactly those rows of the full logits."""
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    with torch.no_grad():
        full = model(ids).logits
        some = model(ids, logits_at=torch.tensor([8, 3])).logits
    torch.testing.assert_close(some, full[:, [8, 3]], atol=1e-6, rtol=0)
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (20, 1, 6)]
    outs = []
    for tails in (None, [2, 1, 0]):
        pool = PagedKVPool.for_model(model.cfg, num_blocks=24, block_size=4, dtype=torch.float32)
        outs.append(forward_packed(model, pool, seqs, [0, 0, 0], TABLES[:3], None, tails=tails))
    for whole, tail, n in zip(outs[0], outs[1], (2, 1, 0)):
        assert tail.shape == (n, 64)
        torch.testing.assert_close(tail, whole[len(whole) - n:], atol=1e-6, rtol=0)
    pool = PagedKVPool.for_model(model.cfg, num_blocks=24, block_size=4, dtype=torch.float32)
    caches = [SoloCache(0, model, pool, TABLES[0], 0) for _ in range(2)]
    whole = solo_forward(model, caches[0], seqs[0], None)
    torch.testing.assert_close(solo_forward(model, caches[1], seqs[0], None, tail=1), whole[-1:], atol=1e-6, rtol=0)


def test_cross_attention_per_query_mask_equals_per_row_mask():
    torch.manual_seed(0)
    layer = GatedCrossAttention(32, 2).eval()
    with torch.no_grad():
        layer.gate.fill_(0.8)
    x, memory = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    row_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])  # row 1: no memory
    per_row = layer(x, memory, row_mask)
    per_query = layer(x, memory, row_mask[:, None, :].expand(2, 3, 4))
    torch.testing.assert_close(per_query, per_row, atol=1e-6, rtol=0)
    assert per_query[1].abs().max() == 0  # queries that see nothing get exactly zero


def test_engine_runs_one_forward_per_step_and_equals_padded_engine(monkeypatch):
    import mmr1.engine.engine as engine_module
    model = tiny_model(cross_attn_layers=())
    calls = []
    real = engine_module.forward_packed
    monkeypatch.setattr(engine_module, "forward_packed", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    prompts = [[5, 9, 2] * 7, [1, 2], [7, 7, 3, 1], [4] * 18]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 9, 3, 7)]
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=4, prefill_chunk=8))
    packed = [o.token_ids for o in eng.generate([{"prompt": p, "sampling": s} for p, s in zip(prompts, params)])]
    assert eng._packed and max(calls) == 4 and len(calls) <= eng.stats["steps"]  # at most one forward a step
    unpacked = Engine(model, config=EngineConfig(block_size=4, max_batch=4, prefill_chunk=8, packed_steps=False))
    assert not unpacked._packed  # the padded-group path as the reference
    ref = [o.token_ids for o in unpacked.generate([{"prompt": p, "sampling": s} for p, s in zip(prompts, params)])]
    assert packed == ref
    eng.check_no_leaks()


def test_sliding_window_models_keep_the_padded_path():
    from mmr1.backbone import R1Model
    from mmr1.config import R1Config
    cfg = R1Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=40,
                   layer_attention=["sliding", "full"], window=4)
    assert not packable(R1Model(cfg))
    assert not Engine(R1Model(cfg)).__dict__["_packed"]


def test_short_rows_are_split_where_padding_costs_more_than_a_call():
    from mmr1.engine.packed import CALL_COST, short_row_groups
    # Decode rows 10-12 tokens in and 400-410 tokens in: padding the short ones to 410 keys would cost
    # 2 x 400 key-rows, more than a second call.
    cached, new = [9, 399, 11, 409], [1, 1, 1, 1]
    assert short_row_groups([0, 1, 2, 3], cached, new) == [[0, 2], [1, 3]]
    # Spans close together: one call (splitting saves fewer key-rows than a call costs).
    cached = [100, 101, 102, 103]
    assert 2 * 3 < CALL_COST and short_row_groups([0, 1, 2, 3], cached, new) == [[0, 1, 2, 3]]
    # A 12-token prompt chunk never shares a call with decode rows (it would pad each of them to 12 queries);
    # rows are only ever grouped among those passed in, each exactly once.
    cached, new = [0, 50, 52, 0], [12, 1, 1, 16]
    groups = short_row_groups([0, 1, 2, 3], cached, new)
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2]]
    assert short_row_groups([], [], []) == []
