"""Prefix caching in mmr1.Engine: requests with a common prompt prefix (and the same image/audio) reuse its KV
blocks -- while the first still runs, after it finished, and after preemption -- and every output still equals the
reference; different modality inputs never share; eviction and accounting hold."""
from __future__ import annotations

import pytest
import torch

from engine_stub import StubBackbone, reference_generate
from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.block_manager import BlockAllocator
from mmr1.engine.prefix_cache import extend_block_hashes, modality_key
from test_engine import drain, multimodal_model, multimodal_reference, raw_inputs, reference
from mmr1.generation import generate
from test_generation import modality_tokens, tiny_model


def stub_engine(**cfg) -> Engine:
    return Engine(StubBackbone(), config=EngineConfig(**{"block_size": 4, **cfg}))


def hit_tokens(eng: Engine) -> int:
    return eng.scheduler.prefix_hit_tokens


def test_allocator_shares_keeps_and_evicts_registered_blocks():
    alloc = BlockAllocator(4)
    a = alloc.allocate(owner=1, n=3)
    alloc.register(a[0], b"p0")
    alloc.register(a[1], b"p1")
    alloc.register(a[2], b"p0")  # the prefix is published already: this block stays private
    assert alloc.cached_prefix([b"p0", b"p1", b"p2"]) == a[:2] and alloc.cached_prefix([b"p1"]) == [a[1]]
    alloc.share(owner=2, blocks=a[:2])
    alloc.free(1, a)
    assert alloc.num_free == 2 and alloc.owners() == {2}  # shared blocks stay held by 2; a[2] is plain free
    alloc.free(2, a[:2])
    assert alloc.num_free == 4 and alloc.num_evictable(a[:2]) == 2
    alloc.check_no_leaks()
    # Taking them back removes them from the free count; allocation uses never-registered blocks first, then
    # evicts, latest blocks of a sequence first (it freed a[1] before a[0]).
    got = alloc.allocate(owner=3, n=2)
    assert a[0] not in got and a[1] not in got and alloc.cached_prefix([b"p0", b"p1"]) == a[:2]
    got += alloc.allocate(owner=3, n=1)
    assert got[-1] == a[1] and alloc.cached_prefix([b"p0", b"p1"]) == [a[0]]
    with pytest.raises(RuntimeError, match="freed by 9"):
        alloc.free(9, got)


def test_chain_hashes_depend_on_the_whole_prefix_and_the_modality_key():
    base = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, modality_key(None))
    assert len(base) == 2  # full blocks only
    assert extend_block_hashes([], [0, 2, 3, 4, 5, 6, 7, 8], 4, modality_key(None))[1] != base[1]
    image_a, image_b = torch.randn(3, 8), torch.randn(3, 8)
    assert modality_key(image_a) == modality_key(image_a.clone()) != modality_key(image_b)
    assert extend_block_hashes([], [1, 2, 3, 4], 4, modality_key(image_a))[0] != base[0]
    grown = extend_block_hashes(list(base[:1]), [1, 2, 3, 4, 5, 6, 7, 8], 4, modality_key(None))
    assert grown == base


def test_later_and_concurrent_requests_reuse_a_shared_prefix():
    eng = stub_engine(max_batch=4, num_blocks=64)
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 2 full blocks + 2 tokens
    first = eng.add_request(shared + [7], sampling=SamplingParams(max_new_tokens=12))
    eng.step()  # first's prompt is computed and its two full blocks published
    second = eng.add_request(shared + [8, 8], sampling=SamplingParams(max_new_tokens=5))
    eng.step()
    a, b = eng._seqs[first], eng._seqs[second]
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]  # held by both, the rest private
    assert hit_tokens(eng) == 8
    drain(eng)
    third = eng.add_request(shared + [8, 8, 1], sampling=SamplingParams(max_new_tokens=5))  # after both finished
    drain(eng)
    assert hit_tokens(eng) == 8 + 12  # second's third block (8, 8 and two outputs) was published too
    for rid, prompt, n in ((first, shared + [7], 12), (second, shared + [8, 8], 5), (third, shared + [8, 8, 1], 5)):
        assert eng.output(rid).token_ids == reference_generate(prompt, n)
    eng.check_no_leaks()
    assert eng.allocator.num_free == 64 and eng.metrics()["prefix_cache_hit_rate"] == 20 / (11 + 12 + 13)


def test_requests_arriving_together_compute_a_common_prefix_once():
    """The first of a burst computes the shared blocks; the others wait for them (a step or two) and reuse them,
    instead of every request of the step computing the same prefix."""
    eng = stub_engine(max_batch=8, num_blocks=64, max_num_batched_tokens=64, prefill_chunk=8)
    shared = list(range(1, 13))  # three blocks
    prompts = [shared + [20 + i] for i in range(6)] + [[7, 7]]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=4))
    assert [o.token_ids for o in outs] == [reference_generate(p, 4) for p in prompts]
    assert hit_tokens(eng) == 5 * 12  # everyone after the first
    eng.check_no_leaks()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    eng = stub_engine(max_batch=2, num_blocks=16)
    prompt = [2, 7, 1, 8, 2, 8, 1, 8]  # exactly two blocks
    outs = [eng.generate([prompt], SamplingParams(max_new_tokens=3))[0].token_ids for _ in range(2)]
    assert outs == [reference_generate(prompt, 3)] * 2 and hit_tokens(eng) == 4  # one block, not both


