"""A plain (not editable) install works from any directory: the wheel carries the shipped models, its
licence and metadata, and `adjust generate` runs on the default model from elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_generates_from_any_directory(tmp_path):
    tree = tmp_path / "tree"  # a copy of what the build reads, so the build leaves nothing in the checkout
    for name in ("src", "models"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("adjust_dlm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "adjust/shipped_models/shakespeare-base/model.safetensors" in names
    assert "adjust/shipped_models/shakespeare-base/sampler/model.safetensors" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "Apache-2.0" in meta
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ADJUST_BASE"} | {"PYTHONPATH": str(site)}
    code = ("import adjust, sys; from adjust.cli import main; print(adjust.__file__, file=sys.stderr); "
            "sys.exit(main(['generate', '--strategy', 'adjust', '-K', '4', '--gen-length', '16', '--json']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0].startswith(str(site))  # the installed copy ran, not the checkout
    out = json.loads(run.stdout)
    assert out["samples"][0]["text"] and out["stats"]["full_passes"] == 4
