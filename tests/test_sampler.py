"""ResumableSampler: one process keeps the seeded shuffled DataLoader's order (existing runs unchanged), ranks
split the global batches of the doubled batch, every rank gets the same number of batches, resume skips."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from data_pipelines.sampler import ResumableSampler


def batches(dataset, batch_size, sampler, epoch):
    sampler.set_epoch(epoch)
    return [b.tolist() for b in DataLoader(dataset, batch_size=batch_size, sampler=sampler)]


def test_one_process_order_equals_the_seeded_shuffled_dataloader():
    dataset = list(range(23))
    old = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    sampler = ResumableSampler(dataset, 4, seed=7)
    for epoch in range(4):
        assert batches(dataset, 4, sampler, epoch) == [b.tolist() for b in old]


def test_two_ranks_split_the_global_batches_of_one_process():
    dataset = list(range(23))
    one = batches(dataset, 8, ResumableSampler(dataset, 8, seed=3), epoch=2)
    ranks = [batches(dataset, 4, ResumableSampler(dataset, 4, 2, r, seed=3), epoch=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3
    for step in range(2):  # full global batches: rank 0 takes the first half, rank 1 the second
        assert ranks[0][step] + ranks[1][step] == one[step]
    # the last, partial global batch (7 samples) is padded to 8 (wrapping around to the epoch's first sample) so
    # that both ranks get a batch of 4 -- a rank with one batch fewer would leave the other waiting
    assert len(ranks[0][2]) == len(ranks[1][2]) == 4
    assert ranks[0][2] + ranks[1][2] == one[2] + one[0][:1]


def test_resume_skips_the_trained_batches_of_that_epoch_only():
    dataset = list(range(20))
    full = batches(dataset, 4, ResumableSampler(dataset, 4, seed=1), epoch=1)
    sampler = ResumableSampler(dataset, 4, seed=1)
    sampler.resume(epoch=1, batches=3)
    assert batches(dataset, 4, sampler, epoch=1) == full[3:]
    assert len(sampler) == 20  # Lightning counts the skipped batches as done
    assert batches(dataset, 4, sampler, epoch=2) == batches(dataset, 4, ResumableSampler(dataset, 4, seed=1), 2)
