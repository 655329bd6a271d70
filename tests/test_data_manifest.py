"""read_manifest: record structure, path resolution, and errors naming manifest, line and record id."""
from __future__ import annotations

import json

import pytest

from data_pipelines import InputError, read_manifest


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_records_fields_paths_and_extra(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = _write(tmp_path / "sub" / "m.jsonl", [
        {"id": "a", "image": "img/a.png", "question": "Q?", "answer": "A", "type": "image/color", "source": "x"},
        "",
        {"id": 7, "depth": str(tmp_path / "abs.npy"), "audio": "a.wav", "question": "Q2?", "answer": "B"},
        {"id": "t", "text": "just text", "image": None},
    ])
    records = read_manifest(manifest, ["image", "depth"])
    assert [r.id for r in records] == ["a", "7", "t"]
    a, seven, text = records
    assert a.sources == {"image": tmp_path / "sub" / "img" / "a.png"}
    assert (a.question, a.answer, a.type, a.text) == ("Q?", "A", "image/color", None)
    assert a.extra == {"source": "x"} and not a.is_text
    assert seven.sources == {"depth": tmp_path / "abs.npy"}
    assert seven.extra == {"audio": "a.wav"}  # not one of the modalities asked for: just extra data
    assert text.is_text and text.text == "just text" and text.sources == {}


def test_question_only_records_only_for_prediction(tmp_path):
    manifest = _write(tmp_path / "p.jsonl", [{"id": "q", "question": "What?"}])
    assert read_manifest(manifest, [], require_answer=False)[0].answer is None
    with pytest.raises(InputError, match="line 1: has a 'question' but no 'answer'"):
        read_manifest(manifest, [])


@pytest.mark.parametrize("lines, record, expected", [
    (['{"id": "a", "text": "ok"}', '{"id": "b", "text": '], None, "line 2: invalid JSON"),
    (['[1, 2]'], None, "line 1: expected a JSON object, got list"),
    ([{"text": "no id"}], None, "line 1: record has no 'id'"),
    ([{"id": "", "text": "x"}], None, "line 1: 'id' must be a non-empty string"),
    ([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}], "a",
     "line 3: duplicate id \\(first used on line 1\\)"),
    ([{"id": "n", "type": "image/color"}], "n", "line 1: expected either 'question' and 'answer'"),
    ([{"id": "n", "answer": "red"}], "n", "line 1: has an 'answer' but no 'question'"),
    ([{"id": "n", "question": "Q?", "answer": 3}], "n", "field 'answer' must be a string, got int"),
    ([{"id": "m", "question": "Q?", "answer": "A", "image": 5}], "m", "modality 'image' must be a file path string"),
    ([{"id": "m", "question": "Q?", "answer": "A", "image": ["a.png"]}], "m", "modality 'image'"),
    ([{"id": "m", "question": "Q?", "answer": "A", "image": " "}], "m", "modality 'image'"),
    ([{"id": "t", "text": "x", "image": "a.png"}], "t", "text-only record carries modality files"),
])
def test_bad_records_name_manifest_line_and_id(tmp_path, lines, record, expected):
    manifest = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputError, match=expected) as info:
        read_manifest(manifest, ["image"])
    assert info.value.manifest == str(manifest) and str(manifest) in str(info.value)
    assert info.value.record == record
    if record is not None:
        assert f"record {record!r}" in str(info.value)


def test_missing_and_empty_manifests(tmp_path):
    with pytest.raises(InputError, match="manifest not found") as info:
        read_manifest(tmp_path / "nope.jsonl", [])
    assert str(tmp_path / "nope.jsonl") in str(info.value)
    with pytest.raises(InputError, match="no records"):
        read_manifest(_write(tmp_path / "empty.jsonl", ["", "  "]), [])


def test_modality_key_may_not_shadow_a_reserved_key(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        read_manifest(_write(tmp_path / "m.jsonl", [{"id": "a", "text": "x"}]), ["text"])
