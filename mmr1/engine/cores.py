"""How the engine's decoder and its async encoder workers share a CPU's cores.

Each encoder worker (fusion.queues.ModalityQueues, one thread per modality) runs its operators on its own PyTorch
thread count, and while the workers have inputs to encode, a decoder step runs on the threads they leave. With
PyTorch's default (every core for every thread that calls into it) a 2-core machine ran six busy threads during
encoding, and async encoding was slower than encoding inline (benchmarks/results/encoder_threads.md). Thread counts
are per calling thread (OpenMP), so neither setting touches the other threads -- except a thread's first one: PyTorch
starts a new thread on the count last set in any thread, so each step sets the engine's own count
(EngineConfig.decoder_threads) whichever thread runs it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def encoder_threads(num_workers: int) -> int:
    """PyTorch threads per encoder worker: the decoder and each worker get an equal share of the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (num_workers + 1))


@contextlib.contextmanager
def step_threads(decoder_threads: int, encoder_cores: int = 0) -> Iterator[None]:
    """Run the block on `decoder_threads` PyTorch threads minus `encoder_cores` (the busy encoder workers' share; at
    least one), then restore the calling thread's own count."""
    target = max(1, decoder_threads - max(0, encoder_cores))
    threads = torch.get_num_threads()
    if target == threads:
        yield
        return
    torch.set_num_threads(target)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
