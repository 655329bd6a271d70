"""EngineConfig(compile_decode=True): the batch-1 decode step as one torch.compile graph (static shapes, masked
attention over the whole contiguous buffer) gives the same tokens as the eager paths."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mmr1.engine import Engine, EngineConfig, SamplingParams
from mmr1.engine.runner import cross_kv_for
from mmr1.engine.solo import SoloCache, solo_forward, solo_step
from test_engine import reference
from test_generation import PROMPTS, modality_tokens, tiny_model


class _NoPool:  # SoloCache only reads the pool when it starts from cached tokens
    dtype = torch.float32
    keys = [torch.empty(0)]


def test_traced_expert_step_equals_the_eager_step():
    """The single-token step as compile_decode traces it (expert ids read per slot, dropped slots weighted 0; run
    eagerly here) == the eager fast path, logits at every step (MoE + cross-attention model)."""
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    cross = cross_kv_for(model, cross_states[0][cross_mask[0]][None])
    eager = SoloCache(0, model, _NoPool(), [], 0)
    static = SoloCache(1, model, _NoPool(), [], 0)
    prompt = PROMPTS[2]
    solo_forward(model, eager, prompt, cross)
    solo_forward(model, static, prompt, cross)
    token = 7
    for _ in range(model.cfg.max_seq_len - len(prompt)):
        want = solo_forward(model, eager, [token], cross)
        got = solo_forward(model, static, [token], cross, compiled_step=solo_step)  # uncompiled, traced=True
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        token = int(want[-1].argmax())
    assert static.length == eager.length == model.cfg.max_seq_len


def test_compiled_decode_equals_single_request_greedy():
    """Three requests decoded alone (text-only and with modality tokens, different lengths): greedy tokens ==
    generate(), and positions never cause a recompilation (one graph without, one with cross-attention K/V)."""
    counters.clear()
    model = tiny_model()
    cross_states, cross_mask = modality_tokens()
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=1, compile_decode=True))
    assert eng._compiled_step is not None
    cs = cross_states[1][cross_mask[1]]
    requests = [(PROMPTS[0], 12, None), (PROMPTS[2], 20, cs), (PROMPTS[1], 30, None)]
    outs = [eng.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n), "cross_states": c}])[0].token_ids
            for p, n, c in requests]  # one at a time: each request decodes alone, on the compiled step
    refs = [reference(model, p, n, None if c is None else c[None]) for p, n, c in requests]
    assert outs == refs
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # compiled (not fallen back to eager), never per step
    eng.check_no_leaks()


def test_compiled_speculative_decoding_equals_plain_greedy():
    """compile_decode with a draft model: the target's verification steps (1 + 4 drafts) and the draft's own steps
    run on compiled graphs too -- one per model for single tokens, one for every longer feed (its length dynamic)
    -- and the greedy tokens equal plain greedy decoding."""
    from mmr1.engine import SpeculativeConfig
    from mmr1.engine.solo import COMPILED_MAX_TOKENS
    from mmr1.engine.speculative import truncated_draft

    counters.clear()
    model = tiny_model()
    spec = SpeculativeConfig("draft", 4, adaptive=False)  # every round drafts 4: verification feeds 5 tokens
    eng = Engine(model, config=EngineConfig(block_size=4, max_batch=1, compile_decode=True, speculative=spec),
                 draft=truncated_draft(model, 1))
    assert eng._compiled_max_tokens == eng.draft.compiled_max_tokens == COMPILED_MAX_TOKENS
    lengths = {"target": [], "draft": []}

    def counted(name, step):
        def run(*args, **kwargs):
            lengths[name].append(len(args[3]))  # tokens (L,)
            return step(*args, **kwargs)
        return run
    eng._compiled_step = counted("target", eng._compiled_step)
    eng.draft.compiled_step = counted("draft", eng.draft.compiled_step)
    requests = [(PROMPTS[0], 12), (PROMPTS[2], 20), (PROMPTS[1], 16)]
    outs = [eng.generate([{"prompt": p, "sampling": SamplingParams(max_new_tokens=n)}])[0].token_ids
            for p, n in requests]
    assert outs == [reference(model, p, n, None) for p, n in requests]
    assert 5 in lengths["target"] and 1 in lengths["draft"] and eng.stats["drafted"] > 0
    assert counters["stats"]["unique_graphs"] <= 4  # target and draft: single tokens, and longer feeds


def test_compiled_feed_limit_follows_the_every_expert_budget():
    """Longer feeds compile only while every MoE layer runs them through all its experts (tensor ops only): dense
    models and tiny experts up to COMPILED_MAX_TOKENS, mid-sized experts up to the work budget, large ones never."""
    from mmr1.backbone import R1Model
    from mmr1.config import MoEConfig, R1Config
    from mmr1.engine.solo import COMPILED_MAX_TOKENS, compiled_feed_limit

    def model(expert_hidden=None):
        moe = None if expert_hidden is None else MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2,
                                                           expert_hidden=expert_hidden)
        return R1Model(R1Config(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                max_seq_len=32, moe=moe))
    assert compiled_feed_limit(model()) == compiled_feed_limit(tiny_model()) == COMPILED_MAX_TOKENS
    assert compiled_feed_limit(model(expert_hidden=64)) == 16  # 8 x 128 x 64 weights: 16 tokens of work
    assert compiled_feed_limit(model(expert_hidden=128)) == 8
    assert compiled_feed_limit(model(expert_hidden=256)) == 1  # larger than the every-expert path takes


@pytest.mark.parametrize("variant", [
    {},  # softmax, top-2, one shared expert
    {"score_func": "sigmoid", "aux_free_bias": True, "shared_expert_gate": True, "route_scale": 2.5},
    {"dynamic_threshold": 0.5, "min_k": 1, "max_k": 3, "num_shared_experts": 0},  # dropped slots (-1)
])
def test_few_token_moe_equals_the_layer(variant):
    """The fast path's MoE for a few tokens (a verification, a short chunk: route together, each chosen expert once
    on its tokens) == MoEFeedForward's own forward, for L = 1..8; which L take it follows the expert-call budget."""
    from mmr1.config import MoEConfig
    from mmr1.engine.solo import _moe_every_expert, _moe_few, every_expert_path, few_tokens_path
    from mmr1.moe import MoEFeedForward
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, num_groups=4, topk_groups=2, top_k=2, expert_hidden=16, **variant)
    layer = MoEFeedForward(32, cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if cfg.aux_free_bias:
            layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    for L in range(1, 9):
        h = torch.randn(L, 32)
        with torch.no_grad():
            reference = layer(h[None])[0][0]
            torch.testing.assert_close(_moe_few(layer, h), reference, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(_moe_every_expert(layer, h), reference, atol=1e-6, rtol=1e-5)
    most = 10 // cfg.slots_per_token  # at most 10 token-expert pairs
    assert few_tokens_path(layer, most) and not few_tokens_path(layer, most + 1)
    assert every_expert_path(layer, 8) and not every_expert_path(layer, 1 << 20)  # tiny experts, up to a budget
    big = MoEFeedForward(32, MoEConfig(num_experts=128, num_groups=16, topk_groups=4, top_k=2, expert_hidden=16))
    assert few_tokens_path(big, 5) and not few_tokens_path(big, 6)  # 10 calls at most, then the grouped layer
    wide = MoEFeedForward(512, MoEConfig(num_experts=128, num_groups=16, topk_groups=4, top_k=2, expert_hidden=256))
    assert not every_expert_path(wide, 2)  # the seed's experts: never every expert


def test_few_token_benchmark_quick_run(tmp_path):
    from benchmarks.moe_few_tokens import main
    result = main(["--quick", "--out", str(tmp_path / "few")])  # asserts parity with the module before timing
    assert len(result["rows"]) == 12 and all(r["few_us"] > 0 for r in result["rows"])
    assert all((r["every_expert_us"] or 0) > 0 for r in result["rows"] if r["layer"].startswith("demo"))
    assert (tmp_path / "few.json").is_file() and "speed-up" in (tmp_path / "few.md").read_text()
