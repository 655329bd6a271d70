"""Packed forwards: every scheduled row's new tokens in ONE sequence (1, N), as vLLM flattens its batches.

The token-wise work -- embeddings, projections, MLP/MoE, the output head -- runs once over all N tokens, so a
step that decodes 15 rows and prefills a 40-token chunk reads the weights once instead of once per group, and no
row is padded to another's length. Only attention needs rows, and the view does it itself (`attend`): decoding
rows (one new token) read their keys in place through the CPU loop of mmr1/engine/decode_attention.py where it
runs; other short rows (speculative verification, short prompt chunks, and decoding rows elsewhere) are batched in
a few SDPA calls with their queries padded (`short_row_groups`), each long row (a prefill chunk) runs on its own;
K/V are written to and read from the paged pool as in `PagedBatch`.

Used for models whose self-attention layers are all full causal without ALiBi (the engine falls back to padded
groups otherwise). Cross-attention K/V of the rows are concatenated with a per-query mask, so image/audio rows
pack with text rows.
"""
from __future__ import annotations

import itertools

import torch

from mmr1.backbone import R1Model
from mmr1.engine import decode_attention
from mmr1.engine.paged_cache import PagedKVPool, block_table_tensor
from mmr1.sdpa import sdpa

SHORT_ROW = 16  # rows feeding at most this many tokens share padded attention calls
# What one attention call costs beside its keys, in key-rows of a one-token row (two index_selects of the pool, the
# SDPA call, the scatter back): about 40 us against 0.25-0.4 us per key-row on this CPU (bf16, 16 heads of 64).
CALL_COST = 150


def packable(model: R1Model) -> bool:
    """Whether `model` can run packed forwards: every self-attention layer full causal without ALiBi, and a
    backbone that has not opted out (`packed_forward = False`, e.g. a test stub whose forward reads cache.update)."""
    cfg = model.cfg
    return (all(kind == "full" for kind in cfg.layer_kinds()) and not cfg.alibi_global and cfg.global_tokens is None
            and getattr(model, "packed_forward", True))


def query_factor(queries: int) -> float:
    """Cost of a key-row whose row runs `queries` queries, against a one-token row. CPU flash attention, measured:
    a second query nearly doubles a row's cost, more queries add little (16 queries: about 3.6x)."""
    return 1.0 if queries <= 1 else 1.6 + queries / 8


