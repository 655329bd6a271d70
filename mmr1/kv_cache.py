"""Key/value cache for autoregressive decoding with the R1 backbone.

Holds, for one batch of requests:
- per self-attention layer, preallocated keys and values (B, n_kv_heads, max_len, head_dim);
- the key padding mask of every position written so far (left-padded prompts keep their padding masked);
- per cross-attention layer, the keys/values of the modality tokens (+ their mask), projected once per request.

A forward pass with L new tokens writes slots [length, length + L) in every layer and then calls `advance(L)`.

Protocol used by mmr1.backbone (stable; other caches such as a paged one implement the same):
    cache.length, cache.batch_size, append_mask(new_mask), update(layer, k, v), advance(n),
    get_cross(layer) / set_cross(layer, k, v, mask)
Optional additions for long context (only called for layers whose attention is "sliding" or "hybrid"):
    cache.windows[layer]               None (full layer) or the layer's window
    update_window(layer, k, v)         keep local heads' K/V in a ring of `window` slots; returns the K/V and key
                                       mask of the window context: (B, Hkv_local, kept + L, Dh) x 2, (B, kept + L)
    update_marked(layer, k, v, marked) hybrid layers with global tokens: keep the K/V of the marked (designated)
                                       tokens; returns them with their slots relative to the window context
    nbytes()                           bytes of K/V storage allocated so far
In a hybrid layer the global heads go through `update` (a full buffer with only those heads) and the local heads
through `update_window`, so decode memory grows only with the global heads and the full layers.
`storage_dtype` is the hook for compressed storage (bf16 today; INT8 with scales would plug into _store/_load).
"""
from __future__ import annotations

import torch

from mmr1.config import R1Config
from mmr1.local_attention import NO_TOKEN, marked_tokens


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, windows: list[int | None] | None = None,
                 storage_dtype: torch.dtype | None = None):
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
        self.windows = list(windows) if windows is not None else [None] * n_layers
        if len(self.windows) != n_layers or any(w is not None and w < 1 for w in self.windows):
            raise ValueError(f"KVCache: windows must hold n_layers={n_layers} entries, each None or >= 1, "
                             f"got {windows}")
        self.storage_dtype = storage_dtype  # None: store K/V in the dtype they arrive in
        # Ring buffers (B, Hkv_local, window, Dh) of the sliding layers / local heads; slot p lives at p % window.
        self.ring_keys: list[torch.Tensor | None] = [None] * n_layers
        self.ring_values: list[torch.Tensor | None] = [None] * n_layers
        # Global-token store per layer: K/V (B, Hkv_global, T, Dh) x 2 and absolute slots (B, T) (NO_TOKEN = hole).
        self.marked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @classmethod
    def for_model(cls, cfg: R1Config, batch_size: int, max_len: int | None = None,
                  device: torch.device | str | None = None, storage_dtype: torch.dtype | None = None) -> "KVCache":
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        windows = [None if kind == "full" else cfg.window for kind in cfg.layer_kinds()]
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, device, windows, storage_dtype)

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.storage_dtype is None else x.to(self.storage_dtype)

    def _load(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == like.dtype else x.to(like.dtype)

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
            # k.shape[1] heads: all KV heads of a full layer, or only the global ones of a hybrid layer.
            shape = (self.batch_size, k.shape[1], self.max_len, self.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=self._store(k).dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=self._store(v).dtype, device=v.device)
        end = self.length + L
        self.keys[layer][:, :, self.length:end] = self._store(k)
        self.values[layer][:, :, self.length:end] = self._store(v)
        return self._load(self.keys[layer][:, :, :end], k), self._load(self.values[layer][:, :, :end], v)

    def update_window(self, layer: int, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local heads of `layer`: given this step's k, v (B, Hkv_local, L, Dh), return the keys/values the L new
        queries can need -- the last min(length, window) cached slots in order, then the L new ones -- and their
        key padding mask (B, kept + L); then keep the last `window` slots in the ring. Memory: O(window)."""
        window = self.windows[layer]
        if window is None:
            raise ValueError(f"KVCache: layer {layer} is a full-attention layer; use update()")
        L = k.shape[2]
        self._check_room(L)
        if self.ring_keys[layer] is None:
            shape = (self.batch_size, k.shape[1], window, self.head_dim)
            self.ring_keys[layer] = torch.zeros(shape, dtype=self._store(k).dtype, device=k.device)
            self.ring_values[layer] = torch.zeros(shape, dtype=self._store(v).dtype, device=v.device)
        ring_k, ring_v = self.ring_keys[layer], self.ring_values[layer]
        start = self.length
        kept = min(start, window)
        past = torch.arange(start - kept, start, device=k.device) % window  # ring slots, oldest first
        keys = torch.cat([self._load(ring_k.index_select(2, past), k), k], dim=2)  # (B, Hkv_local, kept + L, Dh)
        values = torch.cat([self._load(ring_v.index_select(2, past), v), v], dim=2)
        n = min(L, window)  # only the newest `window` slots can be needed later
        slots = torch.arange(start + L - n, start + L, device=k.device) % window
        ring_k[:, :, slots] = self._store(k[:, :, L - n:])
        ring_v[:, :, slots] = self._store(v[:, :, L - n:])
        return keys, values, self.key_mask[:, start - kept:start + L]

    def update_marked(self, layer: int, k: torch.Tensor, v: torch.Tensor, marked: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global heads of a hybrid layer with global tokens: add the marked ones of this step's k, v
        (B, Hkv_global, L, Dh) (marked (B, L) bool) to the store; return all stored K/V and their slots (B, T)
        counted from the start of update_window's context (earlier ones negative; NO_TOKEN for holes)."""
        window = self.windows[layer]
        if window is None:
            raise ValueError(f"KVCache: layer {layer} is a full-attention layer; it keeps no global-token store")
        new_k, new_v, new_slots = marked_tokens(k, v, marked, first_slot=self.length)
        stored = self.marked[layer]
        if stored is None:
            stored = (self._store(new_k), self._store(new_v), new_slots)
        elif new_slots.shape[1]:  # rows with fewer marks leave NO_TOKEN holes, which attention masks out
            stored = (torch.cat([stored[0], self._store(new_k)], dim=2), torch.cat([stored[1], self._store(new_v)], 2),
                      torch.cat([stored[2], new_slots], dim=1))
        self.marked[layer] = stored
        context_start = self.length - min(self.length, window)
        slots = torch.where(stored[2] == NO_TOKEN, stored[2], stored[2] - context_start)
        return self._load(stored[0], k), self._load(stored[1], v), slots

    def nbytes(self) -> int:
        """Bytes of key/value storage allocated so far (full buffers, rings and global-token stores; the key mask
        and cross-attention K/V aside)."""
        stores = [t for entry in self.marked if entry is not None for t in entry[:2]]
        buffers = self.keys + self.values + self.ring_keys + self.ring_values + stores
        return sum(t.numel() * t.element_size() for t in buffers if t is not None)

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
        self.marked = [None] * self.n_layers
