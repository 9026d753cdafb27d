"""`adjust bench --json` on a tiny random model: one JSON object, every strategy timed, positive ratios."""

from __future__ import annotations

import json

import pytest

from adjust.cli import main
from adjust.eval.bench import count_flops, format_table, ideal_speedup
from adjust.provenance import code_version


def _bench(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)  # the whole of stdout is one JSON object


def test_bench_json_structure_and_ratios(capsys, tiny_model_dir):
    report = _bench(capsys, "bench", "--base", tiny_model_dir, "--fresh-sampler", "--gen-length", 8,
                    "--batch-sizes", "1,2", "--ks", "2,4", "--repeats", 2, "--warmup", 1, "--unroll-repeats", 3,
                    "--json")
    assert report["batch_sizes"] == [1, 2] and report["gen_length"] == 8 and report["sampler"] == "fresh"
    labels = {r["strategy"] for r in report["results"]}
    assert {"exact", "parallel:2", "parallel:4", "adjust:2", "adjust:4"} <= labels
    for B in (1, 2):
        rows = {r["strategy"]: r for r in report["results"] if r["batch_size"] == B}
        assert set(rows) == labels  # every strategy at every batch size
        assert rows["exact"]["ratio_to_exact"] == 1.0
        assert rows["exact"]["full_passes"] == 8 and rows["parallel:4"]["full_passes"] == 2
        assert rows["adjust:4"]["full_passes"] == 2 and rows["adjust:4"]["sampler_passes"] == 6
        for r in rows.values():
            assert r["tokens_per_second"] > 0 and r["ratio_to_exact"] > 0
            assert len(r["seconds"]) == 2
        c = report["unroll_cost"][str(B)]
        assert c["full_pass_ms"] > 0 and c["unroll_ms"] > 0 and c["unroll_cost"] > 0
        ideal = [v for v in report["adjust_vs_ideal"] if v["batch_size"] == B]
        assert sorted(v["k"] for v in ideal) == [2, 4]
        for v in ideal:
            assert v["ideal_speedup"] == pytest.approx(ideal_speedup(v["k"], c["unroll_cost"]), rel=1e-3)
            assert v["fraction_of_ideal"] == pytest.approx(v["achieved_speedup"] / v["ideal_speedup"], rel=1e-3)
            assert v["flop_bound_speedup"] == pytest.approx(ideal_speedup(v["k"], c["flop_ratio"]), rel=1e-3)
        assert c["full_pass_flops"] > 0 and c["unroll_flops"] > 0
        assert c["flop_ratio"] == pytest.approx(c["unroll_flops"] / c["full_pass_flops"], rel=1e-3)
    # a sampler strategy with adaptive tokens per pass is skipped with an untrained sampler (if registered)
    assert all(s["strategy"] != "adjust" for s in report["skipped"])
    # speculative: the self drafter runs (the base verifies drafted rows), the sampler drafter needs a trained one
    assert any(s["strategy"] == "speculative:depth=4;drafter=sampler" for s in report["skipped"])
    spec = next(r for r in report["results"] if r["strategy"] == "speculative:depth=4;drafter=self")
    assert spec["rows_per_full_pass"] > 1 and spec["drafts_proposed"] >= spec["drafts_accepted"]
    assert spec["full_passes"] <= 8 and rows["exact"]["rows_per_full_pass"] == 2 and rows["exact"]["drafts_proposed"] == 0


def test_bench_without_sampler_skips_adjust(capsys, tiny_model_dir):
    report = _bench(capsys, "bench", "--base", tiny_model_dir, "--strategies", "parallel:2,adjust:2",
                    "--gen-length", 4, "--batch-sizes", "1", "--repeats", 1, "--warmup", 0, "--json")
    assert [r["strategy"] for r in report["results"]] == ["exact", "parallel:2"]  # exact is always the reference
    assert report["unroll_cost"] == {} and report["adjust_vs_ideal"] == []
    assert any(s["strategy"] == "adjust:2" for s in report["skipped"])


def test_ideal_speedup():
    assert ideal_speedup(1, 0.3) == 1.0
    assert ideal_speedup(4, 0.0) == 4.0
    assert ideal_speedup(4, 1 / 3) == pytest.approx(2.0)


