"""mmr1.Engine exactness: every request of a mixed continuous batch equals single-request greedy `generate`,
the paged cache equals the contiguous KVCache, INT8 KV stays close, per-request sampling is reproducible."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from data_pipelines import InputError

from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.paged_cache import PagedKVPool, dequantize_int8, quantize_int8
from engine_stub import paged_logits
from mmr1.generation import generate, generate_with_inputs
from mmr1.kv_cache import KVCache
from mmr1.model import MultimodalR1
from test_generation import PROMPTS, modality_tokens, tiny_model
from test_model import tiny_config

SMALL = dict(block_size=4, max_batch=3, max_num_batched_tokens=8, prefill_chunk=3)


def reference(model, prompt, n, cross_states=None, **kw):
    return generate(model, [prompt], max_new_tokens=n, cross_states=cross_states, **kw)[0]


def drain(eng: Engine) -> None:
    while eng.has_unfinished():
        eng.step()


@pytest.mark.parametrize("chunked", [False, True])
def test_mixed_batch_equals_single_request_greedy(chunked):
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    cfg = EngineConfig(**SMALL) if chunked else EngineConfig(block_size=8)
    eng = Engine(model, config=cfg)
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8]]
    lengths = [8, 3, 12, 6, 9, 5]
    ids, refs = [], []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        cs = cross_states[i % 4][cross_mask[i % 4]] if i % 3 else None  # text-only and modality rows mixed
        ids.append(eng.add_request(p, sampling=SamplingParams(max_new_tokens=n), cross_states=cs))
        refs.append(reference(model, p, n, None if cs is None else cs[None]))
    drain(eng)
    assert [eng.output(i).token_ids for i in ids] == refs
    assert len({tuple(r) for r in refs}) == len(refs)
    eng.check_no_leaks()


def multimodal_model():
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config()).eval()
    model.backbone.init_weights(std=0.3)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.cross_attn.gate.fill_(0.8)
    return model


def raw_inputs(seed):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
            "audio": (rng.standard_normal(3000 + 1000 * seed).astype(np.float32), 16000)}


def multimodal_reference(model, prompt, inputs, n):
    """The pre-engine path: this request's inputs encoded alone, then generate()."""
    return generate_with_inputs(model, prompt, inputs, n)


@pytest.mark.parametrize("async_encoding", [True, False])
def test_image_audio_text_mix_equals_single_request_greedy(async_encoding):
    model = multimodal_model()
    eng = Engine(model, config=EngineConfig(**SMALL, async_encoding=async_encoding))
    kinds = [("image",), ("audio",), ("image", "audio"), (), ("audio", "image"), ()]
    requests = []
    for i, kind in enumerate(kinds):
        inputs = {k: raw_inputs(i)[k] for k in kind}
        prompt = [1 + i, 3, *range(10, 10 + 2 * i), 4]
        requests.append({"prompt": prompt, **inputs, "sampling": SamplingParams(max_new_tokens=6 + i % 3)})
    outs = eng.generate(requests)
    refs = [multimodal_reference(model, r["prompt"], {k: r[k] for k in ("image", "audio") if k in r},
                                 r["sampling"].max_new_tokens) for r in requests]
    assert [o.token_ids for o in outs] == refs
    assert refs[0] != refs[1] != refs[2]  # the modalities matter
    eng.check_no_leaks()
    eng.close()


def test_an_engine_dropped_without_close_stops_its_workers_and_frees_its_models():
    """The encoder workers hold the models, not the engine (or Pipeline): dropping one that has served requests
    stops its workers and its draft's, and the models can be freed; close() before that is fine too."""
    import gc
    import weakref
    from mmr1.engine import SpeculativeConfig
    from mmr1.pipeline import Pipeline

    def serve_and_drop(make_front) -> None:
        model, draft = multimodal_model(), multimodal_model()
        models = [weakref.ref(model), weakref.ref(draft)]
        front = make_front(model, draft)
        engine = getattr(front, "engine", front)
        workers = engine.queues._threads + engine.draft_queues._threads
        assert len(workers) == 4 and all(t.is_alive() for t in workers)
        engine.generate([{"prompt": [1, 3, 10, 4], **raw_inputs(0)}], SamplingParams(max_new_tokens=3))
        del model, draft, front, engine
        gc.collect()
        for t in workers:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in workers)
        assert all(ref() is None for ref in models)

    spec = EngineConfig(**SMALL, speculative=SpeculativeConfig("draft", 2))
    serve_and_drop(lambda model, draft: Engine(model, config=spec, draft=draft))
    serve_and_drop(lambda model, draft: Pipeline(model, None, engine_config=spec, draft=draft))

    closed = Engine(multimodal_model(), config=EngineConfig(**SMALL))
    workers = closed.queues._threads
    closed.close()
    closed.close()
    assert not any(t.is_alive() for t in workers)


