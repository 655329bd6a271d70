"""Speculative decoding in the engine: greedy output is identical to plain greedy with prompt-lookup and with
draft-model drafts (inside continuous batching and at batch 1), and rejection sampling keeps the target's
distribution (checked statistically on a 4-token vocabulary with fixed seeds)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmr1.backbone import R1Model
from mmr1.engine import Engine, EngineConfig, SamplingParams, SpeculativeConfig
from mmr1.engine.speculative import DraftLength, cut_after_end, ngram_propose, truncated_draft, verify
from test_engine import SMALL, multimodal_model, multimodal_reference, raw_inputs, reference
from test_generation import PROMPTS, modality_tokens, tiny_model

MIXED = PROMPTS + [[3, 1, 4, 1, 5, 3, 1, 4, 1], [9, 9, 9, 9]]


def small_draft(model: R1Model | None = None) -> R1Model:
    """The target's first two of three blocks (+ its norm and head): a cheaper model that often agrees."""
    return truncated_draft(model if model is not None else tiny_model(), 2)


def test_truncated_draft_is_the_targets_first_layers():
    model = tiny_model()
    draft = small_draft(model)
    assert draft.cfg.n_layers == 2 and draft.cfg.cross_attn_layers == [1]
    assert torch.equal(draft.layers[1].attn.wq.weight, model.layers[1].attn.wq.weight)
    with pytest.raises(ValueError, match="n_layers"):
        truncated_draft(model, 3)


def test_ngram_propose_takes_the_continuation_of_the_latest_longest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], k=2) == [7, 1]  # latest "1 2 3" is followed by 7
    assert ngram_propose([5, 6, 5], k=3, ngram_max=2) == [6, 5]
    assert ngram_propose([1, 2, 3], k=3) == []


@pytest.mark.parametrize("method,max_batch", [("ngram", 3), ("draft", 3), ("ngram", 1), ("draft", 1)])
def test_speculative_greedy_equals_plain_greedy(method, max_batch):
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    spec = SpeculativeConfig(method=method, num_draft_tokens=3)
    eng = Engine(model, config=EngineConfig(**{**SMALL, "max_batch": max_batch}, speculative=spec),
                 draft=small_draft() if method == "draft" else None)
    ids, refs = [], []
    for i, p in enumerate(MIXED):
        cs = cross_states[i % 4][cross_mask[i % 4]] if i % 2 else None
        ids.append(eng.add_request(p, sampling=SamplingParams(max_new_tokens=12), cross_states=cs))
        refs.append(reference(model, p, 12, None if cs is None else cs[None]))
    while eng.has_unfinished():
        eng.step()
    assert [eng.output(i).token_ids for i in ids] == refs
    assert eng.stats["drafted"] > 0 and 0 < eng.stats["accepted"] <= eng.stats["drafted"]
    eng.check_no_leaks()


def test_the_target_as_its_own_draft_accepts_everything_in_fewer_steps(monkeypatch):
    """Drafting alone takes the draft's batch-1 fast path (no paged draft forward); its K/V, flushed into the draft
    pool after each proposal, must equal the target's own, so every draft is accepted."""
    import mmr1.engine.speculative as speculative_module
    paged_drafts = []
    real_forward = speculative_module.forward_paged
    monkeypatch.setattr(speculative_module, "forward_paged", lambda *a, **k: paged_drafts.append(1) or
                        real_forward(*a, **k))
    model = tiny_model(cross_attn_layers=())
    plain = Engine(model, config=EngineConfig(max_batch=1))
    spec = Engine(model, config=EngineConfig(max_batch=1, speculative=SpeculativeConfig("draft", 4)), draft=model)
    a = plain.generate([MIXED[4]], SamplingParams(max_new_tokens=15))[0]
    b = spec.generate([MIXED[4]], SamplingParams(max_new_tokens=15))[0]
    assert a.token_ids == b.token_ids
    assert spec.stats["accepted"] == spec.stats["drafted"] > 0
    assert spec.stats["steps"] <= 1 + 15 // 5 + 1 < plain.stats["steps"]
    assert paged_drafts == []