def test_eviction_under_memory_pressure_and_preempted_requests_recompute_from_the_cache():
    eng = stub_engine(max_batch=8, num_blocks=8, max_num_batched_tokens=16, prefill_chunk=8)
    prompts = [[i, i + 1, i + 2, i + 3, i + 4, 1] for i in range(6)]  # one full block each
    for p in prompts:
        assert eng.generate([p], SamplingParams(max_new_tokens=2))[0].token_ids == reference_generate(p, 2)
    # Six one-shot requests left their blocks cached; a batch needing all eight blocks evicts them and preempts.
    ids = [eng.add_request([9, 9, 9, 9, 9, k], sampling=SamplingParams(max_new_tokens=10)) for k in range(3)]
    drain(eng)
    assert eng.scheduler.num_preemptions > 0
    assert hit_tokens(eng) > 0  # the shared [9]*4 block, and a preempted request's own blocks when it came back
    for rid, k in zip(ids, range(3)):
        assert eng.output(rid).token_ids == reference_generate([9, 9, 9, 9, 9, k], 10)
    assert eng.generate([prompts[0]], SamplingParams(max_new_tokens=2))[0].token_ids == reference_generate(
        prompts[0], 2)
    eng.check_no_leaks()


def test_prompt_logprobs_requests_compute_their_prompt():
    eng = stub_engine(max_batch=2, num_blocks=16)
    prompt = [5, 4, 3, 2, 1, 0, 1, 2, 3]
    eng.generate([prompt], SamplingParams(max_new_tokens=2))
    out = eng.generate([prompt], SamplingParams(max_new_tokens=2, prompt_logprobs=0))[0]
    assert hit_tokens(eng) == 0 and len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[-1]


def test_turning_it_off_shares_nothing():
    eng = stub_engine(max_batch=2, num_blocks=16, enable_prefix_caching=False)
    for _ in range(2):
        eng.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_new_tokens=2))
    assert hit_tokens(eng) == 0 and eng.allocator.num_cached == 0


def test_real_model_outputs_equal_generate_with_cache_hits_on_both_paths():
    """MoE + cross-attention model: requests share a prefix with the same modality tokens (hit) or other ones (no
    hit); the batch-1 fast path publishes a finished request's blocks; all outputs equal generate()."""
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    memory = [cross_states[i][cross_mask[i]] for i in range(2)]
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=4, max_num_batched_tokens=16, prefill_chunk=6))
    prefix = [5, 9, 2, 33, 7, 12, 40, 3, 3]
    # alone: the fast path computes it, and publishes two blocks when it finishes
    first = eng.generate([{"prompt": prefix + [1], "cross_states": memory[0]}], SamplingParams(max_new_tokens=6))[0]
    assert first.token_ids == reference(model, prefix + [1], 6, memory[0][None]) and eng.allocator.num_cached >= 2
    requests = [(prefix + [18, 60], memory[0]), (prefix + [21], memory[1]), (prefix[:5], None), (prefix + [1], None)]
    before = hit_tokens(eng)
    outs = eng.generate([{"prompt": p, "cross_states": m} for p, m in requests], SamplingParams(max_new_tokens=7))
    # the request with the first one's modality tokens: 8; the last text-only one waits a step for the other
    # text-only one's first block (same 4 tokens), then reuses it: 4; the one with other modality tokens: nothing
    assert hit_tokens(eng) - before == 8 + 4
    for out, (p, m) in zip(outs, requests):
        assert out.token_ids == reference(model, p, 7, None if m is None else m[None])
    again = eng.generate([{"prompt": p, "cross_states": m} for p, m in requests], SamplingParams(max_new_tokens=7))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    eng.check_no_leaks()


def test_same_image_hits_and_another_image_misses_with_async_encoding():
    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=4))
    prompt = [1, 4, 9, 16, 25, 36, 49, 12, 3]
    same, other = raw_inputs(0), raw_inputs(1)
    ref_same = multimodal_reference(model, prompt, same, 5)
    outs = [eng.generate([{"prompt": prompt, **inputs}], SamplingParams(max_new_tokens=5))[0].token_ids
            for inputs in (same, same, other)]
    assert outs[:2] == [ref_same] * 2 and outs[2] == multimodal_reference(model, prompt, other, 5)
    assert hit_tokens(eng) == 8  # the second request only
    eng.close()


