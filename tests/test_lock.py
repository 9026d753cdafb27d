"""adjust.lock: one writer per output directory, counted per process, removed when released; the
temporaries of killed runs are cleaned, a directory mid-swap is not. (Processes: tests/test_faults.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from adjust.errors import AdjustError
from adjust.lock import LOCK_FILE, acquire, clean_temporaries, output_lock, release


def _try_in_another_process(out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from adjust.lock import acquire; acquire(sys.argv[1])",
                           str(out)], capture_output=True, text=True, timeout=60)


def test_the_lock_is_counted_per_process_and_removed_when_released(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with output_lock(out):
        with output_lock(out):  # the CLI and the library function it calls: one lock
            assert (out / LOCK_FILE).is_file()
        other = _try_in_another_process(out)  # still held after the inner block
        assert other.returncode != 0 and "in use by another adjust run" in other.stderr
    assert not (out / LOCK_FILE).exists() and out.is_dir()  # the directory existed before: it stays
    assert _try_in_another_process(out).returncode == 0


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(AdjustError):
        with output_lock(out):
            raise AdjustError("a bad flag")
    assert not (tmp_path / "a").exists()
    with output_lock(out):
        (out / "result.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]


def test_take_false_is_a_no_op(tmp_path):
    with output_lock(tmp_path / "o", take=False):
        assert not (tmp_path / "o").exists()


def test_cleaning_removes_temporaries_but_not_a_directory_mid_swap(tmp_path):
    (tmp_path / ".model.safetensors.x1.tmp").write_text("half")  # atomic_path's temporary file
    for name in (".sampler.y2.tmp", ".kept.old", ".gone.old"):  # atomic_dir's temporary and swapped-out directories
        (tmp_path / name).mkdir()
    (tmp_path / "kept").mkdir()  # `.kept.old` is a finished swap's leftover; `gone` is mid-swap: keep its old copy
    (tmp_path / "visible.tmp").write_text("a user's file")
    assert sorted(clean_temporaries(tmp_path)) == [".kept.old", ".model.safetensors.x1.tmp", ".sampler.y2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gone.old", "kept", "visible.tmp"]


def test_release_without_acquire_is_harmless(tmp_path):
    release(tmp_path)
    acquire(tmp_path)
    release(tmp_path)
    release(tmp_path)
