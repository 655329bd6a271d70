"""Run a test body in N CPU processes joined by a gloo process group (torch.multiprocessing spawn).

`run_on_ranks(fn, world_size, *args)` calls `fn(rank, world_size, *args)` in every process after
`init_process_group("gloo")` on a free localhost port. An assertion or error in any rank fails the test with
that rank's traceback; a collective that never completes fails after `timeout_s` instead of hanging the suite.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        # Every rank finished before any tears gloo down: a rank that exits while its peer still talks to it can
        # abort in gloo's threads ("terminate called without an active exception"). A failed rank skips this and
        # run_on_ranks ends the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_skipping_finalization()


def exit_skipping_finalization() -> None:
    """End a rank whose work is done and checked with status 0, skipping the interpreter's finalization.

    Even after barrier + destroy_process_group, rank 0 (the TCPStore host) aborted about one run in 40 during
    finalization ("terminate called without an active exception"; faulthandler showed no Python frame left).
    Only a rank that succeeded calls this: a failing one raises, and spawn reports its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """fn must be a module-level function (spawn pickles it by name)."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), timeout_s, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s + 30
    while not context.join(timeout=1.0):  # raises ProcessRaisedException with the failing rank's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"distributed test did not finish within {timeout_s + 30:.0f} s (a hang?)")
