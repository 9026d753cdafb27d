"""Loading a mid-size checkpoint never holds two copies of the weights: peak RSS growth < 1.3 x weight bytes.

The load runs in a fresh Python process (the test's own process has its own history of peaks).
That process first loads a tiny checkpoint of the same kind, so one-off costs (lazy imports in
transformers and torch, first-call kernel set-up: about 20 MiB, whatever the model's size) are
paid before the kernel's peak-RSS mark is reset (/proc/self/clear_refs); the measured growth is
then the mid-size load's alone. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("needs Linux /proc to measure peak memory", allow_module_level=True)

from published import write_dream  # noqa: E402

PROBE = r"""
import json, sys
from adjust.base import load_base
load_base(sys.argv[3], dtype=sys.argv[2])  # one-off costs paid before the mark is reset

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
before = status("VmRSS:")
base = load_base(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"before": before, "peak": status("VmHWM:"), "params": sum(p.numel() * p.element_size() for p in base.parameters())}))
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_load_peak_memory_under_1_3x_weights(tmp_path, dtype):
    """A bf16 checkpoint (as published), loaded as bf16 (bytes read in place) and as float32 (converted
    one tensor at a time): the peak grows by less than 1.3 x the loaded model's bytes."""
    path = write_dream(tmp_path / "mid", seed=0, shards=3, dtype=torch.bfloat16, hidden=1024, layers=3, heads=8,
                       kv_heads=2, inter=2816)
    warm = write_dream(tmp_path / "warm", seed=1, shards=2, dtype=torch.bfloat16)
    weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) * (2 if dtype == "float32" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), dtype, str(warm)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["params"] > 0.99 * weight_bytes  # the whole checkpoint was loaded
    growth = m["peak"] - m["before"]
    print(f"{dtype}: peak growth {growth / 2**20:.1f} MiB for {weight_bytes / 2**20:.1f} MiB loaded ({growth / weight_bytes:.3f}x)")
    assert growth < 1.3 * weight_bytes, f"peak growth {growth / 2**20:.1f} MiB for {weight_bytes / 2**20:.1f} MiB of weights"