def test_count_flops_counts_matrix_products():
    import torch

    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8)
    assert count_flops(lambda: lin(x)) == 2 * 4 * 8 * 16
    assert count_flops(lambda: torch.relu(x)) == 0  # elementwise work is not counted


def test_bench_records_the_code_version_and_calls_the_flop_figure_no_hard_limit(capsys, tiny_model_dir):
    report = _bench(capsys, "bench", "--base", tiny_model_dir, "--fresh-sampler", "--gen-length", 4,
                    "--batch-sizes", "1", "--ks", "2", "--repeats", 1, "--warmup", 0, "--unroll-repeats", 1,
                    "--json")
    assert report["code_version"] == code_version()
    table = format_table(report)
    assert "if time were proportional to FLOPs" in table and "at most" not in table
    assert "not a hard limit" in report["notes"]


def test_bench_with_caches(capsys, tiny_model_dir):
    """--cache none,prefix,dual on a prompt: every strategy with every cache, paired ratios to uncached."""
    report = _bench(capsys, "bench", "--base", tiny_model_dir, "--fresh-sampler", "--strategies",
                    "exact,adjust:2", "--prompt-length", 6, "--gen-length", 8, "--block-length", 4,
                    "--cache", "none,prefix,dual", "--batch-sizes", "1", "--repeats", 2, "--warmup", 0,
                    "--unroll-repeats", 2, "--json")
    assert report["prompt_length"] == 6 and report["block_length"] == 4 and report["caches"] == ["none", "prefix", "dual"]
    rows = {(r["strategy"], r["cache"]): r for r in report["results"]}
    assert set(rows) == {(s, c) for s in ("exact", "adjust:2") for c in ("none", "prefix", "dual")}
    assert rows[("exact", "none")]["ratio_to_exact"] == 1.0 and rows[("exact", "none")]["ratio_to_uncached"] == 1.0
    assert rows[("exact", "none")]["positions_per_full_pass"] == 14
    # 2 blocks of 4, one refresh (14 positions) + 3 span passes each: dual 4 positions, prefix 8 then 4
    assert rows[("exact", "dual")]["positions_per_full_pass"] == (2 * 14 + 6 * 4) / 8
    assert rows[("exact", "prefix")]["positions_per_full_pass"] == (2 * 14 + 3 * 8 + 3 * 4) / 8
    assert rows[("adjust:2", "dual")]["positions_per_unroll"] == 4 and rows[("adjust:2", "none")]["positions_per_unroll"] == 14
    for r in rows.values():
        assert r["tokens_per_second"] > 0 and r["ratio_to_uncached"] > 0
    assert rows[("adjust:2", "dual")]["unroll_cost_in_run"] > 0


def test_bench_with_cache_verify(capsys, tiny_model_dir):
    """--cache none,dual --cache-verify 0,3: the dual cache with each verify count, paired to uncached."""
    report = _bench(capsys, "bench", "--base", tiny_model_dir, "--strategies", "exact", "--prompt-length", 6,
                    "--gen-length", 8, "--block-length", 4, "--cache", "none,dual", "--cache-verify", "0,3",
                    "--batch-sizes", "1", "--repeats", 2, "--warmup", 0, "--json")
    assert report["cache_verifies"] == [0, 3]
    rows = {(r["cache"], r["cache_verify"]): r for r in report["results"]}
    assert set(rows) == {("none", 0), ("dual", 0), ("dual", 3)}
    # 2 blocks of 4: one refresh (14 positions) + 3 cached passes each, of the block and 3 verified positions
    assert rows[("dual", 3)]["positions_per_full_pass"] == (2 * 14 + 6 * 7) / 8
    assert rows[("dual", 0)]["positions_per_full_pass"] == (2 * 14 + 6 * 4) / 8
    assert all(r["ratio_to_uncached"] > 0 for r in rows.values())
    assert "dual+v3" in format_table(report)


def test_bench_cache_needs_blocks(capsys, tiny_model_dir):
    rc = main(["bench", "--base", str(tiny_model_dir), "--cache", "none,dual", "--json"])
    assert rc == 2 and "needs --block-length" in capsys.readouterr().err
