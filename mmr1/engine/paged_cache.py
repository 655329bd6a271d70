"""Paged KV cache: per layer a pool of fixed-size blocks, and a per-forward batch view that speaks the cache
protocol of `R1Model.forward` (`length`, `batch_size`, `append_mask`, `update`, `advance`, `get_cross`).

Pool layout per layer: keys/values (num_blocks, block_size, Hkv, Dh) in the model dtype, or int8 with one
scale per (token, head) (quantize on write, dequantize when gathered for attention).

A batch view lays each row's keys out as
    [ its cached tokens, left-aligned in the first C = max cached slots | its n new tokens in the next L slots ]
with a key mask marking the real ones, so the backbone's causal + key-padding mask is right for every row even
though rows hold different numbers of cached tokens. Positions come in explicitly (each row's own offsets).
"""
from __future__ import annotations

import torch

from mmr1.config import R1Config


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., Dh) -> int8 (..., Dh) and fp32 scale (...,): symmetric, one scale per vector."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


class PagedKVPool:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "model",
                 device: torch.device | str = "cpu"):
        if kv_cache_dtype not in ("model", "int8"):
            raise ValueError(f"PagedKVPool: kv_cache_dtype must be 'model' or 'int8', got {kv_cache_dtype!r}")
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.quantized = kv_cache_dtype == "int8"
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        store = torch.int8 if self.quantized else dtype
        self.keys = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        if self.quantized:
            self.key_scales = [torch.zeros(shape[:3], device=device) for _ in range(n_layers)]
            self.value_scales = [torch.zeros(shape[:3], device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, cfg: R1Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                  kv_cache_dtype: str = "model", device: torch.device | str = "cpu") -> "PagedKVPool":
        return cls(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, dtype, kv_cache_dtype, device)

    def bytes_per_token(self) -> int:
        """K + V bytes one token occupies across all layers (int8: values + fp32 scales)."""
        per_head = self.head_dim * (1 if self.quantized else torch.empty((), dtype=self.dtype).element_size())
        if self.quantized:
            per_head += 4
        return 2 * self.n_layers * self.n_kv_heads * per_head

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What attention will read back for x once stored: x itself, or its int8 quantize/dequantize."""
        return dequantize_int8(*quantize_int8(x), x.dtype) if self.quantized else x

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, Hkv, Dh) at flat slots (N,) = block * block_size + offset."""
        flat = (-1, self.n_kv_heads, self.head_dim)
        if self.quantized:
            for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
                q, s = quantize_int8(x)
                store[layer].view(flat).index_copy_(0, slots, q)
                scales[layer].view(-1, self.n_kv_heads).index_copy_(0, slots, s)
        else:
            self.keys[layer].view(flat).index_copy_(0, slots, k.to(self.dtype))
            self.values[layer].view(flat).index_copy_(0, slots, v.to(self.dtype))

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables (B, nb) -> keys, values (B, Hkv, length, Dh) of each row's first `length` slots."""
        B = tables.shape[0]
        out = []
        for i, store in enumerate((self.keys, self.values)):
            x = store[layer][tables].view(B, -1, self.n_kv_heads, self.head_dim)[:, :length]  # (B, S, Hkv, Dh)
            if self.quantized:
                scales = (self.key_scales, self.value_scales)[i][layer][tables].view(B, -1, self.n_kv_heads)
                x = dequantize_int8(x, scales[:, :length], self.dtype)
            out.append(x.transpose(1, 2))
        return out[0], out[1]


class PagedBatch:
    """One forward's view of the pool: row i has `cached[i]` tokens in its blocks and feeds `new[i]` tokens
    (right-padded to L = max new). Cross-attention K/V come from each row's own per-request store."""

    def __init__(self, pool: PagedKVPool, block_tables: list[list[int]], cached: list[int], new: list[int],
                 cross: list[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
                 device: torch.device | str = "cpu"):
        self.pool = pool
        self.batch_size = len(block_tables)
        self.cached_len = max(cached)  # C
        self.new_len = max(new)  # L
        bs = pool.block_size
        width = max(1, max(len(t) for t in block_tables))
        tables = torch.zeros(self.batch_size, width, dtype=torch.long)  # padding points at block 0, masked anyway
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        self.tables = tables.to(device)
        cached_t = torch.tensor(cached, device=device)
        new_t = torch.tensor(new, device=device)
        slot = torch.arange(max(self.cached_len, 1), device=device)
        self.cached_mask = slot[None, : self.cached_len] < cached_t[:, None]  # (B, C)
        self.new_mask = torch.arange(self.new_len, device=device)[None, :] < new_t[:, None]  # (B, L)
        # Flat pool slots of the real new tokens, row-major like k.transpose(1, 2)[new_mask].
        pos = cached_t[:, None] + torch.arange(self.new_len, device=device)[None, :]  # (B, L)
        pos = pos[self.new_mask]
        rows = torch.arange(self.batch_size, device=device)[:, None].expand(-1, self.new_len)[self.new_mask]
        self.slots = self.tables[rows, pos // bs] * bs + pos % bs  # (N,)
        # The protocol's `length`: R1Model checks length + L <= max_seq_len; every row's real extent is
        # cached + new <= max(cached + new), which is what this makes it check.
        self.length = max(c + n for c, n in zip(cached, new)) - self.new_len
        self._cross = cross or [None] * self.batch_size
        self._cross_batched: dict[int, tuple | None] = {}

    def position_ids(self, max_pos: int) -> torch.Tensor:
        """(B, L): row i's new tokens sit at positions cached[i], cached[i] + 1, ...; padding is clamped to
        max_pos (it is masked, but must still index the RoPE table)."""
        pos = self.cached_mask.sum(dim=1, keepdim=True) + torch.arange(self.new_len, device=self.tables.device)
        return pos.clamp(max=max_pos)

    def append_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """new_mask (B, L) -> key mask of all C + L keys of this forward."""
        return torch.cat([self.cached_mask, new_mask.to(torch.bool)], dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the real ones of k, v (B, Hkv, L, Dh) into the pool; return cached + new (B, Hkv, C + L, Dh)."""
        real = self.new_mask
        self.pool.write(layer, self.slots, k.transpose(1, 2)[real], v.transpose(1, 2)[real])
        k_new, v_new = self.pool.roundtrip(k), self.pool.roundtrip(v)
        if self.cached_len == 0:
            return k_new, v_new
        k_old, v_old = self.pool.gather(layer, self.tables, self.cached_len)
        return torch.cat([k_old.to(k.dtype), k_new], dim=2), torch.cat([v_old.to(v.dtype), v_new], dim=2)

    def advance(self, n: int) -> None:
        """Lengths live with the sequences (the engine advances them after the forward), not in the view."""

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        raise RuntimeError("PagedBatch: cross-attention K/V are computed at admission, not inside the forward")

    def get_cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Stack the rows' modality K/V for `layer`: (B, H, T, Dh) padded to the longest, mask (B, T); None when no
        row has any (then the layer leaves the hidden states untouched, as for text-only input)."""
        if layer in self._cross_batched:
            return self._cross_batched[layer]
        per_row = [c.get(layer) if c else None for c in self._cross]
        present = [kv for kv in per_row if kv is not None]
        result = None
        if present:
            H, _, Dh = present[0][0].shape[1:]
            T = max(kv[0].shape[2] for kv in present)
            ref = present[0][0]
            k = ref.new_zeros(self.batch_size, H, T, Dh)
            v = ref.new_zeros(self.batch_size, H, T, Dh)
            mask = torch.zeros(self.batch_size, T, dtype=torch.bool, device=ref.device)
            for i, kv in enumerate(per_row):
                if kv is not None:
                    t = kv[0].shape[2]
                    k[i, :, :t], v[i, :, :t], mask[i, :t] = kv[0][0], kv[1][0], True
            result = (k, v, mask)
        self._cross_batched[layer] = result
        return result
