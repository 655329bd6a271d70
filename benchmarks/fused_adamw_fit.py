"""`mmr1 fit` at the seed geometry in bf16-mixed with the fused AdamW (the default) vs the unfused one.

    python -m benchmarks.fused_adamw_fit --out benchmarks/results/fused_adamw_fit   # 20 steps x 2 x 2, ~6 min

Both variants train `configs/r1-moe-128x16.yaml` (368 M parameters, `precision: bf16-mixed`, gradient clipping
1.0) for the same steps without validation, in fresh processes, alternating --repeats times; "unfused" adds
`--model.fused_adamw false`. Reported per variant: the median training step (forward, backward, clipping, optimizer
step) from the `train/tokens_per_s` the module logs every step, skipping the first --skip steps, and the child's
wall time (startup included). Logs and checkpoints go to a temporary directory (benchmarks.host_memory.variant);
needs the demo data (`make demo-data`).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.host_memory import run_fit, variant
from benchmarks.report import publish

VARIANTS = {"fused": (), "unfused": ("--model.fused_adamw", "false")}


def step_seconds(run_dir: Path, skip: int) -> list[float]:
    """The `train/step_s` the module logs for every step (forward, backward, clipping, optimizer step), after
    the first `skip` steps (allocator and optimizer-state warm-up)."""
    rows = list(csv.DictReader(next(run_dir.rglob("metrics.csv")).open()))
    return [float(r["train/step_s"]) for r in rows if r.get("train/step_s")][skip:]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` on {result['machine']['cores']} CPU cores ({result['machine']['cpu']}); "
             f"config `{result['config']}` (bf16-mixed), {result['steps']} training steps per run, no validation, "
             f"{result['repeats']} alternating runs per variant; step times are medians over every run's steps "
             f"after the first {result['skip']}.", "",
             "| AdamW | training step, s | wall per run, s |", "|---|---|---|"]
    for name in VARIANTS:
        m = result["median"][name]
        lines.append(f"| {name} | {m['step_s']:.2f} | {m['wall_s']:.0f} |")
    lines += ["", f"fused vs unfused: training step {result['step_ratio']:.2f}x faster, wall "
                  f"{result['wall_ratio']:.2f}x."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/r1-moe-128x16.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the step times")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in VARIANTS.items():
                run_dir = Path(tmp) / f"{name}{i}"
                path = Path(tmp) / f"{name}{i}.yaml"
                path.write_text(yaml.safe_dump(variant(config, True, run_dir)))
                run = run_fit(path, args.steps, ("--trainer.log_every_n_steps", "1", *extra))
                run["step_s"] = step_seconds(run_dir, args.skip)
                runs[name].append(run)
                print(f"{name} run {i}: wall {run['wall_s']:.0f} s, median step "
                      f"{statistics.median(run['step_s']):.2f} s", file=sys.stderr)
    median = {name: {"step_s": statistics.median(s for r in rs for s in r["step_s"]),
                     "wall_s": statistics.median(r["wall_s"] for r in rs)} for name, rs in runs.items()}
    result = {"command": "python -m benchmarks.fused_adamw_fit " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "config": str(args.config), "steps": args.steps, "skip": args.skip, "repeats": args.repeats,
              "runs": runs, "median": median,
              "step_ratio": median["unfused"]["step_s"] / median["fused"]["step_s"],
              "wall_ratio": median["unfused"]["wall_s"] / median["fused"]["wall_s"]}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
