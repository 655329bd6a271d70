"""The R1 backbone: a decoder-only Transformer with GQA self-attention, (MoE) SwiGLU feed-forwards and, in
chosen layers, gated cross-attention to modality tokens (image/audio encoder outputs projected to `dim`).

    x = embed(input_ids)
    for each block i:
        if i in cross_attn_layers and modality tokens are given:  x = x + tanh(gate) * cross_attn(x, memory)
        x = x + attn(norm(x))
        x = x + ffn(norm(x))          # MoE when cfg.is_moe_layer(i), dense SwiGLU otherwise
    logits = lm_head(norm(x))
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fusion.cross_attention import GatedCrossAttention
from mmr1.attention import RotaryEmbedding, SelfAttention, attention_mask_for
from mmr1.config import R1Config
from mmr1.feedforward import SwiGLU
from mmr1.kv_cache import KVCache
from mmr1.moe import GroupedExperts, MoEAux, MoEFeedForward
from mmr1.norm import RMSNorm


@dataclass
class R1Output:
    logits: torch.Tensor  # (B, L, V)
    hidden_states: torch.Tensor | None = None  # (B, L, D) final-normed states the logits are computed from
    moe_aux: list[MoEAux] = field(default_factory=list)  # per MoE layer: its losses and routing telemetry

    @functools.cached_property
    def aux_loss(self) -> torch.Tensor:
        """() sum of the MoE layers' load-balancing losses (0 without MoE), not yet scaled by the coef; computed
        when first read, like the layers' own (MoEAux)."""
        if not self.moe_aux:
            return torch.zeros((), device=self.logits.device)
        return torch.stack([aux.aux_loss for aux in self.moe_aux]).sum()

    @property
    def tokens_per_expert(self) -> list[torch.Tensor]:
        """One (E,) count per MoE layer."""
        return [aux.tokens_per_expert for aux in self.moe_aux]


class DecoderBlock(nn.Module):
    def __init__(self, cfg: R1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cross_attn = (GatedCrossAttention(cfg.dim, cfg.cross_attn_heads, cfg.norm_eps, cfg.memory_width)
                           if layer_idx in cfg.cross_attn_layers else None)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, layer_idx, cfg.dropout, cfg.attention_bias,
                                  kind=cfg.layer_kinds()[layer_idx], window=cfg.window,
                                  local_heads=cfg.hybrid_local_heads, block_size=cfg.attention_block_size,
                                  global_tokens=cfg.global_tokens is not None, alibi=cfg.alibi_global)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg.dim, cfg.moe) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                token_mask: torch.Tensor | None, cross_states: torch.Tensor | None, cross_mask: torch.Tensor | None,
                cache: KVCache | None, key_mask: torch.Tensor | None = None,
                global_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        """x (B, L, D) -> (B, L, D), plus the MoE stats when this block's feed-forward is an MoE.
        key_mask (B, S): padding of all keys, for sliding/hybrid attention (full attention uses attn_mask);
        global_mask (B, L): the designated global tokens among the inputs (cfg.global_tokens)."""
        if self.cross_attn is not None:
            x = self._cross_attend(x, cross_states, cross_mask, cache)
        h = self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, key_mask, global_mask)
        x = x + self.resid_dropout(h)
        h = self.ffn_norm(x)
        aux = None
        if isinstance(self.ffn, MoEFeedForward):
            h, aux = self.ffn(h, token_mask)
            aux.layer_idx = self.layer_idx
        else:
            h = self.ffn(h)
        return x + self.resid_dropout(h), aux

    def _cross_attend(self, x: torch.Tensor, cross_states: torch.Tensor | None, cross_mask: torch.Tensor | None,
                      cache: KVCache | None) -> torch.Tensor:
        # In decoding the modality tokens' K/V are projected at prefill and reused from the cache afterwards.
        cached = cache.get_cross(self.layer_idx) if cache is not None else None
        if cached is not None:
            k, v, cross_mask = cached
        elif cross_states is not None:
            k, v = self.cross_attn.memory_kv(cross_states)  # (B, H, T, Dh) each
            if cache is not None:
                cache.set_cross(self.layer_idx, k, v, cross_mask)
        else:
            return x  # text-only input: nothing to attend to
        return x + self.cross_attn(x, memory_mask=cross_mask, kv=(k, v))


