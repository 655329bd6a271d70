"""Router (group-limited top-k), load-balancing loss and the MoE feed-forward against per-token references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmr1.config import MoEConfig
from mmr1.feedforward import SwiGLU
from mmr1.moe import MoEFeedForward, Router, load_balancing_loss, select_experts


def router_with_logits(logits: torch.Tensor, cfg: MoEConfig) -> tuple[Router, torch.Tensor]:
    """A Router whose gate maps the one-hot rows of an identity input to the given logits (N, E)."""
    N, E = logits.shape
    router = Router(N, cfg)
    with torch.no_grad():
        router.gate.weight.copy_(logits.T)
    return router, torch.eye(N)


def test_softmax_group_limited_routing_skips_experts_of_dropped_groups():
    # 8 experts in 4 groups of 2; keep 1 group. Group scores (max): g0 0.30, g1 0.25, g2 0.20, g3 0.10.
    # The second-best expert overall (0.25, expert 2) lives in a dropped group, so top-2 is experts 0 and 1.
    scores = torch.tensor([[0.30, 0.05, 0.25, 0.02, 0.20, 0.05, 0.10, 0.03]])
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=1, top_k=2, norm_topk_prob=False)
    router, x = router_with_logits(scores.log(), cfg)
    routing = router(x)
    assert routing.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(routing.weights, torch.tensor([[0.30, 0.05]]), atol=1e-6, rtol=1e-6)

    plain = MoEConfig(num_experts=8, num_groups=4, topk_groups=4, top_k=2, norm_topk_prob=False)
    assert select_experts(scores, plain)[1].tolist() == [[0, 2]]  # without group limiting


def test_sigmoid_groups_score_by_top2_sum_and_can_drop_the_best_experts():
    # Group top-2 sums: g0 0.95, g1 0.90, g2 1.20, g3 1.10 -> keep g2 and g3 although experts 0 and 2 are the
    # two best; a max-based group score would have kept g0 and g1 instead.
    scores = torch.tensor([[0.95, 0.00, 0.90, 0.00, 0.60, 0.60, 0.56, 0.54]])
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, score_func="sigmoid",
                    norm_topk_prob=True, route_scale=2.5)
    router, x = router_with_logits(torch.logit(scores.clamp(1e-6, 1 - 1e-6)), cfg)
    routing = router(x)
    assert sorted(routing.indices[0].tolist()) == [4, 5]
    torch.testing.assert_close(routing.weights, torch.tensor([[1.25, 1.25]]), atol=1e-5, rtol=1e-5)


def test_norm_topk_prob_and_route_scale():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.2, 0.2, 0.2]])
    raw = MoEConfig(num_experts=4, num_groups=1, topk_groups=1, top_k=2, norm_topk_prob=False, route_scale=2.0)
    weights, indices = select_experts(scores, raw)
    assert indices[0].tolist() == [1, 2] and indices[1, 0].item() == 0
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.6], [0.8, 0.4]]))
    normed = MoEConfig(num_experts=4, num_groups=1, topk_groups=1, top_k=2, norm_topk_prob=True)
    torch.testing.assert_close(select_experts(scores, normed)[0], torch.tensor([[0.625, 0.375], [2 / 3, 1 / 3]]))


def test_softmax_and_sigmoid_scores():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    for score_func, expected in (("softmax", logits.softmax(-1)), ("sigmoid", logits.sigmoid())):
        cfg = MoEConfig(num_experts=4, num_groups=1, topk_groups=1, top_k=2, score_func=score_func,
                        norm_topk_prob=False)
        router, x = router_with_logits(logits, cfg)
        routing = router(x)
        assert routing.indices.tolist() == [[0, 3]]
        torch.testing.assert_close(routing.weights, expected[:, [0, 3]], atol=1e-6, rtol=1e-6)


def test_load_balancing_loss_by_hand_and_padding_excluded():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    indices = torch.tensor([[0], [0], [1]])
    # Token 2 is padding: f = [1, 0], P = [0.65, 0.35] -> 2 * 0.65.
    loss, counts = load_balancing_loss(probs, indices, torch.tensor([True, True, False]))
    torch.testing.assert_close(loss, torch.tensor(1.3))
    assert counts.tolist() == [2, 0]
    # All three count: f = [2/3, 1/3], P = [1.4/3, 1.6/3] -> 2 * (2.8 + 1.6) / 9.
    loss, counts = load_balancing_loss(probs, indices)
    torch.testing.assert_close(loss, torch.tensor(8.8 / 9))
    assert counts.tolist() == [2, 1]
    # Uniform router probabilities give exactly 1 whatever the top-k assignment.
    loss, _ = load_balancing_loss(torch.full((5, 4), 0.25), torch.tensor([[0, 1]] * 5))
    torch.testing.assert_close(loss, torch.tensor(1.0))
    # No real token at all: zero, not NaN.
    loss, counts = load_balancing_loss(probs, indices, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and counts.sum().item() == 0


def small_moe(score_func="softmax", shared=1, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=3, expert_hidden=12,
                    num_shared_experts=shared, score_func=score_func, norm_topk_prob=score_func == "sigmoid",
                    route_scale=1.5)
    return MoEFeedForward(16, cfg)


def reference_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per token: sum_k w_k * expert_k(x) + shared(x), one token and one expert at a time."""
    B, L, D = x.shape
    flat = x.reshape(-1, D)
    routing = moe.router(flat)
    ex = moe.experts
    rows = []
    for n in range(flat.shape[0]):
        token = flat[n]
        out = moe.shared(token) if moe.shared is not None else torch.zeros_like(token)
        for w, e in zip(routing.weights[n], routing.indices[n].tolist()):
            out = out + w * ((F.silu(token @ ex.w_gate[e]) * (token @ ex.w_up[e])) @ ex.w_down[e])
        rows.append(out)
    return torch.stack(rows).view(B, L, D)


