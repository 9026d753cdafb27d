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


def readable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a file this process can open; else AdjustError: "not found" or "cannot read"
    (permissions, I/O errors), never "corrupt"."""
    from .errors import AdjustError

    path = Path(path)
    try:
        if not path.is_file():
            raise AdjustError(f"{what} not found: {path}")
        with open(path, "rb"):
            pass
    except OSError as e:
        raise AdjustError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return path


def read_json(path: str | os.PathLike, what: str = "file"):
    from .errors import AdjustError

    path = readable_file(path, what)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise AdjustError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdjustError(f"{what} is not valid JSON: {path} ({e})") from None
    if not isinstance(obj, dict):
        raise AdjustError(f"{what} must hold a JSON object: {path}")
    return obj


_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


def config_from_json(cls, raw: dict, path, what: str):
    """Dataclass `cls` from the fields of a config.json, each checked against its annotated type.

    A field missing from the file is an error naming it, unless `cls.OPTIONAL_FIELDS` names it
    (fields added after files were written, whose documented default is what those files meant):
    the code's defaults never stand in silently for a value the file should hold. Unknown keys
    are ignored.
    """
    import dataclasses

    from .errors import AdjustError

    optional = getattr(cls, "OPTIONAL_FIELDS", ())

    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n in fields if n not in raw and n not in optional]
    if missing:
        raise AdjustError(f"{what} {path} lacks the field{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for name, f in fields.items():
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        types = _JSON_TYPES.get(annotation)
        value = raw.get(name)
        if name in raw and types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise AdjustError(f"{what} {path}: field {name} must be {annotation}, got {value!r}")
    return cls(**{n: raw[n] for n in fields if n in raw})


def load_weights(path: str | os.PathLike, what: str = "weights") -> dict:
    """A safetensors state dict, or one clear error if the file is missing, unreadable or corrupt."""
    from safetensors.torch import load_file

    from .errors import AdjustError

    path = readable_file(path, what)
    try:
        return load_file(str(path))
    except OSError as e:
        raise AdjustError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own (non-exported) error type on corrupt files
        raise AdjustError(f"corrupt {what} file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def load_state(module, state: dict, path, what: str = "weights") -> None:
    """`module.load_state_dict(state)`; a mismatch is one line naming the missing, unexpected and
    mis-shaped tensors (the first few of each, with a count of the rest)."""
    from .errors import AdjustError

    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {_names(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if names]
    if problems:
        raise AdjustError(f"{what} in {path} do not fit this architecture; {'; '.join(problems)}")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise AdjustError(f"{what} in {path} do not fit this architecture: {' '.join(str(e).split())}") from None
