"""The asyncio fronts' step thread on a small CPU: how many PyTorch threads its steps should take.

    python -m benchmarks.async_fronts --out benchmarks/results/async_fronts   # ~1 min on 2 cores

The workload of benchmarks/engine.py's item 5 (48 image+audio requests, demo-sized random encoders, real files,
max_batch 16, 8 new tokens each), sent at once as `Engine.stream` calls on one event loop -- what `mmr1 serve` does
with concurrent requests -- with the engine's step thread (mmr1/engine/fronts.py) on 1 thread, on one fewer than the
decoder's (the default, EngineConfig.decoder_threads=None) and on all of the decoder's; and for reference the same
requests through the synchronous `Engine.generate`, whose steps run on the caller's thread with the decoder's count.
Every setting builds a fresh engine (the encoding cache would otherwise skip the encoders); settings alternate
within each round; medians of --rounds. Greedy outputs must equal the synchronous ones.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_cases import demo_sized_multimodal, timed, write_media
from benchmarks.report import machine_info, publish, round_args
from mmr1.engine import Engine, EngineConfig, SamplingParams

NEW_TOKENS = 8


def settings(decoder_threads: int) -> dict[str, dict]:
    """name -> (front, EngineConfig.decoder_threads); the async step thread takes decoder_threads when it is set."""
    rows = {"sync generate": ("sync", None), f"async, step thread on {max(1, decoder_threads - 1)} (default)":
            ("async", None)}
    for threads in dict.fromkeys((1, decoder_threads)):
        if threads != max(1, decoder_threads - 1):
            rows[f"async, step thread on {threads}"] = ("async", threads)
    return rows


async def stream_all(engine: Engine, requests: list[dict], params: SamplingParams) -> list[list[int]]:
    async def one(request: dict) -> list[int]:
        return [t async for t in engine.stream(request["prompt"], sampling=params, image=request["image"],
                                               audio=request["audio"])]
    return await asyncio.gather(*(one(r) for r in requests))


def run_once(model, requests: list[dict], front: str, threads: int | None) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(max_batch=16, decoder_threads=threads))
    try:
        if front == "sync":
            outs, wall = timed(lambda: engine.generate(requests, params))
            assert all(o.error is None for o in outs)
            return wall, [o.token_ids for o in outs]
        tokens, wall = timed(lambda: asyncio.run(stream_all(engine, requests, params)))
        return wall, tokens
    finally:
        engine.close()


def run(rounds: int, n_requests: int) -> dict:
    model = demo_sized_multimodal()
    decoder_threads = torch.get_num_threads()
    rows = settings(decoder_threads)
    walls: dict[str, list[float]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(3)
        requests = [{"prompt": [1, 3, 5, 6] + [rng.randrange(7, 512) for _ in range(rng.randint(4, 16))] + [4], **m}
                    for m in write_media(Path(tmp), n_requests)]
        reference = None
        for _ in range(rounds):
            for name, (front, threads) in rows.items():
                wall, tokens = run_once(model, requests, front, threads)
                reference = reference or tokens
                assert tokens == reference, f"{name}: outputs differ from the first run's"
                walls[name].append(wall)
    default = next(name for name in rows if name.endswith("(default)"))
    out = {name: {"requests_s": n_requests / statistics.median(w), "walls_s": w} for name, w in walls.items()}
    for name in out:
        out[name]["vs_default"] = out[name]["requests_s"] / out[default]["requests_s"]
    return {"decoder_threads": decoder_threads, "settings": out}


def markdown(result: dict) -> str:
    m = result["machine"]
    caption = (f"`{result['command']}`; {m['cores']} cores ({m['cpu']}), torch {m['torch']}, load average at start "
               f"{m['load_average_at_start']:.2f}; {result['requests']} image+audio requests, {NEW_TOKENS} new tokens "
               f"each, all sent at once; decoder threads {result['decoder_threads']}; median of {result['rounds']} "
               "rounds; greedy outputs identical in every run.")
    table = [f"| {name} | {r['requests_s']:.1f} | {r['vs_default']:.2f}x |" for name, r in result["settings"].items()]
    return "\n".join([caption, "", "| setting | requests/s | vs default |", "|---|---|---|", *table]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, argv = round_args(__doc__, argv, rounds=5, quick="8 requests, 1 round: a smoke run")
    rounds, n_requests = (1, 8) if args.quick else (args.rounds, 48)
    result = {"command": "python -m benchmarks.async_fronts " + " ".join(argv), "machine": machine_info(),
              "requests": n_requests, "rounds": rounds, **run(rounds, n_requests)}
    publish(result, markdown(result), args.out)
    return result

if __name__ == "__main__":
    main()
