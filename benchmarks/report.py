"""How every benchmark publishes: the markdown table on stdout, and with `--out PATH` the same table in PATH.md
next to the full results in PATH.json (what benchmarks/results/ holds)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: cores, CPU architecture, torch and its threads, and the load when it started (these
    machines are shared, and a busy one skews timings)."""
    return {"cores": os.cpu_count(), "cpu": platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0]}


def publish(result: dict[str, Any], table: str, out: str | Path | None) -> None:
    print(table)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(table.rstrip("\n") + "\n")


def round_args(doc: str, argv: list[str] | None, rounds: int, quick: str) -> tuple[argparse.Namespace, list[str]]:
    """The options of the benchmarks that repeat interleaved rounds: --rounds, --quick (`quick`: what it does) and
    --out. Returns the parsed options and the arguments as given, for the result's `command`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(argv), argv
