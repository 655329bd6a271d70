"""Batch-1 fast path: when the running batch is one request (decoding, verifying drafts or prefilling), skip the
paged batch view.

At batch 1 a decode step's matmuls read the weights once (memory bound); what the general path adds on top is
per-step bookkeeping -- block tables, key masks, per-layer page gathers of the whole context, the generic cache
protocol. Here the lone request keeps a contiguous copy of its K/V (1, Hkv, capacity, Dh) per layer, writes each
new token in place and attends over the buffer under a position mask. With `EngineConfig.compile_decode` the
single-token step is one torch.compile graph (gpt-fast's recipe: its shapes never depend on the position, so one
graph serves every step and torch.compile fuses the dozens of small ops around the matmuls). With speculative
decoding, a verification's 1 + k tokens and a draft model's own steps run compiled as well (compiled_feed_limit):
one more graph per model, its feed length dynamic (benchmarks/results/speculative_compiled.md). The paged pool stays
the source of truth for everyone else: `flush` writes the tokens decoded here back into the request's blocks
before any general forward runs, so switching between the paths is exact.

Eligible models: every layer full attention without ALiBi, model-dtype KV (INT8 reads back quantized values, which
this copy would not). The layer math is the modules' own (same norms, projections, RoPE, SDPA, feed-forwards).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmr1.attention import apply_rotary
from mmr1.backbone import R1Model
from mmr1.engine.paged_cache import PagedKVPool
from mmr1.moe import MoEFeedForward, Router, select_experts
from mmr1.norm import rms_norm
from mmr1.sdpa import sdpa


def solo_eligible(model: R1Model, kv_cache_dtype: str) -> bool:
    """The fast path re-spells R1Model.forward's decode math: only for that forward (not a subclass's own)."""
    cfg = model.cfg
    return (type(model).forward is R1Model.forward and kv_cache_dtype == "model"
            and all(kind == "full" for kind in cfg.layer_kinds()) and not cfg.alibi_global)


class SoloCache:
    """One request's contiguous K/V: tokens [0, length) are here; [0, synced) are also in its pool blocks."""

    def __init__(self, seq_id: int, model: R1Model, pool: PagedKVPool, blocks: list[int], num_cached: int):
        cfg = model.cfg
        self.seq_id, self.max_len = seq_id, cfg.max_seq_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._shape = (1, cfg.n_kv_heads, 0, cfg.head_dim)
        self._n_layers, self._dtype, self._device = cfg.n_layers, pool.dtype, pool.keys[0].device
        self.reserve(num_cached + 1)
        if num_cached:  # one gather of what the pool already holds
            slots = torch.tensor([blocks[p // pool.block_size] * pool.block_size + p % pool.block_size
                                  for p in range(num_cached)], device=self._device)[None]  # (1, C)
            for layer in range(cfg.n_layers):
                k, v = pool.gather(layer, slots)  # (1, Hkv, C, Dh)
                self.keys[layer][:, :, :num_cached] = k
                self.values[layer][:, :, :num_cached] = v
        self.length = self.synced = num_cached

    def reserve(self, num_tokens: int) -> None:
        """Room for num_tokens positions: capacity doubles (from 256, up to max_seq_len), so a long-context model
        doesn't pay max_seq_len x layers up front and appends stay amortized O(1)."""
        capacity = self.keys[0].shape[2] if self.keys else 0
        if num_tokens <= capacity:
            return
        new_capacity = min(self.max_len, max(256, 2 * capacity, num_tokens))
        shape = (*self._shape[:2], new_capacity, self._shape[3])
        # zeros, not empty: a step attends over the whole buffer with a mask, and a masked position must hold
        # finite values (0 * NaN is NaN in the softmax-weighted sum).
        grown = [[torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self._n_layers)]
                 for _ in range(2)]
        for old, new in zip((self.keys, self.values), grown):
            for layer, t in enumerate(old):
                new[layer][:, :, :capacity] = t
        self.keys, self.values = grown

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rejected drafts): their K/V stay in the buffer, masked until overwritten."""
        self.length = min(self.length, length)
        self.synced = min(self.synced, self.length)

    def flush(self, pool: PagedKVPool, blocks: list[int]) -> None:
        """Write tokens [synced, length) into the request's pool blocks."""
        if self.synced == self.length:
            return
        bs = pool.block_size
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(self.synced, self.length)],
                             device=pool.keys[0].device)
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            new = slice(self.synced, self.length)
            pool.write(layer, slots, k[0, :, new].transpose(0, 1), v[0, :, new].transpose(0, 1))  # (N, Hkv, Dh)
        self.synced = self.length


