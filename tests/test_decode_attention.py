"""The CPU decode-attention loop (mmr1/engine/decode_attention.py) against SDPA on gathered keys, and the packed
engine with it against the packed engine without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmr1.backbone import R1Model
from mmr1.config import R1Config
from mmr1.engine import Engine, EngineConfig, SamplingParams, decode_attention
from mmr1.engine.paged_cache import PagedKVPool, dequantize_int8, quantize_int8
from mmr1.engine.runner import forward_packed

needs_loop = pytest.mark.skipif(decode_attention.function() is None,
                                reason="no AVX-512, C compiler or GNU OpenMP here: the engine keeps SDPA")


def reference(q, keys, values, slot_lists):
    """float64 SDPA of each row's gathered keys."""
    rows = []
    for r, slots in enumerate(slot_lists):
        k, v = keys[slots].transpose(0, 1)[None].double(), values[slots].transpose(0, 1)[None].double()
        rows.append(F.scaled_dot_product_attention(q[r][None, :, None].double(), k, v, enable_gqa=True)[0, :, 0])
    return torch.stack(rows)  # (R, H, Dh)


@needs_loop
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 4, 32), (16, 4, 64), (8, 1, 128),
                                                       (40, 2, 16), (6, 3, 80)])
@pytest.mark.parametrize("dtype,pool", [(torch.float32, "model"), (torch.bfloat16, "model"),
                                        (torch.float32, "int8"), (torch.bfloat16, "int8")])
def test_loop_equals_sdpa_on_gathered_keys(heads, kv_heads, head_dim, dtype, pool):
    """GQA groups of 1-20 query heads (over 16: in pieces of 16), head_dim 16-128 (80: no specialized case),
    rows of 1 to 300 keys at scattered slots, some shared between rows; K/V in the model's dtype or INT8 with
    per-(slot, head) scales (the reference reads them dequantized)."""
    g = torch.Generator().manual_seed(heads * head_dim)
    keys = torch.randn(700, kv_heads, head_dim, generator=g).to(dtype)
    values = torch.randn(700, kv_heads, head_dim, generator=g).to(dtype)
    scales = {}
    if pool == "int8":
        (keys, scales["key_scales"]), (values, scales["value_scales"]) = quantize_int8(keys), quantize_int8(values)
        exact_keys = dequantize_int8(keys, scales["key_scales"], torch.float64)
        exact_values = dequantize_int8(values, scales["value_scales"], torch.float64)
    else:
        exact_keys, exact_values = keys, values
    lengths = [1, 5, 17, 300, 64, 2, 33]
    slot_lists = [torch.randperm(700, generator=g)[:n] for n in lengths]
    q = (2 * torch.randn(len(lengths), heads, head_dim, generator=g)).to(dtype)  # peaked softmaxes too
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # The rows are tokens 4, 0, 9, ... of 11 in a (H, N, Dh) view with the packed layout's strides; the tokens
    # that are not rows must be left alone.
    tokens = torch.tensor([4, 0, 9, 2, 10, 7, 5])
    packed = torch.randn(1, 11, heads, head_dim, generator=g).to(dtype).transpose(1, 2)[0]  # (H, N, Dh), strided
    packed[:, tokens] = q.transpose(0, 1)
    out = torch.full_like(packed, 7.0)
    decode_attention.decode_attention(packed, keys, values, torch.cat(slot_lists), starts, tokens, out, **scales)
    others = [t for t in range(11) if t not in tokens.tolist()]
    assert (out[:, others] == 7.0).all()
    out = out[:, tokens].transpose(0, 1)  # (R, H, Dh)
    want = reference(q, exact_keys, exact_values, slot_lists)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    else:  # fp32 inside, rounded once: at most one bfloat16 step from the exact result rounded
        torch.testing.assert_close(out.double(), want.to(dtype).double(), atol=1e-6, rtol=2 ** -7)


