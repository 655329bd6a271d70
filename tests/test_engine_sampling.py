"""The engine's vLLM-style sampling extras against simple references: logprobs == log-softmax of a full forward,
min_tokens, presence/frequency penalties == a plain loop, min-p == transformers' MinPLogitsWarper; each also
through speculative decoding, where verification must apply the same rules."""
from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper

from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.generation import generate, warp_logits
from test_engine import SMALL
from test_generation import PROMPTS, tiny_model

SETUPS = {"plain": {}, "speculative": {"speculative": SpeculativeConfig("ngram", 3, ngram_min=1)}}


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()  # (T, V), no cache


def loop_reference(model, prompt: list[int], n: int, rule) -> list[int]:
    """Greedy the slow way: a full forward per token, `rule(logits, output)` edits the last logits; None = stop."""
    out: list[int] = []
    for _ in range(n):
        token = rule(full_logits(model, prompt + out)[-1].clone(), out)
        if token is None:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("setup", SETUPS)
def test_logprobs_are_the_log_softmax_of_a_full_forward(setup):
    model = tiny_model(cross_attn_layers=())
    engine = Engine(model, config=EngineConfig(**SMALL, **SETUPS[setup]))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, logprobs=3))
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.logprobs) == len(out.token_ids) == 8
        logp = torch.log_softmax(full_logits(model, prompt + out.token_ids), dim=-1)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            ref = logp[len(prompt) - 1 + i]
            top = ref.topk(3).indices.tolist()
            assert set(entry) == set(top) | {token}  # the chosen token (greedy: the first of the top) + top-3
            for t, value in entry.items():
                assert value == pytest.approx(ref[t].item(), abs=1e-4)
    assert Engine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))[0].logprobs is None


@pytest.mark.parametrize("config", [dict(SMALL), dict(SMALL, packed_steps=False), dict(block_size=4, num_blocks=7),
                                    dict(SMALL, speculative=SpeculativeConfig("ngram", 3))])
def test_prompt_logprobs_score_every_prompt_token_once(config):
    """Chunked prefill (packed and padded), preemption with recompute (7 blocks for 3 growing requests), and prompt
    lookup, whose first drafts (the prompts repeat themselves) are fed after the prompt's last chunk."""
    model = tiny_model(cross_attn_layers=())
    prompts = [p * 2 for p in PROMPTS[:3]]  # 8, 2 and 14 tokens
    engine = Engine(model, config=EngineConfig(**config))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, prompt_logprobs=2, logprobs=1))
    for prompt, out in zip(prompts, outs):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        logp = torch.log_softmax(full_logits(model, prompt), dim=-1)
        for p in range(1, len(prompt)):
            entry, ref = out.prompt_logprobs[p], logp[p - 1]
            assert set(entry) == set(ref.topk(2).indices.tolist()) | {prompt[p]}
            assert all(v == pytest.approx(ref[t].item(), abs=1e-4) for t, v in entry.items())
        assert len(out.logprobs) == 10
    if "num_blocks" in config:
        assert engine.scheduler.num_preemptions > 0
    if "speculative" in config:
        assert engine.stats["accepted"] > 0
    assert outs[0].token_ids == Engine(model).generate([prompts[0]], SamplingParams(max_new_tokens=10))[0].token_ids


@pytest.mark.parametrize("setup", SETUPS)
def test_min_tokens_holds_back_stop_tokens(setup):
    model = tiny_model(cross_attn_layers=())
    prompt = PROMPTS[2]
    first = generate(model, [prompt], max_new_tokens=1)[0][0]
    plain = Engine(model).generate([prompt], SamplingParams(max_new_tokens=6, stop_token_ids=[first]))[0]
    assert plain.token_ids == [] and plain.finish_reason == "stop"  # the stop token comes first

    def rule(logits, out):
        if len(out) < 3:
            logits[first] = float("-inf")
        token = int(logits.argmax())
        return None if token == first else token

    out = Engine(model, config=EngineConfig(**SMALL, **SETUPS[setup])).generate(
        [prompt], SamplingParams(max_new_tokens=12, min_tokens=3, stop_token_ids=[first]))[0]
    assert out.token_ids == loop_reference(model, prompt, 12, rule)
    assert len(out.token_ids) >= 3 and first not in out.token_ids