def test_the_first_drafts_ride_on_the_prompts_forward():
    """The forward that completes a prompt verifies the request's first drafts too: the target as its own draft
    takes 5 tokens per target forward from the first one on, so 15 tokens take 3 forwards. A prompt fed in chunks
    gets its drafts with its last chunk."""
    model = tiny_model(cross_attn_layers=())
    prompt, params = MIXED[4], SamplingParams(max_new_tokens=15, ignore_eos=True)
    plain = Engine(model, config=EngineConfig(max_batch=1)).generate([prompt], params)[0]
    for chunk in (64, 3):
        spec = Engine(model, config=EngineConfig(max_batch=1, prefill_chunk=chunk,
                                                 speculative=SpeculativeConfig("draft", 4, adaptive=False)),
                      draft=model)
        out = spec.generate([prompt], params)[0]
        assert out.token_ids == plain.token_ids
        prompt_steps = -(-len(prompt) // chunk)
        assert spec.stats["steps"] == prompt_steps + 2, (chunk, spec.stats)
        assert spec.stats["drafted"] == spec.stats["accepted"] == 12  # rounds of 4 drafts + the target's token
        spec.check_no_leaks()


def test_multimodal_draft_with_its_own_encoders():
    model = multimodal_model()
    torch.manual_seed(3)
    draft = multimodal_model()  # same architecture, its own (different) weights and encoders
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eng = Engine(model, config=EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 2)), draft=draft)
    requests = [{"prompt": [1, 3, 10, 4], **raw_inputs(0)}, {"prompt": [2, 3, 4], "audio": raw_inputs(1)["audio"]},
                {"prompt": [5, 6, 4]}]
    outs = eng.generate(requests, SamplingParams(max_new_tokens=8))
    refs = [multimodal_reference(model, r["prompt"], {k: r[k] for k in ("image", "audio") if k in r}, 8)
            for r in requests]
    assert [o.token_ids for o in outs] == refs
    assert eng.stats["accepted"] > 0
    eng.close()


def test_a_draft_without_encoders_reads_the_targets_modality_tokens():
    """A MultimodalR1 draft with cross-attention but no encoders (distilled with modality_tokens: teacher) gets the
    target's modality tokens: nothing is encoded for it, and a copy of the target's backbone, which sees exactly
    what the target sees, has every draft accepted, image and audio requests included."""
    from mmr1.model import MultimodalConfig, MultimodalR1
    model = multimodal_model()
    draft = MultimodalR1(MultimodalConfig(backbone=model.config.backbone)).eval()
    draft.backbone.load_state_dict(model.backbone.state_dict())
    eng = Engine(model, config=EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 3, adaptive=False)),
                 draft=draft)
    assert eng.draft_multimodal is None and eng.draft_queues is None
    requests = [{"prompt": [1, 3, 10, 4], **raw_inputs(0)}, {"prompt": [2, 3, 4], "audio": raw_inputs(1)["audio"]},
                {"prompt": [5, 6, 4], "image": raw_inputs(2)["image"]}]
    outs = eng.generate(requests, SamplingParams(max_new_tokens=8, ignore_eos=True))
    refs = [multimodal_reference(model, r["prompt"], {k: r[k] for k in ("image", "audio") if k in r}, 8)
            for r in requests]
    assert [o.token_ids for o in outs] == refs
    assert eng.stats["accepted"] == eng.stats["drafted"] > 0
    eng.check_no_leaks()
    eng.close()
    narrow = MultimodalConfig(backbone=dataclasses.replace(model.config.backbone, dim=16, cross_attn_memory_dim=24))
    with pytest.raises(ValueError, match="cross_attn_memory_dim"):
        Engine(model, config=EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 3)),
               draft=MultimodalR1(narrow))


