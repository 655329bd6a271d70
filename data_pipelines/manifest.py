"""JSONL manifests: one JSON object per line, one `Record` per object.

    {"id": "ex1", "image": "images/ex1.png", "question": "What color is the shape?", "answer": "red",
     "type": "image/color"}
    {"id": "t1", "text": "A red circle sits next to a blue square."}

Reserved keys are id/question/answer/text/type. The caller names which other keys are modality file
references (the processor keys of the model, so a plug-in's "depth" works like "image"); their paths resolve
relative to the manifest's directory. Every remaining key is kept in `Record.extra`. The structure is checked
here; whether the files exist and decode is the dataset's validation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from data_pipelines.errors import InputError

RESERVED_KEYS = ("id", "question", "answer", "text", "type")


@dataclass
class Record:
    id: str
    question: str | None = None
    answer: str | None = None
    text: str | None = None
    type: str | None = None
    sources: dict[str, Path] = field(default_factory=dict)  # modality key -> file path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """A text-only (language-modelling) record rather than a question."""
        return self.question is None


def read_manifest(path: str | Path, modalities: Sequence[str], *, require_answer: bool = True) -> list[Record]:
    """Parse a JSONL manifest into records. `modalities` are the keys that hold file paths.

    `require_answer=False` accepts question-only records (prediction manifests). Raises `InputError` naming
    the manifest, line number and record id.
    """
    path = Path(path)
    manifest = str(path)
    if not path.is_file():
        raise InputError("manifest not found (expected a JSONL file, one JSON object per line)", manifest=manifest)
    clash = sorted(set(modalities) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"modality keys {clash} collide with the reserved manifest keys {list(RESERVED_KEYS)}")

    records: list[Record] = []
    first_line: dict[str, int] = {}  # record id -> line it first appeared on
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_line(line, line_no, path, modalities, require_answer)
            if record.id in first_line:
                raise InputError(f"line {line_no}: duplicate id (first used on line {first_line[record.id]}); "
                                 "ids must be unique within a manifest", record=record.id, manifest=manifest)
            first_line[record.id] = line_no
            records.append(record)
    if not records:
        raise InputError("manifest has no records (expected one JSON object per line)", manifest=manifest)
    return records


def _parse_line(line: str, line_no: int, path: Path, modalities: Sequence[str], require_answer: bool) -> Record:
    manifest = str(path)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})", manifest=manifest) from None
    if not isinstance(obj, dict):
        raise InputError(f"line {line_no}: expected a JSON object, got {type(obj).__name__}", manifest=manifest)

    record_id = _record_id(obj, line_no, manifest)

    def fail(reason: str) -> InputError:
        return InputError(f"line {line_no}: {reason}", record=record_id, manifest=manifest)

    strings = {}
    for key in ("question", "answer", "text", "type"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"field {key!r} must be a string, got {type(value).__name__}")
        strings[key] = value
    question, answer, text = strings["question"], strings["answer"], strings["text"]
    if question is None and answer is not None:
        raise fail("has an 'answer' but no 'question'")
    if question is None and text is None:
        raise fail("expected either 'question' and 'answer' (an example) or 'text' (a text-only record)")
    if question is not None and answer is None and require_answer:
        raise fail("has a 'question' but no 'answer' (only prediction manifests may omit answers)")

    sources: dict[str, Path] = {}
    for key in modalities:
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            raise fail(f"modality {key!r} must be a file path string, got {value!r}")
        file = Path(value).expanduser()
        sources[key] = file if file.is_absolute() else path.parent / file
    if sources and question is None:
        raise fail(f"text-only record carries modality files {sorted(sources)}; give it a question and answer")

    extra = {k: v for k, v in obj.items() if k not in RESERVED_KEYS and k not in modalities}
    return Record(id=record_id, question=question, answer=answer, text=text, type=strings["type"],
                  sources=sources, extra=extra)


def _record_id(obj: dict, line_no: int, manifest: str) -> str:
    value = obj.get("id")
    if value is None:
        raise InputError(f"line {line_no}: record has no 'id' (every record needs a unique string id)",
                         manifest=manifest)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise InputError(f"line {line_no}: 'id' must be a non-empty string, got {value!r}", manifest=manifest)
    return str(value)
