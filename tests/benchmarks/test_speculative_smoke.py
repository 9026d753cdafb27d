"""benchmarks/speculative.py on the shipped task model, one prompt and depth: figures written, tokens as exact's."""

from __future__ import annotations

import json


def test_task_model_one_depth(tmp_path, capsys):
    from tests.benchmarks.bench_loader import load_benchmark

    bench = load_benchmark("speculative")
    out = tmp_path / "spec"
    assert bench.main(["--models", "task-base", "--depths", "2", "--prompts", "2", "--temperatures", "0",
                       "--gen-task", "6", "--dual-models", "", "--branched", "1:1", "--out", str(out)]) == 0
    got = json.loads((tmp_path / "spec.json").read_text())
    rows = {r["strategy"]: r for r in got["rows"]}
    assert set(rows) == {"exact(K=1)", "speculative(D=2,drafter=sampler)", "speculative(D=2,drafter=self)",
                         "speculative(D=1,drafter=sampler,branch=1)", "speculative(D=1,drafter=self,branch=1)"}
    assert all(r["identical"] for r in rows.values())
    assert rows["exact(K=1)"]["full_passes"] == 12  # 2 prompts x 6 tokens, one per pass
    spec = rows["speculative(D=2,drafter=sampler)"]
    assert spec["passes_vs_exact"] == round(12 / spec["full_passes"], 3) and spec["passes_vs_self"] > 0
    md = (tmp_path / "spec.md").read_text()
    assert "speculative(D=2,drafter=self)" in md and md in capsys.readouterr().out  # the table printed is the one written
    assert "commit" in got["code_version"] or "package" in got["code_version"]


def test_out_folder_missing_is_exit_2(tmp_path, capsys):
    from tests.benchmarks.bench_loader import load_benchmark

    bench = load_benchmark("speculative")
    assert bench.main(["--out", str(tmp_path / "no" / "such")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adjust: error: --out") and err.count("\n") == 1
