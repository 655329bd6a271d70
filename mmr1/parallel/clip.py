"""Gradient-norm clipping for a model whose parameters are DTensors on different meshes.

torch.nn.utils.clip_grad_norm_ stacks the per-parameter norms into one tensor, which DTensor refuses when they
live on different meshes: under tensor parallel the sharded layers sit on the (dp, tp) mesh next to dp-only
parameters, under expert parallel the routed experts on the (expert_replicate, expert_parallel) mesh. Here each
DTensor norm is reduced over its own mesh first (`full_tensor()`), so the total is the norm of the whole unsharded
gradient, exactly what one process would clip by.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0
                    ) -> torch.Tensor:
    """Scale all gradients in place so their global `norm_type` norm is at most `max_norm`; returns that norm
    (before clipping) as a plain tensor, the same on every rank."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # reduce over its own mesh
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for grad in grads:
            grad.mul_(coef)
    return total
