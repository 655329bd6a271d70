"""Scheduler behaviour of mmr1.Engine with a stub backbone: admission, chunked prefill, preemption + recompute,
abort, bounded queue, stop rules, static batching, and a soak test with random aborts and no leaked blocks."""
from __future__ import annotations

import random

import pytest

from engine_stub import StubBackbone, reference_generate
from mmr1.engine import Engine, EngineConfig, QueueFullError, SamplingParams
from mmr1.engine.sequence import Status


def engine(**cfg) -> Engine:
    return Engine(StubBackbone(), config=EngineConfig(**{"block_size": 4, **cfg}))


def run(eng: Engine) -> int:
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return steps


def test_outputs_equal_reference_with_chunked_prefill_and_paging():
    eng = engine(max_batch=3, max_num_batched_tokens=6, prefill_chunk=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [4, 4, 4, 4, 4], [30, 1]]
    ids = [eng.add_request(p, sampling=SamplingParams(max_new_tokens=9)) for p in prompts]
    run(eng)
    for rid, p in zip(ids, prompts):
        out = eng.output(rid)
        assert out.token_ids == reference_generate(p, 9) and out.finish_reason == "length"
    eng.check_no_leaks()
    assert eng.allocator.num_free == eng.allocator.num_blocks


def test_admission_respects_max_batch_and_free_blocks():
    eng = engine(max_batch=2, num_blocks=64)
    ids = [eng.add_request([1, 2], sampling=SamplingParams(max_new_tokens=4)) for _ in range(4)]
    eng.step()
    assert [eng._seqs[i].status for i in ids] == [Status.RUNNING] * 2 + [Status.WAITING] * 2
    m = eng.metrics()  # two 3-token sequences after one step: one 4-token block each
    assert (m["running"], m["waiting"], m["kv_blocks_used"], m["kv_blocks_total"]) == (2, 2, 2, 64)
    assert m["kv_cache_usage"] == 2 / 64 and m["steps"] == 1 and m["generated_tokens"] == 2
    assert m["acceptance_rate"] is None and m["preemptions"] == 0
    # A pool of 3 blocks (12 tokens): two 6-token prompts need 2 blocks each -> only the first is admitted.
    eng = engine(max_batch=8, num_blocks=3)
    ids = [eng.add_request([1] * 6, sampling=SamplingParams(max_new_tokens=4)) for _ in range(2)]
    eng.step()
    assert [eng._seqs[i].status for i in ids] == [Status.RUNNING, Status.WAITING]
    run(eng)
    assert all(eng.output(i).token_ids == reference_generate([1] * 6, 4) for i in ids)


def test_finished_sequences_retire_at_once_and_free_their_blocks():
    eng = engine(max_batch=2, num_blocks=64)
    short = eng.add_request([5], sampling=SamplingParams(max_new_tokens=1))
    long = eng.add_request([6], sampling=SamplingParams(max_new_tokens=6))
    third = eng.add_request([7], sampling=SamplingParams(max_new_tokens=2))
    eng.step()
    assert eng._seqs[short].finished and not eng._seqs[short].blocks
    eng.step()  # the freed slot goes to the third request while the long one keeps decoding
    assert eng._seqs[third].status is Status.RUNNING and eng._seqs[long].status is Status.RUNNING
    run(eng)
    eng.check_no_leaks()


def test_preemption_recomputes_and_never_drops():
    # 6 blocks of 4 tokens; three requests growing to 3 + 12 = 15 tokens (4 blocks each) cannot all stay.
    eng = engine(max_batch=3, num_blocks=6)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    ids = [eng.add_request(p, sampling=SamplingParams(max_new_tokens=12)) for p in prompts]
    run(eng)
    assert eng.scheduler.num_preemptions > 0
    assert max(eng._seqs[i].num_preemptions for i in ids) > 0
    assert eng._seqs[ids[0]].num_preemptions == 0  # the oldest is never the victim
    for rid, p in zip(ids, prompts):
        assert eng.output(rid).token_ids == reference_generate(p, 12)
    eng.check_no_leaks()
    assert eng.allocator.num_free == 6


def test_abort_running_and_waiting_frees_memory():
    eng = engine(max_batch=1, num_blocks=32)
    running = eng.add_request([1, 2, 3], sampling=SamplingParams(max_new_tokens=10))
    waiting = eng.add_request([4], sampling=SamplingParams(max_new_tokens=10))
    eng.step()
    eng.step()
    assert eng._seqs[running].blocks and eng._seqs[waiting].status is Status.WAITING
    assert eng.abort(running) and eng.abort(waiting)
    assert not eng.abort(running)  # already finished
    assert eng.output(running).finish_reason == "abort" and len(eng.output(running).token_ids) == 2
    assert not eng.has_unfinished()
    eng.check_no_leaks()
    assert eng.allocator.num_free == 32
    assert list(eng.iter_tokens(running)) == eng.output(running).token_ids  # a stream just ends


def test_bounded_queue_refuses_with_a_clear_error():
    eng = engine(max_waiting=3, max_batch=1)
    for _ in range(3):
        eng.add_request([1], sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFullError, match="max_waiting=3"):
        eng.add_request([1])
    eng.step()  # one admitted -> room for one more
    eng.add_request([1], sampling=SamplingParams(max_new_tokens=2))
    run(eng)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request([1] * 60, sampling=SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])