@pytest.mark.parametrize("score_func,shared", [("softmax", 1), ("sigmoid", 2), ("softmax", 0)])
def test_moe_matches_per_token_reference_forward_and_backward(score_func, shared):
    moe = small_moe(score_func, shared)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, aux = moe(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_moe(moe, x_ref)
    ref_grads = torch.autograd.grad(expected, [x_ref, *moe.parameters()], grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    assert aux.tokens_per_expert.sum().item() == 10 * 3


def test_single_expert_top1_moe_equals_dense_swiglu():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=1, num_groups=1, topk_groups=1, top_k=1, expert_hidden=24, num_shared_experts=0)
    moe = MoEFeedForward(16, cfg)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.w_gate[0].T)
        dense.up_proj.weight.copy_(moe.experts.w_up[0].T)
        dense.down_proj.weight.copy_(moe.experts.w_down[0].T)
    x = torch.randn(3, 4, 16)
    out, aux = moe(x)
    torch.testing.assert_close(out, dense(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(aux.aux_loss, torch.tensor(1.0))  # one expert: trivially balanced


def test_padding_tokens_excluded_from_aux_but_outputs_unchanged():
    moe = small_moe()
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 4:] = False
    out, aux = moe(x, mask)
    real_only, real_aux = moe(x[mask][None])  # the 8 real tokens as one unpadded sequence
    torch.testing.assert_close(aux.aux_loss, real_aux.aux_loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(aux.tokens_per_expert, real_aux.tokens_per_expert)
    assert aux.tokens_per_expert.sum().item() == 8 * 3
    torch.testing.assert_close(out[mask], real_only[0], atol=1e-6, rtol=1e-6)
    _, unmasked = moe(x)
    assert not torch.allclose(unmasked.aux_loss, aux.aux_loss)


def test_aux_loss_is_differentiable_through_the_router():
    moe = small_moe()
    _, aux = moe(torch.randn(2, 5, 16))
    assert aux.aux_loss.item() > 0
    (grad,) = torch.autograd.grad(aux.aux_loss, [moe.router.gate.weight])
    assert grad.abs().sum() > 0


def test_moe_aux_is_computed_when_read_and_carries_gradients():
    """Inference never reads the balance losses or telemetry, so the layer leaves them uncomputed; read, they equal
    the loss functions on the router's outputs and their gradients reach the router."""
    from mmr1.moe import router_z_loss, sequence_balance_loss

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, num_groups=2, topk_groups=1, top_k=2, expert_hidden=16)
    layer = MoEFeedForward(32, cfg)
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    _, aux = layer(x, mask)
    computed = {"_balance", "seq_aux_loss", "z_loss", "router_entropy", "mean_experts_per_token"}
    assert computed.isdisjoint(vars(aux))  # nothing beyond the routing itself ran
    flat, flat_mask = x.reshape(10, 32), mask.reshape(10)
    logits = flat @ layer.router.gate.weight.T
    probs = logits.softmax(-1)
    chosen = aux.expert_indices
    expected_aux, expected_counts = load_balancing_loss(probs, chosen, flat_mask)
    torch.testing.assert_close(aux.aux_loss, expected_aux)
    assert torch.equal(aux.tokens_per_expert, expected_counts)
    torch.testing.assert_close(aux.seq_aux_loss, sequence_balance_loss(probs, chosen, flat_mask, 5))
    torch.testing.assert_close(aux.z_loss, router_z_loss(logits, flat_mask))
    assert aux.mean_experts_per_token.item() == 2.0 and int(aux.dropped_tokens) == 0
    (aux.aux_loss + aux.z_loss).backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
