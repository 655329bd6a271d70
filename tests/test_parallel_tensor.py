"""Tensor parallel (mmr1.parallel.tensor) on 2 CPU processes over gloo: a tiny image+audio MultimodalR1 with
TP(2) computes the single-process loss, and the single-process gradient of every parameter (sharded ones
gathered back), for batches with different modality mixes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from distributed_spawn import run_on_ranks
from mmr1.config import MoEConfig, R1Config
from mmr1.model import MultimodalConfig, MultimodalR1
from mmr1.parallel.tensor import apply_tensor_parallel

TOL = 1e-5
TINY_VIT = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}
TINY_W2V = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "conv_dim": [16, 16], "conv_kernel": [32, 4], "conv_stride": [16, 5],
                       "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2}}


def tiny_config(n_heads: int = 4, n_kv_heads: int = 2, cross_attn_heads: int = 2) -> MultimodalConfig:
    """Dense block 0 + MoE block 1 (shared expert), cross-attention in both; MLP and resampler projectors."""
    backbone = R1Config(vocab_size=64, dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=64,
                        max_seq_len=32, cross_attn_layers=[0, 1], cross_attn_heads=cross_attn_heads,
                        attention_bias=True,
                        moe=MoEConfig(num_experts=4, num_groups=2, topk_groups=1, top_k=2, expert_hidden=16))
    return MultimodalConfig.from_dict({"backbone": backbone, "encoders": {
        "image": {"name": "clip_vit", "kwargs": TINY_VIT, "projector": {"kind": "mlp"}},
        "audio": {"name": "wav2vec2", "kwargs": TINY_W2V,
                  "projector": {"kind": "resampler", "num_latents": 4, "heads": 2}}}})


def modality_batch(model: MultimodalR1, image_rows, audio_rows, seed: int) -> dict:
    """`batch["modalities"]` with images on `image_rows` and audio on `audio_rows` (bools per row)."""
    rng = np.random.default_rng(seed)
    out = {}
    if any(image_rows):
        proc = model.encoders["image"].processor
        images = [proc(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for p in image_rows if p]
        out["image"] = {**proc.collate(images), "present": torch.tensor(image_rows)}
    if any(audio_rows):
        proc = model.encoders["audio"].processor
        waves = [proc((rng.standard_normal(3000 + 1000 * i).astype(np.float32), 16000))
                 for i, p in enumerate(audio_rows) if p]
        out["audio"] = {**proc.collate(waves), "present": torch.tensor(audio_rows)}
    return out


def lm_loss(model: MultimodalR1, ids: torch.Tensor, mask: torch.Tensor, modalities: dict) -> torch.Tensor:
    out = model(ids, attention_mask=mask, modalities=modalities)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100).reshape(-1)
    return F.cross_entropy(logits, targets) + 0.01 * out.aux_loss


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    grad = param.grad
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _tp_worker(rank: int, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"backbone.n_kv_heads=1 \(at backbone.layers.0.attn\) is not divisible "
                                         r"by the tensor-parallel size 2"):
        apply_tensor_parallel(bad := MultimodalR1(tiny_config(n_heads=2, n_kv_heads=1)), mesh)
    assert bad.backbone.layers[0].attn.n_heads == 2  # refused before changing anything
    assert not isinstance(bad.backbone.layers[0].attn.wq.weight, DTensor)

    torch.manual_seed(0)
    ref = MultimodalR1(tiny_config()).eval()  # eval: no dropout / SpecAugment, so both runs are deterministic
    with torch.no_grad():  # open the gates and give the modality embeddings a value so every path matters
        for block in ref.backbone.layers:
            block.cross_attn.gate.fill_(0.5)
        for emb in ref.modality_embeddings.values():
            emb.normal_(0, 0.02)
    tp = apply_tensor_parallel(copy.deepcopy(ref), mesh)

    attn = tp.backbone.layers[0].attn
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
    assert isinstance(attn.wq.weight, DTensor) and attn.wq.weight.to_local().shape == (16, 32)
    assert isinstance(tp.backbone.layers[1].ffn.shared.down_proj.weight, DTensor)
    assert not isinstance(tp.backbone.layers[1].ffn.experts.w_gate, DTensor)  # routed experts stay replicated
    # cross-attention's fused [k; v] projection: split over input features, each rank keeps its heads' k and v
    cross_tp, cross_ref = tp.backbone.layers[0].cross_attn, ref.backbone.layers[0].cross_attn
    assert cross_tp.wkv.weight.placements == (Shard(1),) and cross_tp.n_heads == 1
    memory = torch.randn(2, 5, 32)
    with torch.no_grad():
        (k_tp, v_tp), (k_ref, v_ref) = cross_tp.memory_kv(memory), cross_ref.memory_kv(memory)  # (B, H, T, Dh)
    assert (k_tp - k_ref[:, rank:rank + 1]).abs().max() <= TOL and (v_tp - v_ref[:, rank:rank + 1]).abs().max() <= TOL
    ref_state, tp_state = ref.state_dict(), tp.state_dict()
    assert ref_state.keys() == tp_state.keys() and all(ref_state[k].shape == tp_state[k].shape for k in ref_state)

    calls = {  # (image rows, audio rows)
        "image+audio mixed rows": ((True, False, True), (False, True, True)),
        "image only": ((True, True, False), (False, False, False)),
        "audio only": ((False, False, False), (True, True, True)),
        "text only": ((False, False, False), (False, False, False)),
    }
    for step, (name, (image_rows, audio_rows)) in enumerate(calls.items()):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 64, (3, 12), generator=gen)
        mask = torch.ones(3, 12, dtype=torch.bool)
        mask[1, :3] = False  # a left-padded row
        results = []
        for model in (ref, tp):
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model, ids, mask, modality_batch(ref, image_rows, audio_rows, seed=step))
            loss.backward()
            results.append(loss.detach())
        err = (results[0] - results[1]).abs().item()
        assert err <= TOL, f"{name}: loss {results[1].item()} vs single-process {results[0].item()} ({err:.3g})"
        tp_params = dict(tp.named_parameters())
        for pname, p_ref in ref.named_parameters():
            g_ref, g_tp = p_ref.grad, full_grad(tp_params[pname])
            if g_ref is None or g_tp is None:
                assert g_ref is None and g_tp is None, f"{name}: grad of {pname} present in only one run"
                continue
            err = (g_ref - g_tp).abs().max().item()
            assert err <= TOL, f"{name}: grad {pname} max abs error {err:.3g} > {TOL}"


@pytest.mark.slow
def test_tensor_parallel_matches_single_process():
    run_on_ranks(_tp_worker, 2)
