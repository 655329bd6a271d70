"""Compute saved by dynamic expert activation on a TRAINED model, and what it costs in answer accuracy.

    HF_HUB_OFFLINE=1 python -m benchmarks.dynamic_activation --model runs/demo/export \
        --manifest data/demo/test.jsonl --out benchmarks/results/dynamic_activation

The model is loaded once; for each routing setting its MoE layers' config is switched (fixed top-k, or the
dynamic rule of `MoEConfig.dynamic_threshold` with [min_k, max_k]) and the held-out manifest is run teacher-forced.
Reported per setting: mean routed experts per real token (averaged over MoE layers, from the routers' own
`MoEAux.mean_experts_per_token`), routed-expert FLOPs per token (3 matmuls of dim x expert_hidden per expert) and
their saving against fixed top-4, and the answer exact-match rate (every answer token is the argmax).
The routers were trained with the model's own `top_k`; the other settings change routing after training, so
the accuracy column shows how much each saving costs without retraining.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from benchmarks.report import publish
from data_pipelines.datamodule import MultimodalDataModule
from mmr1.model import MultimodalR1
from mmr1.moe import MoEFeedForward
from mmr1.training import answer_exact_match, shifted_targets

# (name, top_k, dynamic_threshold, min_k, max_k); None threshold = fixed top-k.
SETTINGS = (
    ("fixed top-2", 2, None, None, None),
    ("fixed top-4", 4, None, None, None),
    ("dynamic p>=0.5, k in [2, 4]", 4, 0.5, 2, 4),
    ("dynamic p>=0.7, k in [2, 4]", 4, 0.7, 2, 4),
    ("dynamic p>=0.9, k in [2, 4]", 4, 0.9, 2, 4),
    ("dynamic p>=0.5, k in [1, 4]", 4, 0.5, 1, 4),
    ("dynamic p>=0.7, k in [1, 4]", 4, 0.7, 1, 4),
    ("dynamic p>=0.9, k in [1, 4]", 4, 0.9, 1, 4),
)


def set_routing(model: MultimodalR1, top_k: int, threshold: float | None, min_k: int | None,
                max_k: int | None) -> None:
    """Give every MoE layer (its router too) a copy of its config with this routing rule; validated on build."""
    for block in model.backbone.layers:
        if isinstance(block.ffn, MoEFeedForward):
            cfg = dataclasses.replace(block.ffn.cfg, top_k=top_k, dynamic_threshold=threshold, min_k=min_k,
                                      max_k=max_k)
            block.ffn.cfg = cfg
            block.ffn.router.cfg = cfg


@torch.inference_mode()
def measure(model: MultimodalR1, loader) -> dict:
    experts, correct, answers, batches = [], 0, 0, 0
    started = time.perf_counter()
    for batch in loader:
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("modalities"))
        experts.append(torch.stack([aux.mean_experts_per_token for aux in out.moe_aux]).mean().item())
        ok = answer_exact_match(out.logits, shifted_targets(batch["labels"]))
        correct += int(ok.sum())
        answers += ok.numel()
        batches += 1
    return {"mean_experts_per_token": sum(experts) / len(experts), "answer_accuracy": correct / answers,
            "answers": answers, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model directory (mmr1 export)")
    parser.add_argument("--manifest", required=True, help="held-out QA manifest (jsonl)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args()

    model, tokenizer = MultimodalR1.from_pretrained(args.model)
    moe = model.config.backbone.moe
    if moe is None:
        raise SystemExit(f"{args.model}: the backbone has no MoE layers")
    data = MultimodalDataModule(train_manifest=args.manifest, test_manifest=args.manifest,
                                batch_size=args.batch_size).attach(model.processors(), tokenizer)
    data.setup("test")
    loader = data.test_dataloader()
    flops_per_expert = 3 * 2 * model.config.backbone.dim * moe.expert_hidden  # gate, up, down matmuls

    rows = []
    for name, top_k, threshold, min_k, max_k in SETTINGS:
        set_routing(model, top_k, threshold, min_k, max_k)
        result = measure(model, loader)
        result.update(setting=name, top_k=top_k, dynamic_threshold=threshold, min_k=min_k, max_k=max_k,
                      expert_mflops_per_token=result["mean_experts_per_token"] * flops_per_expert / 1e6)
        rows.append(result)
        print(f"{name:<30} experts/token {result['mean_experts_per_token']:.2f}  "
              f"accuracy {result['answer_accuracy']:.1%}", flush=True)
    top4 = next(r for r in rows if r["setting"] == "fixed top-4")["expert_mflops_per_token"]
    for r in rows:
        r["saved_vs_top4"] = 1 - r["expert_mflops_per_token"] / top4

    report = {"command": "python -m benchmarks.dynamic_activation " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "model": args.model, "trained_top_k": moe.top_k, "num_experts": moe.num_experts,
              "num_groups": moe.num_groups, "topk_groups": moe.topk_groups, "rows": rows}
    table = ["| routing | mean experts/token | expert MFLOPs/token | saved vs top-4 | answer accuracy |",
             "|---|---|---|---|---|"]
    table += [f"| {r['setting']} | {r['mean_experts_per_token']:.2f} | {r['expert_mflops_per_token']:.3f} | "
              f"{r['saved_vs_top4']:.1%} | {r['answer_accuracy']:.1%} |" for r in rows]
    header = (f"`{report['command']}` on {report['machine']}; model trained with fixed top-{moe.top_k} of "
              f"{moe.num_experts} experts ({moe.num_groups} groups, best {moe.topk_groups} kept), "
              f"{rows[0]['answers']} held-out answers, teacher-forced.\n\n")
    publish(report, header + "\n".join(table), args.out)

if __name__ == "__main__":
    main()
