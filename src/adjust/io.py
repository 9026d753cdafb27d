"""Atomic file writes: a reader never sees a half-written checkpoint or output file.

A write goes to a temporary file beside its target, which is fsync'ed, renamed onto the
target, and then the directory is fsync'ed: after a crash or power loss the target holds
either the old or the new content, never an empty or partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(dirpath)


# how a full disk or a file-size limit (ulimit -f) shows through libraries that hide the OSError
# (torch.save's PytorchStreamWriter does not say which: -1)
_FULL = {"unexpected pos": -1, "file write failed": -1, "os error 28": errno.ENOSPC,
         "os error 27": errno.EFBIG, "os error 122": errno.EDQUOT}


def disk_full_message(err: int, path) -> str | None:
    """The one line for a write that failed for lack of room (errno ENOSPC, EDQUOT, EFBIG, or -1: one of them),
    or None for another errno."""
    if err in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {path}; free some space and rerun the same command"
    if err == errno.EFBIG:
        return f"file too large writing {path} (a file-size limit, see ulimit -f); raise it and rerun the same command"
    if err == -1:  # one of the two
        return (f"no space left on device or a file-size limit reached writing {path}; free some space (or raise "
                "ulimit -f) and rerun the same command")
    return None


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A full disk or a file-size limit while writing `path`: one AdjustError naming it (not a traceback)."""
    from .errors import AdjustError

    try:
        yield
    except OSError as e:
        message = disk_full_message(e.errno, path)
        if message is None:
            raise
        raise AdjustError(message) from None
    except Exception as e:  # torch.save (PytorchStreamWriter) and safetensors report it in their own words
        err = next((n for key, n in _FULL.items() if key in str(e)), 0)
        if err == 0 or isinstance(e, AdjustError):
            raise
        raise AdjustError(disk_full_message(err, path)) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _write_errors(path):
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
            _fsync_file(tmp)  # the data is on disk before the rename makes it visible
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # and the rename itself is on disk
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
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
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


DIGEST_KEY = "adjust_sha256"  # where a state, a tensor file or a JSON record keeps the checksum of its content


def content_digest(obj) -> str:
    """sha256 of a state's content: tensors (dtype, shape, bytes), numbers, strings, None, and lists, tuples
    and dicts of them, walked in order. Computed from what was written and from what was read back, it
    catches any change a load does not (a flipped byte in a weight, an edited field)."""
    import torch

    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def check_digest(obj: dict, path, what: str, remedy: str) -> dict:
    """`obj` without its recorded digest, after checking it (an object written before digests were recorded
    has none and is taken as it is); a mismatch is one AdjustError naming the file and `remedy`."""
    from .errors import AdjustError

    if DIGEST_KEY not in obj:
        return obj
    rest = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if content_digest(rest) != obj[DIGEST_KEY]:
        raise AdjustError(f"{what} {path} fails its checksum (the file was damaged or edited); {remedy}")
    return rest


def sealed(obj: dict) -> dict:
    """`obj` with the digest of its content recorded in it (see `check_digest`)."""
    rest = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return {**rest, DIGEST_KEY: content_digest(rest)}


def save_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """A safetensors file written atomically, with the digest of its tensors in its header's metadata (its one
    entry: safetensors writes several in a random order, and the same content must give the same bytes)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={DIGEST_KEY: content_digest({k: tensors[k] for k in sorted(tensors)})})


def load_weights(path: str | os.PathLike, what: str = "weights", remedy: str = "delete it and rerun") -> dict:
    """A safetensors state dict, or one clear error if the file is missing, unreadable, corrupt or fails the
    checksum `save_tensors` recorded (`remedy` says what to do then)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .errors import AdjustError

    path = readable_file(path, what)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
    except OSError as e:
        raise AdjustError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own (non-exported) error type on corrupt files
        raise AdjustError(f"corrupt {what} file {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; {remedy}") from None
    if recorded is not None and content_digest({k: tensors[k] for k in sorted(tensors)}) != recorded:
        raise AdjustError(f"{what} {path} fails its checksum (the file was damaged); {remedy}")
    return tensors


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


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be one (an existing file, or a file on its path) before any work."""
    from .errors import AdjustError

    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise AdjustError(f"{flag} {path}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise AdjustError(f"{flag} {path}: {p} is not writable")
            break
    return path


def save_state(path: str | os.PathLike, state: dict) -> None:
    """A resume state (tensors, numbers, strings, lists and dicts of them), written atomically with the digest
    of its content (checked by `load_state_file`)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(sealed(state), tmp)


def load_state_file(path: str | os.PathLike, what: str, keys: tuple = ()) -> dict:
    """A resume state written by `save_state`, read without unpickling code (torch.load weights_only=True),
    or one clear error if it is unreadable, truncated or lacks one of `keys`."""
    import torch

    from .errors import AdjustError

    path = Path(path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except PermissionError:
        raise AdjustError(f"cannot read {what} {path}: permission denied") from None
    except Exception as e:  # a truncated or foreign file: PytorchStreamReader / UnpicklingError / EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdjustError(f"corrupt {what} {path} ({first}); delete it to start over") from None
    if isinstance(state, dict):
        state = check_digest(state, path, what, "delete it to start over")
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise AdjustError(f"{what} {path} lacks {', '.join(missing)} (written by another version of adjust, or "
                          "damaged); delete it to start over")
    return state


def changed_settings(saved: dict, now: dict, ignore: tuple = ()) -> list[str]:
    """The keys whose values differ between a saved settings dict and the current one (sorted)."""
    return sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
