"""FSDP2 (`fully_shard`, ZeRO-3's equivalent), activation checkpointing, and the Lightning strategy that runs them.

Sharding units: each decoder block, each encoder, each projector, then the root (token embeddings, final norm,
lm head, modality embeddings). A unit's parameters are all-gathered just before its forward and freed after it
(`reshard_after_forward`), its gradients reduce-scattered after its backward. Every rank must therefore run
every unit in the same order: `MultimodalR1.encode_batch(encode_absent=True)` guarantees it for the encoders
and cross-attention layers when ranks' batches carry different modalities.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mmr1.checkpoint import is_local, remove_path, replace_with_staged
from mmr1.model import MultimodalR1
from mmr1.parallel.config import ParallelConfig


def apply_fsdp(model: MultimodalR1, dp_mesh: DeviceMesh, cfg: ParallelConfig,
               expert_mesh: DeviceMesh | None = None) -> MultimodalR1:
    """Shard `model` in place over `dp_mesh`; returns it. `expert_mesh`: when experts are expert-parallel,
    their (already EP-sharded) weights are FSDP-sharded over the ranks that hold the same experts instead."""
    policy = MixedPrecisionPolicy(param_dtype=cfg.torch_dtype("param_dtype"),
                                  reduce_dtype=cfg.torch_dtype("reduce_dtype") or cfg.torch_dtype("param_dtype"))
    kwargs = dict(mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    for key in model.modalities:  # the order the forward runs them in
        fully_shard(model.encoders[key], mesh=dp_mesh, **kwargs)
        fully_shard(model.projectors[key], mesh=dp_mesh, **kwargs)
    for block in model.backbone.layers:
        experts = getattr(block.ffn, "experts", None)
        if expert_mesh is not None and experts is not None:
            # Their gradients arrive already divided by the expert-parallel size (apply_parallelism passes
            # grad_divisor), so FSDP's mean over the replicate ranks gives the same mean over all data-parallel
            # ranks the other parameters get; set_gradient_divide_factor would need PREMUL_SUM, which gloo lacks.
            fully_shard(experts, mesh=expert_mesh, **kwargs)
        fully_shard(block, mesh=dp_mesh, **kwargs)
    # The root keeps its parameters gathered after forward: backward needs the lm head first anyway.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def apply_activation_checkpointing(model: MultimodalR1) -> MultimodalR1:
    """Recompute each decoder block's activations in backward instead of storing them (in place; FQNs and
    checkpoints unchanged). Dropout replays the same RNG draws in the recomputation."""
    from torch.distributed._composable import checkpoint

    for block in model.backbone.layers:
        checkpoint(block)
    return model


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with the mesh taken from the model's `parallel:` block.

    Why a subclass: ModelParallelStrategy's own defaults ("auto") make the tensor-parallel size the number of
    devices per node, i.e. pure TP on one node; here tp = `model.parallel.tensor_parallel_size` and dp fills
    the rest of the world, so one YAML field decides. Everything else (gloo on CPU, NCCL on GPU, launcher,
    sharded checkpoints via torch.distributed.checkpoint) is Lightning's, unchanged: ModelParallelStrategy
    picks the process-group backend from the device, so it runs on CPU/gloo as is.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = timedelta(minutes=30)):
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        cfg = getattr(self.lightning_module, "parallel_config", None) or ParallelConfig(data_parallel="fsdp")
        world = self.num_nodes * self.num_processes
        tp = cfg.tensor_parallel_size
        if world % tp:
            raise ValueError(f"parallel.tensor_parallel_size={tp} does not divide the world size {world} "
                             f"(trainer.num_nodes * trainer.devices)")
        self._tensor_parallel_size, self._data_parallel_size = tp, world // tp
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Sharded saves are all-or-nothing, like `AtomicCheckpointIO`'s files.

        Lightning writes the shards and `meta.pt` into the target directory in place, so a crash in the middle of
        overwriting `last.ckpt` left some ranks' new shards beside old ones and an old `meta.pt`: a resume that
        silently mixed two steps. Every rank writes into `.<name>.partial` beside the target instead; once all have
        written, rank 0 swaps it in (`mmr1.checkpoint.replace_with_staged`). The names do not match Lightning's
        `last*.ckpt`, so `--ckpt_path last` never picks up a leftover. Like the checkpoint's `.metadata`, which only
        rank 0 writes, this assumes every rank sees the same filesystem."""
        if not self._save_distributed_checkpoint or not is_local(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staged = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            remove_path(staged)  # what a crashed save left
        self.barrier("sharded_save_start")
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("sharded_save_written")
        if self.global_rank == 0:
            replace_with_staged(staged, path)
        self.barrier("sharded_save_done")
