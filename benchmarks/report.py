"""How every benchmark publishes: the markdown table on stdout, and with `--out PATH` the same table in PATH.md
next to the full results in PATH.json (what benchmarks/results/ holds)."""
from __future__ import annotations

import json
import os
import platform
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
