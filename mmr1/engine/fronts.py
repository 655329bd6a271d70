"""The ways to drive mmr1.Engine: a token iterator, an offline batch, and the asyncio fronts for servers. Each
steps the whole engine as needed, so every request in it advances, not only the one being read."""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Sequence as Seq

import torch

from mmr1.engine.config import SamplingParams
from mmr1.engine.requests import checked_prompt_ids
from mmr1.engine.sequence import RequestOutput

if TYPE_CHECKING:
    from mmr1.engine.engine import Engine


def iter_tokens(engine: "Engine", request_id: int) -> Iterator[int]:
    seq = engine._single(request_id, "iter_tokens")
    while True:
        yield from _unread_tokens(seq)
        if _ended(seq):
            return
        engine.step()


def generate(engine: "Engine", requests: Seq[Any], sampling: SamplingParams | None) -> list[RequestOutput]:
    todo = list(enumerate(requests))
    ids: dict[int, int] = {}
    unfinished: deque[int] = deque()  # request ids in the order added; finished ones leave from the front
    try:
        while todo or unfinished:
            while todo:
                index, req = todo[0]
                kwargs = dict(req) if isinstance(req, dict) else {"prompt": req}
                kwargs.setdefault("sampling", sampling)
                kwargs.setdefault("input_item", index if len(requests) > 1 else None)
                n = (kwargs["sampling"] or SamplingParams()).n
                if engine.scheduler.num_queued + n > engine.cfg.max_waiting and engine.has_unfinished():
                    break  # room comes as the queue drains; an n larger than the whole queue is refused
                todo.pop(0)
                ids[index] = engine.add_request(kwargs.pop("prompt"), **kwargs)
                unfinished.append(ids[index])
            engine.step()
            # Only the oldest ones are checked: rescanning every finished request each step made a long batch
            # quadratic (7 % of a 64-request batch-1 run).
            while unfinished and engine.finished(unfinished[0]):
                unfinished.popleft()
    except BaseException:  # a refused request (or Ctrl-C) ends the whole batch: nothing is left queued
        for request_id in ids.values():
            engine.abort(request_id)
            engine._forget(request_id)
        raise
    return [engine.release(ids[i]) for i in range(len(requests))]


async def stream(engine: "Engine", prompt: Any, **kwargs: Any) -> AsyncIterator[int]:
    sampling = kwargs.get("sampling")
    if sampling is not None and sampling.n > 1:
        raise ValueError("Engine.stream: one token stream per request; for SamplingParams.n > 1 use follow()")
    outputs = follow(engine, engine.add_request(prompt, **kwargs))
    sent = 0
    try:
        async for out in outputs:
            for token in out.token_ids[sent:]:
                yield token
            sent = len(out.token_ids)
    finally:
        await outputs.aclose()


async def follow(engine: "Engine", request_id: int) -> AsyncIterator[RequestOutput]:
    seqs = engine._members(request_id)
    try:
        while True:
            async with step_lock(engine):
                if all(s.read == len(s.output) for s in seqs) and not all(s.finished for s in seqs):
                    await asyncio.get_running_loop().run_in_executor(step_thread(engine), engine.step)
                with engine._lock:  # a step whose stream was cancelled may still be running in its thread
                    advanced = any(s.read < len(s.output) for s in seqs) or all(s.finished for s in seqs)
                    for s in seqs:
                        s.read = len(s.output)
                    out = engine.output(request_id) if advanced else None
            if out is None:
                continue
            if out.error is not None:
                raise out.error
            yield out
            if out.finish_reason is not None:
                return
    finally:
        engine.abort(request_id)  # a no-op once finished
        engine._forget(request_id)


def step_thread(engine: "Engine") -> ThreadPoolExecutor:
    """The one thread the asyncio fronts step the engine on. asyncio.to_thread hopped between the loop's executor
    threads (serve's add_request calls run there too), and each thread that runs PyTorch ops keeps its own OpenMP
    team: idle teams spin beside the working one. Unless EngineConfig.decoder_threads says otherwise it runs on one
    thread fewer than the engine's (at least 1): the event loop that reads each step's outputs runs beside it. It
    ends with the engine (close(), or when collected)."""
    if engine._step_thread is None:
        threads = engine.cfg.decoder_threads or max(1, engine.decoder_threads - 1)
        engine._step_thread = ThreadPoolExecutor(1, thread_name_prefix="mmr1-engine-step",
                                                 initializer=_step_thread_init,
                                                 initargs=(engine._front_threads, threads))
    return engine._step_thread


