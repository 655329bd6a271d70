"""Held-out accuracy of an exported model on a QA manifest: per question type and per modality, next to chance."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from data_pipelines.manifest import read_manifest
from mmr1.pipeline import Pipeline


def _group(record) -> str:
    if record.type and "/" in record.type:
        return record.type.split("/", 1)[0]
    return "+".join(sorted(record.sources)) or "text"


def evaluate_manifest(model_dir: str | Path, manifest: str | Path, *, batch_size: int = 32,
                      output: str | Path | None = None) -> dict:
    qa = Pipeline.from_pretrained(model_dir)
    try:
        records = [r for r in read_manifest(manifest, qa.model.modalities) if r.question is not None]
        hits: dict[str, list[bool]] = defaultdict(list)
        answers_by_type: dict[str, set[str]] = defaultdict(set)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            inputs = {key: [str(r.sources[key]) if key in r.sources else None for r in chunk]
                      for key in qa.model.modalities if any(key in r.sources for r in chunk)}
            predictions = qa([r.question for r in chunk], **inputs)
            for record, prediction in zip(chunk, predictions):
                ok = prediction.strip().lower() == record.answer.strip().lower()
                qtype = record.type or _group(record)
                hits[f"type:{qtype}"].append(ok)
                hits[f"modality:{_group(record)}"].append(ok)
                answers_by_type[qtype].add(record.answer.strip().lower())
    finally:
        qa.close()
    report = {"manifest": str(manifest), "model": str(model_dir), "n": len(records), "groups": {}}
    for name, values in sorted(hits.items()):
        kind, key = name.split(":", 1)
        if kind == "type":
            chance = 1.0 / len(answers_by_type[key])
        else:  # a modality's chance level: the mean over its question types, weighted by count
            types = [t for t in answers_by_type if _type_group(t) == key]
            weights = [len(hits[f"type:{t}"]) for t in types]
            chance = sum(w / len(answers_by_type[t]) for t, w in zip(types, weights)) / max(1, sum(weights))
        report["groups"][name] = {"n": len(values), "accuracy": sum(values) / len(values), "chance": chance}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _type_group(qtype: str) -> str:
    return qtype.split("/", 1)[0] if "/" in qtype else qtype


def format_report(report: dict) -> str:
    lines = [f"held-out accuracy on {report['manifest']} ({report['n']} questions)",
             f"{'group':<28}{'n':>6}{'accuracy':>10}{'chance':>9}"]
    for name, g in report["groups"].items():
        lines.append(f"{name:<28}{g['n']:>6}{g['accuracy']:>10.1%}{g['chance']:>9.1%}")
    return "\n".join(lines)
