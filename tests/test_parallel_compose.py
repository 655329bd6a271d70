"""TP + EP + FSDP2 together on 4 CPU processes (gloo): a (dp_mod_ep=1, ep=2, tp=2) mesh, applied in the order
TP -> EP -> fully_shard, equals single-process math: every gradient is the mean over the two data groups."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from distributed_spawn import run_on_ranks
from mmr1.model import MultimodalR1
from mmr1.moe import MoEFeedForward
from mmr1.parallel.expert import apply_expert_parallel
from mmr1.parallel.tensor import apply_tensor_parallel
from test_parallel_tensor import lm_loss, modality_batch, tiny_config

TOL = 1e-5


def _compose_worker(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("dp_mod_ep", "ep", "tp"))
    # Data parallel = the ranks that see different batches: (dp_mod_ep, ep). TP ranks share their batch.
    dp_mesh = mesh["dp_mod_ep", "ep"]._flatten("dp")
    torch.manual_seed(0)
    ref = MultimodalR1(tiny_config()).eval()
    with torch.no_grad():
        for block in ref.backbone.layers:
            block.cross_attn.gate.fill_(0.5)
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh["tp"])
    model = apply_expert_parallel(model, mesh["ep"], grad_divisor=mesh["ep"].size())
    for block in model.backbone.layers:
        if isinstance(block.ffn, MoEFeedForward):  # experts: EP over "ep", FSDP over the rest of data parallel
            fully_shard(block.ffn.experts, mesh=mesh["dp_mod_ep"])
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)

    batches = []
    for group in range(2):
        gen = torch.Generator().manual_seed(group)
        rows = 2 + group  # the data groups hold different numbers of rows and tokens
        ids = torch.randint(0, 64, (rows, 8 + 2 * group), generator=gen)
        mask = torch.ones(ids.shape, dtype=torch.bool)
        mask[0, :2] = False
        batches.append((ids, mask, modality_batch(ref, (True,) * rows, (True,) * rows, seed=group)))
    my_group = mesh["ep"].get_local_rank()
    for step in range(2):  # a second step reuses the FSDP-resharded parameters
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss = lm_loss(model, *batches[my_group])
        loss.backward()
        ref_losses = []
        for batch in batches:
            ref_loss = lm_loss(ref, *batch) / len(batches)  # grads: mean over the data groups
            ref_loss.backward()
            ref_losses.append(ref_loss.detach() * len(batches))
        err = (loss.detach() - ref_losses[my_group]).abs().item()
        assert err <= TOL, f"step {step} rank {rank}: loss off by {err:.3g}"
        ref_params = dict(ref.named_parameters())
        for name, param in model.named_parameters():
            got = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            want = ref_params[name].grad
            assert (got is None) == (want is None), f"step {step}: grad of {name} present in only one run"
            if got is not None:
                err = (got - want).abs().max().item()
                assert err <= TOL, f"step {step} rank {rank}: grad {name} max abs error {err:.3g}"
        with torch.no_grad():  # move the weights so step 2 differs from step 1
            for name, param in model.named_parameters():
                if param.grad is not None:
                    param.sub_(0.1 * param.grad)
                    ref_params[name].sub_(0.1 * ref_params[name].grad)


@pytest.mark.slow
def test_tensor_expert_and_fsdp_compose_on_a_3d_mesh():
    run_on_ranks(_compose_worker, 4, timeout_s=180)
