"""`parallel:` -- how the model is spread over devices, one dataclass read from the `model.parallel` YAML block.

    model:
      parallel:
        data_parallel: fsdp          # ddp | fsdp (FSDP2 fully_shard, ZeRO-3's equivalent)
        tensor_parallel_size: 1      # > 1: DTensor plans of mmr1.parallel.tensor on a 2-D (dp, tp) mesh
        expert_parallel_size: 1      # > 1: routed experts sharded by mmr1.parallel.expert (all-to-all dispatch)
        activation_checkpointing: false
        param_dtype: bfloat16        # FSDP mixed precision: dtype of the gathered parameters / compute
        reduce_dtype: float32        # dtype of the gradient reduce-scatter

The trainer's strategy must fit: `ddp` (or `auto` on one device) for data_parallel=ddp without TP/EP, and
Lightning's ModelParallelStrategy (see mmr1.parallel.fsdp.FSDPStrategy and configs/scale/*.yaml) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DATA_PARALLEL = ("ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    data_parallel: str = "ddp"
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    activation_checkpointing: bool = False  # recompute each decoder block's activations in backward
    param_dtype: str | None = None  # FSDP MixedPrecisionPolicy.param_dtype; None = the parameters' own dtype
    reduce_dtype: str | None = None  # FSDP MixedPrecisionPolicy.reduce_dtype; None = param_dtype
    reshard_after_forward: bool = True  # ZeRO-3: free gathered parameters after forward (False: ZeRO-2-like)

    def __post_init__(self) -> None:
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(f"parallel.data_parallel={self.data_parallel!r}; expected one of {DATA_PARALLEL}")
        for name in ("tensor_parallel_size", "expert_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r}; expected an integer >= 1")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"parallel.{name}={value!r}; expected one of {sorted(DTYPES)} or null")
        if self.data_parallel == "ddp" and (self.param_dtype or self.reduce_dtype):
            raise ValueError("parallel.param_dtype/reduce_dtype are FSDP mixed-precision settings; with "
                             "data_parallel=ddp use trainer.precision (e.g. bf16-mixed) instead")

    @property
    def needs_model_parallel_strategy(self) -> bool:
        """FSDP, TP and EP are applied in `configure_model` under Lightning's ModelParallelStrategy."""
        return self.data_parallel == "fsdp" or self.tensor_parallel_size > 1 or self.expert_parallel_size > 1

    def torch_dtype(self, name: str) -> torch.dtype | None:
        value = getattr(self, name)
        return None if value is None else DTYPES[value]
