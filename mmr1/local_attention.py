"""Sliding-window (local) causal attention in O(L * window) time and memory: blocked, no L x L mask or scores.

    out = sliding_window_attention(q, k, v, window, key_mask)

Query i (a key slot) sees keys j with i - window < j <= i that are real tokens (key_mask), and always itself (so a
padding row never softmaxes over nothing). The L queries are the LAST L of the S keys, as in
mmr1.attention.attention_mask_for: without a cache S == L; with one, the cached keys come first.

Blocking: queries are cut into blocks of b; block j attends to the keys of its own block and of the
m = ceil((window - 1) / b) blocks before it, a (m + 1) * b wide strip taken from the keys by `unfold` (a view; no
n x n anything). Every block shares one static band mask (b, (m + 1) b); only key padding varies per block.
Grouped-query heads are folded into the query rows (the G query heads of a KV head share its keys) and blocks
into SDPA's head axis, so one 4-D SDPA call (the CPU flash kernel takes the mask) computes all blocks; its
working set is (B Hkv, nb, G b, (m + 1) b) = O(L * window). Backward runs through autograd
(unfold's backward is a fold that sums the overlapping strips).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def band_mask(block: int, width: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(block, width) bool: query r of a block may see key c of its strip; the strip ends with the block itself."""
    offset = width - block  # strip column of the block's first query
    rel = torch.arange(width, device=device)[None, :] - offset - torch.arange(block, device=device)[:, None]
    return (rel <= 0) & (rel > -window)  # key slot - query slot in (-window, 0]


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_mask: torch.Tensor | None = None, block_size: int = 256,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, H, L, D); k, v (B, Hkv, S, D) with S >= L, H a multiple of Hkv; key_mask (B, S) bool (True = real
    token) or None; returns (B, H, L, D). Scaled by 1/sqrt(D) like SDPA."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if S < L or H % Hkv:
        raise ValueError(f"sliding_window_attention: need S >= L and H % Hkv == 0, got L={L}, S={S}, "
                         f"H={H}, Hkv={Hkv}")
    if window < 1:
        raise ValueError(f"sliding_window_attention: window={window} must be >= 1")
    G = H // Hkv
    b = min(max(min(block_size, window), 16), L)  # blocks much wider than the window waste work
    nb = math.ceil(L / b)
    m = math.ceil((window - 1) / b)  # earlier blocks a query block needs
    W = (m + 1) * b  # strip width
    offset = S - L  # slot of the first query
    front = max(0, m * b - offset)  # zero keys before slot 0 so that the first strip exists
    tail = nb * b - L  # zero queries/keys after the last slot to fill the last block
    start = front + offset - m * b  # first strip's first key, in the padded key sequence

    def strips(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, S, D) -> (B * Hkv, nb, W, D)
        x = F.pad(x, (0, 0, front, tail))[:, :, start:].unfold(2, W, b)  # (B, Hkv, nb, D, W), a view
        return x.transpose(-1, -2).reshape(B * Hkv, nb, W, D)

    # (B, H, L, D) -> (B * Hkv, nb, G * b, D): a KV head's G query heads become rows of the same block, and the
    # blocks take SDPA's "heads" axis, so one 4-D call (CPU flash kernel) computes every strip.
    qb = F.pad(q, (0, 0, 0, tail)).view(B, Hkv, G, nb, b, D).transpose(2, 3).reshape(B * Hkv, nb, G * b, D)

    real = key_mask if key_mask is not None else torch.ones(1, S, dtype=torch.bool, device=q.device)
    real = F.pad(real, (front, tail), value=False)[:, start:].unfold(1, W, b)  # (B or 1, nb, W)
    band = band_mask(b, W, window, q.device)  # (b, W)
    own = band & (torch.arange(W, device=q.device)[None, :] - (W - b) == torch.arange(b, device=q.device)[:, None])
    mask = band & (real[:, :, None, :] | own)  # (B or 1, nb, b, W)
    mask = mask[:, :, None].expand(-1, nb, G, b, W).reshape(-1, nb, G * b, W)
    if mask.shape[0] != 1 and Hkv != 1:  # per-sequence padding: one mask per (sequence, KV head) row
        mask = mask[:, None].expand(B, Hkv, nb, G * b, W).reshape(B * Hkv, nb, G * b, W)

    out = F.scaled_dot_product_attention(qb, strips(k), strips(v), attn_mask=mask, dropout_p=dropout_p)
    out = out.view(B, Hkv, nb, G, b, D).transpose(2, 3).reshape(B, H, nb * b, D)
    return out[:, :, :L]


def dense_sliding_mask(key_mask: torch.Tensor, query_len: int, window: int) -> torch.Tensor:
    """The same rule as a dense (B, 1, L, S) SDPA mask -- O(L * S); for short decode steps and references."""
    S = key_mask.shape[1]
    query_pos = torch.arange(S - query_len, S, device=key_mask.device)[:, None]  # (L, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    band = (key_pos <= query_pos) & (key_pos > query_pos - window)
    return (band & (key_mask[:, None, :] | (key_pos == query_pos))).unsqueeze(1)
