"""DeepSeek-V3's MoE block (grouped sigmoid routing with its correction bias, shared experts) in mmr1's MoE layer."""
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from mmr1.hf_deepseek import moe_from_deepseek_v3
from mmr1.hf_interop import UnsupportedHFCheckpoint


def tiny_block(seed: int = 0, **overrides) -> tuple[DeepseekV3MoE, DeepseekV3Config]:
    torch.manual_seed(seed)
    settings = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    config = DeepseekV3Config(**{**settings, **overrides})
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
        # a strong correction bias, so choosing by biased scores really differs from choosing by raw scores
        block.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
    return block, config


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_block_parity(norm_topk_prob):
    block, config = tiny_block(norm_topk_prob=norm_topk_prob)
    moe = moe_from_deepseek_v3(block, config).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = block(x)
        got, aux = moe(x)
    assert (got - expected).abs().max() <= 1e-5
    # the routing really went through the bias: the same block without it picks other experts
    indices = block.gate(x)[2]  # (N, k) the experts transformers chose
    assert torch.equal(aux.expert_indices.sort(dim=-1).values, indices.sort(dim=-1).values)
    with torch.no_grad():
        block.gate.e_score_correction_bias.zero_()
    assert not torch.equal(block.gate(x)[2].sort(dim=-1).values, indices.sort(dim=-1).values)


def test_bias_survives_state_dict_roundtrip():
    block, config = tiny_block(seed=1)
    moe = moe_from_deepseek_v3(block, config)
    assert torch.equal(moe.state_dict()["router.expert_bias"], block.gate.e_score_correction_bias)


def test_non_silu_experts_are_refused():
    block, config = tiny_block(hidden_act="gelu")
    with pytest.raises(UnsupportedHFCheckpoint, match="hidden_act"):
        moe_from_deepseek_v3(block, config)
