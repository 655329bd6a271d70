"""Routing and balancing options of the MoE layer, each against hand-computed expectations: dynamic activation,
sequence-wise aux loss, router z-loss, DeepSeek-V3 aux-loss-free bias, capacity factor, telemetry, training."""
from __future__ import annotations

import math
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model, save_model

from mmr1.config import MoEConfig, R1Config, config_from_dict
from mmr1.moe import (MoEFeedForward, Router, apply_capacity, load_balancing_loss, router_z_loss, select_experts,
                      sequence_balance_loss)
from test_backbone_model import left_padded_batch, tiny_model
from test_moe import router_with_logits


def flat_cfg(E: int = 4, **kw) -> MoEConfig:
    """E experts in one group (no group limiting), raw scores as weights unless asked otherwise."""
    base = dict(num_experts=E, num_groups=1, topk_groups=1, top_k=2, norm_topk_prob=False)
    base.update(kw)
    return MoEConfig(**base)


# ---- dynamic activation ----------------------------------------------------------------------------------
SCORES = torch.tensor([[0.80, 0.10, 0.06, 0.04],   # 0.80 alone passes 0.7           -> [0]
                       [0.40, 0.35, 0.15, 0.10],   # 0.40, then 0.75 passes          -> [0, 1]
                       [0.22, 0.27, 0.26, 0.25]])  # 0.27, 0.53, then 0.78 passes    -> [1, 2, 3]


def test_dynamic_k_adds_experts_until_the_threshold():
    weights, indices = select_experts(SCORES, flat_cfg(dynamic_threshold=0.7, min_k=1, max_k=3))
    assert indices.tolist() == [[0, -1, -1], [0, 1, -1], [1, 2, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.80, 0, 0], [0.40, 0.35, 0], [0.27, 0.26, 0.25]]))


def test_dynamic_k_respects_min_k_and_max_k():
    _, indices = select_experts(SCORES, flat_cfg(dynamic_threshold=0.7, min_k=2, max_k=3))
    assert indices.tolist() == [[0, 1, -1], [0, 1, -1], [1, 2, 3]]
    _, indices = select_experts(SCORES, flat_cfg(dynamic_threshold=0.7, min_k=1, max_k=2))
    assert indices.tolist() == [[0, -1], [0, 1], [1, 2]]


def test_dynamic_k_normalises_over_the_allowed_groups_and_renormalises_weights():
    # 2 groups of 2, keep 1: group maxima 0.30 vs 0.35 -> only experts 2, 3 (0.35, 0.30) compete. Normalised
    # over those two, expert 2 holds 0.35 / 0.65 = 0.54 >= 0.5, so one expert suffices (raw 0.35 would not).
    scores = torch.tensor([[0.30, 0.05, 0.35, 0.30]])
    cfg = MoEConfig(num_experts=4, num_groups=2, topk_groups=1, top_k=2, norm_topk_prob=True,
                    dynamic_threshold=0.5, min_k=1, max_k=2)
    weights, indices = select_experts(scores, cfg)
    assert indices.tolist() == [[2, -1]]
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0]]))
    cfg.dynamic_threshold = 0.6
    weights, indices = select_experts(scores, cfg)
    assert indices.tolist() == [[2, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.35 / 0.65, 0.30 / 0.65]]))


