"""One writer per output directory, and no writer outliving its launcher.

`output_lock(out)` holds an advisory lock (fcntl.flock) on `out/.adjust.lock` for the duration of
a run; the file holds the holder's PID, and is removed when the run ends. The operating system
releases the lock when the holder dies, however it dies (kill -9 included), so the stale lock
file a killed run leaves never blocks a rerun. A second
writer gets one line naming the holder's PID. Locks are counted per process: the CLI takes the
lock before loading anything, the library function it calls takes it again at no cost.

Having the lock, a run removes the temporary files (`.NAME.XXXX.tmp`, see `adjust.io.atomic_path`)
that killed runs left in the directory: no live writer can own them.

Several processes of one `accelerate launch` share a directory: the main process (rank 0) holds
the lock, and the others start writing only after it has it (a barrier); if it cannot get it,
it exits with the error and the launcher stops the others. `die_with_parent` makes a launched
worker exit when its launcher dies, so no orphan keeps writing into a directory whose lock died
with the launcher's main worker.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AdjustError

LOCK_FILE = ".adjust.lock"

_held: dict[str, list] = {}  # resolved directory -> [fd, count, path, created] (locks this process holds)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "a process that has not written its PID yet"


def acquire(out: str | os.PathLike, flag: str = "--out") -> None:
    """Take (or count once more) the lock of directory `out`, creating it; AdjustError if another process has it."""
    import fcntl

    out = Path(out)
    key = str(out.resolve())
    if key in _held:
        _held[key][1] += 1
        return
    created = [p for p in (out, *out.absolute().parents) if not p.exists()]  # what this run makes
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AdjustError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise AdjustError(f"{flag} {out} is in use by another adjust run ({holder}); wait for it to finish "
                              f"or use another {flag}") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise AdjustError(f"{flag} {out}: cannot lock {LOCK_FILE} ({e.strerror or e})") from None
            # a file system without locks (some network mounts): run unguarded rather than not at all
        try:  # the file we locked is still the directory's lock file (a holder that created the
            same = os.path.samestat(os.fstat(fd), os.stat(out / LOCK_FILE))  # directory removes both)
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, out, created]
    clean_temporaries(out)


def release(out: str | os.PathLike) -> None:
    key = str(Path(out).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        fd, _, path, created = entry
        try:  # removed while still held: a process that opened it meanwhile sees it is gone and retries
            os.unlink(path / LOCK_FILE)
            if created and not any(path.iterdir()):  # a run that failed before writing anything leaves no
                for d in created:  # directory behind (nor the parents made for it)
                    d.rmdir()
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def output_lock(out: str | os.PathLike, flag: str = "--out", take: bool = True) -> Iterator[None]:
    """Hold the lock of `out` for the block (`take=False`: a no-op, for processes that share their main one's)."""
    if not take:
        yield
        return
    acquire(out, flag)
    try:
        yield
    finally:
        release(out)


def clean_temporaries(out: Path) -> list[str]:
    """Remove what interrupted atomic writes left in `out` (call only holding its lock); returns the names."""
    gone = []
    for p in out.iterdir():
        # a `.NAME.old` directory is the previous NAME while `atomic_dir` swaps it: removed only once NAME is back
        old = p.name.startswith(".") and p.name.endswith(".old") and (out / p.name[1:-4]).exists()
        if p.name.startswith(".") and (p.name.endswith(".tmp") or old):
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                gone.append(p.name)
            except OSError:
                pass
    return gone


def die_with_parent() -> None:
    """Exit when the parent process (a launcher) dies: PR_SET_PDEATHSIG on Linux, plus a watcher thread
    that polls the parent's PID elsewhere (and covers a parent that died before this ran)."""
    import signal
    import sys
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def watch():
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, name="adjust-parent-watch", daemon=True).start()
