"""Sliding-window (local) causal attention in O(L * window) time and memory: blocked, no L x L mask or scores.

    out = sliding_window_attention(q, k, v, window, key_mask)

Query i (a key slot) sees keys j with i - window < j <= i that are real tokens (key_mask), and always itself (so a
padding row never softmaxes over nothing). The L queries are the LAST L of the S keys, as in
mmr1.attention.attention_mask_for: without a cache S == L; with one, the cached keys come first.

Blocking: queries are cut into blocks of b; block j attends to the keys of its own block and of the
m = ceil((window - 1) / b) blocks before it, a (m + 1) * b wide strip taken from the keys by `unfold` (a view; no
n x n anything). Every block shares one static band mask (b, (m + 1) b); only key padding varies per block.
Grouped-query heads are folded into the query rows (the G query heads of a KV head share its keys) and blocks
into SDPA's head axis, so a 4-D SDPA call (the CPU flash kernel takes the mask) computes many blocks at once, over
strided views of the keys (no copies away from the sequence ends); blocks go CALL_ROWS query rows per call, so
inference temporaries stay bounded. Work is (L, (m + 1) b) = O(L * window). Backward runs through autograd
(unfold's backward is a fold that sums the overlapping strips).

On CUDA the same rule runs as a FlexAttention block mask (torch.nn.attention.flex_attention, compiled once):
fully masked key blocks are skipped, so work is O(L * window) there too. MMR1_FLEX_ATTENTION (or FLEX_ATTENTION
below) = "auto" (CUDA only, the default) / "on" (anywhere; on CPU FlexAttention runs eagerly, exact but dense) / "off".
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from mmr1.sdpa import sdpa


def band_mask(block: int, width: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(block, width) bool: query r of a block may see key c of its strip; the strip ends with the block itself."""
    offset = width - block  # strip column of the block's first query
    rel = torch.arange(width, device=device)[None, :] - offset - torch.arange(block, device=device)[:, None]
    return (rel <= 0) & (rel > -window)  # key slot - query slot in (-window, 0]


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_mask: torch.Tensor | None = None, block_size: int = 256, dropout_p: float = 0.0,
                             extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (B, H, L, D); k, v (B, Hkv, S, D) with S >= L, H a multiple of Hkv; key_mask (B, S) bool (True = real
    token) or None; returns (B, H, L, D). Scaled by 1/sqrt(D) like SDPA.

    extra = (k_g, v_g, slots): designated global tokens (B, Hkv, T, D) x 2 and their slots (B, T) in the same
    numbering as k (may be negative: evicted from k, still earlier; NO_TOKEN = empty entry). A query additionally sees
    those with slot <= its slot - window (the ones inside its window it already sees): O(L * (window + T)).
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if S < L or H % Hkv:
        raise ValueError(f"sliding_window_attention: need S >= L and H % Hkv == 0, got L={L}, S={S}, "
                         f"H={H}, Hkv={Hkv}")
    if window < 1:
        raise ValueError(f"sliding_window_attention: window={window} must be >= 1")
    decode = L <= 16 and S <= window + L
    if _flex_wanted(q, dropout_p, decode):
        return flex_sliding_attention(q, k, v, window, key_mask, extra)
    if decode or L * S <= DENSE_MAX_SCORES:
        # Decode steps and short sequences (e.g. 64-token training rows): one small dense mask is cheaper than
        # blocking; the blocked path pays off once the (L, S) scores outgrow a few windows.
        return _dense_sliding(q, k, v, window, key_mask, dropout_p, extra)
    G = H // Hkv
    b = min(max(min(block_size, window), 16), L)  # blocks much wider than the window waste work
    nb = math.ceil(L / b)
    m = math.ceil((window - 1) / b)  # earlier blocks a query block needs
    W = (m + 1) * b  # strip width
    band = band_mask(b, W, window, q.device)  # (b, W)
    own = band & (torch.arange(W, device=q.device)[None, :] - (W - b) == torch.arange(b, device=q.device)[:, None])
    real = key_mask if key_mask is not None else torch.ones(1, S, dtype=torch.bool, device=q.device)
    geometry = (b, m, W, G, window, band, own)
    # A few thousand query rows per SDPA call: the temporaries of one call stay bounded however long L is.
    per_call = max(1, CALL_ROWS // (G * b))
    outs = [_blocks(q, k, v, real, c0, min(nb, c0 + per_call), geometry, dropout_p, extra)
            for c0 in range(0, nb, per_call)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


CALL_ROWS = 4096  # query rows (blocks x G x b) per SDPA call
DENSE_MAX_SCORES = 128 * 128  # L * S up to this: a dense masked SDPA call instead of blocks


def _blocks(q, k, v, real, c0: int, c1: int, geometry, dropout_p: float, extra) -> torch.Tensor:
    """Query blocks [c0, c1) -> their output (B, H, <= (c1 - c0) b, D)."""
    b, m, W, G, window, band, own = geometry
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    nc = c1 - c0
    q_lo, q_hi = c0 * b, min(c1 * b, L)
    qc = q[:, :, q_lo:q_hi]
    if q_hi - q_lo < nc * b:  # the last block is partial: zero queries fill it (cut off below)
        qc = F.pad(qc, (0, 0, 0, nc * b - (q_hi - q_lo)))
    # (B, H, nc b, D) -> (B Hkv, nc, G b, D): a KV head's G query heads become rows of the same block, and the
    # blocks take SDPA's "heads" axis, so one 4-D call (CPU flash kernel) computes every strip.
    qb = qc.reshape(B, Hkv, G, nc, b, D).transpose(2, 3).reshape(B * Hkv, nc, G * b, D)

    offset = S - L  # slot of the first query
    k_lo, k_hi = offset + q_lo - m * b, offset + c1 * b  # keys of the strips; zeros stand in outside [0, S)
    lo, hi = max(k_lo, 0), min(k_hi, S)
    pads = (lo - k_lo, k_hi - hi)

    def strips(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, S, D) -> (B Hkv, nc, W, D), a view inside [0, S)
        x = x[:, :, lo:hi]
        if any(pads):
            x = F.pad(x, (0, 0, *pads))
        return x.unfold(2, W, b).transpose(-1, -2).reshape(B * Hkv, nc, W, D)

    rc = real[:, lo:hi]
    if any(pads):
        rc = F.pad(rc, pads, value=False)
    rc = rc.unfold(1, W, b)  # (B or 1, nc, W)
    mask = band & (rc[:, :, None, :] | own)  # (B or 1, nc, b, W)
    mask = mask[:, :, None].expand(-1, nc, G, b, W).reshape(-1, nc, G * b, W)
    if mask.shape[0] != 1 and Hkv != 1:  # per-sequence padding: one mask per (sequence, KV head) row
        mask = mask[:, None].expand(B, Hkv, nc, G * b, W).reshape(B * Hkv, nc, G * b, W)

    k_strips, v_strips = strips(k), strips(v)
    if extra is not None:
        k_strips, v_strips, mask = _with_global_tokens(k_strips, v_strips, mask, extra, offset + q_lo, window, b, G)
    out = sdpa(qb, k_strips, v_strips, attn_mask=mask, dropout_p=dropout_p)
    out = out.view(B, Hkv, nc, G, b, D).transpose(2, 3).reshape(B, H, nc * b, D)
    return out[:, :, :q_hi - q_lo]


def _dense_sliding(q, k, v, window, key_mask, dropout_p, extra) -> torch.Tensor:
    """The same attention with a dense (B, 1, L, S [+ T]) mask; for a few queries over a window-sized context."""
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    real = key_mask if key_mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
    mask = dense_sliding_mask(real, L, window)  # (B, 1, L, S)
    if extra is not None:
        k_g, v_g, slots = extra
        query_slot = torch.arange(S - L, S, device=q.device)
        seen = slots[:, None, None, :] <= (query_slot - window)[None, None, :, None]  # (B, 1, L, T)
        k, v, mask = torch.cat([k, k_g], dim=2), torch.cat([v, v_g], dim=2), torch.cat([mask, seen], dim=-1)
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)


def _with_global_tokens(k_strips: torch.Tensor, v_strips: torch.Tensor, mask: torch.Tensor,
                        extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor], first_query: int, window: int, b: int,
                        G: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the T global keys to every strip: (B Hkv, nb, W + T, D), mask (B Hkv or 1, nb, G b, W + T)."""
    k_g, v_g, slots = extra  # (B, Hkv, T, D) x 2, (B, T)
    B, Hkv, T, D = k_g.shape
    N, nb = k_strips.shape[:2]
    query_slot = first_query + torch.arange(nb * b, device=slots.device).view(nb, b)  # (nb, b)
    seen = slots[:, None, None, :] <= (query_slot - window)[None, :, :, None]  # (B, nb, b, T)
    seen = seen[:, :, None].expand(B, nb, G, b, T).reshape(B, 1, nb, G * b, T).expand(B, Hkv, nb, G * b, T)
    mask = mask.view(-1, Hkv if mask.shape[0] == N else 1, nb, G * b, mask.shape[-1]).expand(B, Hkv, -1, -1, -1)
    mask = torch.cat([mask, seen], dim=-1).reshape(N, nb, G * b, -1)
    k_strips = torch.cat([k_strips, k_g.reshape(N, 1, T, D).expand(N, nb, T, D)], dim=2)
    v_strips = torch.cat([v_strips, v_g.reshape(N, 1, T, D).expand(N, nb, T, D)], dim=2)
    return k_strips, v_strips, mask


NO_TOKEN = 2 ** 40  # slot of an empty global-token entry: after every query, so no query ever sees it


def marked_tokens(k: torch.Tensor, v: torch.Tensor, marked: torch.Tensor, first_slot: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K/V of the marked tokens (B, L) bool, left-aligned per row: (B, Hkv, T, D) x 2 and slots (B, T) =
    first_slot + position, with T the most marks in a row; unused entries get slot NO_TOKEN."""
    B, L = marked.shape
    T = int(marked.sum(dim=1).max()) if marked.numel() else 0
    order = torch.argsort((~marked).to(torch.int8), dim=1, stable=True)[:, :T]  # marked positions first, in order
    valid = torch.gather(marked, 1, order)  # (B, T)
    slots = torch.where(valid, order + first_slot, torch.full_like(order, NO_TOKEN))
    index = order[:, None, :, None].expand(B, k.shape[1], T, k.shape[-1])
    return torch.gather(k, 2, index), torch.gather(v, 2, index), slots


def dense_sliding_mask(key_mask: torch.Tensor, query_len: int, window: int) -> torch.Tensor:
    """The same rule as a dense (B, 1, L, S) SDPA mask -- O(L * S); for short decode steps and references."""
    S = key_mask.shape[1]
    query_pos = torch.arange(S - query_len, S, device=key_mask.device)[:, None]  # (L, 1)
    key_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    band = (key_pos <= query_pos) & (key_pos > query_pos - window)
    return (band & (key_mask[:, None, :] | (key_pos == query_pos))).unsqueeze(1)


# ---- FlexAttention (CUDA by default) -----------------------------------------------------------------------------

FLEX_ATTENTION = os.environ.get("MMR1_FLEX_ATTENTION", "auto")  # "auto" | "on" | "off"
_FLEX: dict = {}  # device type -> flex_attention (compiled on CUDA), filled on first use
_BLOCK_MASKS: dict = {}  # one block mask per (shape, window, device) for unpadded inputs; the last padded one


def _flex_wanted(q: torch.Tensor, dropout_p: float, decode: bool) -> bool:
    """Whether this call runs on FlexAttention: "auto" -> CUDA prefill/training (decode steps stay dense: a
    window-sized step gains nothing from a block mask and would recompile per length); "on" -> always."""
    mode = FLEX_ATTENTION
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"MMR1_FLEX_ATTENTION={mode!r}: expected 'auto', 'on' or 'off'")
    if mode == "off" or dropout_p > 0:  # FlexAttention has no dropout; the blocked kernel does
        return False
    if mode == "auto" and (not q.is_cuda or decode):
        return False
    if _flex_module() is None:
        if mode == "on":
            raise RuntimeError("MMR1_FLEX_ATTENTION=on but torch.nn.attention.flex_attention is not importable")
        return False
    return True


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:
        return None
    return fa