def test_stop_tokens_eos_and_max_new_tokens():
    free = reference_generate([3, 1], 10)
    eng = Engine(StubBackbone(), config=EngineConfig(block_size=4), eos_id=free[4])
    stop = eng.add_request([3, 1], sampling=SamplingParams(max_new_tokens=10, stop_token_ids=[free[2]]))
    eos = eng.add_request([3, 1], sampling=SamplingParams(max_new_tokens=10))
    ignore = eng.add_request([3, 1], sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))
    zero = eng.add_request([3, 1], sampling=SamplingParams(max_new_tokens=0))
    run(eng)
    assert eng.output(stop).token_ids == free[:2] and eng.output(stop).finish_reason == "stop"
    assert eng.output(eos).token_ids == reference_generate([3, 1], 10, eos_id=free[4])
    assert eng.output(ignore).token_ids == free and eng.output(ignore).finish_reason == "length"
    assert eng.output(zero).token_ids == [] and eng.output(zero).finish_reason == "length"


class LetterTokenizer:
    eos_id = None

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_the_text():
    free = reference_generate([2], 10)
    text = LetterTokenizer().decode(free)
    eng = Engine(StubBackbone(), LetterTokenizer(), EngineConfig(block_size=4))
    stop = text[3:5]
    first = text.index(stop)  # the text is cut at the first occurrence, after the token that completes it
    rid = eng.add_request([2], sampling=SamplingParams(max_new_tokens=10, stop=["zzz", stop]))
    run(eng)
    out = eng.output(rid)
    assert out.finish_reason == "stop" and out.text == text[:first] and out.token_ids == free[:first + 2]


@pytest.mark.parametrize("min_tokens", [0, 3])
def test_stop_strings_count_only_after_min_tokens(min_tokens):
    free = reference_generate([2], 10)
    text = LetterTokenizer().decode(free)
    stop = text[0:2]  # occurs at once: min_tokens must skip this occurrence

    def expected():  # token by token: the first occurrence that ends after the first min_tokens characters
        for t in range(max(min_tokens, 1), 11):
            i = text[:t].find(stop, max(0, min_tokens - len(stop) + 1))
            if i >= 0:
                return text[:i], free[:t], "stop"
        return text, free, "length"

    eng = Engine(StubBackbone(), LetterTokenizer(), EngineConfig(block_size=4))
    rid = eng.add_request([2], sampling=SamplingParams(max_new_tokens=10, stop=[stop], min_tokens=min_tokens))
    run(eng)
    out = eng.output(rid)
    assert (out.text, out.token_ids, out.finish_reason) == expected()
    assert len(out.token_ids) >= min_tokens and (min_tokens == 0) == (out.text == "")


def test_static_batching_waits_for_the_whole_batch():
    eng = engine(max_batch=2, scheduling="static")
    a = eng.add_request([1], sampling=SamplingParams(max_new_tokens=1))
    b = eng.add_request([2], sampling=SamplingParams(max_new_tokens=5))
    c = eng.add_request([3], sampling=SamplingParams(max_new_tokens=1))
    eng.step()
    eng.step()
    assert eng._seqs[a].finished and eng._seqs[c].status is Status.WAITING  # a's slot stays empty
    steps = run(eng)
    assert steps == 3 + 1 and eng.output(c).token_ids == reference_generate([3], 1)
    assert eng.output(b).token_ids == reference_generate([2], 5)


def test_soak_1000_requests_with_random_aborts_leaks_nothing():
    rng = random.Random(0)
    eng = engine(max_batch=16, num_blocks=40, max_num_batched_tokens=48, prefill_chunk=8, max_waiting=64)
    expected, aborted, pending = {}, set(), 1000
    while pending or eng.has_unfinished():
        while pending and eng.scheduler.num_queued < 64:
            prompt = [rng.randrange(32) for _ in range(rng.randint(1, 12))]
            n = rng.randint(1, 8)
            expected[eng.add_request(prompt, sampling=SamplingParams(max_new_tokens=n))] = reference_generate(prompt, n)
            pending -= 1
        eng.step()
        unfinished = [s.id for s in list(eng.scheduler.running) + list(eng.scheduler.waiting)]
        if unfinished and rng.random() < 0.3:
            victim = rng.choice(unfinished)
            assert eng.abort(victim)
            aborted.add(victim)
        live = {s.id for s in eng.scheduler.running}
        eng.allocator.check_no_leaks(live)
    assert len(aborted) > 50
    for rid, ref in expected.items():
        out = eng.output(rid)
        if rid in aborted:
            assert out.finish_reason == "abort" and out.token_ids == ref[:len(out.token_ids)]
        else:
            assert out.token_ids == ref, rid
    eng.check_no_leaks()
    assert eng.allocator.num_free == 40 and eng.scheduler.num_preemptions > 0


def test_generate_checks_each_finished_request_once(monkeypatch):
    """Engine.generate waits for its requests in order: a step looks at the oldest unfinished one only, not at every
    request again (that made a long offline batch quadratic in its length). All outputs still come back in order."""
    eng = engine(max_batch=2)
    checks = []
    real_finished = Engine.finished
    monkeypatch.setattr(Engine, "finished", lambda self, rid: checks.append(rid) or real_finished(self, rid))
    prompts = [[1 + i % 7, 2] for i in range(60)]
    lengths = [1 + (7 * i) % 5 for i in range(60)]  # mixed, so requests also finish out of order
    outs = eng.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n)}
                         for p, n in zip(prompts, lengths)])
    assert [o.token_ids for o in outs] == [reference_generate(p, n) for p, n in zip(prompts, lengths)]
    # at most one check that fails per step, one that passes per request, and release()'s own per request
    assert len(checks) <= eng.stats["steps"] + 2 * len(prompts)
    eng.check_no_leaks()