def test_dynamic_moe_reports_mean_experts_and_matches_a_per_token_reference():
    router, x = router_with_logits(SCORES.log(), flat_cfg(dynamic_threshold=0.7, min_k=1, max_k=3))
    aux = router(x).aux
    assert aux.mean_experts_per_token.item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert aux.expert_indices.tolist() == [[0, -1, -1], [0, 1, -1], [1, 2, 3]]

    torch.manual_seed(0)
    moe = MoEFeedForward(16, MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=12,
                                       dynamic_threshold=0.6, min_k=1, max_k=4))
    x = torch.randn(2, 6, 16)
    out, aux = moe(x)
    taken = (aux.expert_indices >= 0).sum(-1)
    assert taken.min() >= 1 and taken.max() <= 4 and len(set(taken.tolist())) > 1
    assert aux.mean_experts_per_token.item() == pytest.approx(taken.float().mean().item())
    assert aux.tokens_per_expert.sum().item() == taken.sum().item()
    torch.testing.assert_close(out, per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """sum over used slots of w * expert(x) + shared(x), one token and one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.router(flat, seq_len=x.shape[1])
    ex, rows = moe.experts, []
    for n, token in enumerate(flat):
        out = moe.shared(token) if moe.shared is not None else torch.zeros_like(token)
        for w, e in zip(routing.weights[n], routing.indices[n].tolist()):
            if e >= 0:
                out = out + w * ((F.silu(token @ ex.w_gate[e]) * (token @ ex.w_up[e])) @ ex.w_down[e])
        rows.append(out)
    return torch.stack(rows).view_as(x)


# ---- losses -----------------------------------------------------------------------------------------------
def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: ln 2 and ln 4 = 2 ln 2
    ln2sq = math.log(2.0) ** 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * ln2sq))  # (1 + 4) / 2
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([True, False])), torch.tensor(ln2sq))
    assert router_z_loss(logits, torch.tensor([False, False])).item() == 0.0
    router, x = router_with_logits(logits, flat_cfg(E=2, top_k=1))
    aux = router(x).aux
    torch.testing.assert_close(aux.z_loss, torch.tensor(2.5 * ln2sq))
    (grad,) = torch.autograd.grad(aux.z_loss, [router.gate.weight])
    assert grad.abs().sum() > 0


def test_sequence_balance_loss_by_hand():
    # Sequence 0: both tokens to expert 0, f = [1, 0], P = [0.65, 0.35] -> 2 * 0.65 = 1.3.
    # Sequence 1: one token each, f = [0.5, 0.5], P = [0.3, 0.7] -> 2 * 0.5 = 1.0. Mean: 1.15.
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    indices = torch.tensor([[0], [0], [1], [0]])
    torch.testing.assert_close(sequence_balance_loss(probs, indices, None, seq_len=2), torch.tensor(1.15))
    # The batch-wide loss differs: f = [3/4, 1/4], P = [1.9/4, 2.1/4] -> 2 * 7.8 / 16.
    torch.testing.assert_close(load_balancing_loss(probs, indices)[0], torch.tensor(0.975))
    # Seq 1's second token is padding: f = [0, 1], P = [0.1, 0.9] -> 1.8; mean (1.3 + 1.8) / 2.
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(sequence_balance_loss(probs, indices, mask, seq_len=2), torch.tensor(1.55))
    # A sequence of padding only does not count at all.
    mask = torch.tensor([True, True, False, False])
    torch.testing.assert_close(sequence_balance_loss(probs, indices, mask, seq_len=2), torch.tensor(1.3))
    # One sequence: the same as the batch-wide loss.
    torch.testing.assert_close(sequence_balance_loss(probs, indices, None, seq_len=4), torch.tensor(0.975))


def test_moe_layer_reports_per_sequence_loss_with_gradient():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=12))
    x = torch.randn(3, 5, 16)
    _, aux = moe(x)
    flat = x.reshape(15, 16)
    probs = F.linear(flat, moe.router.gate.weight).softmax(-1)
    expected = torch.stack([load_balancing_loss(probs[5 * b:5 * b + 5], aux.expert_indices[5 * b:5 * b + 5])[0]
                            for b in range(3)]).mean()
    torch.testing.assert_close(aux.seq_aux_loss, expected)
    (grad,) = torch.autograd.grad(aux.seq_aux_loss, [moe.router.gate.weight])
    assert grad.abs().sum() > 0


# ---- capacity factor --------------------------------------------------------------------------------------
def test_capacity_keeps_the_highest_weights_per_expert():
    # 3 tokens x 2 slots over 4 experts, factor 1: capacity ceil(1 * 3 * 2 / 4) = 2. Expert 0 gets three
    # assignments (0.5, 0.7, 0.6): token 0's 0.5 is dropped. Experts 1 and 2 stay within capacity.
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]])
    w, i, dropped = apply_capacity(weights, indices, 1.0, 4)
    assert i.tolist() == [[-1, 1], [0, 2], [0, 1]] and dropped.item() == 1
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5], [0.7, 0.3], [0.6, 0.4]]))
    # Top-1, all four tokens to expert 0, capacity ceil(4 / 2) = 2: weights 0.9 (token 1) and 0.8 (token 3) stay.
    w, i, dropped = apply_capacity(torch.tensor([[0.6], [0.9], [0.7], [0.8]]), torch.zeros(4, 1, dtype=torch.long),
                                   1.0, 2)
    assert i.flatten().tolist() == [-1, 0, -1, 0] and dropped.item() == 2
    # Ties go to the earlier token; factor 1.5 -> capacity ceil(1.5 * 4 / 2) = 3.
    _, i, dropped = apply_capacity(torch.full((4, 1), 0.5), torch.zeros(4, 1, dtype=torch.long), 1.5, 2)
    assert i.flatten().tolist() == [0, 0, 0, -1] and dropped.item() == 1


def test_capacity_ignores_padding_and_unused_slots():
    # Token 2 is padding: it never takes capacity and is not counted as dropped. 4 real assignments over
    # 4 experts -> capacity 1: expert 0 keeps token 1 (0.7) and drops token 0 (0.5).
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]])
    _, i, dropped = apply_capacity(weights, indices, 1.0, 4, torch.tensor([True, True, False]))
    assert i.tolist() == [[-1, 1], [0, 2], [-1, -1]] and dropped.item() == 1
    # Unused dynamic slots (-1) are neither assignments nor drops: 3 assignments, capacity ceil(3 / 4) = 1.
    _, i, dropped = apply_capacity(torch.tensor([[0.9, 0.0], [0.6, 0.4]]), torch.tensor([[0, -1], [0, 1]]), 1.0, 4)
    assert i.tolist() == [[0, -1], [-1, 1]] and dropped.item() == 1


def test_moe_with_capacity_drops_assignments_and_matches_the_reference():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=12, capacity_factor=1.0)
    moe = MoEFeedForward(16, cfg)
    with torch.no_grad():
        moe.router.gate.weight[0] += 0.5  # skew towards expert 0 so that it overflows
    x = torch.randn(2, 8, 16) + 0.5
    out, aux = moe(x)
    capacity = math.ceil(16 * 2 / 8)
    kept = torch.bincount(aux.expert_indices[aux.expert_indices >= 0], minlength=8)
    assert kept.max().item() <= capacity
    assert aux.tokens_per_expert.max().item() > capacity  # the router's choice, before drops
    assert aux.dropped_tokens.item() == 32 - kept.sum().item() > 0
    torch.testing.assert_close(out, per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


# ---- aux-loss-free balancing ------------------------------------------------------------------------------
def test_bias_changes_which_experts_not_their_weights():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    cfg = flat_cfg(top_k=1, aux_free_bias=True)
    router, x = router_with_logits(scores.log(), cfg)
    routing = router(x)
    assert routing.indices.tolist() == [[0]]
    torch.testing.assert_close(routing.weights, torch.tensor([[0.4]]))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([-0.25, 0.05, 0.0, 0.0]))  # choice scores 0.15, 0.35, 0.2, 0.1
    routing = router(x)
    assert routing.indices.tolist() == [[1]]
    torch.testing.assert_close(routing.weights, torch.tensor([[0.3]]))  # expert 1's unbiased score, not 0.35
    # Top-2 with renormalisation: experts 1 and 2 (the unbiased favourite 0 is out), weights from 0.3 and 0.2.
    weights, indices = select_experts(scores, flat_cfg(top_k=2, norm_topk_prob=True), router.expert_bias)
    assert indices.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.4]]))


def test_bias_update_direction():
    router = Router(8, flat_cfg(aux_free_bias=True, bias_update_rate=0.1))
    router.update_bias(torch.tensor([6, 2, 0, 0]))  # mean 2: overloaded, even, idle, idle
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    router.update_bias(torch.tensor([6, 2, 0, 0]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.2, 0.0, 0.2, 0.2]))
    assert not router.expert_bias.requires_grad and "expert_bias" not in dict(router.named_parameters())


def imbalance(tokens_per_expert: torch.Tensor) -> float:
    return (tokens_per_expert.max() / tokens_per_expert.float().mean()).item()


def test_bias_updates_balance_a_skewed_stream():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, num_groups=1, topk_groups=1, top_k=2, aux_free_bias=True, bias_update_rate=0.005)
    router = Router(16, cfg)
    with torch.no_grad():
        router.gate.weight[0] += 0.3  # tokens with a positive mean prefer expert 0
    stream = torch.Generator().manual_seed(1)
    held_out = torch.randn(2048, 16, generator=stream) + 0.5
    before = imbalance(router(held_out).aux.tokens_per_expert)
    for _ in range(300):  # sign updates of a fixed size settle into a small oscillation around balance
        router.update_bias(router(torch.randn(256, 16, generator=stream) + 0.5).aux.tokens_per_expert)
    after = imbalance(router(held_out).aux.tokens_per_expert)
    assert before > 3.0 and after < 1.3, (before, after)  # measured: 3.66 -> 1.14
    assert router.expert_bias[0] == router.expert_bias.min()  # the favourite was pushed down most


def test_bias_is_saved_in_state_dict_and_safetensors(tmp_path):
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=12, aux_free_bias=True)
    moe = MoEFeedForward(16, cfg)
    moe.router.update_bias(torch.tensor([9, 0, 1, 1, 1, 1, 1, 2]))
    assert "router.expert_bias" in moe.state_dict()
    restored = MoEFeedForward(16, cfg)
    restored.load_state_dict(moe.state_dict())
    assert torch.equal(restored.router.expert_bias, moe.router.expert_bias) and moe.router.expert_bias.abs().sum() > 0
    save_model(moe, str(tmp_path / "moe.safetensors"))
    from_file = MoEFeedForward(16, cfg)
    load_model(from_file, str(tmp_path / "moe.safetensors"))
    assert torch.equal(from_file.router.expert_bias, moe.router.expert_bias)
    # Without aux-free balancing there is no such buffer, so earlier checkpoints keep loading strictly.
    assert "router.expert_bias" not in MoEFeedForward(16, MoEConfig(num_experts=8, num_groups=4)).state_dict()


# ---- telemetry ---------------------------------------------------------------------------------------------
def test_telemetry_fields():
    probs = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    router, x = router_with_logits(probs.log(), flat_cfg(E=3, top_k=1))
    aux = router(x, torch.tensor([True, False])).aux
    torch.testing.assert_close(aux.router_entropy, torch.tensor(1.5 * math.log(2.0)))  # padding row excluded
    aux = router(x).aux
    torch.testing.assert_close(aux.router_entropy, torch.tensor((1.5 * math.log(2.0) + math.log(3.0)) / 2))
    assert aux.expert_indices.dtype == torch.long and aux.expert_indices.shape == (2, 1)
    assert aux.token_mask is None and aux.dropped_tokens.item() == 0 and aux.mean_experts_per_token.item() == 1.0
    for name in ("expert_indices", "router_entropy", "mean_experts_per_token", "dropped_tokens"):
        assert not getattr(aux, name).requires_grad, name
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):
        assert getattr(aux, name).requires_grad, name


def test_backbone_carries_each_layers_aux():
    model = tiny_model()
    input_ids, mask, _, _ = left_padded_batch()
    out = model(input_ids, attention_mask=mask)
    assert len(out.moe_aux) == 2  # MoE layers 1 and 2
    assert all(aux.tokens_per_expert is counts for aux, counts in zip(out.moe_aux, out.tokens_per_expert))
    torch.testing.assert_close(out.aux_loss, out.moe_aux[0].aux_loss + out.moe_aux[1].aux_loss)
    assert torch.equal(out.moe_aux[0].token_mask, mask.reshape(-1))
    assert out.moe_aux[1].expert_indices.shape == (mask.numel(), 2)


# ---- defaults are today's behaviour ------------------------------------------------------------------------
def previous_select_experts(scores: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing before this change (group-limited fixed top-k), kept verbatim as the reference."""
    N, E = scores.shape
    groups = cfg.num_groups
    candidates = scores
    if groups > 1 and cfg.topk_groups < groups:
        grouped = scores.view(N, groups, E // groups)
        if cfg.score_func == "sigmoid" and E // groups >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(cfg.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.repeat_interleave(E // groups, dim=1)
        candidates = scores.masked_fill(~expert_mask, float("-inf"))
    indices = candidates.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * cfg.route_scale, indices


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_defaults_and_neutral_settings_reproduce_previous_routing_exactly(score_func):
    torch.manual_seed(0)
    base = dict(num_experts=16, num_groups=4, topk_groups=2, top_k=3, expert_hidden=8, score_func=score_func,
                route_scale=1.5)
    moe = MoEFeedForward(12, MoEConfig(**base))
    x = torch.randn(2, 7, 12)
    out, aux = moe(x)
    logits = F.linear(x.reshape(14, 12), moe.router.gate.weight)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    weights, indices = select_experts(scores, moe.cfg)
    ref_weights, ref_indices = previous_select_experts(scores, moe.cfg)
    assert torch.equal(indices, ref_indices) and torch.equal(weights, ref_weights)
    assert torch.equal(aux.expert_indices, ref_indices) and aux.dropped_tokens.item() == 0
    # Every new option at a setting that changes nothing routes and computes bit for bit the same.
    for neutral in (dict(dynamic_threshold=1.0, min_k=3, max_k=3), dict(capacity_factor=100.0),
                    dict(aux_free_bias=True), dict(seq_aux_loss_coef=0.1, z_loss_coef=0.1)):
        other = MoEFeedForward(12, MoEConfig(**base, **neutral))
        other.load_state_dict(moe.state_dict(), strict=False)  # the bias buffer stays at its zeros
        other_out, other_aux = other(x)
        assert torch.equal(other_out, out), neutral
        assert torch.equal(other_aux.expert_indices, aux.expert_indices), neutral
        assert torch.equal(other_aux.aux_loss, aux.aux_loss), neutral


# ---- training: weighted losses and the bias update after each optimizer step ----------------------------------
@pytest.fixture
def lightning_module(tmp_path):
    from mmr1.tokenizer import R1Tokenizer
    from mmr1.training import MMR1LightningModule

    R1Tokenizer.train(["what color is the square", "red green blue"], vocab_size=300).save(tmp_path / "tok.json")
    moe = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=16, aux_free_bias=True,
                    bias_update_rate=0.05, seq_aux_loss_coef=0.1, z_loss_coef=0.01)
    backbone = R1Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16, moe=moe)
    torch.manual_seed(0)
    return MMR1LightningModule(str(tmp_path / "tok.json"), backbone=backbone, lr=1e-3, warmup_steps=1)