def _flex_fn(device: torch.device):
    """flex_attention, compiled once per process on CUDA (its fused kernel); eager elsewhere (exact, dense)."""
    if device.type not in _FLEX:
        fn = _flex_module().flex_attention
        _FLEX[device.type] = torch.compile(fn) if device.type == "cuda" else fn
    return _FLEX[device.type]


def sliding_mask_mod(L: int, S: int, window: int, key_mask: torch.Tensor | None, slots: torch.Tensor | None):
    """mask_mod(b, h, q_idx, kv_idx) for the rule of sliding_window_attention over S keys [+ T global keys after
    them, with slots (B, T)]: the query at slot S - L + q_idx sees kv_idx in its window if real (or itself), and
    global key S + t if slots[b, t] <= its slot - window."""
    offset = S - L

    def mask_mod(b, h, q_idx, kv_idx):
        q_slot = q_idx + offset
        seen = (kv_idx <= q_slot) & (kv_idx > q_slot - window)
        if key_mask is not None:  # clamp: global columns (kv_idx >= S) index past the key mask
            seen = seen & (key_mask[b, kv_idx.clamp(max=S - 1)] | (kv_idx == q_slot))
        if slots is None:
            return seen
        t = (kv_idx - S).clamp(min=0, max=slots.shape[1] - 1)
        return torch.where(kv_idx >= S, slots[b, t] <= q_slot - window, seen)

    return mask_mod


