"""RoPE scaling (linear / dynamic NTK / YaRN) against transformers' rope init functions and rotary embedding."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mmr1.attention import RotaryEmbedding
from mmr1.backbone import R1Model
from mmr1.config import R1Config, RopeScaling
from mmr1.kv_cache import KVCache
from mmr1.rope import rope_frequencies

HEAD_DIM, THETA, ORIGINAL, LONG = 32, 10000.0, 64, 512


def hf_config(rope: dict, max_position_embeddings: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=max_position_embeddings,
                                    rope_parameters={"rope_theta": THETA, **rope})


CASES = {
    "linear": (RopeScaling(type="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}, LONG),
    # transformers' dynamic NTK takes its original length from max_position_embeddings and the current length
    # from seq_len; we evaluate it once at the model's max_seq_len.
    "dynamic": (RopeScaling(type="dynamic", factor=4.0, original_max_seq_len=ORIGINAL),
                {"rope_type": "dynamic", "factor": 4.0}, ORIGINAL),
    "yarn": (RopeScaling(type="yarn", factor=8.0, original_max_seq_len=ORIGINAL),
             {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL}, LONG),
    "yarn_custom": (RopeScaling(type="yarn", factor=4.0, original_max_seq_len=ORIGINAL, beta_fast=16.0,
                                beta_slow=2.0, attention_factor=1.3, truncate=False),
                    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                     "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False}, LONG),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(name):
    ours, theirs, max_pos = CASES[name]
    inv_freq, factor = rope_frequencies(HEAD_DIM, THETA, ours, max_seq_len=LONG)
    hf_kwargs = {"seq_len": LONG} if ours.type == "dynamic" else {}
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](hf_config(theirs, max_pos), None, **hf_kwargs)
    torch.testing.assert_close(inv_freq.float(), hf_inv_freq, atol=0, rtol=1e-6)  # theirs is computed in fp32
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    assert not torch.allclose(inv_freq, rope_frequencies(HEAD_DIM, THETA, None, LONG)[0])  # scaling did something


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_cos_sin_tables_match_transformers_rotary_embedding(name):
    """The whole table (cos/sin times YaRN's attention factor) equals LlamaRotaryEmbedding's at every position."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ours, theirs, max_pos = CASES[name]
    rope = RotaryEmbedding(HEAD_DIM, LONG, THETA, ours)
    positions = torch.arange(LONG)[None]
    cos, sin = rope(positions)  # (1, 1, L, D)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config(theirs, max_pos))(torch.zeros(1, dtype=torch.float32), positions)
    # transformers multiplies fp32 positions by fp32 frequencies; at position p that rounds the angle by ~p * 6e-8.
    torch.testing.assert_close(cos[0, 0], hf_cos[0], atol=LONG * 1e-7, rtol=0)
    torch.testing.assert_close(sin[0, 0], hf_sin[0], atol=LONG * 1e-7, rtol=0)


def test_default_rope_tables_unchanged():
    """No scaling: the tables are exactly today's (theta ** -(2i/D) in float64)."""
    rope = RotaryEmbedding(HEAD_DIM, 128, THETA)
    dims = torch.arange(0, HEAD_DIM, 2, dtype=torch.float64)
    angles = torch.outer(torch.arange(128, dtype=torch.float64), THETA ** -(dims / HEAD_DIM))
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(rope.cos, angles.cos().float()) and torch.equal(rope.sin, angles.sin().float())


def test_linear_scaling_is_position_interpolation():
    """Linear scaling by f rotates position p exactly as plain RoPE rotates p / f (checked on multiples of f)."""
    plain = RotaryEmbedding(HEAD_DIM, 64, THETA)
    scaled = RotaryEmbedding(HEAD_DIM, 256, THETA, RopeScaling(type="linear", factor=4.0))
    torch.testing.assert_close(scaled.cos[::4], plain.cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled.sin[::4], plain.sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scaling", [CASES["yarn"][0], CASES["dynamic"][0]])
def test_scaled_model_decodes_with_cache_like_full_forward(scaling):
    """Scaled frequencies are fixed per model, so cached decoding still equals the full forward."""
    torch.manual_seed(0)
    cfg = R1Config(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=LONG,
                   rope_scaling=scaling, attention_pattern="sliding", global_every=2, window=8,
                   attention_block_size=8)
    model = R1Model(cfg).eval()
    ids = torch.randint(1, 64, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(cfg, 2, max_len=40)
        steps = [model(ids[:, :20], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                             for t in range(20, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_from_hf_imports_linear_and_yarn_llama_exactly(rope, tmp_path):
    """A Llama with scaled RoPE imports into R1 and gives transformers' logits on sequences past the original
    context (max abs diff <= 1e-4, the bound of tests/test_hf_interop.py)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                      initializer_range=0.1, rope_parameters={"rope_theta": 500.0, **rope},
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = R1Model.from_hf(str(tmp_path))
    assert model.cfg.rope_scaling.type == rope["rope_type"]
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