class R1Model(nn.Module):
    def __init__(self, cfg: R1Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # An all-sliding model never needs the dense (B, 1, L, S) mask, which would be quadratic in L.
        self.needs_dense_mask = any(kind == "full" or (kind == "hybrid" and cfg.global_tokens is None)
                                    for kind in cfg.layer_kinds())
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.init_weights()

    @classmethod
    def from_hf(cls, local_dir: str, max_seq_len: int | None = None) -> "R1Model":
        """Import a transformers Llama / Qwen2 / Mixtral / Qwen2-MoE checkpoint (config.json + safetensors) from
        a local directory, exactly, or refuse with an error naming what R1 can't express. See mmr1.hf_interop."""
        from mmr1.hf_interop import load_hf_checkpoint
        return load_hf_checkpoint(local_dir, max_seq_len=max_seq_len)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) everywhere; projections that write into the residual stream get std / sqrt(2 n_layers)
        (GPT-2) so the stream's variance doesn't grow with depth. Norms start at 1, cross-attn gates at 0."""
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w_gate, mean=0.0, std=std)
                nn.init.normal_(module.w_up, mean=0.0, std=std)
                nn.init.normal_(module.w_down, mean=0.0, std=resid_std)
            elif isinstance(module, GatedCrossAttention):
                nn.init.zeros_(module.gate)
        for block in self.layers:
            residual_outputs = [block.attn.wo.weight]
            if block.cross_attn is not None:
                residual_outputs.append(block.cross_attn.wo.weight)
            if isinstance(block.ffn, SwiGLU):
                residual_outputs.append(block.ffn.down_proj.weight)
            elif block.ffn.shared is not None:
                residual_outputs.append(block.ffn.shared.down_proj.weight)
            for weight in residual_outputs:
                nn.init.normal_(weight, mean=0.0, std=resid_std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm head counts once); optionally without the token embedding table."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to (top_k of num_experts)."""
        inactive = 0
        for block in self.layers:
            if isinstance(block.ffn, MoEFeedForward):
                moe = block.ffn.cfg
                routed = sum(p.numel() for p in block.ffn.experts.parameters())
                inactive += routed - routed * moe.top_k // moe.num_experts
        return self.num_parameters() - inactive

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cross_states: torch.Tensor | None = None,
                cross_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None) -> R1Output:
        """input_ids (B, L); attention_mask (B, L) bool, True = real token (padding may sit anywhere, e.g. left);
        position_ids (B, L), by default counted over real tokens only (cached ones included);
        cross_states (B, T, cfg.memory_width) modality tokens and cross_mask (B, T) bool for the
        cross-attention layers, skipped when absent; cache: decode incrementally, the L tokens continue what the
        cache holds; logits_at (K,) positions along L: only these get logits, (B, K, V) (an engine samples from a few
        positions of a long prefill; transformers calls it logits_to_keep).
        """
        B, L = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + L > self.cfg.max_seq_len:
            raise ValueError(f"R1Model: {start + L} positions exceed max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)

        # key_mask (B, S) covers every key this call attends to: cached ones, then these L.
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"R1Model: cache holds {cache.batch_size} sequences, input has {B}")
            new_mask = attention_mask if attention_mask is not None else input_ids.new_ones(B, L, dtype=torch.bool)
            key_mask = cache.append_mask(new_mask)
        else:
            key_mask = attention_mask
        dense = key_mask is not None and self.needs_dense_mask
        attn_mask = attention_mask_for(key_mask, L) if dense else None  # None: plain causal (or all sliding)
        if position_ids is None:
            if key_mask is None:
                position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
            else:
                position_ids = (key_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
        cos, sin = self.rope(position_ids)  # (B, 1, L, Dh)

        global_mask = None
        if self.cfg.global_tokens is not None:  # designated global tokens (BOS, modality markers)
            global_mask = torch.isin(input_ids, torch.tensor(self.cfg.global_tokens, device=input_ids.device))
        x = self.tok_embeddings(input_ids)  # (B, L, D)
        moe_aux = []
        for block in self.layers:
            x, aux = block(x, cos, sin, attn_mask, attention_mask, cross_states, cross_mask, cache, key_mask,
                           global_mask)
            if aux is not None:
                moe_aux.append(aux)
        if cache is not None:
            cache.advance(L)

        x = self.norm(x)
        logits = self.lm_head(x if logits_at is None else x[:, logits_at])  # (B, L or K, V)
        return R1Output(logits=logits, hidden_states=x, moe_aux=moe_aux)