@needs_loop
def test_bad_arguments_are_refused():
    q, pool = torch.randn(4, 2, 16), torch.randn(10, 2, 16)  # 4 heads, 2 tokens
    slots, starts = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])
    with pytest.raises(TypeError, match="fp32 or bf16"):
        decode_attention.decode_attention(q.bfloat16(), pool, pool, slots, starts)
    with pytest.raises(ValueError, match="fp16 key_scales and value_scales"):
        decode_attention.decode_attention(q, pool.to(torch.int8), pool.to(torch.int8), slots, starts)
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_attention.decode_attention(q[..., :8], pool[..., :8], pool[..., :8], slots, starts)
    with pytest.raises(ValueError, match="R \\+ 1 offsets"):
        decode_attention.decode_attention(q, pool, pool, slots, starts[:2])
    with pytest.raises(IndexError, match="the pool's 10 slots"):
        decode_attention.decode_attention(q, pool, pool, torch.tensor([0, 1, 10]), starts)  # slot 10 of 10
    with pytest.raises(IndexError, match="2 query tokens"):
        decode_attention.decode_attention(q, pool, pool, slots, starts, tokens=torch.tensor([0, 2]))
    with pytest.raises(IndexError, match="non-decreasing"):
        decode_attention.decode_attention(q, pool, pool, slots, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="q's shape, dtype and strides"):
        decode_attention.decode_attention(q, pool, pool, slots, starts, out=torch.empty(2, 4, 16).transpose(0, 1))
    torch.testing.assert_close(decode_attention.decode_attention(q, pool, pool, slots, starts)[:, 0],
                               pool[0].repeat_interleave(2, dim=0))  # one key: its value, for each query head


def model_16(dtype) -> R1Model:
    torch.manual_seed(0)
    cfg = R1Config(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=96)
    model = R1Model(cfg)
    model.init_weights(std=0.3)
    return model.eval().to(dtype)


@needs_loop
@pytest.mark.parametrize("dtype,kv", [(torch.float32, "model"), (torch.bfloat16, "model"), (torch.float32, "int8")])
def test_packed_forward_with_the_loop_equals_without(dtype, kv, monkeypatch):
    """Decode rows beside prompt chunks in packed forwards over scattered pages: in fp32 the loop's logits are
    SDPA's (model-dtype or INT8 pool); in bf16 both differ from the fp32 computation by rounding, the loop by no
    more than SDPA does."""
    model = model_16(dtype)
    g = torch.Generator().manual_seed(1)
    schedule = [(20, 3, 7), (1, 4, 1), (1, 1, 1), (1, 1, 1)]
    tables = [[0, 5, 9, 3, 12, 14, 21], [2, 11, 19, 16], [7, 1, 4, 13, 10, 23]]
    seqs = [torch.randint(0, 96, (sum(s[i] for s in schedule),), generator=g).tolist() for i in range(3)]

    def run(model):
        pool = PagedKVPool.for_model(model.cfg, num_blocks=24, block_size=4, dtype=next(model.parameters()).dtype,
                                     kv_cache_dtype=kv)
        done, out = [0, 0, 0], []
        for step in schedule:
            logits = forward_packed(model, pool, [seqs[i][done[i]:done[i] + step[i]] for i in range(3)], done,
                                    tables, [None] * 3)
            out.append(torch.cat([rows[:n] for rows, n in zip(logits, step)]))
            done = [d + n for d, n in zip(done, step)]
        return torch.cat(out).float()

    calls = []
    real = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_loop = run(model)
    assert len(calls) == 3 * model.cfg.n_layers  # the three steps with decode rows
    monkeypatch.setattr(decode_attention, "supported", lambda pool: False)
    without = run(model)
    if dtype == torch.float32:
        torch.testing.assert_close(with_loop, without, atol=1e-5, rtol=0)
    else:
        exact = run(model.float())  # the same bf16-valued weights, computed in fp32
        loop_error, sdpa_error = (with_loop - exact).abs().mean(), (without - exact).abs().mean()
        assert loop_error <= 1.1 * sdpa_error, (loop_error, sdpa_error)


@needs_loop
@pytest.mark.parametrize("kv", ["model", "int8"])
def test_engine_greedy_outputs_unchanged_by_the_loop(kv, monkeypatch):
    """A continuous-batching run of mixed requests gives the same greedy tokens with and without the loop (fp32)."""
    model = model_16(torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 30, 9, 17, 1, 24)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (20, 5, 33, 12, 40, 8)]

    def outputs():
        engine = Engine(model, config=EngineConfig(max_batch=4, block_size=4, kv_cache_dtype=kv))
        outs = engine.generate([{"prompt": p, "sampling": s} for p, s in zip(prompts, params)])
        engine.check_no_leaks()
        return [o.token_ids for o in outs]

    with_loop = outputs()
    monkeypatch.setattr(decode_attention, "supported", lambda pool: False)
    assert with_loop == outputs()
