"""Async modality queues: each modality's load -> preprocess -> encode runs in its own worker thread.

A request submits its raw inputs (paths, PIL images, waveforms) and gets one future per modality; the decoder
side awaits them (`gather`, or `await` in asyncio code) while other work goes on. A worker drains whatever is
waiting in its queue (up to `max_batch` items), encodes those in one batched forward, and resolves each
item's future with that item's own tokens. PyTorch releases the GIL inside its kernels, so encoding really
runs beside the decoder. A bad input fails only its own future, with an error naming the item.
"""
from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from data_pipelines.errors import InputError
from encoders.base import ModalityProcessor

# (values, mask) of a collated batch -> (tokens (N, T, D), token_mask (N, T))
EncodeFn = Callable[[str, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class EncodedInput:
    tokens: torch.Tensor  # (T, D)
    mask: torch.Tensor  # (T,) bool


_STOP = object()
_ALIVE: "weakref.WeakSet[ModalityQueues]" = weakref.WeakSet()  # their workers are stopped at interpreter exit
EXIT_JOIN_TIMEOUT_S = 60.0  # how long interpreter exit waits for a batch being encoded


class ModalityQueues:
    """One worker thread per modality. Use as a context manager or call `close()`; one dropped without either stops
    its workers when it is garbage-collected, and interpreter exit stops those still open."""

    def __init__(self, processors: Mapping[str, ModalityProcessor], encode: EncodeFn, *, max_batch: int = 16,
                 intra_op_threads: int | None = None):
        """intra_op_threads: PyTorch threads of each worker's own operators (torch.set_num_threads in the worker:
        OpenMP keeps the count per calling thread, so the decoder's threads are untouched); None: PyTorch's
        default. The workers run beside the decoder, whose threads want the same cores."""
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f"ModalityQueues: intra_op_threads={intra_op_threads} must be >= 1 (or None)")
        self.processors = dict(processors)
        self.intra_op_threads = intra_op_threads  # the engine counts the cores its busy workers hold
        self._queues: dict[str, queue.Queue] = {m: queue.Queue() for m in self.processors}
        # The threads get the queue, processor and encode function, not this object: a ModalityQueues dropped without
        # close() is collected, and its finalizer stops them (an engine's workers end with the engine).
        self._threads = [threading.Thread(target=_work, args=(self._queues[m], self.processors[m], encode, m,
                                                               max_batch, intra_op_threads),
                                          daemon=True, name=f"mmr1-{m}-encoder")
                         for m in self.processors]
        for t in self._threads:
            t.start()
        self._stop = weakref.finalize(self, _stop_workers, list(self._queues.values()), self._threads)
        self._stop.atexit = False  # _stop_workers_at_exit does it, dropping what is still queued
        _ALIVE.add(self)

    @property
    def _closed(self) -> bool:
        return not self._stop.alive

    # ---- submission ---------------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, Any], *, item: int | None = None) -> dict[str, Future]:
        """Queue one request's raw inputs; returns {modality: Future[EncodedInput]}."""
        if self._closed:
            raise RuntimeError("ModalityQueues is closed")
        unknown = sorted(set(inputs) - set(self.processors))
        if unknown:
            raise ValueError(f"no encoder for modality {unknown}; this model encodes {sorted(self.processors)}")
        futures = {}
        for modality, source in inputs.items():
            fut: Future = Future()
            self._queues[modality].put((source, item, fut))
            futures[modality] = fut
        return futures

    @staticmethod
    def gather(futures: Mapping[str, Future], timeout: float | None = None) -> dict[str, EncodedInput]:
        """Block until every future of one request is done; re-raises the first input error."""
        return {m: f.result(timeout=timeout) for m, f in futures.items()}

    async def encode_async(self, inputs: Mapping[str, Any], *, item: int | None = None) -> dict[str, EncodedInput]:
        futures = self.submit(inputs, item=item)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()))
        return dict(zip(futures.keys(), results))

    def close(self) -> None:
        """Stop the workers after the inputs already queued (also done when the object is garbage-collected)."""
        self._stop()

    def __enter__(self) -> "ModalityQueues":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- workers ------------------------------------------------------------------------------------------
def _stop_workers(queues: list[queue.Queue], threads: list[threading.Thread], timeout: float = 10.0) -> None:
    for q in queues:
        q.put(_STOP)
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=timeout)


@atexit.register
def _stop_workers_at_exit() -> None:
    """Before the interpreter finalizes, stop the workers of every ModalityQueues still alive, dropping queued inputs.

    The workers are daemon threads, and one still inside an encoder's PyTorch kernels when the interpreter
    finalizes dies taking the GIL back, in a C++ destructor: the process aborts ("terminate called without an
    active exception", exit 134) after the script itself finished, e.g. a Ctrl-C or an error while a request
    was encoding. So exit cancels what no worker has started and waits for the batch being encoded (also behind
    a `close()` that returned while its workers still had queued inputs to encode)."""
    for alive in list(_ALIVE):
        alive._stop.detach()
        queues = list(alive._queues.values())
        for q in queues:
            _cancel_queued(q)
        _stop_workers(queues, alive._threads, timeout=EXIT_JOIN_TIMEOUT_S)


def _cancel_queued(q: queue.Queue) -> None:
    while True:
        try:
            entry = q.get_nowait()
        except queue.Empty:
            return
        if entry is not _STOP:
            entry[2].cancel()  # (source, item, future)


def _drain(q: queue.Queue, max_batch: int) -> list:
    first = q.get()
    if first is _STOP:
        return [_STOP]
    batch = [first]
    while len(batch) < max_batch:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is _STOP:
            q.put(_STOP)  # finish this batch, stop on the next drain
            break
        batch.append(nxt)
    return batch


def _work(q: queue.Queue, processor: ModalityProcessor, encode: EncodeFn, modality: str, max_batch: int,
          intra_op_threads: int | None) -> None:
    if intra_op_threads is not None:
        torch.set_num_threads(intra_op_threads)
    while True:
        batch = _drain(q, max_batch)
        if batch[0] is _STOP:
            return
        ready = []
        for source, item, fut in batch:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                ready.append((processor.preprocess(processor.load(source)), fut))
            except InputError as err:
                fut.set_exception(err.located(item=item))
            except Exception as err:  # a processor bug must not kill the worker
                fut.set_exception(err)
        if ready:
            _encode_batch(encode, modality, processor, ready)


def _encode_batch(encode: EncodeFn, modality: str, processor: ModalityProcessor, ready: list) -> None:
    try:
        collated = processor.collate([tensor for tensor, _ in ready])
        with torch.inference_mode():
            tokens, mask = encode(modality, collated["values"], collated.get("mask"))  # (N, T, D), (N, T)
        for i, (_, fut) in enumerate(ready):
            fut.set_result(EncodedInput(tokens[i], mask[i]))
    except Exception as err:
        for _, fut in ready:
            if not fut.done():
                fut.set_exception(err)
