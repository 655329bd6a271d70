"""Tensor parallelism (Megatron-style) for MultimodalR1, as DTensor plans applied by `apply_tensor_parallel`.

Over a 1-D tensor-parallel mesh of size T, every pair "column-wise projection -> local math -> row-wise
projection" is split by output features / heads, so activations between the pair stay sharded and one
all-reduce (forward) / one all-reduce (backward) per pair restores the replicated residual stream:

    self-attention        wq, wk, wv column-wise (H/T query, Hkv/T key/value heads per rank), wo row-wise
    dense SwiGLU MLPs     gate_proj, up_proj column-wise, down_proj row-wise
    MoE shared experts    the same SwiGLU plan; router, shared gate and routed experts stay replicated
                          (routed experts are expert parallel's job, see mmr1.parallel.expert)
    gated cross-attention wq column-wise, wo row-wise; wkv ([k; v] rows) row-wise, then each rank keeps the k/v
                          of its heads (StackedHeadsParallel)
    MLP projector         fc1 column-wise, fc2 row-wise
    resampler projector   each layer: wq, wkv, wo like cross-attention; mlp like a dense MLP

Replicated: token embeddings / lm head, norms, encoders, modality embeddings, cross-attention gates, the
resampler's input projection and latents. Their gradients are identical on every TP rank because each
column-wise block all-reduces its input gradient.

Attention modules reshape by their head-count attributes, so the transform sets those to the local counts.
Inference with a KV cache is not covered (the cache is sized from the global config).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from fusion.cross_attention import GatedCrossAttention
from fusion.projector import MLPProjector, ResamplerLayer
from mmr1.attention import SelfAttention
from mmr1.feedforward import SwiGLU


class StackedHeadsParallel(ParallelStyle):
    """For a Linear whose output rows are `chunks` stacked per-head projections, e.g. wkv = [wk; wv]: each rank
    ends up with [k of its heads; v of its heads], the layout the module's `view(..., 2, heads, head_dim)`
    expects once its head count is the local one.

    Splitting the rows column-wise would need a strided placement (rank 0 would otherwise get all of k), and
    FSDP2 does not compose with one; so the weight is split row-wise (Shard(1), over input features), the partial
    outputs are all-reduced, and each rank keeps its heads (Replicate -> Shard on the head dim: a local slice
    forward, an all-gather of the output gradient backward).
    """

    def __init__(self, chunks: int, heads: int):
        super().__init__()
        self.chunks, self.heads = chunks, heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        RowwiseParallel(input_layouts=Replicate(), use_local_output=False)._apply(module, device_mesh)
        chunks, heads = self.chunks, self.heads

        def keep_local_heads(_module, _args, out: DTensor):  # out (..., chunks * heads * Dh), replicated
            lead = out.shape[:-1]
            per_head = out.view(*lead, chunks, heads, out.shape[-1] // (chunks * heads))  # (..., c, H, Dh)
            mine = per_head.redistribute(device_mesh, [Shard(per_head.ndim - 2)]).to_local()  # (..., c, H/T, Dh)
            return mine.reshape(*lead, -1)

        module.register_forward_hook(keep_local_heads)
        return module


class ReplicatedInput(ParallelStyle):
    """Mark a module's first argument as replicated over the TP mesh before its column-wise projections see it.

    wq/wk/wv (or gate/up) then share one DTensor input, their partial input gradients add up as one Partial
    tensor, and the backward needs a single all-reduce instead of one per projection. Unlike
    PrepareModuleInput this does not fix the number of arguments, so the modules' signatures may grow.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_replicated(_module, args):
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            return (x, *args[1:])

        module.register_forward_pre_hook(to_replicated)
        return module


# (module type, head-count attribute its forward reshapes by, the config field it comes from)
_HEAD_ATTRS = ((SelfAttention, "n_heads", "backbone.n_heads"),
               (SelfAttention, "n_kv_heads", "backbone.n_kv_heads"),
               (GatedCrossAttention, "n_heads", "backbone.cross_attn_heads"),
               (ResamplerLayer, "heads", "projector.heads"))


def local_head_counts(model: nn.Module, tp_size: int) -> list[tuple[nn.Module, str, int]]:
    """(module, attribute, per-rank head count) for every attention module; raises before anything changes if
    a head count does not split evenly over the tensor-parallel ranks."""
    updates = []
    for name, module in model.named_modules():
        for kind, attr, field in _HEAD_ATTRS:
            if isinstance(module, kind):
                count = getattr(module, attr)
                if count % tp_size:
                    raise ValueError(f"apply_tensor_parallel: {field}={count} (at {name}) is not divisible by the "
                                     f"tensor-parallel size {tp_size}; every rank must hold whole heads")
                updates.append((module, attr, count // tp_size))
    return updates


def _swiglu_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {prefix: ReplicatedInput(), f"{prefix}.gate_proj": ColwiseParallel(),
            f"{prefix}.up_proj": ColwiseParallel(), f"{prefix}.down_proj": RowwiseParallel()}


def _self_attention_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {prefix: ReplicatedInput(), f"{prefix}.wq": ColwiseParallel(), f"{prefix}.wk": ColwiseParallel(),
            f"{prefix}.wv": ColwiseParallel(), f"{prefix}.wo": RowwiseParallel()}


def _cross_attention_plan(prefix: str, heads: int) -> dict[str, ParallelStyle]:
    return {f"{prefix}.wq": ColwiseParallel(), f"{prefix}.wkv": StackedHeadsParallel(2, heads),
            f"{prefix}.wo": RowwiseParallel()}


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The {module FQN: style} plan for every supported submodule of `model` (any nn.Module tree, e.g. a
    MultimodalR1 or a bare R1Model), built while the modules still hold their global head counts."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        if isinstance(module, SelfAttention):
            plan.update(_self_attention_plan(name))
        elif isinstance(module, GatedCrossAttention):
            plan.update(_cross_attention_plan(name, module.n_heads))
        elif isinstance(module, ResamplerLayer):  # cross-attention to the inputs + an MLP
            plan.update({**_cross_attention_plan(name, module.heads), f"{name}.mlp.0": ColwiseParallel(),
                         f"{name}.mlp.2": RowwiseParallel()})
        elif isinstance(module, MLPProjector):
            plan.update({f"{name}.fc1": ColwiseParallel(), f"{name}.fc2": RowwiseParallel()})
        elif isinstance(module, SwiGLU):
            plan.update(_swiglu_plan(name))  # a dense block's MLP or an MoE layer's shared experts
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over the 1-D `tp_mesh` (see the module docstring) and return it.

    Every rank of the mesh must build the same model and feed the same batch; parameters are scattered from
    the mesh's first rank. Apply before expert parallel and FSDP (TP -> EP -> FSDP2).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel: tp_mesh must be 1-D (the tensor-parallel dimension), "
                         f"got a {tp_mesh.ndim}-D mesh {tp_mesh.mesh_dim_names}")
    tp_size = tp_mesh.size()
    if tp_size == 1:
        return model
    head_counts = local_head_counts(model, tp_size)
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model))
    for module, attr, local in head_counts:
        setattr(module, attr, local)  # the forwards view activations by these: per-rank counts from now on
    return model
