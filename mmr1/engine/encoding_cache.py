"""Encodings of image/audio files shared between requests: a request naming a file that an earlier request already
sent (or is still sending) waits for that encoding instead of running the encoder again. Multiple-choice scoring
(`Pipeline.score`: one request per candidate answer), several questions about one image and a server receiving the
same path repeatedly then encode it once; equal encodings also give equal prefix-cache keys.

A file is keyed by its resolved path, size and modification time, so a file rewritten on disk is encoded afresh.
In-memory inputs (arrays, PIL images, waveforms) are not keyed: the same object can change between requests.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Mapping

from fusion.queues import ModalityQueues


def file_key(modality: str, source: Any) -> tuple | None:
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        stat = os.stat(source)
    except OSError:
        return None  # the encoder reports it (add_request refuses missing files before this)
    return modality, os.path.realpath(source), stat.st_size, stat.st_mtime_ns


def files_key(inputs: Mapping[str, Any]) -> bytes | None:
    """A prefix-cache modality key for inputs that are all files, before they are encoded (inline encoding runs at
    admission, after the prefix lookup): the same files unchanged on disk give the same modality tokens."""
    keys = [file_key(m, source) for m, source in sorted(inputs.items())]
    if not keys or any(k is None for k in keys):
        return None
    return hashlib.sha256(repr(keys).encode()).digest()


class EncodingCache:
    """The futures of the last `capacity` file encodings, by file_key; least recently used evicted first."""

    def __init__(self, queues: ModalityQueues, capacity: int = 256):
        self.queues = queues
        self.capacity = capacity
        self._futures: OrderedDict[tuple, Future] = OrderedDict()
        self.hits = 0

    def submit(self, inputs: Mapping[str, Any], item: int | None = None) -> dict[str, Future]:
        """Like ModalityQueues.submit, reusing the encoding of any file sent before."""
        keys = {m: file_key(m, source) for m, source in inputs.items()}
        reused = {}
        for modality, key in keys.items():
            fut = self._futures.get(key) if key is not None else None
            if fut is not None and not fut.cancelled():
                self._futures.move_to_end(key)
                reused[modality] = fut
        fresh = self.queues.submit({m: s for m, s in inputs.items() if m not in reused}, item=item)
        for modality, fut in fresh.items():
            if keys[modality] is not None:
                self._futures[keys[modality]] = fut
                if len(self._futures) > self.capacity:
                    self._futures.popitem(last=False)
        self.hits += len(reused)
        return {m: reused.get(m) or fresh[m] for m in inputs}

    def shared(self, fut: Future) -> bool:
        """Whether a later request may still wait for this future (so an abort must not cancel it)."""
        return any(f is fut for f in self._futures.values())