@pytest.mark.parametrize("setting", ["ngram", "draft", "sliding", "int8"])
def test_shared_prefixes_with_speculation_sliding_windows_and_int8(setting):
    """Prefix hits combined with the engine's other features: speculative decoding (the draft model computes its
    own prefix), a sliding-window model (the window reads cached slots) and INT8 KV (cached blocks hold quantized
    values). Greedy outputs equal generate() -- for INT8, the same engine without the cache."""
    from mmr1.engine import SpeculativeConfig
    from mmr1.engine.speculative import truncated_draft
    from test_long_context import long_model

    model = long_model("sliding", window=5, block=4, seed=1) if setting == "sliding" else tiny_model()
    if setting == "sliding":
        with torch.no_grad():
            model.init_weights(std=0.3)
    shared = [1, 9, 2, 33, 7, 41, 12, 3, 8, 14]
    prompts = [shared + [5], shared + [6, 2], shared[:6] + [11], shared + [5]]
    spec = SpeculativeConfig(setting, num_draft_tokens=3) if setting in ("ngram", "draft") else None
    draft = truncated_draft(model, 2) if setting == "draft" else None

    def run(caching: bool) -> tuple[list[list[int]], int]:
        cfg = EngineConfig(block_size=4, max_batch=3, max_num_batched_tokens=16, prefill_chunk=6, speculative=spec,
                           kv_cache_dtype="int8" if setting == "int8" else "model", enable_prefix_caching=caching)
        eng = Engine(model, config=cfg, draft=draft)
        outs = [eng.generate([prompts[0]], SamplingParams(max_new_tokens=12))[0].token_ids]  # computes the prefix
        outs += [o.token_ids for o in eng.generate(prompts[1:], SamplingParams(max_new_tokens=12))]
        eng.check_no_leaks()
        return outs, eng.scheduler.prefix_hit_tokens

    outs, hits = run(True)
    assert hits == 8 + 4 + 8  # the three after the first start from its blocks: 2, 1 and 2 whole ones
    refs = run(False)[0] if setting == "int8" else [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert outs == refs


@pytest.mark.parametrize("max_batch", [1, 2])  # 1: the batch-1 fast path; 2: the pooled path
def test_a_stop_token_among_accepted_drafts_publishes_only_the_requests_tokens(max_batch):
    """Speculation with a draft identical to the target accepts every draft, so a stop token can be verified
    together with the tokens before it: its K/V are in the pool, but it is not one of the request's tokens. When
    that K/V crosses into a new block, only blocks of the request's own tokens may be published (this raised an
    IndexError in `make demo`); a later request with the same prompt starts from them and answers the same."""
    import copy

    from mmr1.engine import SpeculativeConfig
    model = tiny_model()
    prompt = [1, 9, 2, 33, 7]
    ref = generate(model, [prompt], max_new_tokens=12)[0]
    stops = [j for j in range(1, 12) if ref[j] not in ref[:j] and (len(prompt) + j) % 4 == 3]
    assert stops  # 7 committed tokens + the stop's K/V: the 8th cached position closes block 1
    j = stops[0]
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=max_batch,
                                            speculative=SpeculativeConfig("draft", num_draft_tokens=4)),
                 draft=copy.deepcopy(model))
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[ref[j]])
    for _ in range(2):
        assert eng.generate([prompt], params)[0].token_ids == ref[:j]
    assert hit_tokens(eng) == 4  # the second request started from the prompt's one full block
    eng.check_no_leaks()


def test_the_fast_path_publishes_each_block_as_it_fills_while_requests_wait(monkeypatch):
    """Batch 1 with another request waiting: the fast path writes its K/V to the pool and publishes it once per
    block that fills (only full blocks can be shared), not every step; every full block is published by the end
    of the step that fills it, and the waiting request, admitted later, reuses them and equals generate()."""
    from mmr1.engine.solo import SoloCache
    model = tiny_model()
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=1))
    flushes = []
    real_flush = SoloCache.flush
    monkeypatch.setattr(SoloCache, "flush", lambda self, *a: flushes.append(self.length) or real_flush(self, *a))
    prompt = [5, 9, 2, 33, 7]
    first = eng.add_request(prompt, sampling=SamplingParams(max_new_tokens=14))
    eng.step()  # prefill alone: nothing waits, nothing is written to the pool yet
    assert flushes == [] and eng.allocator.num_cached == 0
    ref = reference(model, prompt, 14)
    second = eng.add_request(prompt + ref[:9], sampling=SamplingParams(max_new_tokens=3))
    seq = eng._seqs[first]
    while not seq.finished:
        eng.step()
        if not seq.finished:
            assert eng.allocator.num_cached == seq.num_cached // 4  # every full block, as soon as it fills
    # cached positions after each step: 6, 7, ..., 18. At 6 the prompt's block (full since the prefill) goes out,
    # then each block as it fills (8, 12, 16), and the rest when the request finishes (18)
    assert flushes == [6, 8, 12, 16, 18]
    drain(eng)
    assert eng.output(first).token_ids == ref
    assert eng.output(second).token_ids == reference(model, prompt + ref[:9], 3)
    assert hit_tokens(eng) == 12  # 14 prompt tokens: three full blocks of the first request's
    eng.check_no_leaks()