def test_a_draft_that_read_another_targets_tokens_is_warned_about():
    """A draft records the teacher whose modality tokens it learned to read (config.token_source); paired with a
    target whose encoders/projectors differ it gets a warning (outputs stay exact), with its own teacher none."""
    import copy
    import warnings

    from mmr1.model import MultimodalConfig, MultimodalR1, TokenSource
    model = multimodal_model()
    source = TokenSource(model="runs/demo/export", fingerprint=model.modality_fingerprint())
    draft = MultimodalR1(MultimodalConfig(backbone=model.config.backbone, token_source=source)).eval()
    config = EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(model, config=config, draft=draft).close()
        Engine(copy.deepcopy(model).to(torch.bfloat16), config=config, draft=draft.to(torch.bfloat16)).close()
    other = copy.deepcopy(model).float()
    with torch.no_grad():
        next(other.projectors.parameters()).add_(0.1)
    with pytest.warns(UserWarning, match=r"modality tokens of runs/demo/export \(fingerprint "
                                         rf"{source.fingerprint}\), but .* fingerprint {other.modality_fingerprint()}"):
        eng = Engine(other, config=config, draft=draft.float())
    requests = [{"prompt": [1, 3, 10, 4], **raw_inputs(0)}, {"prompt": [5, 6, 4]}]
    outs = eng.generate(requests, SamplingParams(max_new_tokens=6))
    refs = [multimodal_reference(other, r["prompt"], {k: r[k] for k in ("image", "audio") if k in r}, 6)
            for r in requests]
    assert [o.token_ids for o in outs] == refs
    eng.close()
    alone = Engine(draft, config=EngineConfig(**SMALL))  # on its own it takes no image, and says what to run
    with pytest.raises(TypeError, match=r"no encoders: .* distilled from runs/demo/export: "
                                        r"Pipeline.from_pretrained\('runs/demo/export', draft="):
        alone.add_request([1, 3, 4], image=raw_inputs(0)["image"])
    alone.close()


def test_draft_length_follows_acceptance_and_backs_off():
    length = DraftLength(4)
    assert length.next_length() == 4
    length.record(4, 1)  # partly rejected: one shorter
    assert length.next_length() == 3
    length.record(3, 3)  # all accepted: one longer, never beyond the configured 4
    length.record(4, 4)
    assert length.next_length() == 4
    length.record(4, 0)  # wholly rejected: one shorter too
    assert length.next_length() == 3
    length.record(3, 0)
    length.record(2, 0)
    assert length.next_length() == 1
    pauses = []
    for _ in range(6):  # one-token drafts keep failing: pauses of 4, 8, 16, 32, 64, 64 steps, each then a probe
        length.record(1, 0)
        skipped = 0
        while length.next_length() == 0:
            skipped += 1
        pauses.append(skipped)
    assert pauses == [4, 8, 16, 32, 64, 64]
    length.record(1, 1)  # an accepted probe ends the back-off
    assert length.next_length() == 2
    length.record(2, 0)
    length.record(1, 0)
    assert [length.next_length() for _ in range(5)] == [0, 0, 0, 0, 1]
    length.record(0, 0)  # nothing drafted (no n-gram match): no change
    assert length.next_length() == 1


@pytest.mark.parametrize("max_batch", [1, 3])
def test_adaptive_length_stops_paying_for_a_draft_that_is_always_wrong(max_batch):
    """A draft with other weights is almost never right: with a fixed length every step drafts 3 tokens, with the
    adaptive one drafting soon pauses; outputs equal plain greedy either way and no KV block leaks."""
    model = tiny_model(cross_attn_layers=())
    draft = truncated_draft(tiny_model(cross_attn_layers=(), seed=7), 1)
    params = SamplingParams(max_new_tokens=30)
    prompts = [[5, 9, 2, 7], [11, 3, 3], [8, 1, 6, 2, 4]]
    refs = [reference(model, p, 30) for p in prompts]
    drafted = {}
    for adaptive in (False, True):
        spec = SpeculativeConfig("draft", 3, adaptive=adaptive)
        eng = Engine(model, config=EngineConfig(**{**SMALL, "max_batch": max_batch}, speculative=spec), draft=draft)
        assert [o.token_ids for o in eng.generate(prompts, params)] == refs
        eng.check_no_leaks()
        assert eng.stats["accepted"] <= eng.stats["drafted"] // 4
        drafted[adaptive] = eng.stats["drafted"]
    assert drafted[False] >= 3 * 25 * len(prompts)  # nearly every step drafted its 3 tokens
    assert drafted[True] <= 12 * len(prompts)  # 3 + 2 + 1 before the first pause, then a probe per pause


