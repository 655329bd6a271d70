"""Ranks whose batches carry different modality sets: zero-contribution passes keep outputs bit-identical, give
every parameter a gradient, and make DDP (no find_unused_parameters) and FSDP2 on 2 gloo processes compute
exactly the gradient one process computes on the whole batch."""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distributed_spawn import exit_skipping_finalization
from mmr1.model import MultimodalR1
from mmr1.parallel.config import ParallelConfig
from mmr1.tokenizer import IGNORE_INDEX
from test_model import tiny_config

L = 10
# Two steps on 2 ranks x 2 rows: step 0 rank 0 only images, rank 1 only audio; step 1 rank 0 text only, rank 1 both.
STEPS = [[{"image"}, {"image"}, {"audio"}, {"audio"}],
         [set(), set(), {"image", "audio"}, {"image"}]]


def make_model() -> MultimodalR1:
    torch.manual_seed(0)
    model = MultimodalR1(tiny_config())
    with torch.no_grad():  # open the gates so that the modality tokens change the outputs
        for layer in model.backbone.layers:
            layer.cross_attn.gate.fill_(0.5)
    return model


def make_batch(model: MultimodalR1, rows: list[set], seed: int) -> dict:
    """rows: the modalities of each row -> input_ids (B, L), labels (B, L), modalities (collated)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = torch.randint(0, 64, (len(rows), L), generator=g)
    labels = ids.clone()
    labels[:, : 3 + seed % 3] = IGNORE_INDEX  # prompt tokens; unequal supervised counts across steps
    items = {"image": [model.encoders["image"].processor(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
                       for _ in rows],
             "audio": [model.encoders["audio"].processor((rng.standard_normal(6000).astype(np.float32), 16000))
                       for _ in rows]}
    modalities = {}
    for key in model.modalities:
        present = torch.tensor([key in r for r in rows])
        if present.any():
            chosen = [items[key][i] for i, r in enumerate(rows) if key in r]
            modalities[key] = {**model.encoders[key].processor.collate(chosen), "present": present}
    return {"input_ids": ids, "labels": labels, "modalities": modalities}


def token_sum_loss(model, batch, encode_absent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["input_ids"], modalities=batch["modalities"], encode_absent=encode_absent).logits
    targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


@pytest.mark.parametrize("rows", [[set(), set()], [{"image"}, set()], [{"audio"}, {"audio"}],
                                  [{"image", "audio"}, {"image"}]], ids=["text", "image", "audio", "both"])
def test_encode_absent_is_bit_identical_and_reaches_every_parameter(rows):
    model = make_model()
    batch = make_batch(model, rows, seed=3)
    grads, reference = {}, None
    for encode_absent in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout draws in the wav2vec2 encoder
        loss, _ = token_sum_loss(model, batch, encode_absent)
        loss.backward()
        grads[encode_absent] = {n: p.grad for n, p in model.named_parameters()}
        if encode_absent:
            assert torch.equal(loss, reference)
        reference = loss
    with_pass, without = grads[True], grads[False]
    assert all(g is not None for g in with_pass.values())
    if rows != [{"image", "audio"}, {"image"}]:  # some modality is absent: without the pass it has no gradient
        assert any(g is None for g in without.values())
    for name, g in without.items():  # the parameters that had gradients keep them, bit for bit
        if g is not None:
            assert torch.equal(with_pass[name], g), name
        else:
            assert not with_pass[name].any(), name


def test_dummy_input_default_names_the_plugin():
    from encoders.base import ModalityProcessor

    class VideoProcessor(ModalityProcessor):
        modality = "video"

    with pytest.raises(NotImplementedError, match=r"VideoProcessor.*'video'.*dummy_input"):
        VideoProcessor().dummy_input()


def test_depth_plugin_dummy_input(depth_plugin):
    from encoders import create_encoder

    encoder = create_encoder(depth_plugin, size=16, patch_size=8, width=16)
    dummy = encoder.processor.dummy_input()
    tokens, mask = encoder(*encoder.processor.collate([dummy]).values())
    assert dummy.shape == (1, 16, 16) and tokens.shape == (1, 4, 16) and mask.all()


# ---- 2 gloo processes ------------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, modes: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    for mode in modes:  # one process group for all: process start-up dominates on CPU
        _check_mode(rank, world, mode)
    dist.destroy_process_group()
    exit_skipping_finalization()


def _check_mode(rank: int, world: int, mode: str) -> None:
    # eval mode: no dropout draws in wav2vec2, so both models see the same function (gradients still flow)
    reference = make_model().eval()
    model = make_model().eval()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)  # no find_unused_parameters
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from mmr1.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
        cfg = ParallelConfig(data_parallel="fsdp", param_dtype="bfloat16" if mode == "fsdp_bf16" else None,
                             reduce_dtype="float32" if mode == "fsdp_bf16" else None)
        if mode == "fsdp_ac":  # the order apply_parallelism uses: checkpointing, then sharding
            apply_activation_checkpointing(model)
        wrapped = apply_fsdp(model, init_device_mesh("cpu", (world,)), cfg)
    for step, rows in enumerate(STEPS):
        full = make_batch(reference, rows, seed=step)
        reference.zero_grad(set_to_none=True)
        ref_loss, count = token_sum_loss(reference, full, encode_absent=False)
        (ref_loss / count).backward()
        local_rows = slice(rank * len(rows) // world, (rank + 1) * len(rows) // world)
        local = {"input_ids": full["input_ids"][local_rows], "labels": full["labels"][local_rows],
                 "modalities": _slice_modalities(full["modalities"], local_rows)}
        wrapped.zero_grad(set_to_none=True)
        loss, _ = token_sum_loss(wrapped, local, encode_absent=True)
        (loss * world / count).backward()  # ranks average gradients; count is the global token count
        got, expected = [], []
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            grad = p.grad if mode == "ddp" else p.grad.full_tensor()
            assert grad is not None and grad.dtype == torch.float32, name
            if mode == "fsdp_bf16":
                got.append(grad.flatten())
                expected.append(q.grad.flatten())
            else:
                torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{mode} step {step} {name}")
        if mode == "fsdp_bf16":  # bf16 compute, fp32 reduction: the whole gradient is close in norm
            got, expected = torch.cat(got), torch.cat(expected)
            err = float((got - expected).norm() / expected.norm())
            assert err < 0.02, (step, err)


def _slice_modalities(modalities: dict, rows: slice) -> dict:
    """The collated modalities of batch rows `rows` (values hold only the rows where `present` is True)."""
    out = {}
    for key, item in modalities.items():
        present = item["present"]
        first = int(present[: rows.start].sum())
        local = present[rows]
        if not local.any():
            continue
        n = int(local.sum())
        mask = item.get("mask")
        out[key] = {"values": item["values"][first:first + n], "mask": None if mask is None else mask[first:first + n],
                    "present": local}
    return out


@pytest.mark.slow
def test_two_ranks_with_different_modalities_match_one_process(tmp_path):
    """DDP (no find_unused_parameters), FSDP2, FSDP2 with activation checkpointing, and FSDP2 with bf16
    parameters / fp32 reduction, in turn."""
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), ["ddp", "fsdp", "fsdp_ac", "fsdp_bf16"]), nprocs=2,
             join=True)


def test_activation_checkpointing_keeps_outputs_and_gradients():
    from mmr1.parallel.fsdp import apply_activation_checkpointing

    results = []
    for checkpointed in (False, True):
        model = make_model().eval()
        if checkpointed:
            apply_activation_checkpointing(model)
        batch = make_batch(model, [{"image"}, {"audio"}], seed=4)
        loss, _ = token_sum_loss(model, batch, encode_absent=True)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)
