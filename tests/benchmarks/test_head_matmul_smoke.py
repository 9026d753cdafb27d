"""benchmarks/head_matmul.py on a tiny model: both products timed, figures written, in a second."""

from __future__ import annotations

import json

import torch


def test_tiny_head_both_products(tiny_model_dir, tmp_path, capsys):
    from tests.benchmarks.bench_loader import load_benchmark

    bench = load_benchmark("head_matmul")
    out = tmp_path / "head.json"
    assert bench.main(["--bases", str(tiny_model_dir), "--rows", "1,6", "--repeats", "3", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["rows"] for r in got["rows"]] == [1, 6]
    for r in got["rows"]:
        for cond in ("hot", "evicted"):
            assert r[cond]["plain_us"] > 0 and r[cond]["packed_us"] > 0
            assert abs(r[cond]["speedup"] - r[cond]["plain_us"] / r[cond]["packed_us"]) < 0.05 * r[cond]["speedup"]
    assert all(r["packed_available"] for r in got["rows"]) or not torch.backends.mkldnn.is_available()
    assert "tiny" in capsys.readouterr().out