def greedy_verify_reference(logits, drafts, params, seen, num_prompt, end_ids):
    """Greedy verification spelled out: accept while the draft is sample_row's choice at its position."""
    from mmr1.engine.sampling import sample_row
    out = []
    for j, d in enumerate(drafts):
        best = sample_row(logits[j], params, seen + out, torch.Generator(), num_prompt, end_ids)
        if best != d:
            return out + [best], j
        out.append(d)
    return out + [sample_row(logits[len(drafts)], params, seen + out, torch.Generator(), num_prompt, end_ids)], \
        len(drafts)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.5),
                                    SamplingParams(min_tokens=6)], ids=["plain", "penalty", "min_tokens"])
def test_greedy_verification_accepts_exactly_the_argmax_prefix(params):
    """verify() under greedy (one batched argmax when no penalty or min_tokens applies) commits the drafts up to
    the first one that is not the target's choice, plus the target's token there: per position as sample_row."""
    g = torch.Generator().manual_seed(0)
    seen, num_prompt, ends = [5, 1, 2, 7], 2, (0,)
    for trial in range(200):
        logits = torch.randn(5, 8, generator=g)
        best = logits.argmax(-1).tolist()
        agree = trial % 5  # drafts equal the raw argmax for the first `agree` positions, then differ
        drafts = [best[j] if j < agree else (best[j] + 1) % 8 for j in range(4)]
        got = verify(logits, drafts, params, seen, g, None, num_prompt, ends)
        assert got == greedy_verify_reference(logits, drafts, params, seen, num_prompt, ends)
        if params == SamplingParams():
            assert got == (drafts[:agree] + [best[agree]], agree)


