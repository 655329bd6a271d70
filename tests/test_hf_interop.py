"""R1Model.from_hf: tiny random transformers checkpoints (Llama, Qwen2, Mixtral, Qwen2-MoE) are saved, imported
and must match transformers' logits (fp32, max abs diff <= 1e-4) and greedy generations token for token; what
R1 can't express exactly is refused with the config key named."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from mmr1.backbone import R1Model
from mmr1.generation import generate, left_pad
from mmr1.hf_interop import UnsupportedHFCheckpoint, r1_config_from_hf
from mmr1.moe import MoEFeedForward

VOCAB = 128
PROMPTS = [[5, 9, 2, 33, 17, 80, 4], [7, 100, 3], [12, 40, 3, 3, 18, 60]]  # row 1 gets left-padded
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


def llama(**kw):
    return transformers.LlamaConfig(**{**COMMON, "intermediate_size": 96, "rms_norm_eps": 1e-5,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, **kw})


def qwen2(**kw):
    return transformers.Qwen2Config(**{**COMMON, "intermediate_size": 96, "rms_norm_eps": 1e-6,
                                       "tie_word_embeddings": True,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 2000.0}, **kw})


def mixtral(**kw):
    return transformers.MixtralConfig(**{**COMMON, "intermediate_size": 48, "num_local_experts": 8,
                                         "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "sliding_window": None,
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, **kw})


def qwen2_moe(**kw):
    return transformers.Qwen2MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 80, "num_experts": 6,
                                          "num_experts_per_tok": 2, "norm_topk_prob": False, "mlp_only_layers": [0],
                                          "rms_norm_eps": 1e-6,
                                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, **kw})


FAMILIES = {
    "llama": (llama, transformers.LlamaForCausalLM, {}),
    "qwen2": (qwen2, transformers.Qwen2ForCausalLM, {"max_shard_size": "40KB"}),  # sharded + index.json
    "mixtral": (mixtral, transformers.MixtralForCausalLM, {}),  # saved per expert (w1/w2/w3), the default
    "mixtral_fused": (mixtral, transformers.MixtralForCausalLM, {"save_original_format": False}),  # gate_up_proj
    "qwen2_moe": (qwen2_moe, transformers.Qwen2MoeForCausalLM, {}),
}


def save_tiny(family: str, path, seed: int = 0):
    make_config, model_cls, save_kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    hf = model_cls(make_config()).eval()
    hf.save_pretrained(path, **save_kwargs)
    return hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_generation_match_transformers(family, tmp_path):
    hf = save_tiny(family, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors.index.json" in files) == (family == "qwen2")
    model = R1Model.from_hf(str(tmp_path))

    if family.startswith("mixtral"):
        assert model.cfg.first_k_dense == 0 and model.cfg.moe.norm_topk_prob and model.cfg.moe.num_shared_experts == 0
    if family == "qwen2_moe":  # layer 0 is in mlp_only_layers: dense, the others MoE with a gated shared expert
        assert model.cfg.first_k_dense == 1 and not model.cfg.moe.norm_topk_prob
        assert isinstance(model.layers[1].ffn, MoEFeedForward) and model.layers[1].ffn.shared_gate is not None
        assert model.layers[1].ffn.shared.down_proj.weight.shape == (64, 80)
    assert model.cfg.tie_embeddings == (family == "qwen2")
    assert model.cfg.attention_bias == family.startswith("qwen2")

    input_ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))  # (3, 7), row 1 has 4 pads on the left
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids, attention_mask=mask).logits
        theirs = hf(input_ids=input_ids, attention_mask=mask.long(), position_ids=positions).logits
    diff = (ours - theirs).abs()[mask]  # padding positions compute nothing either model is asked for
    assert diff.max().item() <= 1e-4, f"{family}: max abs logit diff {diff.max().item():.2e}"
    assert theirs[mask].std() > 0.1  # logits that actually vary, so the comparison means something

    new = 8
    mine = generate(model, PROMPTS, max_new_tokens=new)
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
    assert mine == out[:, input_ids.shape[1]:].tolist()
    assert len({tok for row in mine for tok in row}) > 3  # not a degenerate repeat of one token


def test_routing_matches_transformers_router_per_layer(tmp_path):
    hf = save_tiny("mixtral", tmp_path, seed=1)
    model = R1Model.from_hf(str(tmp_path))
    x = torch.randn(20, 64)
    _, hf_weights, hf_indices = hf.model.layers[1].mlp.gate(x)
    routing = model.layers[1].ffn.router(x)
    order_hf, order_ours = hf_indices.sort(-1), routing.indices.sort(-1)
    assert torch.equal(order_hf.values, order_ours.values)
    torch.testing.assert_close(hf_weights.gather(1, order_hf.indices), routing.weights.gather(1, order_ours.indices))


def test_max_seq_len_override(tmp_path):
    save_tiny("llama", tmp_path)
    assert R1Model.from_hf(str(tmp_path), max_seq_len=32).cfg.max_seq_len == 32
    assert R1Model.from_hf(str(tmp_path)).cfg.max_seq_len == 64


@pytest.mark.parametrize("config, key", [
    (llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "mscale": 0.7,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 32}), "rope_parameters"),
    (llama(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "rope_type"),
    (llama(attention_bias=True), "attention_bias"),
    (llama(mlp_bias=True), "mlp_bias"),
    (llama(head_dim=32), "head_dim"),
    (llama(hidden_act="gelu"), "hidden_act"),
    (llama(attention_dropout=0.1), "attention_dropout"),
    (qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=1), "layer_types"),
    (mixtral(sliding_window=16), "sliding_window"),
    (mixtral(router_jitter_noise=0.01), "router_jitter_noise"),
    (qwen2_moe(mlp_only_layers=[1]), "mlp_only_layers"),
    (qwen2_moe(mlp_only_layers=[], decoder_sparse_step=2), "decoder_sparse_step"),
])
def test_refuses_what_r1_cannot_express_exactly(config, key):
    with pytest.raises(UnsupportedHFCheckpoint, match=key):
        r1_config_from_hf(config)


def test_accepts_settings_that_do_not_change_the_function():
    # A sliding window at least as long as the sequence never masks anything; a Qwen2 window that applies to
    # no layer (max_window_layers >= num layers) leaves every layer on full attention.
    assert r1_config_from_hf(mixtral(sliding_window=64)).moe.num_experts == 8
    assert r1_config_from_hf(mixtral(sliding_window=4096), max_seq_len=64).max_seq_len == 64
    assert not r1_config_from_hf(qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=3)).moe
    cfg = r1_config_from_hf(qwen2_moe(mlp_only_layers=[], decoder_sparse_step=1, qkv_bias=False))
    assert cfg.first_k_dense == 0 and not cfg.attention_bias


def test_refuses_unknown_model_type_and_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UnsupportedHFCheckpoint, match="model_type='gpt2'"):
        R1Model.from_hf(str(tmp_path))
    llama().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        R1Model.from_hf(str(tmp_path))


def test_refuses_checkpoint_tensors_it_would_ignore(tmp_path):
    from safetensors.torch import load_file, save_file
    save_tiny("llama", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedHFCheckpoint, match="o_proj.bias"):
        R1Model.from_hf(str(tmp_path))


# ---- a multimodal model starting from an imported backbone ------------------------------------------------------

def tokenizer_file(tmp_path) -> tuple[str, int]:
    from mmr1.tokenizer import R1Tokenizer
    tok = R1Tokenizer.train(["what color is the shape red blue green"] * 3, vocab_size=64, modalities=["image"])
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    return str(path), tok.vocab_size


def test_lightning_module_starts_from_hf_backbone_with_new_cross_attention(tmp_path):
    from mmr1.config import R1Config
    from mmr1.training import MMR1LightningModule
    tok_path, vocab = tokenizer_file(tmp_path)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(mixtral(vocab_size=vocab)).eval()
    hf.save_pretrained(tmp_path / "hf")
    module = MMR1LightningModule(tokenizer=tok_path, init_from_hf=str(tmp_path / "hf"),
                                 backbone=R1Config(cross_attn_layers=[1], cross_attn_heads=2, max_seq_len=48))
    backbone = module.model.backbone
    assert backbone.cfg.dim == 64 and backbone.cfg.cross_attn_layers == [1] and backbone.cfg.max_seq_len == 48
    assert module.hparams["init_from_hf"] == str(tmp_path / "hf") and module.hparams["backbone"]["dim"] == 64
    input_ids = torch.randint(0, vocab, (2, 9))
    with torch.no_grad():  # cross-attention gates start closed: the text model is exactly the checkpoint
        cross = torch.randn(2, 3, 64)
        ours = backbone.eval()(input_ids, cross_states=cross, cross_mask=torch.ones(2, 3, dtype=torch.bool)).logits
        assert (ours - hf(input_ids=input_ids).logits).abs().max().item() <= 1e-4


def test_init_from_hf_refuses_conflicting_backbone_fields_and_a_larger_tokenizer(tmp_path):
    from mmr1.config import R1Config
    from mmr1.training import MMR1LightningModule
    tok_path, vocab = tokenizer_file(tmp_path)
    transformers.LlamaForCausalLM(llama(vocab_size=vocab)).save_pretrained(tmp_path / "fits")
    with pytest.raises(ValueError, match="'dim': \\(32, 64\\)"):
        MMR1LightningModule(tokenizer=tok_path, init_from_hf=str(tmp_path / "fits"), backbone=R1Config(dim=32))
    transformers.LlamaForCausalLM(llama(vocab_size=vocab - 1)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=f"tokenizer has {vocab} ids.*vocab_size is {vocab - 1}"):
        MMR1LightningModule(tokenizer=tok_path, init_from_hf=str(tmp_path / "small"))


def test_multimodal_fit_from_hf_backbone_named_in_yaml(tmp_path):
    """`model.init_from_hf` in a training YAML: the CLI trains an image+audio model on an imported Mixtral."""
    import yaml

    from data_pipelines.synth import synthesize
    from e2e_utils import tiny_demo_config
    from mmr1.checkpoint import read_checkpoint
    from mmr1.cli import main
    from mmr1.tokenizer import R1Tokenizer

    data = tmp_path / "data"
    synthesize(data, num_train=8, num_val=4, num_test=4, text_records=2, seed=3)
    vocab = R1Tokenizer.from_file(data / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(mixtral(vocab_size=vocab)).save_pretrained(tmp_path / "hf")
    config_path = tiny_demo_config(tmp_path, data, max_steps=2)
    config = yaml.safe_load(config_path.read_text())
    # the checkpoint defines the architecture; the YAML names it and adds only the cross-attention layers
    config["model"]["init_from_hf"] = str(tmp_path / "hf")
    config["model"]["backbone"] = {"cross_attn_layers": [1, 2], "cross_attn_heads": 2, "max_seq_len": 64}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["fit", "--config", str(config_path)]) == 0
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    backbone = checkpoint["mmr1"]["config"]["backbone"]
    assert backbone["dim"] == 64 and backbone["moe"]["num_experts"] == 8 and backbone["cross_attn_layers"] == [1, 2]