def sliding_block_mask(B: int, L: int, S: int, window: int, key_mask: torch.Tensor | None,
                       slots: torch.Tensor | None, device: torch.device):
    """The BlockMask of sliding_mask_mod. Unpadded ones are cached by shape; a padded one is reused while the
    same key_mask / slots tensors come back unchanged (every layer of one forward passes the same key mask)."""
    fa = _flex_module()
    T = 0 if slots is None else slots.shape[1]
    if key_mask is None and slots is None:
        key = (L, S, window, str(device))
        if key not in _BLOCK_MASKS:
            _BLOCK_MASKS[key] = fa.create_block_mask(sliding_mask_mod(L, S, window, None, None), None, None, L, S,
                                                     device=device, _compile=device.type == "cuda")
        return _BLOCK_MASKS[key]
    tensors = tuple(x for x in (key_mask, slots) if x is not None)
    stamp = (B, L, S, T, window, str(device), tuple(x._version for x in tensors))
    last = _BLOCK_MASKS.get("padded")
    if last is not None and last[1] == stamp and all(a is b for a, b in zip(last[0], tensors)):
        return last[2]
    block_mask = fa.create_block_mask(sliding_mask_mod(L, S, window, key_mask, slots), B, None, L, S + T,
                                      device=device, _compile=device.type == "cuda")
    _BLOCK_MASKS["padded"] = (tensors, stamp, block_mask)  # holds the tensors: no id is reused while cached
    return block_mask


def flex_sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                           key_mask: torch.Tensor | None = None,
                           extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sliding_window_attention (same arguments, no dropout) through FlexAttention -> (B, H, L, D)."""
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    slots = None
    if extra is not None:  # the global tokens become T more key columns after the S window keys
        k_g, v_g, slots = extra
        k, v = torch.cat([k, k_g], dim=2), torch.cat([v, v_g], dim=2)  # (B, Hkv, S + T, D)
    if key_mask is not None and key_mask.shape[0] != B:
        key_mask = key_mask.expand(B, S)
    block_mask = sliding_block_mask(B, L, S, window, key_mask, slots, q.device)
    return _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=True)