def empirical(samples: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(samples), minlength=vocab).float() / len(samples)


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_rejection_sampling_keeps_the_target_distribution(drafter):
    """Target p_j per position, draft q_j: the first emitted token must follow p_0, and the second (when the
    first draft was accepted) p_1, whatever q is. 20000 trials: a frequency's sd is <= 0.0036."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    first, second, accepted = [], [], 0
    for _ in range(20000):
        if drafter == "model":
            drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
            out, n = verify(p.log(), drafts, params, [], g, [q[0], q[1]])
        else:
            out, n = verify(p.log(), [3, 0], params, [], g)  # a fixed (point-mass) prompt-lookup proposal
        accepted += n
        first.append(out[0])
        if n >= 1:
            second.append(out[1])
    assert (empirical(first, 4) - p[0]).abs().max() < 0.015
    assert (empirical(second, 4) - p[1]).abs().max() < 0.02
    # Acceptance rate of the first draft is sum_x min(p, q) for a model draft, p(d) for a point mass.
    expected_first = float(torch.minimum(p[0], q[0]).sum()) if drafter == "model" else float(p[0, 3])
    assert abs(len(second) / 20000 - expected_first) < 0.015


def test_speculative_sampling_is_seeded_and_leak_free():
    model = tiny_model(cross_attn_layers=())
    cfg = EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 3))
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=4)
    runs = [Engine(model, config=cfg, draft=small_draft()).generate(MIXED[:3], params) for _ in range(2)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert all(len(o.token_ids) == 10 for o in runs[0])


def test_acceptance_counts_no_draft_past_a_stop_token():
    """A stop token verified together with later drafts ends the request there: the drafts after it were accepted
    by verification but never used, so `stats["accepted"]` leaves them out (it counts drafts that became output
    or the stop itself). The target as its own draft accepts every draft, so the count is exact."""
    model = tiny_model(cross_attn_layers=())
    plain = Engine(model, config=EngineConfig(max_batch=1)).generate([MIXED[4]], SamplingParams(max_new_tokens=15))
    tokens = plain[0].token_ids
    checked = 0
    for p in range(2, len(tokens)):
        if tokens[p] in tokens[:p]:
            continue  # an earlier occurrence would stop first
        spec = Engine(model, config=EngineConfig(max_batch=1, speculative=SpeculativeConfig("draft", 4,
                                                                                          adaptive=False)),
                      draft=model)
        out = spec.generate([MIXED[4]], SamplingParams(max_new_tokens=15, stop_token_ids=[tokens[p]]))[0]
        assert out.token_ids == tokens[:p] and out.finish_reason == "stop"
        # Every round (the first one on the prompt) verifies 4 drafts, all accepted, and adds the target's own token:
        # output tokens 4, 9, 14 are not drafts. The count is the drafts among tokens 0 .. p (the stop included);
        # the drafts verified beside the stop and after it must not count.
        assert spec.stats["accepted"] == sum(1 for j in range(p + 1) if j % 5 != 4), (p, spec.stats)
        checked += 1
    assert checked >= 3


def test_drafting_stops_at_an_end_token():
    """Nothing drafted after an end token (eos, a stop token) can become output, whether verification accepts the
    end or rejects it: the draft stops there. With the target as its own draft every draft is accepted, so the
    drafts counted are exactly the accepted ones, the stop included -- none is wasted past it."""
    model = tiny_model(cross_attn_layers=())
    plain = Engine(model, config=EngineConfig(max_batch=1)).generate([MIXED[4]], SamplingParams(max_new_tokens=15))
    tokens = plain[0].token_ids
    stop = next(tokens[p] for p in range(3, len(tokens)) if tokens[p] not in tokens[:p])
    spec = Engine(model, config=EngineConfig(max_batch=1, speculative=SpeculativeConfig("draft", 8, adaptive=False)),
                  draft=model)
    out = spec.generate([MIXED[4]], SamplingParams(max_new_tokens=15, stop_token_ids=[stop]))[0]
    assert out.token_ids == tokens[:tokens.index(stop)] and out.finish_reason == "stop"
    assert spec.stats["drafted"] == spec.stats["accepted"] > 0
    spec.check_no_leaks()


def test_prompt_lookup_drafts_are_cut_after_an_end_token():
    assert cut_after_end([4, 2, 7, 2], (2,)) == [4, 2]
    assert cut_after_end([4, 5], (2, 9)) == [4, 5]
    assert cut_after_end([], (2,)) == []


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_drafts_cut_at_end_tokens_in_a_batch_keep_outputs_exact(method):
    """Several requests drafting together (batched draft forwards / prompt lookup), each with its own stop token
    that its greedy output reaches: outputs equal plain decoding with the same stop tokens, and nothing is drafted
    past a stop (the target as its own draft accepts every draft, so drafted == accepted)."""
    model = tiny_model(cross_attn_layers=())
    prompts = [MIXED[i] for i in (0, 2, 4, 5)]
    plain = Engine(model, config=EngineConfig(**SMALL)).generate(prompts, SamplingParams(max_new_tokens=14))
    requests = []
    for prompt, out in zip(prompts, plain):
        tokens = out.token_ids
        stop = next((tokens[p] for p in range(2, len(tokens)) if tokens[p] not in tokens[:p]), None)
        requests.append({"prompt": prompt, "sampling": SamplingParams(
            max_new_tokens=14, stop_token_ids=[stop] if stop is not None else [])})
    expected = Engine(model, config=EngineConfig(**SMALL)).generate(requests)
    spec = Engine(model, config=EngineConfig(**SMALL, speculative=SpeculativeConfig(method, 6, adaptive=False)),
                  draft=model if method == "draft" else None)
    got = spec.generate(requests)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert sum(o.finish_reason == "stop" for o in got) >= 3
    if method == "draft":
        assert spec.stats["drafted"] == spec.stats["accepted"] > 0
    spec.check_no_leaks()
