"""SamplingParams.n > 1 in mmr1.Engine: n samples of one prompt under one request id, each equal to a lone request
with its own seed, the prompt's KV computed once (prefix cache) and its image/audio encoded once."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mmr1.engine import Engine, EngineConfig, SamplingParams
from test_engine import drain, multimodal_model, raw_inputs, reference
from test_generation import tiny_model

PROMPT = [5, 9, 2, 33, 7, 12, 40, 3, 3, 18]  # two full 4-token blocks + 2


def test_n_samples_equal_lone_requests_seeded_s_s_plus_1_and_share_the_prompt():
    model = tiny_model(cross_attn_layers=())
    params = SamplingParams(max_new_tokens=8, temperature=1.2, top_k=20, seed=7, n=3)
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=4))
    out = eng.generate([PROMPT], params)[0]
    assert len(out.samples) == 3 and out.token_ids == out.samples[0].token_ids and out.finish_reason == "length"
    lone = Engine(model, config=EngineConfig(block_size=4, enable_prefix_caching=False))
    for i, sample in enumerate(out.samples):
        alone = lone.generate([PROMPT], dataclasses.replace(params, n=1, seed=7 + i))[0]
        assert sample.token_ids == alone.token_ids
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # different seeds, different samples
    assert eng.scheduler.prefix_hit_tokens == 2 * 8  # samples 2 and 3 reused the first one's two prompt blocks
    eng.check_no_leaks()


def test_greedy_samples_are_identical_and_mix_with_other_requests():
    model = tiny_model(cross_attn_layers=())
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=3))
    outs = eng.generate([{"prompt": PROMPT, "sampling": SamplingParams(max_new_tokens=6, n=4)}, [7], [21, 22]],
                        SamplingParams(max_new_tokens=5))
    ref = reference(model, PROMPT, 6)
    assert [s.token_ids for s in outs[0].samples] == [ref] * 4
    assert outs[1].samples is None and outs[1].token_ids == reference(model, [7], 5)
    assert outs[2].token_ids == reference(model, [21, 22], 5)
    eng.check_no_leaks()


def test_abort_follow_and_single_stream_fronts():
    model = tiny_model(cross_attn_layers=())
    eng = Engine(model, config=EngineConfig(block_size=4))
    rid = eng.add_request(PROMPT, sampling=SamplingParams(max_new_tokens=20, temperature=1.0, seed=1, n=2))
    eng.step()
    assert not eng.finished(rid) and eng.abort(rid) and eng.finished(rid)
    assert [s.finish_reason for s in eng.output(rid).samples] == ["abort"] * 2 and not eng.abort(rid)
    eng.release(rid)
    eng.check_no_leaks()
    with pytest.raises(ValueError, match="n > 1"):
        next(eng.iter_tokens(eng.add_request(PROMPT, sampling=SamplingParams(n=2))))

    async def follow():
        rid = eng.add_request(PROMPT, sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, n=2))
        return [out async for out in eng.follow(rid)]

    drain(eng)
    outs = asyncio.run(follow())
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert [len(s.token_ids) for s in outs[-1].samples] == [5, 5]
    with pytest.raises(ValueError, match="follow"):
        asyncio.run(anext(eng.stream(PROMPT, sampling=SamplingParams(n=2))))
    eng.check_no_leaks()


def test_multimodal_samples_encode_their_inputs_once(monkeypatch):
    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(block_size=4))
    submitted = []
    real_submit = eng.queues.submit
    monkeypatch.setattr(eng.queues, "submit", lambda *a, **k: submitted.append(a) or real_submit(*a, **k))
    inputs = raw_inputs(0)
    prompt = [1, 4, 9, 16, 25, 36, 49, 12, 3]
    out = eng.generate([{"prompt": prompt, **inputs}], SamplingParams(max_new_tokens=5, n=3))[0]
    lone = eng.generate([{"prompt": prompt, **inputs}], SamplingParams(max_new_tokens=5))[0]
    assert len(submitted) == 2 and [s.token_ids for s in out.samples] == [lone.token_ids] * 3
    eng.close()
