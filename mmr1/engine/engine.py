"""mmr1.Engine: continuous batching over a paged (optionally INT8) KV cache, async modality encoding,
per-request sampling and speculative decoding.

    engine = Engine(model, tokenizer)                    # a MultimodalR1 (or a bare R1Model with token prompts)
    rid = engine.add_request("What color?", image="a.png", sampling=SamplingParams(max_new_tokens=8))
    while engine.has_unfinished(): engine.step()         # or: for tok in engine.iter_tokens(rid): ...
    engine.output(rid).text
    outs = engine.generate(["q1", {"prompt": "q2", "audio": "b.wav"}])           # offline batch
    async for tok in engine.stream("q", image="a.png"): ...                       # servers
    async for out in engine.follow(rid): ...                                      # ... RequestOutputs as they grow
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterator, Sequence as Seq

import torch

from fusion.queues import ModalityQueues
from mmr1.backbone import R1Model
from mmr1.engine import admission, cores, cpu_linear, decode_attention, fronts
from mmr1.engine.advance import advance, greedy_batch, sampled_tail
from mmr1.engine.block_manager import BlockAllocator, blocks_for
from mmr1.engine.config import EngineConfig, SamplingParams
from mmr1.engine.encoding_cache import EncodingCache, files_key
from mmr1.engine.paged_cache import PagedKVPool
from mmr1.engine.prefix_cache import modality_key
from mmr1.engine.prepack import PrepackedLinears
from mmr1.engine.requests import checked_prompt_ids
from mmr1.engine.packed import packable
from mmr1.engine.runner import forward_packed, forward_paged
from mmr1.engine.scheduler import QueueFullError, ScheduledRow, Scheduler
from mmr1.engine.sequence import RequestOutput, Sequence, Status, merge_samples
from mmr1.engine.solo import SoloCache, compile_solo_step, compiled_feed_limit, solo_eligible, solo_forward
from mmr1.engine.speculative import DraftModel, add_drafts, check_draft, check_token_source
from mmr1.engine.sampling import make_generator

__all__ = ["Engine", "QueueFullError"]


def _parts(model: Any) -> tuple[R1Model, Any]:
    """(backbone, multimodal model or None)."""
    if isinstance(model, R1Model):
        return model, None
    if isinstance(getattr(model, "backbone", None), R1Model):
        return model.backbone, model
    raise TypeError(f"Engine: expected an R1Model or a MultimodalR1, got {type(model).__name__}")


class Engine:
    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None, *,
                 draft: Any = None, eos_id: int | None = None):
        self.cfg = config or EngineConfig()
        self.decoder_threads = self.cfg.decoder_threads or torch.get_num_threads()  # read before workers start
        self.backbone, self.multimodal = _parts(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        param = next(self.backbone.parameters())
        self.device, self.dtype = param.device, param.dtype
        num_blocks = self.cfg.num_blocks or self.cfg.max_batch * blocks_for(self.backbone.cfg.max_seq_len,
                                                                            self.cfg.block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.pool = PagedKVPool.for_model(self.backbone.cfg, num_blocks, self.cfg.block_size, self.dtype,
                                          self.cfg.kv_cache_dtype, self.device)
        self.draft = self.draft_multimodal = None
        spec = self.cfg.speculative
        if spec is not None and spec.method == "draft":
            if draft is None:
                raise ValueError("EngineConfig.speculative.method='draft' needs Engine(..., draft=<smaller model>)")
            draft_backbone, self.draft_multimodal = _parts(draft)
            if self.draft_multimodal is not None and not self.draft_multimodal.modalities:
                check_token_source(self.draft_multimodal, self.multimodal)
                self.draft_multimodal = None  # no encoders of its own: it reads the target's modality tokens
            check_draft(draft_backbone.cfg, self.backbone.cfg, reads_target_tokens=self.draft_multimodal is None)
            self.draft = DraftModel(draft_backbone, num_blocks, self.cfg.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.cfg, self.allocator, self.draft.allocator if self.draft else None)
        self.queues = self.draft_queues = None
        if self.multimodal is not None and self.multimodal.modalities and self.cfg.async_encoding:
            drafts_own = self.draft_multimodal is not None and bool(self.draft_multimodal.modalities)
            workers = len(self.multimodal.modalities) + (len(self.draft_multimodal.modalities) if drafts_own else 0)
            queue_args = {"max_batch": self.cfg.encoder_max_batch,
                          "intra_op_threads": self.cfg.encoder_threads or cores.encoder_threads(workers)}
            self.queues = ModalityQueues(self.multimodal.processors(), self.multimodal.encode_modality, **queue_args)
            if drafts_own:
                self.draft_queues = ModalityQueues(self.draft_multimodal.processors(),
                                                   self.draft_multimodal.encode_modality, **queue_args)
        # A file sent again (or by several requests at once) is encoded once (mmr1/engine/encoding_cache.py).
        self.encodings = EncodingCache(self.queues) if self.queues is not None else None
        self.draft_encodings = EncodingCache(self.draft_queues) if self.draft_queues is not None else None
        # Batch-1 fast path (mmr1.engine.solo): a lone running request keeps a contiguous K/V copy.
        self._solo_ok = solo_eligible(self.backbone, self.cfg.kv_cache_dtype)
        self._packed = self.cfg.packed_steps and packable(self.backbone)  # one forward per step (engine/packed.py)
        if self._packed:
            decode_attention.supported(self.pool)  # builds the CPU decode loop now (once), not in the first step
        self._solo: SoloCache | None = None
        self._compiled_step = compile_solo_step(self.device) if self.cfg.compile_decode and self._solo_ok else None
        # Speculative verification feeds 1 + drafts tokens: compiled too where the model allows (prompt chunks stay
        # eager, as in a plain engine).
        self._compiled_max_tokens = (compiled_feed_limit(self.backbone)
                                     if self._compiled_step and self.cfg.speculative is not None else 1)
        if self.draft is not None and self.cfg.compile_decode and self.draft._solo_ok:  # the draft's steps too
            self.draft.compiled_step = self._compiled_step or compile_solo_step(self.device)
            self.draft.compiled_max_tokens = compiled_feed_limit(self.draft.model)
        self._weights = contextlib.nullcontext()  # what every step runs under: packed CPU weights, or nothing
        if self.cfg.cpu_prepacked_weights:
            if self.device.type != "cpu":
                raise ValueError(f"EngineConfig.cpu_prepacked_weights: the model is on {self.device}, not the CPU")
            self._weights = PrepackedLinears(self.model, draft if self.draft is not None else None,
                                             few_rows=self.cfg.cpu_few_row_linears)
        elif self.cfg.cpu_few_row_linears and self.device.type == "cpu" and cpu_linear.available():
            few_rows = cpu_linear.FewRowLinears(self.model, draft if self.draft is not None else None)
            self._weights = few_rows if len(few_rows) else self._weights
        self._seqs: dict[int, Sequence] = {}
        self._groups: dict[int, list[Sequence]] = {}  # SamplingParams.n > 1: the id add_request gave -> samples
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._async_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None  # fronts.step_lock
        self._step_thread: ThreadPoolExecutor | None = None  # fronts.step_thread
        self._front_threads = threading.local()  # the step thread's own decoder threads (fronts.step_thread)
        self.stats = {"steps": 0, "generated_tokens": 0, "drafted": 0, "accepted": 0}

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Seq[int], *, sampling: SamplingParams | None = None,
                    cross_states: torch.Tensor | None = None, input_item: int | None = None, **inputs: Any) -> int:
        """Queue a request; returns its id. Keyword inputs are the model's modality keys (image=, audio=, ...);
        `cross_states` (T, dim) gives precomputed modality tokens instead (bare-backbone use).
        Raises QueueFullError when EngineConfig.max_waiting requests are already queued."""
        params = sampling or SamplingParams()
        inputs = {k: v for k, v in inputs.items() if v is not None}
        ids = checked_prompt_ids(self, prompt, params, inputs, input_item)
        with self._lock:
            self.scheduler.check_room(params.n)
            if cross_states is not None:
                cross_states = (cross_states if cross_states.dim() == 3 else cross_states[None]).to(self.dtype)
            if params.n == 1:
                seq = Sequence(next(self._ids), ids, params, make_generator(params.seed))
                self._enqueue(seq, cross_states, inputs, input_item)
                return seq.id
            # n samples: n sequences under one id. They share the encodings; the first computes the prompt's KV
            # blocks and the prefix cache gives them to the others.
            group_id = next(self._ids)
            encoded = None
            self._groups[group_id] = []
            for i in range(params.n):
                child = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                seq = Sequence(next(self._ids), ids, child, make_generator(child.seed))
                encoded = self._enqueue(seq, cross_states, inputs, input_item, encoded)
                self._groups[group_id].append(seq)
            return group_id

    def _enqueue(self, seq: Sequence, cross_states: torch.Tensor | None, inputs: dict[str, Any],
                 input_item: int | None, encoded: tuple | None = None) -> tuple | None:
        """Queue a new sequence: for encoding (its modality inputs to the workers, or the futures `encoded` of a
        sibling sample), or for admission. Returns the encoding futures it waits for, if any."""
        seq.cross_states = cross_states
        if cross_states is not None or not inputs:  # else: keyed once its encodings are in (async only)
            seq.cache_key = modality_key(seq.cross_states)
        self._seqs[seq.id] = seq
        if seq.params.max_new_tokens == 0:
            seq.text = "" if self.tokenizer is not None else None
            seq.finish("length")
        elif inputs and self.queues is not None:
            seq.status = Status.ENCODING
            if encoded is None:
                encoded = (self.encodings.submit(inputs, input_item),
                           self.draft_encodings.submit(inputs, input_item) if self.draft_encodings else None)
            seq.futures, seq.draft_futures = encoded
            self.scheduler.encoding.append(seq)
        else:
            seq.raw_inputs = (inputs or None) and (inputs, input_item)
            if inputs and cross_states is None:  # encoded at admission: keyed by its files (if only files)
                seq.cache_key = files_key(inputs)
            self.scheduler.waiting.append(seq)
        return encoded

    def abort(self, request_id: int) -> bool:
        """Cancel a request (all its samples) now: its KV blocks are freed; False when it had already finished."""
        with self._lock:
            live = [s for s in self._members(request_id, missing_ok=True) if not s.finished]
            for seq in live:
                for futures, cache in ((seq.futures, self.encodings), (seq.draft_futures, self.draft_encodings)):
                    for fut in (futures or {}).values():
                        if not cache.shared(fut):  # another request may be waiting for this file's encoding
                            fut.cancel()
                self.scheduler.remove(seq)
                seq.finish("abort")
            return bool(live)

    def output(self, request_id: int) -> RequestOutput:
        """The request's output so far; with SamplingParams.n > 1 the first sample's, all of them in `samples`."""
        with self._lock:
            seqs = self._members(request_id)
            if request_id not in self._groups:
                return seqs[0].result()
            return merge_samples(request_id, [s.result() for s in seqs])

    def finished(self, request_id: int) -> bool:
        return all(s.finished for s in self._members(request_id))

    def release(self, request_id: int) -> RequestOutput:
        """The final output of a finished request; the engine forgets it (long-running servers call this)."""
        if not self.finished(request_id):
            raise RuntimeError(f"request {request_id} has not finished")
        out = self.output(request_id)
        self._forget(request_id)
        return out

    def _members(self, request_id: int, missing_ok: bool = False) -> list[Sequence]:
        """The sequences behind an id add_request returned: one, or the samples of an n > 1 request."""
        if request_id in self._groups:
            return self._groups[request_id]
        if request_id in self._seqs:
            return [self._seqs[request_id]]
        if missing_ok:
            return []
        raise KeyError(f"unknown request id {request_id} (released already, or never added)")

    def _single(self, request_id: int, front: str) -> Sequence:
        if request_id in self._groups:
            raise ValueError(f"Engine.{front}: request {request_id} has SamplingParams.n > 1 samples; one token "
                             f"stream per request: use follow() or output()")
        return self._members(request_id)[0]

    def _forget(self, request_id: int) -> None:
        for seq in self._members(request_id, missing_ok=True):
            self._seqs.pop(seq.id, None)
        self._groups.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def metrics(self) -> dict[str, Any]:
        """A snapshot for logs and dashboards (what vLLM's periodic stats show): requests running / waiting /
        encoding, KV-cache usage, preemptions so far, and the counters in `stats` with the draft acceptance rate."""
        used = self.allocator.num_blocks - self.allocator.num_free
        drafted = self.stats["drafted"]
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "encoding": len(self.scheduler.encoding), "kv_blocks_used": used,
                "kv_blocks_total": self.allocator.num_blocks, "kv_cache_usage": used / self.allocator.num_blocks,
                "preemptions": self.scheduler.num_preemptions, **self.stats,
                "prefix_cache_hit_rate": (self.scheduler.prefix_hit_tokens / self.scheduler.prefix_queried_tokens
                                          if self.scheduler.prefix_queried_tokens else None),
                "acceptance_rate": self.stats["accepted"] / drafted if drafted else None}

    def check_no_leaks(self) -> None:
        live = {s.id for s in self.scheduler.running}
        self.allocator.check_no_leaks(live)
        if self.draft is not None:
            self.draft.allocator.check_no_leaks(live)

    def close(self) -> None:
        """Stop the encoder workers and the asyncio fronts' step thread now (an engine dropped without it stops them
        when it is collected)."""
        for q in (self.queues, self.draft_queues):
            if q is not None:
                q.close()
        if self._step_thread is not None:
            self._step_thread.shutdown(wait=False)
            self._step_thread = None  # text requests may still be served: a later stream starts a new one

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[int]:
        """One iteration: admit, run decode + prefill chunks in one forward, sample, retire. Returns the ids of
        requests that produced tokens or finished."""
        with self._lock, self._weights, self._step_threads():
            admission.collect_encoded(self.scheduler, self.multimodal, self.draft_multimodal)
            for seq in self.scheduler.admit():
                admission.prepare_admitted(seq, self.scheduler, self.backbone, self.multimodal,
                                           self.draft.model if self.draft else None, self.draft_multimodal)
            rows = self.scheduler.schedule()
            if not rows:
                admission.wait_for_encoders(self.scheduler)
                return []
            if self.cfg.speculative is not None:
                add_drafts(rows, self.cfg.speculative, self.draft, self.scheduler, self.eos_id,
                           self.backbone.cfg.max_seq_len)
            if self._solo_ok and len(rows) == 1:
                self.stats["steps"] += 1
                return self._solo_step(rows[0])
            self._flush_solo()  # the general path reads the pool: it must hold every cached token
            if self._packed:
                return self._packed_step(rows)
            # Rows are right-padded to the longest feed of their forward, so decode rows (1 token, + drafts) run
            # together and each prefill chunk runs on its own: a decode row never pays for a 256-token chunk.
            groups = [[r for r in rows if r.num_new == 1]] + [[r] for r in rows if r.num_new > 1]
            touched = []
            for group in filter(None, groups):
                logits = forward_paged(self.backbone, self.pool, [self._feed(r) for r in group],
                                       [r.seq.num_cached for r in group], [r.seq.blocks for r in group],
                                       [r.seq.cross_kv for r in group])
                per_row = [logits[i][r.num_new + len(r.drafts) - sampled_tail(r):r.num_new + len(r.drafts)]
                           for i, r in enumerate(group)]
                for row, row_logits, token in zip(group, per_row, greedy_batch(group, per_row)):
                    if advance(self, row, row_logits, greedy_token=token):
                        touched.append(row.seq.id)
            self.stats["steps"] += 1
            return touched

    def _step_threads(self) -> contextlib.AbstractContextManager:
        """The step runs on the engine's decoder threads (EngineConfig.decoder_threads), from any thread; on the CPU,
        while encoder workers have inputs to encode, on those the workers leave (EngineConfig.share_cores_with_encoders,
        mmr1/engine/cores.py)."""
        busy = (self.cfg.share_cores_with_encoders and self.queues is not None and bool(self.scheduler.encoding)
                and self.device.type == "cpu")
        workers = [q for q in (self.queues, self.draft_queues) if q is not None] if busy else []
        threads = getattr(self._front_threads, "decoder_threads", self.decoder_threads)
        return cores.step_threads(threads, sum(q.intra_op_threads * len(q.processors) for q in workers))

    def _packed_step(self, rows: list[ScheduledRow]) -> list[int]:
        """Every row's tokens in one packed forward: the weights are read once per step, nothing is padded."""
        per_row = forward_packed(self.backbone, self.pool, [self._feed(r) for r in rows],
                                 [r.seq.num_cached for r in rows], [r.seq.blocks for r in rows],
                                 [r.seq.cross_kv for r in rows], tails=[sampled_tail(r) for r in rows])
        greedy = greedy_batch(rows, per_row)
        touched = [row.seq.id for row, logits, token in zip(rows, per_row, greedy)
                   if advance(self, row, logits, greedy_token=token)]
        self.stats["steps"] += 1
        return touched

    def _solo_step(self, row: ScheduledRow) -> list[int]:
        seq = row.seq
        solo = self._solo
        if solo is None or solo.seq_id != seq.id or solo.length != seq.num_cached:
            self._flush_solo()
            solo = self._solo = SoloCache(seq.id, self.backbone, self.pool, seq.blocks, seq.num_cached)
        logits = solo_forward(self.backbone, solo, self._feed(row), seq.cross_kv, self._compiled_step,
                              tail=sampled_tail(row),
                              compiled_max_tokens=self._compiled_max_tokens if row.drafts else 1)
        touched = [seq.id] if advance(self, row, logits, in_pool=False) else []
        if seq.finished:
            self._solo = None
        else:
            solo.truncate(seq.num_cached)
            # A waiting request may start from this request's blocks next step: publish each one when it fills.
            # Only full blocks can be shared, and writing every step's tokens to the pool cost about 80 us a step
            # (a compiled demo decode step takes about 200 us).
            if (self.scheduler.waiting and self._caches(seq)
                    and solo.length // self.pool.block_size > solo.synced // self.pool.block_size):
                self._sync_solo(solo, seq)
        return touched

    def _caches(self, seq: Sequence) -> bool:
        return self.cfg.enable_prefix_caching and seq.cache_key is not None

    def _sync_solo(self, solo: SoloCache, seq: Sequence) -> None:
        """Write the fast path's new tokens into seq's pool blocks and publish the full ones for reuse."""
        solo.flush(self.pool, seq.blocks)
        self.scheduler.register_cached(seq, solo.synced)

    def _flush_solo(self) -> None:
        """Write the fast path's tokens into the request's pool blocks and drop its copy; a request that finished,
        was aborted or preempted since (its blocks may be gone) is just dropped."""
        solo, self._solo = self._solo, None
        if solo is None:
            return
        seq = self._seqs.get(solo.seq_id)
        if seq is not None and not seq.finished and seq.status == Status.RUNNING and seq.num_cached == solo.length:
            self._sync_solo(solo, seq)

    def _feed(self, row: ScheduledRow) -> list[int]:
        seq = row.seq
        return seq.tokens[seq.num_cached:seq.num_cached + row.num_new] + row.drafts

    def _retire(self, seq: Sequence, in_pool: bool) -> None:
        """Free a finished request's memory, first publishing its full blocks for later requests (a request the
        fast path ran writes its K/V to the pool first: the next one with the same prompt starts from them)."""
        solo = self._solo
        if in_pool:
            self.scheduler.register_cached(seq, seq.num_cached)
        elif solo is not None and solo.seq_id == seq.id and self._caches(seq):
            solo.truncate(seq.num_cached)  # rejected drafts are not the request's tokens
            self._sync_solo(solo, seq)
        self.scheduler.remove(seq)

    # ---- fronts (mmr1/engine/fronts.py drives the steps for them) ----------------------------------------
    def iter_tokens(self, request_id: int) -> Iterator[int]:
        """Yield a request's tokens as they come, stepping the engine (and everyone else in it) as needed."""
        return fronts.iter_tokens(self, request_id)

    def generate(self, requests: Seq[Any], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Offline batch: each request is a prompt (text or token ids) or a dict with `prompt`, modality inputs
        and optionally `sampling`. Returns one RequestOutput per request, in order."""
        return fronts.generate(self, requests, sampling)

    def stream(self, prompt: str | Seq[int], **kwargs: Any) -> AsyncIterator[int]:
        """`async for token in engine.stream(prompt, image=..., sampling=...)`. Concurrent streams share the
        engine's steps (one runs in a worker thread at a time); leaving the loop early aborts the request."""
        return fronts.stream(self, prompt, **kwargs)

    def follow(self, request_id: int) -> AsyncIterator[RequestOutput]:
        """An added request's RequestOutput each time it advances (its tokens so far), the last one finished (text,
        finish_reason, logprobs); what servers build on, like vLLM's AsyncLLMEngine.generate. Steps as `stream`
        does; the engine forgets the request afterwards, and leaving the loop early aborts it. A request that
        failed (e.g. an unreadable image) raises its error. With SamplingParams.n > 1 each output holds every
        sample so far in `samples`, and the last comes when all have finished."""
        return fronts.follow(self, request_id)

    def beam_search(self, prompt: str | Seq[int], *, beam_width: int = 4, max_new_tokens: int = 16,
                    length_penalty: float = 1.0, cross_states: torch.Tensor | None = None,
                    **inputs: Any) -> list[fronts.BeamHypothesis]:
        """The `beam_width` most likely continuations (vLLM's `LLM.beam_search` rule: each step keeps the width
        best continuations by summed log-probability, those ending in eos finish; the result is ranked by
        log-probability / length**length_penalty). Built on the engine: a step is one request per beam, and the
        prefix cache spares recomputing the prompt and the beams' shared tokens; the inputs are encoded once."""
        return fronts.beam_search(self, prompt, beam_width, max_new_tokens, length_penalty, cross_states, **inputs)

