"""Paged KV cache: per layer a pool of fixed-size blocks, and a per-forward batch view that speaks the cache
protocol of `R1Model.forward` (`length`, `batch_size`, `append_mask`, `update`, `advance`, `get_cross`).

Pool layout per layer: keys/values (num_blocks, block_size, Hkv, Dh) in the model dtype, or int8 with one
fp16 scale per (token, head) (quantize on write, dequantize when gathered for attention).

A batch view lays each row's keys out as
    [ its cached tokens, right-aligned (left-padded) in the first C = max cached slots | its n new tokens next ]
with a key mask marking the real ones, so the backbone's causal + key-padding mask is right for every row even
though rows hold different numbers of cached tokens, and -- because a row's last cached token sits right before
its first new one -- key-slot distance equals position distance for every real key/query pair. That is what
sliding-window heads (and ALiBi) measure, so `update_window` serves sliding/hybrid layers from the same layout:
it returns only the last min(C, window) cached slots. The pool keeps every position of those layers (the ring
buffer saving is the contiguous KVCache's job). Positions come in explicitly (each row's own offsets).
"""
from __future__ import annotations

import torch

from mmr1.config import R1Config


SCALE_DTYPE = torch.float16  # 2 bytes per (token, head): int8 K/V at head_dim 64 is 66/128 of bf16's bytes


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., Dh) -> int8 (..., Dh) and fp16 scale (...,): symmetric, one scale per vector. The scale is rounded
    to fp16 first and the values quantized against that rounded scale, so |dequantized - x| <= scale / 2."""
    scale = (x.float().abs().amax(dim=-1) / 127.0).clamp(1e-7, 65504.0).to(SCALE_DTYPE)  # fp16's range
    q = torch.round(x.float() / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


class PagedKVPool:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "model",
                 device: torch.device | str = "cpu", windows: list[int | None] | None = None):
        if kv_cache_dtype not in ("model", "int8"):
            raise ValueError(f"PagedKVPool: kv_cache_dtype must be 'model' or 'int8', got {kv_cache_dtype!r}")
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.quantized = kv_cache_dtype == "int8"
        self.windows = list(windows) if windows is not None else [None] * n_layers  # None: full layer
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        store = torch.int8 if self.quantized else dtype
        self.keys = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        if self.quantized:
            self.key_scales = [torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device) for _ in range(n_layers)]
            self.value_scales = [torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, cfg: R1Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                  kv_cache_dtype: str = "model", device: torch.device | str = "cpu") -> "PagedKVPool":
        if cfg.global_tokens is not None:
            raise ValueError("PagedKVPool: hybrid attention with global_tokens is not supported by the paged cache "
                             "(R1Config.global_tokens must be None); use mmr1.generation.generate")
        windows = [None if kind == "full" else cfg.window for kind in cfg.layer_kinds()]
        return cls(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, dtype, kv_cache_dtype, device,
                   windows)

    def bytes_per_token(self) -> int:
        """K + V bytes one token occupies across all layers (int8: values + one fp16 scale per head)."""
        per_head = self.head_dim * (1 if self.quantized else torch.empty((), dtype=self.dtype).element_size())
        if self.quantized:
            per_head += torch.empty((), dtype=SCALE_DTYPE).element_size()
        return 2 * self.n_layers * self.n_kv_heads * per_head

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What attention will read back for x once stored: x itself, or its int8 quantize/dequantize."""
        return dequantize_int8(*quantize_int8(x), x.dtype) if self.quantized else x

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: slice = slice(None)
              ) -> None:
        """Store k, v (N, h, Dh) at flat slots (N,) = block * block_size + offset, KV heads `heads` (hybrid layers
        write their local and global heads separately)."""
        flat = (-1, self.n_kv_heads, self.head_dim)
        if self.quantized:
            for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
                q, s = quantize_int8(x)
                store[layer].view(flat)[slots, heads] = q
                scales[layer].view(-1, self.n_kv_heads)[slots, heads] = s.to(scales[layer].dtype)
        else:
            self.keys[layer].view(flat)[slots, heads] = k.to(self.dtype)
            self.values[layer].view(flat)[slots, heads] = v.to(self.dtype)

    def gather(self, layer: int, slots: torch.Tensor, heads: slice = slice(None)
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slots (B, S) -> keys, values (B, h, S, Dh) of KV heads `heads`. index_select on the flat token
        axis (about 2x faster on CPU than advanced indexing); a head subset is sliced off afterwards."""
        B, S = slots.shape
        flat_slots = slots.reshape(-1)
        out = []
        for i, store in enumerate((self.keys, self.values)):
            x = store[layer].view(-1, self.n_kv_heads, self.head_dim).index_select(0, flat_slots)
            x = x.view(B, S, self.n_kv_heads, self.head_dim)[:, :, heads]  # (B, S, h, Dh)
            if self.quantized:
                scales = (self.key_scales, self.value_scales)[i][layer].view(-1, self.n_kv_heads)
                x = dequantize_int8(x, scales.index_select(0, flat_slots).view(B, S, -1)[:, :, heads], self.dtype)
            out.append(x.transpose(1, 2))
        return out[0], out[1]


def block_table_tensor(block_tables: list[list[int]]) -> torch.Tensor:
    """Rows' block tables -> (B, max blocks) long; short rows are padded with block 0 (their masks hide it)."""
    width = max(1, max(len(t) for t in block_tables))
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # one call


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
        self.tables = block_table_tensor(block_tables).to(device)
        cached_t = torch.tensor(cached, device=device)
        new_t = torch.tensor(new, device=device)
        C = self.cached_len
        # Left-padded cached layout: slot s of row i holds position s - (C - cached[i]) (negative = padding).
        held = torch.arange(C, device=device)[None, :] - (C - cached_t[:, None])  # (B, C)
        self.cached_mask = held >= 0
        held = held.clamp(min=0)  # padding reads position 0 of its own row (masked anyway)
        self.cached_slots = self.tables.gather(1, held // bs) * bs + held % bs  # (B, C) flat pool slots
        self.new_mask = torch.arange(self.new_len, device=device)[None, :] < new_t[:, None]  # (B, L)
        # Flat pool slots of the real new tokens, row-major like k.transpose(1, 2)[new_mask].
        pos = cached_t[:, None] + torch.arange(self.new_len, device=device)[None, :]  # (B, L)
        pos = pos[self.new_mask]
        rows = torch.arange(self.batch_size, device=device)[:, None].expand(-1, self.new_len)[self.new_mask]
        self.slots = self.tables[rows, pos // bs] * bs + pos % bs  # (N,)
        # The same slots laid out (B, L); padding reads slot 0 (finite, masked).
        pos = torch.where(self.new_mask, cached_t[:, None] + torch.arange(self.new_len, device=device)[None, :], 0)
        self.new_slots = torch.where(self.new_mask, self.tables.gather(1, pos // bs) * bs + pos % bs, 0)
        self._read_slots: dict[int, torch.Tensor] = {}
        self.windows = pool.windows
        self._new_key_mask = self.new_mask  # append_mask() replaces it with the backbone's own mask
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
        self._new_key_mask = new_mask.to(torch.bool)
        return torch.cat([self.cached_mask, self._new_key_mask], dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the real ones of k, v (B, h, L, Dh) into the pool; return cached + new (B, h, C + L, Dh).
        h < n_kv_heads: a hybrid layer's global heads, the last h KV heads (the local ones come first)."""
        heads = slice(self.pool.n_kv_heads - k.shape[1], None)
        return self._write_and_read(layer, k, v, heads, self.cached_len)

    def update_window(self, layer: int, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sliding heads (the first h KV heads) of a sliding/hybrid layer: write k, v (B, h, L, Dh); return the last
        kept = min(C, window) cached slots + the L new ones (B, h, kept + L, Dh) x 2 and their key mask."""
        window = self.windows[layer]
        if window is None:
            raise ValueError(f"PagedBatch: layer {layer} is a full-attention layer; use update()")
        kept = min(self.cached_len, window)
        keys, values = self._write_and_read(layer, k, v, slice(0, k.shape[1]), kept)
        mask = torch.cat([self.cached_mask[:, self.cached_len - kept:], self._new_key_mask], dim=1)
        return keys, values, mask

    def update_marked(self, layer: int, k: torch.Tensor, v: torch.Tensor, marked: torch.Tensor):
        raise NotImplementedError("PagedBatch: global-token hybrid attention is not supported by the paged cache")

    def _write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor, heads: slice, kept: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens, then read the last `kept` cached + the new ones back in ONE gather: (B, h,
        kept + L, Dh). Reading the new ones from the pool is what attention must see anyway (exact in the model
        dtype, the int8 round trip otherwise) and saves a concatenation of the whole context per layer."""
        real = self.new_mask
        self.pool.write(layer, self.slots, k.transpose(1, 2)[real], v.transpose(1, 2)[real], heads)
        if kept == 0:
            return self.pool.roundtrip(k), self.pool.roundtrip(v)
        slots = self._read_slots.get(kept)
        if slots is None:
            slots = self._read_slots[kept] = torch.cat([self.cached_slots[:, self.cached_len - kept:],
                                                        self.new_slots], dim=1)  # (B, kept + L)
        keys, values = self.pool.gather(layer, slots, heads)
        return keys.to(k.dtype), values.to(v.dtype)

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
