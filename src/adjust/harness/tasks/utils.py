"""Functions the adjust_* task YAMLs name (`!function utils.<name>`): the shipped prompts and validity.

eval_prompts.jsonl beside this file is `python -m adjust.eval.tasks prompts --out eval_prompts.jsonl
--n 200 --split eval --seed 1`: the 200 held-out prompts per task of the task table in docs/results.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from adjust.eval.tasks import is_valid

PROMPTS = Path(__file__).resolve().parent / "eval_prompts.jsonl"


def _docs(task: str):
    import datasets

    with open(PROMPTS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    docs = [{"prompt": r["prompt"], "answer": " " + r["meta"]["answer"]} for r in records if r["task"] == task]
    return {"test": datasets.Dataset.from_list(docs)}


def list_docs(**kwargs):
    return _docs("list")


def shuffle_docs(**kwargs):
    return _docs("shuffle")


def pick_docs(**kwargs):
    return _docs("pick")


def reverse_docs(**kwargs):
    return _docs("reverse")


def either_docs(**kwargs):
    return _docs("either")


def validity(doc: dict, results: list[str]) -> dict:
    """1.0 if the generated answer is valid for the prompt (`adjust.eval.tasks.is_valid`), else 0.0."""
    return {"validity": float(is_valid(doc["prompt"], results[0]))}


def reverse_mc_docs(**kwargs):
    """`reverse` as multiple choice: the reversed words (the answer, choice 0) against the given order, the
    answer rotated by one, and the answer with its first two words swapped (distinct choices only)."""
    import datasets

    with open(PROMPTS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    docs = []
    for r in records:
        if r["task"] != "reverse":
            continue
        answer = r["meta"]["answer"].split()
        options = [answer, list(r["meta"]["items"]), answer[1:] + answer[:1], answer[1:2] + answer[:1] + answer[2:]]
        choices = list(dict.fromkeys(" " + " ".join(o) for o in options))
        docs.append({"prompt": r["prompt"], "choices": choices, "gold": 0})
    return {"test": datasets.Dataset.from_list(docs)}
