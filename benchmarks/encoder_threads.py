"""Async image/audio encoding beside the decoder on a small CPU: how many threads the encoder workers and the
decoder take (EngineConfig.encoder_threads, share_cores_with_encoders).

    python -m benchmarks.encoder_threads --out benchmarks/results/encoder_threads   # ~3 min on 2 cores

The workload of benchmarks/engine.py's item 5 (48 image+audio requests, demo-sized random encoders, real files,
max_batch 16, 8 new tokens each), run with async encoding and inline, under three settings:
  every_core      each worker on PyTorch's default thread count (every core), the decoder too (the engine before
                  the twenty-third session);
  workers_share   the workers on an equal share of the cores (EngineConfig.encoder_threads=None), the decoder on
                  all of them;
  default         that share, and while the workers have inputs, the decoder's steps on the threads they leave
                  (share_cores_with_encoders, the default).
Each at the decoder thread count PyTorch starts with (every core: what `Pipeline`, `mmr1 ask` and `mmr1 serve`
get) and at 1 thread (the engine benchmark's setting). Settings alternate within each round; medians of --rounds.
"""
from __future__ import annotations

import os
import statistics

import torch

from benchmarks.engine_cases import async_vs_inline
from benchmarks.report import machine_info, publish, round_args

SETTINGS = {"every_core": {"encoder_threads": os.cpu_count() or 1, "share_cores_with_encoders": False},
            "workers_share": {"encoder_threads": None, "share_cores_with_encoders": False},
            "default": {"encoder_threads": None, "share_cores_with_encoders": True}}


def run(threads: int, rounds: int, n_requests: int) -> dict:
    torch.set_num_threads(threads)
    runs = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, config in SETTINGS.items():
            runs[name].append(async_vs_inline(n_requests, 8, **config))
    out = {}
    for name, results in runs.items():
        out[name] = {key: statistics.median(r[key]["requests_s"] for r in results) for key in ("async", "inline")}
        out[name]["async_vs_inline"] = statistics.median(r["speedup"] for r in results)
    for name in SETTINGS:
        out[name]["async_vs_every_core_async"] = out[name]["async"] / out["every_core"]["async"]
    return out


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}`; {result['machine']['cores']} cores ({result['machine']['cpu']}), torch "
             f"{result['machine']['torch']}; {result['requests']} image+audio requests; median of "
             f"{result['rounds']} rounds.", "",
             "| decoder threads | setting | async requests/s | inline requests/s | async vs inline | "
             "async vs every_core |", "|---|---|---|---|---|---|"]
    for threads, settings in result["by_threads"].items():
        for name, r in settings.items():
            lines.append(f"| {threads} | {name} | {r['async']:.1f} | {r['inline']:.1f} | {r['async_vs_inline']:.2f}x "
                         f"| {r['async_vs_every_core_async']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, argv = round_args(__doc__, argv, rounds=3, quick="8 requests, 1 round: a smoke run")
    rounds, n_requests = (1, 8) if args.quick else (args.rounds, 48)
    default_threads = torch.get_num_threads()
    result = {"command": "python -m benchmarks.encoder_threads " + " ".join(argv),
              "machine": machine_info(), "requests": n_requests, "rounds": rounds,
              "by_threads": {t: run(t, rounds, n_requests) for t in dict.fromkeys((default_threads, 1))}}
    publish(result, markdown(result), args.out)
    return result

if __name__ == "__main__":
    main()