def short_row_groups(rows: list[int], cached: list[int], new: list[int]) -> list[list[int]]:
    """Split the short rows into attention calls. A call pads its rows to its longest query run and key span, so
    one decode row sharing a call with a 12-token prompt chunk pays for 12 queries, and a row 20 tokens into its
    answer pays for the key span of one 400 tokens in. One-token rows and multi-token rows go to separate calls;
    within each, rows sorted by key span are cut where the padding saved outweighs another call (dynamic
    programming over the cut points, `CALL_COST` per call)."""
    groups = []
    for part in ([r for r in rows if new[r] == 1], [r for r in rows if new[r] > 1]):
        order = sorted(part, key=lambda r: cached[r] + new[r])
        best = [0.0] + [float("inf")] * len(order)  # best[j]: cheapest calls for order[:j]
        cut = [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            span = cached[order[j - 1]] + new[order[j - 1]]  # the longest span of any segment ending at j
            queries = 0
            for i in range(j - 1, -1, -1):  # segment order[i:j]
                queries = max(queries, new[order[i]])
                keys = (j - i) * span * query_factor(queries)
                if CALL_COST + keys >= best[j]:
                    break  # longer segments only cost more
                if best[i] + CALL_COST + keys < best[j]:
                    best[j], cut[j] = best[i] + CALL_COST + keys, i
        j, found = len(order), []
        while j:
            found.append(order[cut[j]:j])
            j = cut[j]
        groups += found[::-1]
    return groups


class _AttentionGroup:
    """Rows attended together: query index (G, Lg) into the packed tokens, key slots (G, Sg), mask (G, 1, Lg, Sg)."""

    def __init__(self, rows: list[int], offsets: list[int], cached: list[int], new: list[int], tables: torch.Tensor,
                 block_size: int):
        Lg = max(new[r] for r in rows)
        Sg = max(cached[r] + new[r] for r in rows)
        j = torch.arange(Lg)
        off = torch.tensor([offsets[r] for r in rows])[:, None]
        n = torch.tensor([new[r] for r in rows])[:, None]
        c = torch.tensor([cached[r] for r in rows])[:, None]
        self.real = j[None, :] < n  # (G, Lg)
        self.query_index = torch.where(self.real, off + j[None, :], off)  # padding repeats the row's first token
        key_pos = torch.arange(Sg)[None, :]  # (1, Sg)
        held = (key_pos < c + n)  # (G, Sg): real keys; padding reads slot 0 (masked)
        pos = torch.where(held, key_pos, 0)
        row_tables = tables[torch.tensor(rows)]
        self.slots = torch.where(held, row_tables.gather(1, pos // block_size) * block_size + pos % block_size, 0)
        query_pos = torch.where(self.real, c + j[None, :], c)  # (G, Lg) position of each query
        causal = key_pos[:, None, :] <= query_pos[:, :, None]  # (G, Lg, Sg)
        self.mask = (causal & held[:, None, :]).unsqueeze(1)  # (G, 1, Lg, Sg); every query sees key 0 at least
        # The real queries as plain indices, built here on the host: a boolean index on the device would cost a
        # host sync per layer.
        self.real_flat = self.real.flatten().nonzero().squeeze(1)  # (R,) into the G*Lg padded queries
        self.real_query = self.query_index.flatten()[self.real_flat]  # (R,) their packed-token positions


class PackedBatch:
    """One forward's view of the pool for rows packed into a single sequence: row i continues its `cached[i]`
    tokens with `new[i]` tokens, laid out one row after another (N = sum(new) tokens)."""

    computes_attention = True  # SelfAttention hands q, k, v to `attend` instead of running SDPA itself

    def __init__(self, pool: PagedKVPool, block_tables: list[list[int]], cached: list[int], new: list[int],
                 cross: list[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
                 device: torch.device | str = "cpu"):
        self.pool = pool
        self.batch_size = 1
        # R1Model checks length + N <= max_seq_len: make that check each row's real extent.
        self.length = max(c + n for c, n in zip(cached, new)) - sum(new)
        bs = pool.block_size
        tables = block_table_tensor(block_tables)
        self.offsets = offsets = [0, *itertools.accumulate(new)][:-1]  # row i's first token in the packed sequence
        row_of = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))  # (N,)
        # token t of row i (packed at offsets[i] + t) sits at position cached[i] + t
        positions = torch.arange(len(row_of)) + torch.tensor([c - o for c, o in zip(cached, offsets)])[row_of]
        self.positions = positions  # (N,)
        self.slots = (tables[row_of, positions // bs] * bs + positions % bs).to(device)  # (N,) write slots
        # One-token rows read their keys in place (decode_attention) where the pool allows; the rest in groups.
        loop = decode_attention.supported(pool)
        self.decode_rows = [i for i, n in enumerate(new) if n == 1] if loop else []
        if self.decode_rows:
            self._decode_keys(tables, bs, [cached[i] + 1 for i in self.decode_rows], device)
        short = [i for i, n in enumerate(new) if n <= SHORT_ROW and not (loop and n == 1)]
        groups = short_row_groups(short, cached, new) + [[i] for i, n in enumerate(new) if n > SHORT_ROW]
        self.groups = [_AttentionGroup(g, offsets, cached, new, tables, bs) for g in groups]
        for g in self.groups:
            for name in ("real_flat", "real_query", "query_index", "slots", "mask"):
                setattr(g, name, getattr(g, name).to(device))
        self._row_of = row_of.to(device)
        self._cross = cross or [None] * len(new)
        self._cross_packed: dict[int, tuple | None] = {}

    def _decode_keys(self, tables: torch.Tensor, block_size: int, spans: list[int], device) -> None:
        """The pool slots of each one-token row's keys (positions 0 .. span - 1), concatenated, and where each row's
        start: (K,) and (R + 1,) int64."""
        starts, spans_t = [0, *itertools.accumulate(spans)], torch.tensor(spans)
        row_of_key = torch.tensor(self.decode_rows).repeat_interleave(spans_t)  # (K,) each key's table row
        pos = torch.arange(starts[-1]) - torch.tensor(starts[:-1]).repeat_interleave(spans_t)  # (K,) its position
        self.decode_slots = (tables[row_of_key, pos // block_size] * block_size + pos % block_size).to(device)
        self.decode_starts = torch.tensor(starts, device=device)
        self.decode_tokens = torch.tensor([self.offsets[i] for i in self.decode_rows], device=device)  # (R,)
        # Checked once here for every layer's call (the loop reads what the indices point at).
        decode_attention.check_rows(self.decode_slots, self.decode_starts, self.pool.num_blocks * block_size,
                                    self.decode_tokens, len(self.positions))

    def position_ids(self, max_pos: int) -> torch.Tensor:
        return self.positions.clamp(max=max_pos)[None].to(self.slots.device)  # (1, N)

    def append_mask(self, new_mask: torch.Tensor) -> None:
        return None  # no padding anywhere; attention masks are per group (attend)

    def advance(self, n: int) -> None:
        """Lengths live with the sequences (the engine advances them after the forward)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        raise RuntimeError("PackedBatch: attention runs in attend(); update() serves padded batches only")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, Dh), k/v (1, Hkv, N, Dh) of the packed tokens -> attention output (1, H, N, Dh): the new K/V
        are written to the pool, then each group's queries attend causally to their rows' cached + new keys."""
        self.pool.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = torch.empty_like(q)
        if self.decode_rows:  # written in place into their tokens of out
            pool = self.pool
            scales = (pool.key_scales[layer], pool.value_scales[layer]) if pool.quantized else (None, None)
            decode_attention.decode_attention(q[0], pool.keys[layer], pool.values[layer], self.decode_slots,
                                              self.decode_starts, self.decode_tokens, out[0], *scales,
                                              check_indices=False)
        for g in self.groups:
            keys, values = self.pool.gather(layer, g.slots)  # (G, Hkv, Sg, Dh)
            qg = q[0][:, g.query_index].transpose(0, 1)  # (G, H, Lg, Dh)
            og = sdpa(qg, keys.to(q.dtype), values.to(q.dtype), attn_mask=g.mask, enable_gqa=True)  # (G, H, Lg, Dh)
            og = og.transpose(0, 1).flatten(1, 2)  # (H, G*Lg, Dh)
            out[0][:, g.real_query] = og[:, g.real_flat]
        return out

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        raise RuntimeError("PackedBatch: cross-attention K/V are computed at admission, not inside the forward")

    def get_cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows' modality K/V for `layer` concatenated, (1, H, T, Dh), with a per-query mask (1, N, T): a token
        sees only its own row's modality tokens. None when no row has any."""
        if layer in self._cross_packed:
            return self._cross_packed[layer]
        per_row = [c.get(layer) if c else None for c in self._cross]
        result = None
        if any(kv is not None for kv in per_row):
            ks, vs, owner = [], [], []
            for i, kv in enumerate(per_row):
                if kv is not None:
                    ks.append(kv[0][0])
                    vs.append(kv[1][0])
                    owner += [i] * kv[0].shape[2]
            owner_t = torch.tensor(owner, device=self._row_of.device)
            mask = (self._row_of[:, None] == owner_t[None, :])[None]  # (1, N, T)
            result = (torch.cat(ks, dim=1)[None], torch.cat(vs, dim=1)[None], mask)
        self._cross_packed[layer] = result
        return result