def test_encoder_workers_share_the_cores_with_the_decoder(monkeypatch):
    """By default the decoder and each encoder worker (here image and audio) get an equal share of the cores; a
    2-core machine gives each worker one thread instead of PyTorch's default of every core."""
    from mmr1.engine import cores
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(9)), raising=False)
    assert cores.encoder_threads(2) == 3 and cores.encoder_threads(8) == 1
    model = multimodal_model()
    for configured, expected in ((None, 3), (2, 2)):
        eng = Engine(model, config=EngineConfig(**SMALL, encoder_threads=configured))
        assert eng.queues.intra_op_threads == expected
        eng.close()
    with pytest.raises(ValueError, match="encoder_threads=0"):
        EngineConfig(encoder_threads=0)


def test_a_step_leaves_busy_encoder_workers_their_cores(monkeypatch):
    """While inputs are being encoded, a CPU step runs on the threads the workers leave; then on all again."""
    import threading

    import mmr1.engine.engine as engine_module
    model = multimodal_model()
    release, encode = threading.Event(), model.encode_modality
    monkeypatch.setattr(model, "encode_modality", lambda *a, **k: release.wait(10) and encode(*a, **k))
    seen, collect = [], engine_module.admission.collect_encoded
    monkeypatch.setattr(engine_module.admission, "collect_encoded",
                        lambda *a: seen.append(torch.get_num_threads()) or collect(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    eng = Engine(model, config=EngineConfig(**SMALL, encoder_threads=1))  # two workers (image, audio), 1 each
    try:
        ids = [eng.add_request([5, 6, 4], sampling=SamplingParams(max_new_tokens=3)),
               eng.add_request([1, 3, 10, 4], image=raw_inputs(0)["image"], sampling=SamplingParams(max_new_tokens=3))]
        eng.step()
        assert seen == [2] and torch.get_num_threads() == 4
        release.set()
        while eng.has_unfinished():
            eng.step()
        assert seen[-1] == 4 and all(eng.output(i).error is None for i in ids)
    finally:
        release.set()
        eng.close()
        torch.set_num_threads(before)


def test_steps_run_on_the_engines_threads_from_any_thread(monkeypatch):
    """PyTorch starts a new thread on the thread count last set in any thread (the encoder workers set theirs): a
    step run from a fresh thread still takes the engine's decoder threads (the builder's count, or
    EngineConfig.decoder_threads) and the thread gets its own count back; the asyncio fronts' step thread takes one
    fewer by default (the event loop runs beside it)."""
    import threading

    import mmr1.engine.engine as engine_module
    seen, collect = [], engine_module.admission.collect_encoded
    monkeypatch.setattr(engine_module.admission, "collect_encoded",
                        lambda *a: seen.append(torch.get_num_threads()) or collect(*a))
    text = {"prompt": [5, 6, 4], "sampling": SamplingParams(max_new_tokens=3)}
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for configured, expected, on_the_async_step_thread in ((None, 3, 2), (2, 2, 2)):
            eng = Engine(multimodal_model(), config=EngineConfig(**SMALL, encoder_threads=1,
                                                                 decoder_threads=configured))
            eng.queues.gather(eng.queues.submit({"image": raw_inputs(0)["image"]}), timeout=10)  # workers set 1
            seen.clear()
            own = {}

            def fresh_thread():
                own["before"] = torch.get_num_threads()
                eng.generate([text])
                own["after"] = torch.get_num_threads()

            worker = threading.Thread(target=fresh_thread)
            worker.start()
            worker.join()

            async def stream():
                return [t async for t in eng.stream(text["prompt"], sampling=text["sampling"])]

            assert seen and set(seen) == {expected}
            assert own["after"] == own["before"] and torch.get_num_threads() == 3
            seen.clear()
            assert len(asyncio.run(stream())) == 3
            eng.close()
            assert len(asyncio.run(stream())) == 3  # closed: text requests still stream, on a new step thread
            assert seen and set(seen) == {on_the_async_step_thread}  # one core left to the event loop by default
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="decoder_threads=0"):
        EngineConfig(decoder_threads=0)


def test_missing_file_is_refused_at_add_request(tmp_path):
    """A path that isn't a file fails in add_request, naming modality and file, before any worker sees it."""
    eng = Engine(multimodal_model(), config=EngineConfig(**SMALL))
    try:
        with pytest.raises(InputError, match=r"batch item 2, file .*nope\.wav: audio file not found"):
            eng.add_request([1, 3, 4], audio=str(tmp_path / "nope.wav"), input_item=2)
        assert not eng.has_unfinished()
        batch = [{"prompt": [1, 3, 4], "image": raw_inputs(0)["image"]}, {"prompt": [1, 4], "audio": "gone.wav"}]
        with pytest.raises(InputError, match=r"batch item 1, file gone\.wav"):
            eng.generate(batch, SamplingParams(max_new_tokens=2))
        assert not eng.has_unfinished() and not eng._seqs  # the batch's first request was withdrawn too
        rid = eng.add_request([1, 3, 4], image=raw_inputs(0)["image"], sampling=SamplingParams(max_new_tokens=2))
        drain(eng)
        assert len(eng.output(rid).token_ids) == 2
        eng.check_no_leaks()
    finally:
        eng.close()


def test_paged_cache_equals_contiguous_cache():
    model = tiny_model(cross_attn_layers=())
    torch.manual_seed(5)
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (11, 4, 7)]
    reference_logits = []
    for seq in seqs:  # contiguous KVCache, one token at a time after a 3-token prefill
        cache = KVCache.for_model(model.cfg, 1, max_len=len(seq))
        with torch.no_grad():
            parts = [model(torch.tensor([seq[:3]]), cache=cache).logits[0]]
            parts += [model(torch.tensor([[t]]), position_ids=torch.tensor([[p]]), cache=cache).logits[0]
                      for p, t in enumerate(seq[3:], start=3)]
        reference_logits.append(torch.cat(parts))
    pool = PagedKVPool.for_model(model.cfg, num_blocks=16, block_size=4, dtype=torch.float32)
    tables = [[0, 5, 9], [2], [7, 1]]  # scattered, non-contiguous pages
    schedule = [(5, 4, 2), (1, 0, 3), (4, 0, 1), (1, 0, 1)]  # tokens fed per row per step (0 = idle)
    paged = paged_logits(model, pool, seqs, tables, schedule)
    for i in range(3):
        torch.testing.assert_close(paged[i], reference_logits[i], atol=1e-5, rtol=0)


