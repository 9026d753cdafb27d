"""Atomic file writes: a reader never sees a half-written checkpoint or output file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the directory normal permissions
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file"):
    from .errors import AdjustError

    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdjustError(f"{what} is not valid JSON: {path} ({e})") from None
    if not isinstance(obj, dict):
        raise AdjustError(f"{what} must hold a JSON object: {path}")
    return obj


def load_weights(path: str | os.PathLike, what: str = "weights") -> dict:
    """A safetensors state dict, or one clear error if the file is missing or corrupt."""
    from safetensors.torch import load_file

    from .errors import AdjustError

    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own (non-exported) error type on corrupt files
        raise AdjustError(f"corrupt {what} file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def load_state(module, state: dict, path, what: str = "weights") -> None:
    from .errors import AdjustError

    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise AdjustError(f"{what} in {path} do not fit this architecture: {str(e).splitlines()[0]}") from None
