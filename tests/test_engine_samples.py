"""SamplingParams.n > 1 in mmr1.Engine: n samples of one prompt under one request id, each equal to a lone request
with its own seed, the prompt's KV computed once (prefix cache) and its image/audio encoded once."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

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


def reference_beam_search(model, prompt, width, max_new, eos, cross_states=None, length_penalty=1.0):
    """vLLM's beam search rule with full forwards (no cache): keep the width best continuations by summed
    log-probability; those ending in eos finish; rank by log-probability / length**length_penalty."""
    live, done = [([], 0.0)], []
    for _ in range(max_new):
        candidates = []
        for tokens, logprob in live:
            logits = model(torch.tensor([prompt + tokens]), cross_states=cross_states).logits[0, -1]
            top = torch.log_softmax(logits.float(), -1).topk(2 * width)
            candidates += [(tokens + ([] if t == eos else [t]), logprob + v, t == eos)
                           for t, v in zip(top.indices.tolist(), top.values.tolist())]
        best = sorted(candidates, key=lambda c: -c[1])[:width]
        done += [c for c in best if c[2]]
        live = [(c[0], c[1]) for c in best if not c[2]]
        if not live:
            break
    ranked = done + [(t, lp, False) for t, lp in live]
    ranked.sort(key=lambda c: -c[1] / max(1, len(c[0]) + c[2]) ** length_penalty)
    return [(c[0], c[1], c[2]) for c in ranked[:width]]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_a_full_forward_reference(length_penalty):
    from test_generation import modality_tokens

    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    memory = cross_states[0][cross_mask[0]]
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([PROMPT]), cross_states=memory[None]).logits[0, -1], -1)
    eos = int(first.topk(2).indices[1])  # the second most likely first token: some beam finishes at once
    eng = Engine(model, config=EngineConfig(block_size=4), eos_id=eos)
    with torch.no_grad():
        beams = eng.beam_search(PROMPT, beam_width=3, max_new_tokens=6, length_penalty=length_penalty,
                                cross_states=memory)
        ref = reference_beam_search(model, PROMPT, 3, 6, eos, memory[None], length_penalty)
    assert [(b.token_ids, b.finished) for b in beams] == [(t, f) for t, _, f in ref]
    assert [b.cumulative_logprob for b in beams] == pytest.approx([lp for _, lp, _ in ref], abs=1e-4)
    assert any(b.finished for b in beams) and any(not b.finished for b in beams)
    assert eng.scheduler.prefix_hit_tokens > 0  # steps reuse the prompt's (and the beams') blocks
    eng.check_no_leaks()


def test_beam_search_with_image_audio_inputs_encodes_them_once(monkeypatch):
    from mmr1.engine import runner

    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(block_size=4))
    calls = []
    real = runner.encode_inline
    monkeypatch.setattr(runner, "encode_inline", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = raw_inputs(0)
    prompt = [1, 4, 9, 16, 25, 36, 49]
    beams = eng.beam_search(prompt, beam_width=2, max_new_tokens=4, **inputs)
    memory = runner.fuse_one(model.modalities, real(model, inputs))[0]
    again = eng.beam_search(prompt, beam_width=2, max_new_tokens=4, cross_states=memory)
    assert len(calls) == 1 and [b.token_ids for b in beams] == [b.token_ids for b in again]
    assert len(beams) == 2 and beams[0].token_ids != beams[1].token_ids
    with pytest.raises(ValueError, match="beam_width"):
        eng.beam_search(prompt, beam_width=0)
    eng.close()
