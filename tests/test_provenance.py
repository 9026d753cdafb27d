"""Which code made a result: the git commit + dirty flag in a checkout, the package version outside
one, and the hash of the generating code that keys cached samples."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from adjust import provenance
from adjust.provenance import code_version, sampling_code_hash, source_hash

PACKAGE = Path(provenance.__file__).resolve().parent


def _git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git repository laid out like this one: src/adjust/decode.py and a tracked results/ file."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pkg = tmp_path / "repo" / "src" / "adjust"
    pkg.mkdir(parents=True)
    (pkg / "decode.py").write_text("X = 1\n")
    (tmp_path / "repo" / "results").mkdir()
    (tmp_path / "repo" / "results" / "r.json").write_text("{}\n")
    repo = tmp_path / "repo"
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return repo


def test_code_version_in_a_checkout_records_the_commit_and_dirty_flag(checkout):
    pkg = checkout / "src" / "adjust"
    v = code_version(pkg)
    assert v["commit"] == _git(checkout, "rev-parse", "HEAD") and v["dirty"] is False
    assert v["package"] == provenance.package_version()
    (checkout / "results" / "r.json").write_text('{"new": 1}\n')  # a run writing its results: still clean
    (checkout / "README.md").write_text("prose\n")
    _git(checkout, "add", "README.md")  # tracked prose changed: still clean
    assert code_version(pkg)["dirty"] is False and "source" not in code_version(pkg)
    (pkg / "decode.py").write_text("X = 2\n")
    dirty = code_version(pkg)
    assert dirty["dirty"] is True and dirty["source"] == source_hash(pkg)  # the commit no longer names the code
    _git(checkout, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "X = 2")
    assert "source" not in code_version(pkg) and source_hash(pkg) == dirty["source"]  # found: this commit


def test_code_version_outside_a_checkout_is_the_package_version(tmp_path, checkout):
    plain = tmp_path / "site-packages" / "adjust"
    plain.mkdir(parents=True)
    assert code_version(plain) == {"package": provenance.package_version()}
    nested = checkout / "vendor" / "adjust"  # inside some other repository: not this package's commit
    nested.mkdir(parents=True)
    assert code_version(nested) == {"package": provenance.package_version()}


def test_this_package_reports_its_own_commit_when_run_from_a_checkout():
    try:
        head = _git(PACKAGE, "rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not running from a git checkout")
    assert code_version()["commit"] == head


def test_sampling_code_hash_follows_only_the_code_that_writes_tokens(tmp_path):
    copy = tmp_path / "adjust"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    h = sampling_code_hash(copy)
    assert h == sampling_code_hash(PACKAGE)
    for unrelated in ("eval/quality.py", "cli.py", "distill/train.py"):
        (copy / unrelated).write_text((copy / unrelated).read_text() + "\n# a comment\n")
    assert sampling_code_hash(copy) == h
    (copy / "decode.py").write_text((copy / "decode.py").read_text() + "\n# a comment\n")
    changed = sampling_code_hash(copy)
    assert changed != h
    (copy / "strategies" / "new.py").write_text("Y = 1\n")  # a new generating module counts too
    assert sampling_code_hash(copy) != changed
