"""scripts/: train_default.sh rebuilds into a fresh directory and compares with the shipped pair
(scripts/compare_models.py), never writing into models/."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _compare_models():
    spec = importlib.util.spec_from_file_location("compare_models", SCRIPTS / "compare_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_models_tells_identical_from_different_weights(tiny_model_dir, tmp_path, capsys):
    cm = _compare_models()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    same = cm.compare_dirs(copy, tiny_model_dir)
    assert same["base"]["identical"] and same["base"]["max_abs_diff"] == 0.0 and "sampler" not in same
    weights = load_file(str(copy / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 0.25
    save_file(weights, str(copy / "model.safetensors"))
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "training": {"val_loss": 1.5}}))
    assert cm.main([str(copy), str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    report = json.loads(out[0])["base"]
    assert not report["identical"] and report["max_abs_diff"] == pytest.approx(0.25, abs=1e-3)
    assert report["new"] == {"val_loss": 1.5}
    assert out[1].startswith("base: weights differ: max abs difference 0.25")
    assert cm.main([str(tmp_path / "none"), str(tiny_model_dir)]) == 2


def test_train_default_never_writes_into_the_shipped_models():
    script = (SCRIPTS / "train_default.sh").read_text()
    outs = re.findall(r"--out\s+(\S+)", script)
    assert outs and all("models/" not in o and "SHIPPED" not in o for o in outs)
    assert "compare_models.py" in script


@pytest.mark.slow
def test_train_default_smoke_rebuilds_and_compares(tmp_path):
    """SMOKE=1 scripts/train_default.sh on a copy of the repository: trains a tiny pair in runs/ and
    prints the comparison with the shipped one (different by design at these settings)."""
    repo = tmp_path / "repo"
    for part in ("scripts", "src", "models", "README.md"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / part)
    shipped = {p: p.read_bytes() for p in (repo / "models").rglob("*") if p.is_file()}
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/train_default.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("base: weights differ") and "val_loss" in lines[-2]
    assert lines[-1].startswith("sampler: weights differ") and "val_kl" in lines[-1]
    assert (repo / "runs/shakespeare-smoke/base/sampler/model.safetensors").is_file()
    assert {p: p.read_bytes() for p in (repo / "models").rglob("*") if p.is_file()} == shipped


@pytest.mark.slow
def test_fault_sweep_smoke():
    """scripts/fault_sweep.py with one interruption per stage: every output equals the uninterrupted run's."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "fault_sweep.py"), "--kills", "1"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["stage"] for r in lines[:-1]] == ["train-base", "rollouts", "distill"]
    assert all(r["identical"] and not r["temporaries_left"] for r in lines[:-1]) and lines[-1] == {"failures": 0}
