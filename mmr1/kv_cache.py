"""Key/value cache for autoregressive decoding with the R1 backbone.

Holds, for one batch of requests:
- per self-attention layer, preallocated keys and values (B, n_kv_heads, max_len, head_dim);
- the key padding mask of every position written so far (left-padded prompts keep their padding masked);
- per cross-attention layer, the keys/values of the modality tokens (+ their mask), projected once per request.

A forward pass with L new tokens writes slots [length, length + L) in every layer and then calls `advance(L)`.
"""
from __future__ import annotations

import torch

from mmr1.config import R1Config


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None):
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # K/V buffers are allocated on a layer's first write, in the dtype its keys arrive in (autocast-safe).
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)  # True = real token
        self.length = 0
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def for_model(cls, cfg: R1Config, batch_size: int, max_len: int | None = None,
                  device: torch.device | str | None = None) -> "KVCache":
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, device)

    def _check_room(self, new_len: int) -> None:
        if self.length + new_len > self.max_len:
            raise ValueError(f"KVCache: writing {new_len} tokens at position {self.length} "
                             f"overflows max_len={self.max_len}")

    def append_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the key padding mask (B, L) of the incoming tokens; return the mask of all keys (B, length + L)."""
        L = new_mask.shape[1]
        self._check_room(L)
        self.key_mask[:, self.length:self.length + L] = new_mask
        return self.key_mask[:, :self.length + L]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, Hkv, L, Dh) for `layer`; return all so far, (B, Hkv, length + L, Dh) each."""
        L = k.shape[2]
        self._check_room(L)
        if self.keys[layer] is None:
            shape = (self.batch_size, self.n_kv_heads, self.max_len, self.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + L
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward pass, after every layer has written its n new positions."""
        self._check_room(n)
        self.length += n

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Keep a cross-attention layer's memory keys/values (B, H, T, Dh) and mask (B, T) for the whole request."""
        self.cross_kv[layer] = (k, v, mask)

    def get_cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        return self.cross_kv.get(layer)

    def reset(self) -> None:
        """Reuse the buffers for a new request of the same batch size."""
        self.length = 0
        self.key_mask.zero_()
        self.cross_kv.clear()
