"""The `mmr1` console script.

    mmr1 fit|validate|test|predict --config configs/demo.yaml   # LightningCLI (all its flags, --print_config)
    mmr1 data synth --out data/demo                              # synthetic PNG/WAV data + manifests + tokenizer
    mmr1 export --checkpoint last.ckpt --output runs/demo/export # Lightning checkpoint -> from_pretrained dir
                [--merge-lora]                                   #   (file or sharded dir; LoRA merged)
    mmr1 evaluate --model runs/demo/export --manifest data/demo/test.jsonl
    mmr1 ask --model runs/demo/export "What color is the shape?" --image x.png  # QA from the shell
    mmr1 serve --model runs/demo/export --port 8000              # OpenAI-compatible HTTP server

A bad input (missing file, malformed manifest, existing output) is one line on stderr and exit status 2;
MMR1_TRACEBACK=1 shows the full stack instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: mmr1 <command> [options]

training (Lightning's CLI: every Trainer, model and data flag; `mmr1 fit --help` lists them)
  fit        train:      mmr1 fit --config configs/demo.yaml
  validate   evaluate a checkpoint on the validation set (--ckpt_path)
  test       evaluate a checkpoint on the test set (--ckpt_path)
  predict    run the model over a data set (--ckpt_path)

models and data
  data       mmr1 data synth --out data/demo     synthetic PNG/WAV question data, manifests, tokenizer
  export     mmr1 export --checkpoint last.ckpt --output DIR     -> config.json, model.safetensors, tokenizer.json
  evaluate   mmr1 evaluate --model DIR --manifest test.jsonl     held-out accuracy per question type
  ask        mmr1 ask --model DIR "What color is the shape?" --image x.png [--audio y.wav]
  serve      mmr1 serve --model DIR [--port 8000]     OpenAI-compatible HTTP server (pip install 'mmr1[serve]')

`mmr1 <command> --help` describes a command; `mmr1 --version` prints the version."""


def main(argv: Sequence[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in ("", "-h", "--help"):
        print(USAGE)
        return 0
    if command == "--version":
        from mmr1 import __version__

        print(f"mmr1 {__version__}")
        return 0
    commands = {"data": data_main, "export": export_main, "evaluate": evaluate_main, "ask": ask_main,
                "serve": serve_main}
    if command in commands:
        from data_pipelines.errors import InputError

        try:
            return commands[command](argv[1:])
        except (InputError, FileNotFoundError, FileExistsError, ValueError) as err:
            if os.environ.get("MMR1_TRACEBACK"):  # for bug reports: the full stack
                raise
            print(f"mmr1 {command}: {err}", file=sys.stderr)
            return 2
    if command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        print(f"mmr1: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return lightning_main(argv, from_console)


def lightning_main(argv: list[str], from_console: bool = False) -> int:
    from lightning.pytorch.cli import LightningCLI

    from data_pipelines.datamodule import MultimodalDataModule
    from mmr1.training import MMR1LightningModule

    # Checkpoints are written atomically unless the YAML names other plug-ins (see mmr1.checkpoint).
    defaults = {"plugins": [{"class_path": "mmr1.checkpoint.AtomicCheckpointIO"}]}
    # From the console LightningCLI reads sys.argv itself (given both, it warns that they may disagree).
    LightningCLI(MMR1LightningModule, MultimodalDataModule, args=None if from_console else argv,
                 auto_configure_optimizers=False, parser_kwargs={"prog": "mmr1"}, trainer_defaults=defaults)
    close_process_group()
    return 0


def close_process_group() -> None:
    """After a successful distributed run: wait for every rank, then destroy the process group(s).

    Lightning leaves a gloo group open until the interpreter exits. Its worker threads may then still be releasing
    the last collective's work, which holds a Python object (the context autograd captures in backward); taking
    the GIL for that during finalization aborts the process ("terminate called without an active exception",
    exit -6) after the run itself succeeded (PyTorch issue #190489; here 5 of 75 two-process CPU fits of Lightning's
    BoringModel, and one resumed FSDP fit in CI). Destroying the group joins those threads while the interpreter is
    alive. Not called after a failure: a rank still blocked in a collective would make the barrier wait for the
    timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def ask_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmr1 ask", description="Answer a question about an image and/or audio")
    parser.add_argument("question", help='the question, quoted: "What color is the shape?"')
    parser.add_argument("--model", required=True, help="exported model directory (mmr1 export)")
    parser.add_argument("--image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("--audio", help="audio file (WAV, FLAC, ...; any rate and channel count)")
    parser.add_argument("--input", action="append", default=[], metavar="KEY=PATH",
                        help="a plug-in modality's file, e.g. depth=scene.npy (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--draft", help="exported draft model directory: speculative decoding "
                        "(configs/demo_draft.yaml)")
    args = parser.parse_args(argv)
    inputs = {"image": args.image, "audio": args.audio}
    for item in args.input:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            parser.error(f"--input expects KEY=PATH, got {item!r}")
        inputs[key] = path
    inputs = {key: path for key, path in inputs.items() if path is not None}

    from mmr1.pipeline import Pipeline

    qa = Pipeline.from_pretrained(args.model, draft=args.draft)
    try:
        unknown = sorted(set(inputs) - set(qa.model.modalities))
        if unknown:
            parser.error(f"{args.model} takes {qa.model.modalities}, not {unknown}")
        answer = qa(args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, **inputs)
    finally:
        qa.close()
    print(answer)
    return 0


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmr1 serve", description="Serve an exported model over an "
                                     "OpenAI-compatible HTTP API (docs/serving.md)")
    parser.add_argument("--model", required=True, help="exported model directory (mmr1 export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    parser.add_argument("--profile", help="engine profile YAML, e.g. configs/profiles/low_latency.yaml")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--draft", help="exported draft model directory: speculative decoding "
                        "(configs/demo_draft.yaml)")
    args = parser.parse_args(argv)
    for module in ("fastapi", "uvicorn"):  # the optional dependencies: imported here, never when mmr1 is
        try:
            importlib.import_module(module)
        except ImportError as err:
            print(f"mmr1 serve: needs FastAPI and uvicorn ({err}); pip install 'mmr1[serve]'", file=sys.stderr)
            return 2

    from mmr1.engine import load_profile
    from mmr1.serve import serve

    engine_config = load_profile(args.profile) if args.profile else None
    serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
          engine_config=engine_config, device=args.device, draft=args.draft)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
