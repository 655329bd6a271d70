"""`mmr1 fit` with and without `mmr1.host_memory.KeepFreedHostMemory`: wall, user, kernel (sys) time and peak RSS.

    python -m benchmarks.host_memory --out benchmarks/results/host_memory   # seed geometry, 30 steps, ~10 min

Both variants train the same config (default `configs/r1-moe-128x16.yaml`, which ships with the callback) for the
same steps without validation, in fresh processes, alternating "keep" and "default" --repeats times so a drift
in the machine's speed hits both. The "default" variant is the config with the callback removed. Each child's
logs and checkpoints go to a temporary directory; nothing under runs/ is touched. Needs the demo data
(`make demo-data`). Times come from the kernel's accounting of each child (os.wait4), startup included.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.report import publish

CALLBACK = "mmr1.host_memory.KeepFreedHostMemory"


def variant(config: dict[str, Any], keep: bool, run_dir: Path) -> dict[str, Any]:
    """The config with its logger and checkpoints under run_dir, and the callback present (keep) or removed."""
    cfg = yaml.safe_load(yaml.safe_dump(config))  # a deep copy
    trainer = cfg.setdefault("trainer", {})
    callbacks = [c for c in trainer.get("callbacks") or [] if c.get("class_path") != CALLBACK]
    for c in callbacks:
        if c.get("class_path", "").endswith("ModelCheckpoint"):
            c.setdefault("init_args", {})["dirpath"] = str(run_dir / "checkpoints")
    if keep:
        callbacks.append({"class_path": CALLBACK})
    trainer["callbacks"] = callbacks
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(run_dir)
    return cfg


def run_fit(config_path: Path, steps: int, extra_args: tuple[str, ...] = ()) -> dict[str, float]:
    cmd = [sys.executable, "-m", "mmr1.cli", "fit", "--config", str(config_path), "--trainer.max_steps", str(steps),
           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", *extra_args]
    # stderr to a file, not a pipe: wait4 reads nothing while the child runs, so a full pipe would block it
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        err = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"mmr1 fit --config {config_path} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "max_rss_gb": usage.ru_maxrss / 2**20,
            "callback_applied": "KeepFreedHostMemory: glibc keeps" in err}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` on {result['machine']['cores']} CPU cores ({result['machine']['cpu']}); "
             f"config `{result['config']}`, {result['steps']} training steps per run, no validation, "
             f"{result['repeats']} alternating runs per variant (median; every run in the JSON).", "",
             "| variant | wall s | user s | kernel (sys) s | peak RSS GB |", "|---|---|---|---|---|"]
    for name in ("keep", "default"):
        m = result["median"][name]
        lines.append(f"| {name} | {m['wall_s']:.0f} | {m['user_s']:.0f} | {m['sys_s']:.0f} | {m['max_rss_gb']:.1f} |")
    lines += ["", f"keep vs default, wall: {result['wall_ratio']:.2f}x faster."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/r1-moe-128x16.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    runs: dict[str, list[dict[str, float]]] = {"keep": [], "default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in ("keep", "default"):
                run_dir = Path(tmp) / f"{name}{i}"
                path = Path(tmp) / f"{name}{i}.yaml"
                path.write_text(yaml.safe_dump(variant(config, name == "keep", run_dir)))
                runs[name].append(run_fit(path, args.steps))
                print(f"{name} run {i}: {runs[name][-1]}", file=sys.stderr)
    median = {name: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "user_s", "sys_s", "max_rss_gb")}
              for name, rs in runs.items()}
    result = {"command": "python -m benchmarks.host_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "config": str(args.config), "steps": args.steps, "repeats": args.repeats, "runs": runs,
              "median": median, "wall_ratio": median["default"]["wall_s"] / median["keep"]["wall_s"]}
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
