"""benchmarks/pass_cost.py on the shipped task model, two rows: a --pass-cost report, its table printed and written."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def pass_cost():
    from tests.benchmarks.bench_loader import load_benchmark

    return load_benchmark("pass_cost")


def test_task_model_two_rows(pass_cost, tmp_path, capsys):
    out = tmp_path / "pc"
    assert pass_cost.main(["--models", "task-base", "--max-rows", "2", "--repeats", "2", "--warmup", "0",
                           "--out", str(out)]) == 0
    got = json.loads((tmp_path / "pc.json").read_text())
    t = got["pass_cost"]["task-base"]
    assert t["rows"] == [1, 2] and t["canvas"] == 20 and t["block"] == [4, 20]  # 10 prompt + 10 generated
    for kind in ("full", "span"):
        assert t[kind]["1"] == 1.0 and t[kind]["2"] > 0 and t[f"{kind}_ms"]["1"] > 0
    assert t["unroll_cost"] > 0  # the sampler beside the model
    md = (tmp_path / "pc.md").read_text()
    assert "| task-base | span |" in md and md in capsys.readouterr().out
    from adjust.eval.costs import read_pass_cost
    from adjust.provenance import code_version

    assert got["code_version"] == code_version()
    # the report's table, read back (the reader scales it by the one-row cost: equal up to float rounding)
    assert read_pass_cost(tmp_path / "pc.json", "task-base").cost("span", 2) == pytest.approx(t["span"]["2"], rel=1e-9)


@pytest.mark.parametrize("argv, words", [(["--max-rows", "0"], "--max-rows"), (["--out", "no/such/dir/pc"], "--out")])
def test_bad_arguments_exit_2(pass_cost, capsys, argv, words):
    assert pass_cost.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adjust: error:") and words in err[0]