@pytest.mark.parametrize("setup", SETUPS)
def test_presence_and_frequency_penalties_match_a_plain_loop(setup):
    model = tiny_model(cross_attn_layers=())
    presence, frequency = 0.8, 0.6

    def rule(logits, out):
        for token in set(out):
            logits[token] -= presence + frequency * out.count(token)
        return int(logits.argmax())

    params = SamplingParams(max_new_tokens=12, presence_penalty=presence, frequency_penalty=frequency)
    outs = Engine(model, config=EngineConfig(**SMALL, **SETUPS[setup])).generate(PROMPTS, params)
    refs = [loop_reference(model, p, 12, rule) for p in PROMPTS]
    assert [o.token_ids for o in outs] == refs
    assert refs != [generate(model, [p], max_new_tokens=12)[0] for p in PROMPTS]  # the penalties bite


def test_min_p_matches_transformers_and_seeded_engine_sampling_matches_generate():
    logits = torch.randn(4, 64) * 3
    ours = warp_logits(logits, 1.0, min_p=0.1)
    theirs = MinPLogitsWarper(0.1)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))

    model = tiny_model(cross_attn_layers=())
    params = SamplingParams(max_new_tokens=8, temperature=1.2, min_p=0.2, seed=5)
    out = Engine(model, config=EngineConfig(**SMALL)).generate([PROMPTS[0]], params)[0]
    ref = generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=1.2, min_p=0.2,
                   generator=torch.Generator().manual_seed(5))[0]
    assert out.token_ids == ref


@pytest.mark.parametrize("bad, field", [({"presence_penalty": 2.5}, "presence_penalty"),
                                         ({"frequency_penalty": -3}, "frequency_penalty"),
                                         ({"min_p": 1.5}, "min_p"), ({"min_tokens": 9}, "min_tokens"),
                                         ({"logprobs": -1}, "logprobs"),
                                         ({"prompt_logprobs": -2}, "prompt_logprobs")])
def test_sampling_params_refuse_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_new_tokens=8, **bad)


def test_stop_token_outside_the_vocabulary_is_refused_at_add_request():
    engine = Engine(tiny_model(cross_attn_layers=()))
    with pytest.raises(ValueError, match=r"stop_token_ids \[64\] are outside the vocabulary \[0, 64\)"):
        engine.add_request(PROMPTS[0], sampling=SamplingParams(stop_token_ids=[3, 64], min_tokens=2))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("setup", SETUPS)
def test_each_request_of_a_mixed_batch_equals_itself_alone(setup):
    """Per-request rules stay per request: a batch mixing every option gives each request what it gets alone."""
    model = tiny_model(cross_attn_layers=())
    settings = [SamplingParams(max_new_tokens=9, logprobs=2),
                SamplingParams(max_new_tokens=9, temperature=1.1, min_p=0.1, seed=4, logprobs=0),
                SamplingParams(max_new_tokens=9, presence_penalty=1.0, frequency_penalty=0.5),
                SamplingParams(max_new_tokens=9, min_tokens=4, stop_token_ids=[7, 9], repetition_penalty=1.3),
                SamplingParams(max_new_tokens=9, temperature=0.8, top_k=8, frequency_penalty=1.5, seed=9)]
    config = EngineConfig(**SMALL, **SETUPS[setup])
    batch = Engine(model, config=config).generate([{"prompt": p, "sampling": s}
                                                  for p, s in zip(PROMPTS + [PROMPTS[0]], settings)])
    for prompt, params, out in zip(PROMPTS + [PROMPTS[0]], settings, batch):
        alone = Engine(model, config=config).generate([prompt], params)[0]
        assert (out.token_ids, out.finish_reason) == (alone.token_ids, alone.finish_reason)
        assert (out.logprobs is None) == (params.logprobs is None)
        if out.logprobs is not None:
            assert [set(a) for a in out.logprobs] == [set(b) for b in alone.logprobs]
            for a, b in zip(out.logprobs, alone.logprobs):
                assert all(a[t] == pytest.approx(b[t], abs=1e-4) for t in a)
