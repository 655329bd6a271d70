"""The `parallel:` config: bad values are named, and a missing TP/EP transform is a clear error."""
from __future__ import annotations

import sys

import pytest

from mmr1.model import MultimodalR1
from mmr1.parallel import apply_parallelism
from mmr1.parallel.config import ParallelConfig
from test_model import tiny_config


class FakeMesh:
    """Stands in for Lightning's (data_parallel, tensor_parallel) DeviceMesh: only sizes are read first."""

    def __init__(self, dp: int, tp: int):
        self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

    def __getitem__(self, name):
        size = self.sizes[name]
        return type("Dim", (), {"size": lambda self: size})()


@pytest.mark.parametrize("kwargs, field", [({"data_parallel": "zero3"}, "data_parallel"),
                                           ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
                                           ({"data_parallel": "fsdp", "param_dtype": "bf16"}, "param_dtype"),
                                           ({"param_dtype": "bfloat16"}, "param_dtype")])
def test_bad_values_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"parallel.{field}"):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize("module, cfg", [("mmr1.parallel.tensor", ParallelConfig(tensor_parallel_size=2)),
                                         ("mmr1.parallel.expert", ParallelConfig(data_parallel="fsdp",
                                                                                   expert_parallel_size=2))])
def test_missing_transform_is_a_clear_error(monkeypatch, module, cfg):
    monkeypatch.setitem(sys.modules, module, None)  # as if this installation had no such module
    if cfg.expert_parallel_size > 1:  # the EP mesh is built before the transform: stub it
        monkeypatch.setattr("mmr1.parallel.expert_meshes", lambda mesh, ep: (None, None))
    with pytest.raises(RuntimeError, match=f"{module}.*not available"):
        apply_parallelism(MultimodalR1(tiny_config()), FakeMesh(2 // cfg.tensor_parallel_size, cfg.tensor_parallel_size),
                          cfg)


@pytest.mark.parametrize("cfg", [ParallelConfig(expert_parallel_size=2), ParallelConfig(tensor_parallel_size=2)])
def test_model_parallel_over_several_data_parallel_ranks_needs_fsdp(cfg):
    # Under ModelParallelStrategy only FSDP2 reduces gradients across data-parallel ranks.
    with pytest.raises(ValueError, match="needs data_parallel: fsdp"):
        apply_parallelism(MultimodalR1(tiny_config()), FakeMesh(2, cfg.tensor_parallel_size), cfg)


def test_expert_and_tensor_parallel_together_are_refused():
    from mmr1.parallel import expert_meshes
    with pytest.raises(ValueError, match="expert_parallel_size > 1 together with tensor_parallel_size > 1"):
        expert_meshes(FakeMesh(2, 2), 2)