def batches(n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.bool)
        mask[0, 7:] = False
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100)})
    return out


def test_training_loss_weights_the_new_losses(lightning_module):
    batch = batches(1, lightning_module.tokenizer.vocab_size)[0]
    out = lightning_module._forward(batch)
    expected = out["lm_loss"] + 0.01 * out["aux_loss"] + 0.1 * out["seq_aux_loss"] + 0.01 * out["z_loss"]
    torch.testing.assert_close(out["loss"], expected)
    assert out["seq_aux_loss"].item() > 0 and out["z_loss"].item() > 0


def test_bias_follows_the_load_of_each_optimizer_step(lightning_module):
    data = batches(2, lightning_module.tokenizer.vocab_size)
    router = lightning_module.model.backbone.layers[1].ffn.router
    with torch.no_grad():  # the load the one optimizer step (2 accumulated micro-batches) will observe
        load = sum(lightning_module.model(b["input_ids"], b["attention_mask"]).tokens_per_expert[0] for b in data)
    trainer = lightning.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lightning_module, torch.utils.data.DataLoader(data, batch_size=None))
    expected = 0.05 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(router.expert_bias, expected)
    assert expected.abs().sum() > 0 and lightning_module._expert_load == []


# ---- config ---------------------------------------------------------------------------------------------------
def test_config_validates_the_new_options():
    with pytest.raises(ValueError, match="min_k"):
        MoEConfig(num_experts=8, num_groups=4, topk_groups=1, dynamic_threshold=0.5, min_k=1, max_k=3)  # 2 kept
    with pytest.raises(ValueError, match="dynamic_threshold"):
        MoEConfig(num_experts=8, num_groups=4, dynamic_threshold=1.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(num_experts=8, num_groups=4, capacity_factor=0.0)
    assert MoEConfig(top_k=2).k_range == (2, 2)  # min_k/max_k only matter with a threshold
    assert MoEConfig(top_k=2, dynamic_threshold=0.5, max_k=4).k_range == (1, 4)


def test_seed_geometry_config():
    path = Path(__file__).resolve().parents[1] / "configs" / "r1-moe-128x16.yaml"
    backbone = config_from_dict(R1Config, yaml.safe_load(path.read_text())["model"]["backbone"])
    moe = backbone.moe
    assert (backbone.dim, moe.num_experts, moe.num_groups, moe.topk_groups, moe.top_k, moe.expert_hidden) == \
        (512, 128, 16, 4, 2, 256)
    assert moe.num_experts // moe.num_groups == 8 and moe.num_shared_experts == 1 and moe.capacity_factor is None
