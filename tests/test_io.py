"""Atomic writes and the loaders' single clear error on missing or corrupt files."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

from adjust.errors import AdjustError
from adjust.io import atomic_dir, atomic_path, load_state, load_weights, read_json, write_json


class Boom(Exception):
    pass


def test_atomic_path_failure_leaves_original_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("original")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half-written")
            raise Boom
    assert target.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_failure_without_original_creates_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_success_replaces_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # parent is created
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # readers never see a partial file
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with atomic_path(target) as tmp:
        tmp.write_text("newer")
    assert target.read_text() == "newer"


def test_atomic_dir(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
            raise Boom
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_json_round_trip_and_errors(tmp_path):
    obj = {"a": [1, 2.5, "x"], "b": {"c": None}}
    write_json(tmp_path / "x.json", obj)
    assert read_json(tmp_path / "x.json") == obj
    with pytest.raises(AdjustError, match="not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(AdjustError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AdjustError):
        read_json(tmp_path / "bin.json")


def test_weights_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(AdjustError, match="not found"):
        load_weights(tmp_path / "none.safetensors")
    good = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(4, 3)}, str(good))
    assert load_weights(good)["weight"].shape == (4, 3)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdjustError, match="corrupt"):
        load_weights(bad)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(AdjustError):
        load_weights(tmp_path / "empty.safetensors")
    with pytest.raises(AdjustError, match="do not fit"):
        load_state(nn.Linear(5, 5, bias=False), load_weights(good), tmp_path)


def _record_syncs(monkeypatch):
    """Log os.fsync (by the path its descriptor names) and os.replace, in order; both still run."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
    tmp_name = next(e[1] for e in events if e[0] == "replace")
    assert events == [("fsync", tmp_name), ("replace", tmp_name, str(target)), ("fsync", str(tmp_path))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_atomic_dir_fsyncs_its_files_before_the_rename(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("x")
        (tmp / "b").write_text("y")
    renamed = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target)]
    synced = {e[1] for e in events[:renamed[0]] if e[0] == "fsync"}
    assert {str(tmp / "a"), str(tmp / "b"), str(tmp)} <= synced
    assert events[renamed[0] + 1] == ("fsync", str(tmp_path))


def test_check_output_dir(tmp_path):
    from adjust.io import check_output_dir

    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"  # nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(AdjustError, match="is a file, not a directory"):
            check_output_dir(bad)


def test_state_files_load_without_unpickling_and_fail_clearly(tmp_path):
    from adjust.io import load_state_file, save_state

    path = tmp_path / "state.pt"
    save_state(path, {"w": torch.ones(2), "step": 3, "history": [{"a": 1.5}], "cfg": {"s": "x", "n": None}})
    state = load_state_file(path, "test state", ("w", "step"))
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(2)) and state["cfg"] == {"s": "x", "n": None}
    with pytest.raises(AdjustError, match="lacks optimizer .written by another version"):
        load_state_file(path, "test state", ("w", "optimizer"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(AdjustError, match="corrupt test state"):
        load_state_file(path, "test state")
    torch.save({"f": nn.Linear(2, 2)}, path)  # a pickled module: code, not data
    with pytest.raises(AdjustError, match="corrupt test state"):
        load_state_file(path, "test state")