def test_int8_kv_cache_quantizes_per_token_and_head():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16) * torch.logspace(-2, 1, 5)[:, None, None]  # very different per-token ranges
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 2)
    assert ((dequantize_int8(q, scale, torch.float32) - x).abs() <= scale.float()[..., None] / 2 + 1e-7).all()
    cfg = tiny_model().cfg
    fp32 = PagedKVPool.for_model(cfg, 4, 4, torch.float32)
    int8 = PagedKVPool.for_model(cfg, 4, 4, torch.float32, "int8")
    assert int8.keys[0].dtype == torch.int8
    assert int8.key_scales[0].dtype == torch.float16
    assert int8.bytes_per_token() / fp32.bytes_per_token() == (cfg.head_dim + 2) / (4 * cfg.head_dim)


def test_int8_engine_stays_close_to_full_precision():
    model = tiny_model()
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    exact = Engine(model, config=EngineConfig(**SMALL)).generate(prompts, SamplingParams(max_new_tokens=10))
    quant = Engine(model, config=EngineConfig(**SMALL, kv_cache_dtype="int8")).generate(
        prompts, SamplingParams(max_new_tokens=10))
    agree = sum(a == b for e, q in zip(exact, quant) for a, b in zip(e.token_ids, q.token_ids))
    assert agree >= 0.8 * sum(len(e.token_ids) for e in exact)


def test_per_request_seeds_reproduce_single_request_sampling():
    model = tiny_model()
    settings = [SamplingParams(max_new_tokens=8, temperature=1.3, top_k=10, seed=1),
                SamplingParams(max_new_tokens=8),
                SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=2),
                SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)]
    outs = Engine(model, config=EngineConfig(**SMALL)).generate(
        [{"prompt": p, "sampling": s} for p, s in zip(PROMPTS, settings)])
    for p, s, o in zip(PROMPTS, settings, outs):
        g = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        assert o.token_ids == reference(model, p, 8, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                        generator=g)
    alone = Engine(model).generate([{"prompt": PROMPTS[2], "sampling": settings[2]}])[0]
    assert alone.token_ids == outs[2].token_ids  # batch composition doesn't change a seeded sample


