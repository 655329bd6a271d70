"""EngineConfig(compile_decode=True): the batch-1 decode step as one torch.compile graph (static shapes, masked
attention over the whole contiguous buffer) gives the same tokens as the eager paths."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.runner import cross_kv_for
from mmr1.engine.solo import SoloCache, solo_forward, solo_step
from test_engine import reference
from test_generation import PROMPTS, modality_tokens, tiny_model


class _NoPool:  # SoloCache only reads the pool when it starts from cached tokens
    dtype = torch.float32
    keys = [torch.empty(0)]


def test_traced_expert_step_equals_the_eager_step():
    """The single-token step as compile_decode traces it (expert ids read per slot, dropped slots weighted 0; run
    eagerly here) == the eager fast path, logits at every step (MoE + cross-attention model)."""
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    cross = cross_kv_for(model, cross_states[0][cross_mask[0]][None])
    eager = SoloCache(0, model, _NoPool(), [], 0)
    static = SoloCache(1, model, _NoPool(), [], 0)
    prompt = PROMPTS[2]
    solo_forward(model, eager, prompt, cross)
    solo_forward(model, static, prompt, cross)
    token = 7
    for _ in range(model.cfg.max_seq_len - len(prompt)):
        want = solo_forward(model, eager, [token], cross)
        got = solo_forward(model, static, [token], cross, compiled_step=solo_step)  # uncompiled, traced=True
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        token = int(want[-1].argmax())
    assert static.length == eager.length == model.cfg.max_seq_len


def test_compiled_decode_equals_single_request_greedy():
    """Three requests decoded alone (text-only and with modality tokens, different lengths): greedy tokens ==
    generate(), and positions never cause a recompilation (one graph without, one with cross-attention K/V)."""
    counters.clear()
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=1, compile_decode=True))
    assert eng._compiled_step is not None
    cs = cross_states[1][cross_mask[1]]
    requests = [(PROMPTS[0], 12, None), (PROMPTS[2], 20, cs), (PROMPTS[1], 30, None)]
    outs = [eng.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n), "cross_states": c}])[0].token_ids
            for p, n, c in requests]  # one at a time: each request decodes alone, on the compiled step
    refs = [reference(model, p, n, None if c is None else c[None]) for p, n, c in requests]
    assert outs == refs
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # compiled (not fallen back to eager), never per step
    eng.check_no_leaks()
