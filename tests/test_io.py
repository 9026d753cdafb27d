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
