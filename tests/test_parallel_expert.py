"""Expert parallel (mmr1.parallel.expert) on 2 CPU processes over gloo: the EP MoE layer and a full tiny model
equal single-process computation on each rank's own batch, in outputs and in every gradient."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from distributed_spawn import run_on_ranks
from mmr1.config import MoEConfig
from mmr1.model import MultimodalR1
from mmr1.moe import MoEFeedForward
from mmr1.parallel.expert import ExpertParallelExperts, apply_expert_parallel, expert_major_order

TOL = 1e-5
DIM = 16


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel():
        err = (actual - expected).abs().max().item()
        assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def local_grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    return grad.to_local() if isinstance(grad, DTensor) else grad


def test_expert_major_order_regroups_source_major_rows():
    recv_counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 sources x 3 local experts
    # buffer: src0 e0 (rows 0,1), src0 e2 (row 2), src1 e0 (row 3), src1 e1 (rows 4,5,6)
    order = expert_major_order(recv_counts, 7)
    assert order.tolist() == [0, 1, 3, 4, 5, 6, 2]


# ---- the MoE layer -------------------------------------------------------------------------------------------
LAYER_CFGS = {
    "softmax_topk": MoEConfig(num_experts=4, num_groups=2, topk_groups=2, top_k=2, expert_hidden=8,
                              aux_free_bias=True, seq_aux_loss_coef=0.1, z_loss_coef=0.01),
    "capacity_dynamic": MoEConfig(num_experts=4, num_groups=1, topk_groups=1, top_k=3, expert_hidden=8,
                                  score_func="sigmoid", dynamic_threshold=0.5, capacity_factor=1.0,
                                  num_shared_experts=2, shared_expert_gate=True),
}


def layer_batch(seed: int, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, L, D), token_mask (B, L) with some padding, and a fixed random cotangent for the output."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, DIM, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    if B and L > 1:
        mask[0, : L // 2] = False  # left padding on the first row
    return x, mask, torch.randn(B, L, DIM, generator=gen)


def layer_loss(layer: MoEFeedForward, x: torch.Tensor, mask: torch.Tensor, cotangent: torch.Tensor):
    out, aux = layer(x, mask)
    loss = (out * cotangent).sum() + aux.aux_loss + aux.seq_aux_loss + aux.z_loss
    return loss, out, aux


def reference_grads(ref: MoEFeedForward, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    layer = copy.deepcopy(ref)
    x, mask, cot = batch
    x = x.clone().requires_grad_(True)
    loss, out, aux = layer_loss(layer, x, mask, cot)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return grads, out.detach(), x.grad, aux.tokens_per_expert


def _layer_worker(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    odd = MoEFeedForward(DIM, MoEConfig(num_experts=3, num_groups=1, topk_groups=1, top_k=2, expert_hidden=8))
    with pytest.raises(ValueError, match=r"moe.num_experts=3 is not divisible by the expert-parallel size 2"):
        apply_expert_parallel(odd, mesh)
    # (B, L) per rank for each scenario; rank 1 holds fewer tokens, then none at all.
    scenarios = {"different_counts": [(3, 5), (1, 4)], "rank1_empty": [(2, 6), (0, 6)]}
    for cfg_name, cfg in LAYER_CFGS.items():
        torch.manual_seed(0)
        ref = MoEFeedForward(DIM, cfg)
        torch.manual_seed(1234 + rank)  # EP must not depend on the ranks' own inits: weights come from rank 0
        ep = apply_expert_parallel(copy.deepcopy(ref), mesh)
        assert isinstance(ep.experts, ExpertParallelExperts) and ep.experts.w_gate.to_local().shape[0] == 2
        cases = dict(scenarios)
        if cfg.aux_free_bias:  # every token prefers experts 2, 3: rank 0 receives no rows, rank 1 all of them
            cases["all_to_rank1"] = [(2, 5), (1, 3)]
        for case, shapes in cases.items():
            where = f"{cfg_name}/{case}/rank{rank}"
            if case == "all_to_rank1":
                for layer in (ref, ep):
                    layer.router.expert_bias.copy_(torch.tensor([-10.0, -10.0, 10.0, 10.0]))
            batches = [layer_batch(100 * s + len(case), *shape) for s, shape in enumerate(shapes)]
            expected = [reference_grads(ref, b) for b in batches]
            x, mask, cot = batches[rank]
            x = x.clone().requires_grad_(True)
            ep.zero_grad()
            loss, out, aux = layer_loss(ep, x, mask, cot)
            loss.backward()
            grads, ref_out, ref_xgrad, ref_load = expected[rank]
            assert_close(out, ref_out, f"{where} output")
            assert_close(x.grad, ref_xgrad, f"{where} input grad")
            assert torch.equal(aux.tokens_per_expert, ref_load), where
            lo, hi = 2 * rank, 2 * rank + 2  # this rank's experts
            for name, param in ep.named_parameters():
                if name.startswith("experts."):  # owner sums every rank's tokens
                    want = sum(g[name] for g, *_ in expected)[lo:hi]
                else:  # replicated: this rank's batch only
                    want = grads[name]
                assert_close(local_grad(param), want, f"{where} grad {name}")
            if case == "all_to_rank1":
                assert int(ref_load[:2].sum()) == 0
    # grad_divisor scales only the expert weights' gradients (the mean-over-ranks convention of data parallel)
    halved = apply_expert_parallel(copy.deepcopy(ref), mesh, grad_divisor=2.0)
    x, mask, cot = layer_batch(7, 2, 4)
    layer_loss(halved, x, mask, cot)[0].backward()
    ep.zero_grad()
    layer_loss(ep, x, mask, cot)[0].backward()
    assert_close(local_grad(halved.experts.w_up), local_grad(ep.experts.w_up) / 2, "grad_divisor=2 expert grad")
    assert_close(halved.router.gate.weight.grad, ep.router.gate.weight.grad, "grad_divisor=2 router grad")


@pytest.mark.slow
def test_expert_parallel_layer_matches_single_process():
    run_on_ranks(_layer_worker, 2)


# ---- a full model ----------------------------------------------------------------------------------------------
def model_batch(model, seed: int, rows: int, length: int, image: bool, audio: bool):
    from test_parallel_tensor import modality_batch  # the tiny image+audio model's batch builder

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, :2] = False
    return ids, mask, modality_batch(model, (image,) * rows, (audio,) * rows, seed)


def _model_worker(rank: int, world: int) -> None:
    from test_parallel_tensor import lm_loss, tiny_config

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    cfg = tiny_config()
    cfg.backbone.moe.aux_free_bias = True
    torch.manual_seed(0)
    ref = MultimodalR1(cfg).eval()
    with torch.no_grad():
        for block in ref.backbone.layers:
            block.cross_attn.gate.fill_(0.5)
    ep = apply_expert_parallel(copy.deepcopy(ref), mesh)
    rounds = {  # per rank: (rows, length, image, audio) — mixed-modality batches of different sizes
        "rank0 images / rank1 audio": [(3, 10, True, False), (2, 7, False, True)],
        "rank0 image+audio / rank1 text only": [(2, 8, True, True), (4, 6, False, False)],
    }
    for step, (name, specs) in enumerate(rounds.items()):
        batches = [model_batch(ref, 10 * step + s, *spec) for s, spec in enumerate(specs)]
        expected = []
        for batch in batches:
            ref.zero_grad(set_to_none=True)
            loss = lm_loss(ref, *batch)
            loss.backward()
            expected.append((loss.detach(), {n: p.grad for n, p in ref.named_parameters()}))
        ep.zero_grad(set_to_none=True)
        loss = lm_loss(ep, *batches[rank])
        loss.backward()
        ref_loss, ref_grads = expected[rank]
        err = (loss.detach() - ref_loss).abs().item()
        assert err <= TOL, f"{name} rank{rank}: loss {loss.item()} vs single-process {ref_loss.item()}"
        for pname, param in ep.named_parameters():
            if ".experts." in pname:  # owner: both ranks' tokens; 2 of the 4 experts live here
                want = sum(g[pname] for _, g in expected)[2 * rank:2 * rank + 2]
            else:
                want = ref_grads[pname]
            got = local_grad(param)
            if want is None or got is None:
                assert want is None and got is None, f"{name} rank{rank}: grad of {pname} in only one run"
                continue
            assert_close(got, want, f"{name} rank{rank} grad {pname}")


@pytest.mark.slow
def test_expert_parallel_model_with_mixed_modality_ranks():
    run_on_ranks(_model_worker, 2)
