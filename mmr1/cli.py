"""The `mmr1` console script.

    mmr1 fit|validate|test|predict --config configs/demo.yaml   # LightningCLI (all its flags, --print_config)
    mmr1 data synth --out data/demo                              # synthetic PNG/WAV data + manifests + tokenizer
    mmr1 export --checkpoint last.ckpt --output runs/demo/export # Lightning checkpoint -> from_pretrained dir
                [--merge-lora]                                   #   (file or sharded dir; LoRA merged)
    mmr1 evaluate --model runs/demo/export --manifest data/demo/test.jsonl
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "data":
        return data_main(argv[1:])
    if command == "export":
        return export_main(argv[1:])
    if command == "evaluate":
        return evaluate_main(argv[1:])
    return lightning_main(argv)


def lightning_main(argv: list[str]) -> int:
    from lightning.pytorch.cli import LightningCLI

    from data_pipelines.datamodule import MultimodalDataModule
    from mmr1.training import MMR1LightningModule

    # Checkpoints are written atomically unless the YAML names other plug-ins (see mmr1.checkpoint).
    defaults = {"plugins": [{"class_path": "mmr1.checkpoint.AtomicCheckpointIO"}]}
    LightningCLI(MMR1LightningModule, MultimodalDataModule, args=argv, auto_configure_optimizers=False,
                 parser_kwargs={"prog": "mmr1"}, trainer_defaults=defaults)
    return 0


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmr1 data", description="Data utilities")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="write synthetic image/audio QA data: PNG/WAV files, manifests, tokenizer")
    synth.add_argument("--out", required=True, help="output directory (must be empty or new)")
    synth.add_argument("--num-train", type=int, default=6000)
    synth.add_argument("--num-val", type=int, default=200)
    synth.add_argument("--num-test", type=int, default=300)
    synth.add_argument("--text-records", type=int, default=100)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty directory")
    args = parser.parse_args(argv)

    from data_pipelines.synth import synthesize

    summary = synthesize(args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                         seed=args.seed, text_records=args.text_records, overwrite=args.overwrite)
    print(summary)
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmr1 export", description="Lightning checkpoint -> model directory")
    parser.add_argument("--checkpoint", required=True,
                        help="a .ckpt written by `mmr1 fit` (a file, or a sharded FSDP checkpoint directory)")
    parser.add_argument("--output", required=True, help="directory for config.json, model.safetensors, tokenizer.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --output")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold LoRA adapters into the weights (required for checkpoints trained with model.lora)")
    args = parser.parse_args(argv)

    from mmr1.checkpoint import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite, merge_lora=args.merge_lora)
    print(f"exported {args.checkpoint} -> {path}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmr1 evaluate", description="Held-out QA accuracy of an exported model")
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--manifest", required=True, help="JSONL manifest with question/answer records")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", help="write the report as JSON here")
    args = parser.parse_args(argv)

    from mmr1.evaluation import evaluate_manifest, format_report

    report = evaluate_manifest(args.model, args.manifest, batch_size=args.batch_size, output=args.output)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