def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward without the module call (the fast path runs it twice per layer per token)."""
    return rms_norm(x, norm.weight, norm.eps)


def _route_one(router: Router, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router.forward's expert choice for a few tokens (L, D) -> weights, indices (L, k), without its training
    statistics (balance losses, z-loss, entropy: a dozen small ops per layer that decoding throws away)."""
    cfg = router.cfg
    if cfg.capacity_factor is not None:  # capacity can drop slots: keep the module's exact rule
        routing = router(h, None, seq_len=1)
        return routing.weights, routing.indices
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(h.float(), router.gate.weight.float())  # (1, E)
    scores = logits.softmax(dim=-1) if cfg.score_func == "softmax" else logits.sigmoid()
    return select_experts(scores, cfg, router.expert_bias if cfg.aux_free_bias else None)


def _moe_one(ffn: MoEFeedForward, h: torch.Tensor, traced: bool = False) -> torch.Tensor:
    """One token h (1, D) through an MoE layer -> (1, D): the module's own router, then only its top-k experts'
    weights are touched (views of the stacked weights, one small matmul chain each) -- no sort/bincount/
    grouped-GEMM bookkeeping. Eagerly the expert ids come to the host once; `traced` (the compiled step) reads
    each id with .item() inside the graph (an unbacked size under `capture_scalar_outputs`), so the graph does not
    depend on which experts were chosen and still selects views instead of copying the experts' weights."""
    weights, indices = _route_one(ffn.router, h)  # (1, k)
    w = ffn.experts
    # bf16 experts on the CPU during an engine step: cpu_linear's loop (cpu_linear.mark_experts); traced,
    # its operator (the graph cannot trace into ctypes). Eagerly the instance dict is read directly: nn.Module's
    # lookup of a missing attribute raises inside, ~0.8 us a layer.
    if traced:
        mm = torch.ops.mmr1.rows_times if getattr(w, "few_row_matmul", None) is not None else None
    else:
        mm = w.__dict__.get("few_row_matmul")

    def expert(e):  # (1, D)
        if mm is not None:
            return mm(F.silu(mm(h, w.w_gate[e])) * mm(h, w.w_up[e]), w.w_down[e])
        return (F.silu(h @ w.w_gate[e]) * (h @ w.w_up[e])) @ w.w_down[e]

    out = torch.zeros_like(h)
    if traced:
        for slot in range(indices.shape[1]):
            e = indices[0, slot].clamp_min(0).item()  # a dropped slot (-1) reads expert 0 with weight 0
            torch._check(e >= 0)
            torch._check(e < w.w_gate.shape[0])
            out = out + expert(e) * torch.where(indices[0, slot] >= 0, weights[0, slot], 0.0).to(h.dtype)
    else:
        for slot, e in enumerate(indices[0].tolist()):
            if e >= 0:  # -1: a slot the router dropped (dynamic threshold / capacity)
                out = out + expert(e) * weights[0, slot].to(h.dtype)
    return out + _shared(ffn, h)


# _moe_few runs one small matmul chain per chosen expert, the layer a fixed cost plus grouped GEMMs; on this CPU
# (benchmarks/results/moe_few_tokens.md, fp32) the chains win up to about 10 token-expert pairs per layer (counted
# before merging a token pair's shared expert calls: with few experts, a call carrying more tokens still costs more).
FEW_EXPERT_CALLS = 10


def few_tokens_path(ffn: MoEFeedForward, num_tokens: int) -> bool:
    """Whether num_tokens (> 1) tokens take _moe_few: at most FEW_EXPERT_CALLS token-expert pairs, dropless routing
    (capacity drops depend on the whole batch, so they keep the module's own rule)."""
    cfg = ffn.router.cfg
    return cfg.capacity_factor is None and num_tokens * cfg.slots_per_token <= FEW_EXPERT_CALLS


