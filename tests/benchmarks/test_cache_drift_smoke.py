"""benchmarks/cache_drift.py on the shipped task model, a few prompts: the drift table and the ablation, written."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def cache_drift():
    from tests.benchmarks.bench_loader import load_benchmark

    return load_benchmark("cache_drift")


def test_drift_and_ablation_on_a_few_prompts(cache_drift, tmp_path, capsys):
    out = tmp_path / "cd"
    assert cache_drift.main(["--n", "3", "--ablation", "--positions", "2", "--out", str(out)]) == 0
    got = json.loads((tmp_path / "cd.json").read_text())
    from adjust.provenance import code_version

    assert got["code_version"] == code_version() and got["layers"] == 4
    drift = {(d["layer"], d["region"], d["writes"]): d["mean_relative_drift"] for d in got["drift"]}
    assert {w for _, _, w in drift} == {1, 2, 3, 4}  # blocks of 5, exact: 1-4 tokens written before a cached pass
    assert all(v == 0 for (layer, _, _), v in drift.items() if layer == 0)  # first-layer keys/values cannot drift
    assert all(drift[(3, "prompt", w)] > 0 for w in (1, 2, 3, 4))
    rows = got["ablation"]
    by_layers = {tuple(r["fresh_layers"]): r for r in rows if "fresh_layers" in r}
    assert by_layers[()]["all"] <= by_layers[(0, 1, 2, 3)]["all"] and by_layers[()] == {**by_layers[(0,)],
                                                                                        "fresh_layers": []}
    assert [(r["fresh_positions"], r["ranked_at_layer"]) for r in rows if "fresh_positions" in r] == [(2, 1), (2, 3)]
    md = (tmp_path / "cd.md").read_text()
    assert "| prompt | 3 |" in md and "2 positions, ranked at layer 1" in md and md in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [(["--n", "0"], "--n"), (["--positions", "0"], "--positions"),
                                        (["--out", "no/such/dir/cd"], "--out")])
def test_bad_arguments_exit_2(cache_drift, capsys, argv, flag):
    assert cache_drift.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adjust: error: ") and flag in err[0]