def test_repetition_penalty_matches_transformers_processor():
    model = tiny_model(cross_attn_layers=())
    processor = RepetitionPenaltyLogitsProcessor(1.8)
    for prompt in PROMPTS[:2]:
        seq = list(prompt)
        for _ in range(10):  # reference: no cache, HF's processor on the full sequence
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[:, -1]
            seq.append(int(processor(torch.tensor([seq]), logits).argmax()))
        out = Engine(model).generate([prompt], SamplingParams(max_new_tokens=10, repetition_penalty=1.8))[0]
        assert out.token_ids == seq[len(prompt):]
        assert out.token_ids != reference(model, prompt, 10)


def test_streaming_fronts_yield_the_same_tokens():
    model = tiny_model(cross_attn_layers=())
    refs = [reference(model, p, 7) for p in PROMPTS[:3]]
    eng = Engine(model, config=EngineConfig(**SMALL))
    ids = [eng.add_request(p, sampling=SamplingParams(max_new_tokens=7)) for p in PROMPTS[:3]]
    assert list(eng.iter_tokens(ids[1])) == refs[1]  # steps everyone: the others progressed too
    assert [list(eng.iter_tokens(i)) for i in ids] == [refs[0], [], refs[2]]  # a token is handed out once

    async def consume(prompt, limit=None):
        out = []
        async for token in eng.stream(prompt, sampling=SamplingParams(max_new_tokens=7)):
            out.append(token)
            if limit is not None and len(out) == limit:
                break  # a client going away: the request is aborted
        return out

    async def main():
        return await asyncio.gather(*(consume(p) for p in PROMPTS[:3]), consume(PROMPTS[3], limit=2))

    results = asyncio.run(main())
    assert results[:3] == refs and results[3] == reference(model, PROMPTS[3], 2)
    assert not eng.has_unfinished()
    eng.check_no_leaks()


def test_batch_one_fast_path_switches_exactly_with_the_paged_path(monkeypatch):
    """A lone decoding request takes mmr1.engine.solo (contiguous K/V, no paged forward); requests arriving
    mid-way send it back through the paged batch (its fast-path tokens flushed into its blocks) and, once alone
    again, forward. Every request still equals single-request greedy (MoE + cross-attention model)."""
    import mmr1.engine.engine as engine_module
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=4))
    paged_calls = []  # the general path of this all-full-attention model is the packed forward
    real_forward = engine_module.forward_packed
    monkeypatch.setattr(engine_module, "forward_packed", lambda *a, **k: paged_calls.append(len(a[2])) or
                        real_forward(*a, **k))
    cs = cross_states[0][cross_mask[0]]
    first = eng.add_request(PROMPTS[2], sampling=SamplingParams(max_new_tokens=20), cross_states=cs)
    for _ in range(6):  # prefill, then 5 decode steps, all on the fast path
        eng.step()
    assert paged_calls == [] and len(eng.output(first).token_ids) == 6  # alone: prefill too
    others = [eng.add_request(p, sampling=SamplingParams(max_new_tokens=n)) for p, n in ((PROMPTS[0], 3),
                                                                                         (PROMPTS[1], 4))]
    drain(eng)
    assert max(paged_calls) == 3 and len(paged_calls) < 20  # batched while the others ran, alone again after
    refs = [reference(model, PROMPTS[2], 20, cs[None]), reference(model, PROMPTS[0], 3), reference(model, PROMPTS[1], 4)]
    assert [eng.output(i).token_ids for i in [first] + others] == refs
    eng.check_no_leaks()


def test_fast_path_cache_grows_past_its_first_capacity():
    """The batch-1 copy starts at 256 positions and doubles: a request running past that still equals generate."""
    torch.manual_seed(0)
    from mmr1.backbone import R1Model
    from mmr1.config import R1Config
    model = R1Model(R1Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                             max_seq_len=300)).eval()
    model.init_weights(std=0.3)
    eng = Engine(model, config=EngineConfig(block_size=16, max_batch=1))
    out = eng.generate([[5, 9, 2]], SamplingParams(max_new_tokens=280))[0].token_ids
    assert eng._solo is None and out == reference(model, [5, 9, 2], 280)