def _step_thread_init(front_threads: threading.local, threads: int) -> None:
    front_threads.decoder_threads = threads  # what Engine.step takes on this thread
    torch.set_num_threads(threads)


def step_lock(engine: "Engine") -> asyncio.Lock:
    """The lock that lets one stream at a time step the engine; one per event loop (an asyncio.Lock is bound to
    the loop it first waits in, and an engine may outlive one: asyncio.run twice, test clients)."""
    loop = asyncio.get_running_loop()
    if engine._async_lock is None or engine._async_lock[0] is not loop:
        engine._async_lock = (loop, asyncio.Lock())
    return engine._async_lock[1]


def _unread_tokens(seq) -> Iterator[int]:
    """The request's tokens not yet handed to its reader, marking each as read."""
    while seq.read < len(seq.output):
        seq.read += 1
        yield seq.output[seq.read - 1]


def _ended(seq) -> bool:
    """Whether the request is finished; re-raises the error that ended it, if any."""
    if seq.finished and seq.error is not None:
        raise seq.error
    return seq.finished


@dataclass
class BeamHypothesis:
    """One beam: the tokens generated after the prompt, their summed log-probability, and the decoded text."""

    token_ids: list[int]
    cumulative_logprob: float
    finished: bool = False  # ended with eos (not included in token_ids)
    text: str | None = None

    def score(self, length_penalty: float) -> float:
        """Log-probability per token^length_penalty (vLLM's and transformers' beam score)."""
        return self.cumulative_logprob / max(1, len(self.token_ids) + self.finished) ** length_penalty


def beam_search(engine: "Engine", prompt: Any, beam_width: int, max_new_tokens: int, length_penalty: float = 1.0,
                cross_states: Any = None, **inputs: Any) -> list[BeamHypothesis]:
    if beam_width < 1 or max_new_tokens < 1:
        raise ValueError(f"Engine.beam_search: beam_width={beam_width} and max_new_tokens={max_new_tokens} must be "
                         f">= 1")
    prompt_ids = checked_prompt_ids(engine, prompt, SamplingParams(max_new_tokens=max_new_tokens), inputs, None)
    if inputs:  # encode once; every step's requests then carry the same modality tokens (and prefix-cache key)
        from mmr1.engine.runner import encode_inline, fuse_one

        cross_states = fuse_one(engine.multimodal.modalities, encode_inline(engine.multimodal, inputs))[0]
    eos = engine.eos_id
    # One step of every live beam = one engine request for one token, with the top 2 x width alternatives'
    # log-probabilities; the prefix cache gives each request the blocks its beam shares with the prompt.
    step_params = SamplingParams(max_new_tokens=1, logprobs=2 * beam_width, ignore_eos=True)
    live, done = [BeamHypothesis([], 0.0)], []
    for _ in range(max_new_tokens):
        outs = generate(engine, [{"prompt": prompt_ids + b.token_ids, "cross_states": cross_states} for b in live],
                        step_params)
        candidates = [BeamHypothesis(b.token_ids + ([] if t == eos else [t]), b.cumulative_logprob + lp, t == eos)
                      for b, out in zip(live, outs) for t, lp in out.logprobs[0].items()]
        candidates.sort(key=lambda h: h.cumulative_logprob, reverse=True)
        best = candidates[:beam_width]  # vLLM's rule: the width best; those that end in eos leave the beam
        done += [h for h in best if h.finished]
        live = [h for h in best if not h.finished]
        if not live:
            break
    best = sorted(done + live, key=lambda h: h.score(length_penalty), reverse=True)[:beam_width]
    for h in best:
        h.text = engine.tokenizer.decode(h.token_ids) if engine.tokenizer is not None else None
    return best
