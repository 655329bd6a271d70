"""CPU linear weights kept in oneDNN's blocked layout for the engine's forwards (EngineConfig.cpu_prepacked_weights).

torch's CPU linear hands oneDNN each weight in nn.Linear's plain (out, in) layout, and oneDNN reorders it into its
own blocked layout inside every call: a pass over the weight each time, on top of the pass the product needs. In
serving, where a step reads every weight once for a few rows, that is a large share of the step. Reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does), the weights feed
`torch.ops.mkldnn._linear_pointwise` directly. Measured on this 2-core machine (benchmarks/results/prepack.md):
the bf16 137 MB serving model ran 1.16-1.22x faster in continuous batching and 1.24-1.25x at batch 1 (two
runs). bf16 weights only (`PACKED_DTYPES`).

No module is replaced and no weight is touched: entered around each engine step, `PrepackedLinears` gives each
plain nn.Linear of the backbone (and the draft's) an instance `forward` that runs the packed copy, and takes it
away again on exit, so outside the engine's steps the model is exactly the user's. (A TorchFunctionMode, tried
first, costs a Python call for every op of the step: it made the fp32 serving model's steps 1.5-2x slower.) The
copies double the linear weights' memory. A weight changed or replaced after packing (load_state_dict, an optimizer
step) is packed again at its next use (its version counter moved), so outputs never come from stale weights;
grad-enabled calls take the plain op (the packed one has no backward).

With `few_rows` (the engine passes EngineConfig.cpu_few_row_linears) products of at most cpu_linear.ROW_LIMITS rows
go to mmr1.engine.cpu_linear's loop instead, which reads the weight faster than oneDNN's packed product for those
(batch-1 decoding of the 137 MB bf16 model: benchmarks/results/prepack.md); larger ones take the packed weight. bf16
MoE experts (stacked weights, not nn.Linear) are marked for cpu_linear.rows_times in the batch-1 path, as
cpu_linear.FewRowLinears does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmr1.engine import cpu_linear

# bf16 only: fp32 linears run on MKL's sgemm, and oneDNN's packed fp32 products measured slower than it here
# (0.64-0.66x at batch 1, 0.80-0.84x in continuous batching: the fp32 serving model, benchmarks/results/prepack.md).
PACKED_DTYPES = (torch.bfloat16,)


def available() -> bool:
    """Whether this torch build can pack linear weights for oneDNN on the CPU."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class _Packed:
    """One nn.Linear's packed weight, and the forward that uses it."""

    def __init__(self, layer: nn.Linear, loop_rows: int = 0):
        self.layer, self.loop_rows = layer, loop_rows
        self.weight, self.version, self.packed = layer.weight, layer.weight._version, _pack(layer.weight)
        self.calls = self.loop_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.layer.weight, self.layer.bias
        if torch.is_grad_enabled() or x.dtype != w.dtype or x.device != w.device:
            return F.linear(x, w, bias)
        if self.loop_rows and cpu_linear.takes_loop(x, w, 1, self.loop_rows):  # a few rows: the loop
            self.loop_calls += 1
            return cpu_linear.linear_rows(x, w, bias)
        if w is not self.weight or w._version != self.version:  # replaced or changed in place since packing
            self.weight, self.version, self.packed = w, w._version, _pack(w)
        self.calls += 1
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class PrepackedLinears:
    """`with PrepackedLinears(model, draft):` runs the plain nn.Linear layers of the given modules' backbones (CPU,
    PACKED_DTYPES) on their packed weights; every other module runs as it would."""

    def __init__(self, *models: nn.Module | None, few_rows: bool = False):
        if not available():
            raise RuntimeError("cpu_prepacked_weights: this torch build has no oneDNN linear packing "
                               "(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._reorder_linear_weight)")
        self._layers: list[_Packed] = []
        backbones = cpu_linear.serving_backbones(*models)
        for layer in (layer for b in backbones for layer in b.modules()):
            w = getattr(layer, "weight", None)
            if type(layer) is nn.Linear and w.device.type == "cpu" and w.dtype in PACKED_DTYPES:
                loop = few_rows and cpu_linear.available(w.dtype)
                self._layers.append(_Packed(layer, cpu_linear.ROW_LIMITS[w.dtype] if loop else 0))
        # bf16 stacked experts are not nn.Linear layers: with `few_rows` the batch-1 path's one-token MoE multiplies
        # them through cpu_linear.rows_times, as under cpu_linear.FewRowLinears.
        self._experts = []
        if few_rows and cpu_linear.available():
            streams = cpu_linear.parameter_bytes(backbones) > cpu_linear.last_level_cache_bytes()
            self._experts = cpu_linear.loop_experts(backbones, streams)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def packed_calls(self) -> int:
        """Products that ran on a packed weight so far."""
        return sum(p.calls for p in self._layers)

    @property
    def loop_calls(self) -> int:
        """Products of a few rows that ran on the cpu_linear loop so far (`few_rows`)."""
        return sum(p.loop_calls for p in self._layers)

    def __enter__(self) -> "PrepackedLinears":
        for p in self._layers:
            p.layer.forward = p.forward  # an instance attribute: found before nn.Linear.forward
        cpu_linear.mark_experts(self._experts)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self._layers:
            p.layer.__dict__.pop("forward", None)
        cpu_linear.unmark_experts(self._experts)
