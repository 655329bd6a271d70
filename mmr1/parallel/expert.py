"""Expert parallelism: the routed experts of every MoE layer are split over an expert-parallel (EP) group and
tokens travel to the rank that owns their expert with all-to-all, like GShard / DeepSpeed-MoE.

With P ranks and E experts, rank p owns experts [p E/P, (p+1) E/P). `MoEFeedForward` routes and calls
`self.experts(tokens, experts, weights)`; `apply_expert_parallel` swaps that module for `ExpertParallelExperts`,
whose forward sorts the (token, expert) assignments by expert and calls its `sorted_rows(rows, counts)`, which
does:

    counts (E,) --all_to_all--> rows each rank will receive per local expert     (P, E/P)   no autograd
    rows sorted by expert (M, D) --all_to_all--> rows for my experts by source    (R, D)     autograd
    regroup source-major -> expert-major, grouped SwiGLU over my E/P experts       (R, D)
    --all_to_all back--> the M rows in their original order                       (M, D)     autograd

The router (and its aux-free bias), the shared experts and every aux loss stay replicated and local: each rank
routes its own tokens, so ranks may hold different numbers of tokens (mixed-modality batches), including none.
The backward runs the two all-to-alls in reverse with the split sizes swapped (functional collectives), so every
rank takes part in every collective whatever its batch.

Gradient semantics: after `loss_r.backward()` on every rank r, an expert weight's gradient is
d(sum_r loss_r)/dW (the all-to-all backward returns every rank's contribution to the owner), while replicated
parameters hold d(loss_r)/dW of their own rank. A data-parallel wrapper that averages replicated gradients over
D ranks must therefore divide the expert gradients by D as well, but reduce them only over the ranks that hold
the same experts (docs/parallelism.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mmr1.moe import GroupedExperts, MoEFeedForward
from mmr1.moe_kernels import combine_sorted, grouped_swiglu, sort_assignments


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all-to-all of rows: the backward sends the gradients back with the splits swapped."""
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, group))


