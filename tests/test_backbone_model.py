"""R1Model: KV-cached decoding parity, padding, gated cross-attention, MoE aux loss, init and parameter counts."""
from __future__ import annotations

import math

import pytest
import torch

from mmr1.backbone import R1Model
from mmr1.config import MoEConfig, R1Config
from mmr1.kv_cache import KVCache


def tiny_config(**overrides) -> R1Config:
    base = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=32,
                moe=MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=16),
                cross_attn_layers=[0, 2], cross_attn_heads=2)
    base.update(overrides)
    return R1Config(**base)


def tiny_model(seed: int = 0, open_gates: bool = True, **overrides) -> R1Model:
    torch.manual_seed(seed)
    model = R1Model(tiny_config(**overrides))
    model.init_weights(std=0.2)  # larger than the default so the test logits are far from ties
    if open_gates:  # a fresh model's gates are 0, which would hide any cross-attention bug
        with torch.no_grad():
            for block in model.layers:
                if block.cross_attn is not None:
                    block.cross_attn.gate.fill_(0.8)
    return model.eval()


def left_padded_batch(B=3, L=9, T=5, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :1] = False
    cross_states = torch.randn(B, T, dim, generator=g)
    cross_mask = torch.ones(B, T, dtype=torch.bool)
    cross_mask[0, 3:] = False
    cross_mask[2] = False  # a sample without any modality token
    return input_ids, mask, cross_states, cross_mask


@pytest.mark.parametrize("with_cross", [True, False])
def test_cached_decoding_equals_full_forward_at_every_step(with_cross):
    model = tiny_model()
    input_ids, mask, cross_states, cross_mask = left_padded_batch()
    cross = dict(cross_states=cross_states, cross_mask=cross_mask) if with_cross else {}
    full = model(input_ids, attention_mask=mask, **cross).logits  # (B, L, V)

    prefill = 5
    cache = KVCache.for_model(model.cfg, batch_size=3, max_len=12)
    steps = [model(input_ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, **cross).logits]
    for t in range(prefill, input_ids.shape[1]):  # modality K/V now come from the cache
        steps.append(model(input_ids[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert cache.length == input_ids.shape[1]
    assert sorted(cache.cross_kv) == ([0, 2] if with_cross else [])


def test_left_padded_batch_equals_each_sequence_alone():
    model = tiny_model()
    input_ids, mask, cross_states, cross_mask = left_padded_batch()
    batched = model(input_ids, attention_mask=mask, cross_states=cross_states, cross_mask=cross_mask).logits
    for b in range(3):
        ids = input_ids[b][mask[b]][None]
        alone = model(ids, cross_states=cross_states[b:b + 1][:, cross_mask[b]] if cross_mask[b].any() else None)
        torch.testing.assert_close(batched[b][mask[b]], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_closed_gates_give_exactly_the_text_only_model():
    model = tiny_model(open_gates=False)  # as built: every tanh gate at 0
    input_ids, mask, cross_states, cross_mask = left_padded_batch()
    with_modality = model(input_ids, attention_mask=mask, cross_states=cross_states, cross_mask=cross_mask).logits
    text_only = model(input_ids, attention_mask=mask).logits
    assert torch.equal(with_modality, text_only)

    plain = R1Model(tiny_config(cross_attn_layers=[])).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(".cross_attn." in k for k in unexpected)
    assert torch.equal(plain(input_ids, attention_mask=mask).logits, with_modality)


def test_open_gates_use_the_modality_tokens():
    model = tiny_model()
    input_ids, mask, cross_states, cross_mask = left_padded_batch()
    with_modality = model(input_ids, attention_mask=mask, cross_states=cross_states, cross_mask=cross_mask).logits
    text_only = model(input_ids, attention_mask=mask).logits
    assert not torch.allclose(with_modality[0], text_only[0], atol=1e-3)
    # Sample 2 has no modality token. (Not bitwise: the other samples change the experts' matmul shapes.)
    torch.testing.assert_close(with_modality[2], text_only[2], atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_and_expert_counts():
    model = tiny_model()
    model.train()
    input_ids, mask, _, _ = left_padded_batch()
    out = model(input_ids, attention_mask=mask)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    assert len(out.tokens_per_expert) == 2  # layers 1 and 2 (first_k_dense=1)
    n_real = int(mask.sum())
    assert all(t.shape == (8,) and t.sum().item() == n_real * 2 for t in out.tokens_per_expert)
    out.aux_loss.backward()
    assert model.layers[1].ffn.router.gate.weight.grad.abs().sum() > 0
    assert model.norm.weight.grad is None  # downstream of every router

    dense = tiny_model(moe=None)
    dense_out = dense(input_ids)
    assert dense_out.aux_loss.item() == 0.0 and dense_out.tokens_per_expert == []


def test_training_loss_backpropagates_to_every_parameter():
    model = tiny_model()
    model.train()
    input_ids, mask, cross_states, cross_mask = left_padded_batch()
    out = model(input_ids, attention_mask=mask, cross_states=cross_states, cross_mask=cross_mask)
    loss = torch.nn.functional.cross_entropy(out.logits[mask], input_ids[mask]) + 0.01 * out.aux_loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_init_weights_and_tied_embeddings():
    torch.manual_seed(0)
    cfg = tiny_config(dim=64, n_heads=4, n_kv_heads=4, n_layers=8, ffn_hidden=128, cross_attn_layers=[3])
    model = R1Model(cfg)
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert model.layers[3].cross_attn.gate.item() == 0.0
    resid_std = 0.02 / math.sqrt(2 * 8)
    for block in model.layers:
        assert abs(block.attn.wo.weight.std().item() - resid_std) < 0.1 * resid_std
        assert abs(block.attn.wq.weight.std().item() - 0.02) < 0.1 * 0.02
        assert torch.equal(block.attn_norm.weight, torch.ones(64))
    assert abs(model.layers[0].ffn.down_proj.weight.std().item() - resid_std) < 0.1 * resid_std
    assert abs(model.layers[5].ffn.experts.w_down.std().item() - resid_std) < 0.1 * resid_std
    untied = R1Model(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_embeddings.weight


def test_parameter_counts_by_hand():
    V, D, L, H, Hkv, F = 64, 32, 3, 4, 2, 48
    model = R1Model(tiny_config(moe=None, cross_attn_layers=[1]))
    kv_dim = D // H * Hkv
    per_block = (D * D + 2 * D * kv_dim + D * D) + 2 * D + 3 * D * F
    cross = 2 * D + D * D + 2 * D * D + D * D + 1  # two norms, wq, wkv, wo, gate
    expected = V * D + L * per_block + cross + D  # tied head counted once, final norm
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - V * D
    assert model.num_active_parameters() == expected

    moe_model = R1Model(tiny_config(cross_attn_layers=[]))  # 2 MoE layers, 8 experts, top-2, 16 wide, 1 shared
    routed = 8 * 3 * D * 16
    moe_block = (D * D + 2 * D * kv_dim + D * D) + 2 * D + D * 8 + routed + 3 * D * 16
    assert moe_model.num_parameters() == V * D + per_block + 2 * moe_block + D
    assert moe_model.num_active_parameters() == moe_model.num_parameters() - 2 * (routed - routed * 2 // 8)


def test_too_long_input_and_cache_overflow_raise():
    model = tiny_model(moe=None)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache.for_model(model.cfg, batch_size=1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="overflows"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
