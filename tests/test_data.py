"""Reading corpora: plain text, JSONL, and clear errors."""

from __future__ import annotations

import json

import pytest

from adjust.data import read_documents, read_examples
from adjust.errors import AdjustError


def test_plain_text_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\nline two\n")
    assert read_documents(p) == ["line one\nline two\n"]


def test_jsonl_documents(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps("second") + "\n" + json.dumps({"text": " "}))
    assert read_documents(p) == ["first", "second"]  # blank lines and blank documents skipped


def test_prompt_completion_records(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"prompt": "list: a b =", "completion": " b a"}) + "\n" + json.dumps({"text": "plain"}))
    assert read_examples(p) == [("list: a b =", " b a"), ("", "plain")]
    assert read_documents(p) == ["list: a b = b a", "plain"]


@pytest.mark.parametrize("content,match", [
    ("", "empty"), ("   \n\n", "empty"), ('{"text": "a"}\nnot json\n', ":2"), ('{"body": "a"}\n', "text"),
    ('{"prompt": "a"}\n', "completion"), ('{"prompt": 3, "completion": "b"}\n', "completion")])
def test_bad_files(tmp_path, content, match):
    suffix = ".jsonl" if "{" in content or "json" in content else ".txt"
    p = tmp_path / f"f{suffix}"
    p.write_text(content)
    with pytest.raises(AdjustError, match=match):
        read_documents(p)


def test_missing_file(tmp_path):
    with pytest.raises(AdjustError, match="not found"):
        read_documents(tmp_path / "nope.txt")
