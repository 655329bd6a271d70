"""Fused vs unfused AdamW on the demo model (configs/demo.yaml), side by side in one process.

    HF_HUB_OFFLINE=1 python -m benchmarks.optimizer --data data/demo --out benchmarks/results/optimizer

Times, interleaved over --rounds, (a) `optimizer.step()` alone on the demo model's real gradients and (b) a whole
training step (forward, backward, step, zero_grad) on demo batches, with torch's default AdamW (a per-parameter
loop on the CPU) and with `fused=True`, the one the LightningModule picks where Lightning allows it. One parameter
group (configure_optimizers' groups change learning rates, not the work). Medians; the ratio is what to compare.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.report import publish
from data_pipelines.datamodule import MultimodalDataModule
from mmr1.config import R1Config, config_from_dict
from mmr1.model import EncoderConfig
from mmr1.training import MMR1LightningModule


def demo_module_and_batches(data: Path, n_batches: int) -> tuple[MMR1LightningModule, list[dict]]:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())["model"]
    torch.manual_seed(0)
    module = MMR1LightningModule(str(data / "tokenizer.json"), backbone=config_from_dict(R1Config, cfg["backbone"]),
                                 encoders={k: config_from_dict(EncoderConfig, v) for k, v in cfg["encoders"].items()},
                                 lr=cfg["lr"], encoder_lr_scale=cfg["encoder_lr_scale"],
                                 gate_lr_scale=cfg["gate_lr_scale"])
    dm = MultimodalDataModule(train_manifest=str(data / "train.jsonl"), batch_size=32, num_workers=0, max_length=64)
    dm.attach(module.model.processors(), module.tokenizer)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return module.train(), [next(loader) for _ in range(n_batches)]


def adamw(module: MMR1LightningModule, fused: bool) -> torch.optim.AdamW:
    groups = [{"params": [p for p in module.model.parameters() if p.requires_grad], "weight_decay": 0.05}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round and optimizer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    module, batches = demo_module_and_batches(args.data, args.steps)
    optimizers = {"unfused": adamw(module, False), "fused": adamw(module, True)}
    step_s = {name: [] for name in optimizers}
    train_s = {name: [] for name in optimizers}

    def train_step(opt, batch):
        module._forward(batch, train=True)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, opt in optimizers.items():  # warm-up: optimizer state exists for both
        train_step(opt, batches[0])
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            module._forward(batches[0], train=True)["loss"].backward()
            start = time.perf_counter()
            opt.step()
            step_s[name].append(time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for batch in batches:
                train_step(opt, batch)
            train_s[name].append((time.perf_counter() - start) / len(batches))
    result = {"command": "python -m benchmarks.optimizer " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "parameters": sum(p.numel() for p in module.parameters()), "rounds": args.rounds,
              "steps_per_round": args.steps}
    for name in optimizers:
        result[name] = {"optimizer_step_ms": 1e3 * statistics.median(step_s[name]),
                        "train_step_ms": 1e3 * statistics.median(train_s[name])}
    result["optimizer_step_speedup"] = result["unfused"]["optimizer_step_ms"] / result["fused"]["optimizer_step_ms"]
    result["train_step_speedup"] = result["unfused"]["train_step_ms"] / result["fused"]["train_step_ms"]
    table = "\n".join([
        f"`{result['command']}` on {result['machine']}; demo model ({result['parameters']:,} parameters), batch 32; "
        f"medians of {args.rounds} interleaved rounds.", "",
        "| AdamW | optimizer step, ms | training step, ms |", "|---|---|---|",
        *(f"| {name} | {result[name]['optimizer_step_ms']:.1f} | {result[name]['train_step_ms']:.0f} |"
          for name in optimizers),
        f"| speed-up | {result['optimizer_step_speedup']:.2f}x | {result['train_step_speedup']:.2f}x |"])
    publish(result, table, args.out)
    return result


if __name__ == "__main__":
    main()