def expert_major_order(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """recv_counts (P, El): rows from source rank s for local expert j, laid out source-major in a receive
    buffer of `total` rows. Returns (total,) indices into that buffer that list the rows expert-major (expert 0
    from every source, then expert 1, ...), the contiguous-per-expert layout the grouped kernel needs."""
    P, El = recv_counts.shape
    sizes = recv_counts.reshape(-1)  # (P*El,) segment sizes in buffer order
    buffer_starts = (sizes.cumsum(0) - sizes).view(P, El)  # where segment (s, j) starts in the buffer
    seg_sizes = recv_counts.t().reshape(-1)  # (El*P,) the same segments in expert-major order
    seg_buffer_starts = buffer_starts.t().reshape(-1)
    seg_starts = seg_sizes.cumsum(0) - seg_sizes  # where each segment starts in the expert-major output
    shift = torch.repeat_interleave(seg_buffer_starts - seg_starts, seg_sizes, output_size=total)  # (R,)
    return shift + torch.arange(total, device=recv_counts.device)


class ExpertParallelExperts(GroupedExperts):
    """Drop-in for `GroupedExperts` that holds E/P experts per rank of `ep_mesh` and exchanges rows by owner.

    w_gate, w_up (E, D, H) and w_down (E, H, D) become DTensors sharded on the expert dim: state dicts keep the
    global shapes and keys, `full_tensor()` gathers them, and the local shard is what this rank computes with.
    Still a GroupedExperts, so `R1Model.init_weights` (e.g. after a meta-device build) initialises it.
    """

    def __init__(self, experts: GroupedExperts, ep_mesh: DeviceMesh, grad_divisor: float = 1.0):
        num_experts, dim, hidden = experts.w_gate.shape
        if ep_mesh.ndim != 1:
            raise ValueError(f"apply_expert_parallel: ep_mesh must be 1-D (the expert-parallel dimension), got a "
                             f"{ep_mesh.ndim}-D mesh {ep_mesh.mesh_dim_names}")
        if num_experts % ep_mesh.size():
            raise ValueError(f"apply_expert_parallel: moe.num_experts={num_experts} is not divisible by the "
                             f"expert-parallel size {ep_mesh.size()}")
        if grad_divisor <= 0:
            raise ValueError(f"apply_expert_parallel: grad_divisor={grad_divisor} must be positive")
        if any(isinstance(w, DTensor) for w in experts.parameters()):
            raise ValueError("apply_expert_parallel: the experts' weights are already DTensors; apply expert "
                             "parallel once, before FSDP")
        super().__init__(0, dim, hidden)  # empty placeholders, replaced by the sharded weights below
        self.num_experts, self.ep_size, self.ep_mesh = num_experts, ep_mesh.size(), ep_mesh
        self.grad_divisor = grad_divisor
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(experts, name)
            # Scattered from the mesh's first rank, so all ranks agree even if their inits differed.
            shard = distribute_tensor(full.detach(), ep_mesh, [Shard(0)])
            self.register_parameter(name, nn.Parameter(shard, requires_grad=full.requires_grad))

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def _local(self, weight: DTensor) -> torch.Tensor:
        local = weight.to_local()
        if self.grad_divisor != 1.0 and local.requires_grad:
            local.register_hook(lambda grad: grad / self.grad_divisor)
        return local

    def forward(self, flat: torch.Tensor, slot_experts: torch.Tensor, slot_weights: torch.Tensor, *,
                has_unused: bool = False) -> torch.Tensor:
        """The MoE layer's call: sort the assignments by expert, exchange their rows (sorted_rows), combine."""
        order, slot_tokens, counts = sort_assignments(slot_experts, self.num_experts, flat.shape[0], has_unused)
        rows = self.sorted_rows(flat.index_select(0, slot_tokens), counts)
        return combine_sorted(flat.shape[0], rows, slot_tokens, slot_weights[order])

    def sorted_rows(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows sorted by (global) expert, counts (E,) rows per expert -> (M, D), like GroupedExperts."""
        P, El = self.ep_size, self.local_experts
        group = self.ep_mesh.get_group()
        counts = counts.contiguous()
        # Rows every rank sends to my experts: entry s * El + j = rows from rank s for my local expert j.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        recv_counts = recv_counts.view(P, El)
        send_splits = counts.view(P, El).sum(dim=1).tolist()  # rows to each owner (the host sync of this layer)
        recv_splits = recv_counts.sum(dim=1).tolist()

        received = _all_to_all(x, recv_splits, send_splits, group)  # (R, D) source-major
        order = expert_major_order(recv_counts, received.shape[0])  # (R,)
        w_gate, w_up, w_down = (self._local(w) for w in (self.w_gate, self.w_up, self.w_down))  # (El, ...)
        rows = received.index_select(0, order)  # (R, D) expert-major
        out = grouped_swiglu(rows, recv_counts.sum(dim=0), w_gate, w_up, w_down)  # (R, D)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(0, restore)  # (R, D) back to source-major
        return _all_to_all(out, send_splits, recv_splits, group)  # (M, D)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, grad_divisor: float = 1.0) -> nn.Module:
    """Shard the routed experts of every MoEFeedForward in `model` over the 1-D `ep_mesh`, in place.

    Call it on every rank of the mesh with identically built (or loaded) weights, after tensor parallel and
    before FSDP. Ranks then feed their own batches; all of them must run every forward/backward together.
    Expert weight gradients are d(sum over the EP ranks' losses)/dW divided by `grad_divisor`: 1 gives the exact
    sum; when the EP ranks are data-parallel ranks whose other gradients get averaged, pass ep_mesh.size() (and
    let the outer FSDP average the experts over the remaining data-parallel dim) so all gradients share the
    mean-over-ranks scale. On NCCL, FSDP2's set_gradient_divide_factor does the same; gloo has no PREMUL_SUM.
    """
    if ep_mesh.ndim == 1 and ep_mesh.size() == 1:
        return model
    for moe in [m for m in model.modules() if isinstance(m, MoEFeedForward)]:
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh, grad_divisor)
    return model
