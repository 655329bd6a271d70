"""Prefix caching on vs off, side by side in one process, on the engine benchmark's serving model.

    python -m benchmarks.prefix_cache --out benchmarks/results/prefix_cache

Workloads where requests share a prompt prefix, as chat serving has them:
  * system prompt: every request is one 384-token system prompt + its own 16-token question, 16 output tokens,
    arriving as a Poisson stream at 1.5x the rate the engine without caching sustains (so it queues, and the
    throughput shows what each can serve);
  * multi-turn: conversations of 6 turns, each turn's prompt is the whole conversation so far + 24 new tokens,
    24 output tokens; the conversations' turns are sent together, turn after turn.
Random weights and tokens, greedy, ignore_eos. Reports throughput, time to first token, the cache hit rate, and the
share of outputs identical with and without the cache (fp32: a prefix computed in another batch may round
differently in the last bits, which can flip a near-tie).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

from benchmarks.engine_cases import pct, run_online, serving_model
from benchmarks.report import publish
from mmr1.engine import Engine, EngineConfig, SamplingParams


def system_prompt_workload(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(2048) for _ in range(prefix_len)]
    return [system + [rng.randrange(2048) for _ in range(16)] for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals


def run_turns(engine: Engine, conversations: int, turns: int, new_tokens: int) -> dict:
    """Each conversation's next prompt = its history + the answer + 24 new tokens; a turn's requests go together."""
    rng = random.Random(2)  # the same conversations on every engine
    history = [[rng.randrange(2048) for _ in range(32)] for _ in range(conversations)]  # first turn's prompt
    ttft, tokens, start = [], [], time.perf_counter()
    for _ in range(turns):
        sent = time.perf_counter()
        outs = engine.generate(history, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        ttft += [o.first_token_time - sent for o in outs]
        tokens += [o.token_ids for o in outs]
        history = [h + o.token_ids + [rng.randrange(2048) for _ in range(24)] for h, o in zip(history, outs)]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tok_s": sum(map(len, tokens)) / wall, "p50_ttft_s": pct(ttft, 50),
            "p99_ttft_s": pct(ttft, 99), "tokens": tokens, "final_prompt_len": len(history[0]) - 24}


def compare(model, run, rounds: int) -> dict:
    """run(engine) -> metrics, with caching off and on, alternating for `rounds` rounds on fresh engines; the
    medians of each metric (outputs from the last round), after one untimed warm-up run."""
    runs = {"off": [], "on": []}
    run(Engine(model))  # warm-up, untimed: first calls of each kernel shape are slow
    for _ in range(rounds):
        for name in runs:
            engine = Engine(model, config=EngineConfig(enable_prefix_caching=name == "on"))
            m = run(engine)
            m["hit_rate"] = engine.metrics()["prefix_cache_hit_rate"]
            runs[name].append(m)
    res = {}
    for name, ms in runs.items():
        res[name] = {k: statistics.median(m[k] for m in ms) for k in ms[0] if k != "tokens"}
        res[name]["tokens"] = ms[-1]["tokens"]
    res["n_outputs"] = len(res["on"]["tokens"])
    res["identical_outputs"] = sum(a == b for a, b in zip(res["on"].pop("tokens"), res["off"].pop("tokens")))
    res["throughput_ratio"] = res["on"]["tok_s"] / res["off"]["tok_s"]
    res["p50_ttft_ratio"] = res["on"]["p50_ttft_s"] / res["off"]["p50_ttft_s"]
    return res


def markdown(r: dict) -> str:
    head = (f"`python -m benchmarks.prefix_cache{' --quick' if r['quick'] else ''}` on {r['machine']}, torch "
            f"{r['torch']} ({r['threads']} threads); total {r['total_s']:.0f} s; serving model fp32, {r['n_layers']} "
            f"layers, dim 256 (benchmarks/engine_cases.py), greedy; medians of {r['rounds']} off/on rounds.\n\n")
    lines = ["| workload | caching | output tok/s | TTFT p50 / p99 s | hit rate | on/off tok/s | on/off TTFT p50 | "
             "identical outputs |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("system_prompt_offline", "system prompt, all at once"),
                       ("system_prompt_stream", "system prompt, streamed"), ("multi_turn", "multi-turn")):
        w = r[key]
        for name in ("off", "on"):
            m = w[name]
            hit = "" if m["hit_rate"] is None else f"{100 * m['hit_rate']:.0f}%"
            tail = (f"{w['throughput_ratio']:.2f}x | {w['p50_ttft_ratio']:.2f}x | {w['identical_outputs']}/"
                    f"{w['n_outputs']}" if name == "on" else " | | ")
            lines.append(f"| {label} | {name} | {m['tok_s']:.0f} | {m['p50_ttft_s']:.3f} / {m['p99_ttft_s']:.3f} | "
                         f"{hit} | {tail} |")
    notes = (f"\nsystem prompt: {r['requests']} requests, one {r['prefix_len']}-token prefix + 16 tokens each, "
             f"{r['new_tokens']} output tokens; all at t=0 (with caching the first request computes the prefix and "
             f"the others wait a step or two to reuse it), or as Poisson arrivals at "
             f"{r['system_prompt_stream']['arrival_rate_per_s']:.1f}/s "
             f"({r['load']}x what the uncached engine serves all at once). multi-turn: {r['conversations']} "
             f"conversations x {r['turns']} turns (last prompt {r['multi_turn']['on']['final_prompt_len']:.0f} "
             f"tokens), each turn's requests sent together (the first turn shares nothing).\n")
    return head + "\n".join(lines) + "\n" + notes


def run_offline(engine: Engine, prompts: list[list[int]], sampling: SamplingParams) -> dict:
    """All requests at t=0."""
    start = time.perf_counter()
    outs = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    ttft = [o.first_token_time - start for o in outs]
    return {"wall_s": wall, "tok_s": sum(len(o.token_ids) for o in outs) / wall, "p50_ttft_s": pct(ttft, 50),
            "p99_ttft_s": pct(ttft, 99), "tokens": [o.token_ids for o in outs]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite runs this)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs per workload; medians reported")
    parser.add_argument("--load", type=float, default=1.5,
                        help="streamed arrivals as a multiple of what the uncached engine serves offline")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n_layers = 2 if args.quick else 4
    model = serving_model(n_layers=n_layers)
    r = {"quick": args.quick, "n_layers": n_layers, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), python {sys.version.split()[0]}"}
    n, prefix_len, new_tokens = (40, 64, 4) if args.quick else (160, 384, 16)
    conversations, turns = (2, 2) if args.quick else (32, 6)
    prompts = system_prompt_workload(n, prefix_len)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    with torch.inference_mode():
        r["system_prompt_offline"] = compare(model, lambda e: run_offline(e, prompts, sampling), args.rounds)
        rate = args.load * r["system_prompt_offline"]["off"]["tok_s"] / new_tokens  # requests/s
        arrivals = poisson_arrivals(n, rate)
        work = [(p, new_tokens) for p in prompts]
        r["system_prompt_stream"] = compare(model, lambda e: run_online(e, work, arrivals, keep_tokens=True),
                                            args.rounds)
        r["system_prompt_stream"]["arrival_rate_per_s"] = rate
        r["multi_turn"] = compare(model, lambda e: run_turns(e, conversations, turns, new_tokens), args.rounds)
    r.update(requests=n, prefix_len=prefix_len, new_tokens=new_tokens, conversations=conversations, turns=turns,
             load=args.load, rounds=args.rounds)
    r["total_s"] = time.perf_counter() - start
    publish(r, markdown(r), args.out)
    return r


if __name__ == "__main__":
    main()
