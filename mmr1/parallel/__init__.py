"""Scale-out transforms: `apply_parallelism(model, device_mesh, cfg)` applies tensor parallel, then expert
parallel, then activation checkpointing, then FSDP2, each only when `cfg` (a ParallelConfig) asks for it.

`device_mesh` is Lightning's ModelParallelStrategy mesh, dims ("data_parallel", "tensor_parallel").
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mmr1.parallel.config import ParallelConfig


def _transform(module: str, name: str, feature: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{feature} was requested in the parallel: config, but {module}.{name} is not "
                           f"available in this installation ({type(e).__name__}: {e})") from e


def expert_meshes(device_mesh: DeviceMesh, ep: int) -> tuple[DeviceMesh, DeviceMesh]:
    """Split the data-parallel ranks into groups of `ep` that hold different experts: returns the expert-parallel
    mesh (ranks of one group) and the expert-replicate mesh (ranks holding the same experts)."""
    dp = device_mesh["data_parallel"].size()
    if device_mesh["tensor_parallel"].size() > 1:
        raise ValueError("parallel: expert_parallel_size > 1 together with tensor_parallel_size > 1 is not "
                         "supported yet; use one of them with FSDP")
    if dp % ep:
        raise ValueError(f"parallel.expert_parallel_size={ep} does not divide the data-parallel size {dp}")
    mesh = init_device_mesh(device_mesh.device_type, (dp // ep, ep),
                            mesh_dim_names=("expert_replicate", "expert_parallel"))
    return mesh["expert_parallel"], mesh["expert_replicate"]


@torch.no_grad()
def broadcast_module_states(model: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Copy rank `src`'s parameters and buffers to every rank (DDP does this when it wraps a model; sharding
    does not, and each rank keeping its shard of its *own* initialisation would build a model no rank has)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=src)
    return model


def apply_parallelism(model, device_mesh: DeviceMesh, cfg: ParallelConfig):
    """TP -> EP -> activation checkpointing -> FSDP, in place; returns the model. Every rank starts from rank
    0's weights."""
    if cfg.data_parallel != "fsdp" and device_mesh["data_parallel"].size() > 1 and (
            cfg.tensor_parallel_size > 1 or cfg.expert_parallel_size > 1):
        # Under ModelParallelStrategy only FSDP2 reduces gradients over the data-parallel ranks; without it the
        # replicas would silently drift apart.
        raise ValueError(f"parallel: tensor/expert parallel with {device_mesh['data_parallel'].size()} data-parallel "
                         f"ranks needs data_parallel: fsdp (got {cfg.data_parallel!r})")
    broadcast_module_states(model)
    if cfg.tensor_parallel_size > 1:
        if device_mesh["tensor_parallel"].size() != cfg.tensor_parallel_size:
            raise ValueError(f"parallel.tensor_parallel_size={cfg.tensor_parallel_size} but the strategy's mesh has "
                             f"{device_mesh['tensor_parallel'].size()} tensor-parallel ranks")
        apply_tp = _transform("mmr1.parallel.tensor", "apply_tensor_parallel", "tensor parallelism")
        model = apply_tp(model, device_mesh["tensor_parallel"])
    expert_replicate = None
    if cfg.expert_parallel_size > 1:
        ep_mesh, expert_replicate = expert_meshes(device_mesh, cfg.expert_parallel_size)
        apply_ep = _transform("mmr1.parallel.expert", "apply_expert_parallel", "expert parallelism")
        # Expert gradients sum over the expert-parallel group (all-to-all backward): divide by its size so that,
        # after FSDP's mean over the replicate ranks, they are the same mean over all ranks as every other grad.
        model = apply_ep(model, ep_mesh, grad_divisor=float(cfg.expert_parallel_size))
    if cfg.activation_checkpointing:
        from mmr1.parallel.fsdp import apply_activation_checkpointing
        model = apply_activation_checkpointing(model)
    if cfg.data_parallel == "fsdp":
        from mmr1.parallel.fsdp import apply_fsdp
        model = apply_fsdp(model, device_mesh["data_parallel"], cfg, expert_mesh=expert_replicate)
    return model


__all__ = ["ParallelConfig", "apply_parallelism", "broadcast_module_states", "expert_meshes"]
