"""Which code made a result: `code_version()` for every report, `sampling_code_version()` for cached samples.

Every report writer (eval quality / tasks / joint-kl, bench, benchmarks/gpu_bench.py) records
`code_version()`: the git commit of this checkout and whether its tracked files differ from it
(`dirty`; when they do, also a hash of the package's source), or, for an installed package outside a
checkout, only the package version.
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = "adjust-dlm"
PACKAGE_DIR = Path(__file__).resolve().parent

# Parts of the package that cannot change which tokens a generation writes: evaluation and
# reporting, distillation, base-model training, the command line and this module.
NOT_SAMPLING = ("eval", "distill", "train_base.py", "cli.py", "provenance.py")


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def _git(args: list[str], cwd) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(package_dir=PACKAGE_DIR) -> dict:
    """{"package", "commit", "dirty"} in a git checkout of this package, {"package"} otherwise.

    `dirty` is whether tracked files differ from the commit, apart from results/ (which runs
    write) and Markdown files (prose cannot change a figure); None if git could not tell. A checkout
    counts only if `package_dir` is its src/adjust, so an installed copy inside some other repository
    reports no commit. Where `dirty` is not False the commit does not name the code; "source"
    (`source_hash`) then does: `python -m adjust.provenance` prints it for a checkout of any commit,
    to find the one that made the report (a copy of the tree whose git metadata is older than its
    files reads as dirty, as on a GPU machine that received the files of a later commit).
    """
    package_dir = Path(package_dir).resolve()
    info: dict = {"package": package_version()}
    top = _git(["rev-parse", "--show-toplevel"], package_dir)
    if not top or (Path(top) / "src" / "adjust").resolve() != package_dir:
        return info
    commit = _git(["rev-parse", "HEAD"], top)
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results",
                       ":(exclude,glob)**/*.md"], top)
        info.update(commit=commit, dirty=None if status is None else bool(status))
        if info["dirty"] is not False:
            info["source"] = source_hash(package_dir)
    return info


def source_hash(package_dir=PACKAGE_DIR) -> str:
    """Short SHA-256 over every .py file of the package (paths and contents)."""
    return _hash_py(Path(package_dir), lambda rel: True)


def sampling_code_hash(package_dir=PACKAGE_DIR) -> str:
    """Short SHA-256 over the package's .py files that can change generated tokens (all but NOT_SAMPLING)."""
    return _hash_py(Path(package_dir), lambda rel: rel.parts[0] not in NOT_SAMPLING)


def _hash_py(package_dir: Path, keep) -> str:
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if "__pycache__" in rel.parts or not keep(rel):
            continue
        h.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def sampling_code_version() -> str:
    """The key of cached samples: package version + hash of the code that generates them.

    Not the git commit: a commit changes with every README or evaluation edit, and keying on it
    would throw away hours of cached CPU generation for changes that cannot alter one token.
    Hashing the generating code instead invalidates the cache exactly when generation may change,
    and works the same in a checkout and in an installed package.
    """
    return f"{package_version()}+{sampling_code_hash()}"


if __name__ == "__main__":  # python -m adjust.provenance: this checkout's code version and source hash
    import json

    print(json.dumps({**code_version(), "source": source_hash()}))
