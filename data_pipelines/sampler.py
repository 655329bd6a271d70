"""A resumable, data-parallel sampler: the data order depends only on (seed, epoch, global batch size).

Each epoch the dataset is permuted once (the same permutation on every rank) and cut into global batches of
`batch_size * num_replicas` samples; rank r takes the r-th block of `batch_size` of each. So 2 ranks with batch
size B see exactly the batches one process with batch size 2B sees, split in two, and a run resumed in the
middle of an epoch (`skip_batches`) continues with the batch the interrupted run would have taken next.

With one process the permutation is the one `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`
draws (RandomSampler sharing the loader's generator: per epoch a base-seed draw and two permutations), so
runs that predate this sampler keep their data order bit for bit.
"""
from __future__ import annotations

import math
from typing import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) the sample order of `epoch`: replays a seeded DataLoader generator through epochs 0..epoch."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader iterator's base seed
        torch.randperm(n, generator=generator)  # the epoch's order
        torch.randperm(n, generator=generator)  # RandomSampler's (empty) remainder slice still draws one
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)


class ResumableSampler(DistributedSampler):
    """Indices of this rank for one epoch (see the module docstring). A DistributedSampler subclass so Lightning
    uses it as the distributed sampler instead of replacing it; `set_epoch` is called by Lightning each epoch."""

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.resume_epoch: int | None = None  # the epoch whose first `skip_batches` batches were already trained
        self.skip_batches = 0

    def resume(self, epoch: int, batches: int) -> None:
        self.resume_epoch, self.skip_batches = epoch, batches

    def _rank_order(self) -> torch.Tensor:
        n = len(self.dataset)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        world, B = self.num_replicas, self.batch_size
        if world == 1:
            return order
        # Pad by wrapping so every rank gets the same number of batches (a rank with fewer would hang the rest).
        full, rest = divmod(n, world * B)
        last = math.ceil(rest / world) * world
        total = full * world * B + last
        order = order.repeat(math.ceil(total / n))[:total]
        blocks = order[: full * world * B].view(full, world, B)[:, self.rank].reshape(-1)  # full global batches
        tail = order[full * world * B:].view(world, -1)[self.rank] if last else order[:0]  # the last, partial one
        return torch.cat([blocks, tail])

    def __iter__(self) -> Iterator[int]:
        order = self._rank_order()
        if self.resume_epoch == self.epoch:
            order = order[self.skip_batches * self.batch_size:]
            self.resume_epoch, self.skip_batches = None, 0  # later epochs start from their beginning
        return iter(order.tolist())

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the skipped batches as already done.
        n, world, B = len(self.dataset), self.num_replicas, self.batch_size
        if world == 1:
            return n
        full, rest = divmod(n, world * B)
        return full * B + math.ceil(rest / world)