def _moe_few(ffn: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """A few tokens h (L, D) through an MoE layer -> (L, D), eagerly: route them together, then run each chosen
    expert once on the tokens that chose it (views of its weights; at most L * k experts), weighted and added in
    place -- the general layer's statistics, sort and grouped GEMMs cost more than that at this size."""
    weights, indices = _route_one(ffn.router, h)  # (L, k)
    w = ffn.experts
    users: dict[int, tuple[list[int], list[int]]] = {}
    for token, row in enumerate(indices.tolist()):
        for slot, e in enumerate(row):
            if e >= 0:  # -1: a slot the router dropped (dynamic threshold)
                users.setdefault(e, ([], []))[0].append(token)
                users[e][1].append(slot)
    out = torch.zeros_like(h)
    for e, (tokens, slots) in users.items():
        rows = torch.tensor(tokens, device=h.device)
        hr = h.index_select(0, rows)  # (n, D)
        y = (F.silu(hr @ w.w_gate[e]) * (hr @ w.w_up[e])) @ w.w_down[e]  # (n, D)
        out.index_add_(0, rows, y * weights[rows, torch.tensor(slots, device=h.device)][:, None].to(h.dtype))
    return out + _shared(ffn, h)


# With tiny experts, running EVERY expert on the few tokens as three batched matmuls beats one small chain per
# chosen expert: the extra multiply-adds cost less than the per-expert calls (benchmarks/results/moe_few_tokens.md:
# the demo's 8 x (128 x 64) experts). Bounded by the size of one of the three stacked weights, E * D * H, and by
# that times the tokens (the work; E / k times the routed work).
EVERY_EXPERT_WEIGHTS = 1 << 17
EVERY_EXPERT_WORK = 1 << 20


def every_expert_path(ffn: MoEFeedForward, num_tokens: int) -> bool:
    """Whether num_tokens (> 1) tokens go through every expert at once (_moe_every_expert): small experts, few
    tokens, dropless routing."""
    size = ffn.experts.w_gate.numel()
    return (ffn.router.cfg.capacity_factor is None and size <= EVERY_EXPERT_WEIGHTS
            and num_tokens * size <= EVERY_EXPERT_WORK)


def _moe_every_expert(ffn: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """A few tokens h (L, D) through every expert in three batched matmuls, mixed by the routing weights (zero for
    the experts a token did not choose) -> (L, D)."""
    weights, indices = _route_one(ffn.router, h)  # (L, k)
    w = ffn.experts
    E, L = w.w_gate.shape[0], h.shape[0]
    xe = h.expand(E, L, h.shape[1])  # (E, L, D)
    y = torch.bmm(F.silu(torch.bmm(xe, w.w_gate)) * torch.bmm(xe, w.w_up), w.w_down)  # (E, L, D)
    # (L, E) routing weights; a dropped slot (-1, dynamic threshold) lands in a spare column E that is cut off
    mix = weights.new_zeros(L, E + 1).scatter_add_(1, indices.where(indices >= 0, E), weights)[:, :E]
    return torch.einsum("le,eld->ld", mix.to(h.dtype), y) + _shared(ffn, h)


def _shared(ffn: MoEFeedForward, h: torch.Tensor) -> torch.Tensor | float:
    """The shared experts' output for h (..., D) (gated if the layer has a shared gate); 0 without any."""
    if ffn.shared is None:
        return 0.0
    shared = ffn.shared(h)
    if ffn.shared_gate is not None:
        shared = torch.sigmoid(ffn.shared_gate(h)) * shared
    return shared


def solo_step(model: R1Model, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: torch.Tensor,
              positions: torch.Tensor, cross: dict | None, traced: bool = False, tail: int | None = None
              ) -> torch.Tensor:
    """tokens (L,) at positions (L,) against per-layer K/V buffers (1, Hkv, C, Dh) -> logits (L, V); writes their
    K/V into the buffers. Shapes never depend on the position (K/V written with index_copy_, attention over the
    whole buffer under a mask), so with L = 1 and `traced` this is the graph `compile_decode` compiles.
    Hidden states stay 2-D (L, D): every projection is a single mm."""
    L, capacity = tokens.shape[0], keys[0].shape[2]
    x = model.tok_embeddings(tokens)  # (L, D)
    cos, sin = model.rope(positions[None])  # (1, 1, L, Dh)
    # Query i sees keys 0..positions[i]: the cached prefix and the new tokens up to itself. Slots past the newest
    # position hold zeros or a rejected draft's K/V, masked either way.
    visible = torch.arange(capacity, device=tokens.device)[None, :] <= positions[:, None]  # (L, C)
    for i, block in enumerate(model.layers):
        if block.cross_attn is not None and cross and i in cross:
            x = x + block.cross_attn(x[None], kv=cross[i])[0]
        attn = block.attn
        h = _norm(block.attn_norm, x)
        q = attn.wq(h).view(L, attn.n_heads, attn.head_dim).transpose(0, 1)[None]  # (1, H, L, Dh)
        k = attn.wk(h).view(L, attn.n_kv_heads, attn.head_dim).transpose(0, 1)[None]  # (1, Hkv, L, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys[i].index_copy_(2, positions, k)
        values[i].index_copy_(2, positions, attn.wv(h).view(L, attn.n_kv_heads, attn.head_dim).transpose(0, 1)[None])
        out = sdpa(q, keys[i], values[i], attn_mask=visible, enable_gqa=True)  # (1, H, L, Dh)
        x = x + attn.wo(out[0].transpose(0, 1).reshape(L, -1))  # (L, H Dh)
        h = _norm(block.ffn_norm, x)
        if not isinstance(block.ffn, MoEFeedForward):
            x = x + block.ffn(h)
        elif L == 1:
            x = x + _moe_one(block.ffn, h, traced=traced)
        elif every_expert_path(block.ffn, L):
            x = x + _moe_every_expert(block.ffn, h)
        elif few_tokens_path(block.ffn, L):
            x = x + _moe_few(block.ffn, h)
        else:
            x = x + block.ffn(h[None])[0][0]
    return model.lm_head(_norm(model.norm, x if tail is None else x[L - tail:]))  # (L or tail, V)


@torch.inference_mode()
def solo_forward(model: R1Model, cache: SoloCache, tokens: list[int], cross: dict | None,
                 compiled_step=None, tail: int | None = None, compiled_max_tokens: int = 1) -> torch.Tensor:
    """Feed `tokens` (a decode token, + speculative drafts, or a prompt chunk) at positions cache.length, ...;
    returns their logits (L, V) -- or only the last `tail` tokens' -- and appends their K/V to the cache.
    `compiled_step`: torch.compile(solo_step) (EngineConfig.compile_decode), used for feeds of up to
    `compiled_max_tokens` tokens (compiled_feed_limit): single tokens in one graph, 2.. in another whose length is
    dynamic (speculative verification, a draft catching up)."""
    pos, L = cache.length, len(tokens)
    if pos + L > model.cfg.max_seq_len:
        raise ValueError(f"R1Model: {pos + L} positions exceed max_seq_len={model.cfg.max_seq_len}")
    cache.reserve(pos + L)
    device = cache.keys[0].device
    args = (model, cache.keys, cache.values, torch.tensor(tokens, device=device),
            torch.arange(pos, pos + L, device=device), cross)
    if compiled_step is not None and L <= compiled_max_tokens:
        if L > 1:  # one graph for every length 2..compiled_max_tokens
            torch._dynamo.maybe_mark_dynamic(args[3], 0)
            torch._dynamo.maybe_mark_dynamic(args[4], 0)
        logits = compiled_step(*args, traced=True)
        logits = logits if tail is None else logits[L - tail:]
    else:
        logits = solo_step(*args, tail=tail)
    cache.length = pos + L
    return logits


# The longest feed a compiled step may take besides single tokens: speculative verification (1 + drafts) and a
# draft catching up; longer prompt chunks run eagerly (their matmuls dominate).
COMPILED_MAX_TOKENS = 16
RECOMPILE_LIMIT = 64  # dynamo graphs of solo_step per process (compile_solo_step)


def compiled_feed_limit(model: R1Model) -> int:
    """The longest feed compile_decode's graphs take for `model`: up to COMPILED_MAX_TOKENS while every MoE layer
    runs that many tokens through all its experts (_moe_every_expert: tensor ops only, so one graph serves every
    length); else 1. The few-token path reads expert ids on the host and the general layer sorts and counts tokens:
    traced, both break the graph, and with the Mixtral-shaped model compiled verification was slower than eager."""
    limit = COMPILED_MAX_TOKENS
    for block in model.layers:
        if isinstance(block.ffn, MoEFeedForward):
            while limit > 1 and not every_expert_path(block.ffn, limit):
                limit -= 1
    return limit


def compile_solo_step(device: torch.device | str = "cpu"):
    """torch.compile(solo_step) for single-token steps and the short feeds of compiled_feed_limit, with dynamo settings
    for these calls only (not process-wide): capture_scalar_outputs, because expert ids are read inside the graph
    (.item()), and suppress_errors, so a machine where inductor cannot build its kernels (no C++ compiler) logs the
    failure and decodes eagerly instead of failing the request; and a recompile_limit of RECOMPILE_LIMIT: dynamo
    keeps the graphs of one function together, and every engine's model, weight routing (cpu_few_row_linears) and
    torch thread count is a graph of its own, so torch's default of 8 sent the ninth engine in a process to eager.
    On the CPU inductor writes the code around its kernels in C++ (cpp_wrapper): its Python wrapper, which makes a
    tensor view per weight slice and checks sizes on every call, took about 80 us of a 280 us demo decode step
    (benchmarks/results/speculative_compiled.md)."""
    cpu = torch.device(device).type == "cpu"
    compiled = torch.compile(solo_step, options={"cpp_wrapper": True} if cpu else None)
    config = torch._dynamo.config

    def step(*args, **kwargs):
        # Plain attribute swaps: config.patch() costs ~100 us per call, a few % of a decode step.
        saved = config.capture_scalar_outputs, config.suppress_errors, config.recompile_limit
        config.capture_scalar_outputs = config.suppress_errors = True
        config.recompile_limit = max(saved[2], RECOMPILE_LIMIT)
        try:
            return compiled(*args, **kwargs)
        finally:
            config.capture_scalar_outputs, config.suppress_errors, config.recompile_limit = saved
    return step
