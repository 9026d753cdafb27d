"""adjust.eval.costs: pass-cost reports, cost(r), tokens per pass-equivalent from real decodings' Stats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adjust.cli import main
from adjust.decode import generate
from adjust.errors import AdjustError
from adjust.eval.costs import (FREE, PassCost, measure_pass_cost, parse_unroll_cost, pass_equivalents, read_pass_cost,
                               read_pass_costs, tokens_per_pass_equivalent, unroll_cost_of, unroll_costs_of)
from adjust.strategies import make_strategy


def _report(tmp_path, tables, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"pass_cost": tables}))
    return path


def test_cost_interpolates_and_extrapolates_the_last_segment():
    c = PassCost({"full": {1: 1.0, 2: 1.5, 4: 2.5}, "span": {1: 1.0, 8: 1.7}})
    assert c.cost("full", 1) == 1.0 and c.cost("full", 2) == 1.5
    assert c.cost("full", 3) == pytest.approx(2.0) and c.cost("full", 6) == pytest.approx(3.5)
    assert c.cost("span", 4.5) == pytest.approx(1.35)
    assert FREE.cost("full", 16) == 1.0 and FREE.cost("span", 3) == 1.0


def test_read_report_picks_the_model_and_checks_every_table(tmp_path):
    path = _report(tmp_path, {"a": {"full": {"1": 1.0, "4": 3.0}, "unroll_cost": 0.25},
                              "b": {"full": {"1": 1.0, "2": 1.1}, "span": {"1": 1.0, "2": 1.05}}})
    a = read_pass_cost(path, "a")
    assert a.cost("full", 2) == pytest.approx(5 / 3) and a.unroll_cost == 0.25
    assert a.cost("span", 2) == pytest.approx(5 / 3)  # no span table: the full one
    assert read_pass_cost(path, "b").cost("span", 2) == pytest.approx(1.05)
    with pytest.raises(AdjustError, match=r"no table for model 'c'; it has a, b"):
        read_pass_cost(path, "c")
    assert read_pass_cost(_report(tmp_path, {"only": {"full": {"1": 1}}}, "one.json"), "x").source.endswith("(only)")
    for bad, words in (({"m": {"full": {"2": 1.5}}}, "no entry for 1 row"),
                       ({"m": {"full": {"1": 1, "x": 2}}}, "'x' is not an integer"),
                       ({"m": {"full": {"1": 1, "2": -1}}}, "costs positive"),
                       ({"m": {"span": {"1": 1}}}, "no \"full\" table"),
                       ({"m": {"full": {"1": 1}, "unroll_cost": "a"}}, "unroll_cost"),
                       ({"m": {"full": {"1": 1}, "unroll_cost_fast": -0.1}}, "unroll_cost_fast must be"),
                       ({}, "no \"pass_cost\"")):
        with pytest.raises(AdjustError, match="--pass-cost .*bad.json") as e:
            read_pass_costs(_report(tmp_path, bad, "bad.json"))
        assert words in str(e.value)


@torch.inference_mode()
def test_stats_carry_each_pass_shape(tiny_base):
    g = generate(tiny_base, [[]], make_strategy("exact"), gen_length=6, seed=0)
    assert g.stats.pass_shapes == {"full 1 1": 6} and g.stats.row_unrolls == 0
    assert tokens_per_pass_equivalent(g.stats) == 1.0
    g2 = generate(tiny_base, [[], [5]], make_strategy("exact"), gen_length=6, seed=0)
    assert g2.stats.pass_shapes == {"full 2 2": 12}  # two sequences decoding in each of 6 passes
    linear = PassCost({"full": {1: 1.0, 2: 2.0}, "span": {1: 1.0, 2: 2.0}})
    # a batch of plain canvases is the reference: per sequence one pass each, whatever a row costs
    assert tokens_per_pass_equivalent(g2.stats, linear) == tokens_per_pass_equivalent(g2.stats) == 1.0
    merged = g.stats.merge(g2.stats)
    assert merged.pass_shapes == {"full 1 1": 6, "full 2 2": 12}


@torch.inference_mode()
def test_speculative_rows_cost_what_the_table_says(tiny_base):
    g = generate(tiny_base, [[]], make_strategy("speculative", depth=3, drafter="self"), gen_length=8, seed=0)
    st = g.stats
    shapes = {tuple(map(int, k.split()[1:])): n for k, n in st.pass_shapes.items()}
    assert sum(shapes.values()) == st.full_passes and sum(r * n for (_, r), n in shapes.items()) == st.base_rows
    assert max(r for _, r in shapes) > 1  # drafted rows were computed
    assert tokens_per_pass_equivalent(st) == pytest.approx(st.tokens_per_full_pass)  # rows free by default
    linear = PassCost({"full": {1: 1.0, 2: 2.0}})  # cost(r) = r: every row a pass
    assert pass_equivalents(st, linear) == pytest.approx(st.base_rows)
    assert tokens_per_pass_equivalent(st, linear) == pytest.approx(8 / st.base_rows)


@torch.inference_mode()
def test_unrolls_add_c_each(tiny_base):
    from adjust.sampler import JointSampler, SamplerConfig

    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    g = generate(tiny_base, [[]], make_strategy("adjust", tokens_per_pass=4), gen_length=8, seed=0, sampler=sampler)
    st = g.stats
    assert (st.full_passes, st.sampler_passes, st.row_unrolls) == (2, 6, 6)
    assert pass_equivalents(st, FREE, 0.5) == pytest.approx(2 + 0.5 * 6)
    assert tokens_per_pass_equivalent(st, FREE, 0.5) == pytest.approx(8 / 5)


def test_each_unroll_mode_has_its_own_c(tmp_path):
    both = read_pass_cost(_report(tmp_path, {"m": {"full": {"1": 1}, "unroll_cost": 0.3, "unroll_cost_fast": 0.05}}))
    assert (both.unroll_cost, both.unroll_cost_fast) == (0.3, 0.05)
    assert unroll_cost_of(both, None) == unroll_cost_of(both, None, "full") == 0.3
    assert unroll_cost_of(both, None, "fast") == 0.05
    assert unroll_costs_of(both, None, ["full", "fast", "full"]) == {"full": 0.3, "fast": 0.05}
    assert unroll_costs_of(both, 0.2, ["full", "fast"]) == {"full": 0.2, "fast": 0.2}  # --unroll-cost: every mode
    assert unroll_costs_of(both, {"fast": 0.15}, ["full", "fast"]) == {"full": 0.3, "fast": 0.15}  # one mode given
    full_only = read_pass_cost(_report(tmp_path, {"m": {"full": {"1": 1}, "unroll_cost": 0.3}}, "f.json"))
    assert full_only.unroll_cost_fast is None
    assert unroll_cost_of(full_only, None, "fast") == 0.3  # no fast figure: charged as a full unroll (upper bound)
    assert unroll_costs_of(FREE, None, ["full", "fast"]) == {"full": 0.0, "fast": 0.0}
    assert "0.3 (full unroll), 0.05 (fast unroll)" in both.describe({"full": 0.3, "fast": 0.05})
    assert "c = 0.3 of" in both.describe({"full": 0.3, "fast": 0.3}) and "c = 0.3 of" in both.describe(0.3)


def test_a_gpu_bench_report_charges_the_loops_unroll_cost(tmp_path):
    """benchmarks/gpu_bench.py's pass_vs_unroll at batch 1 (LM heads included) is the c read, not pass_cost's
    head-free figures; a report without it keeps those. The shipped GPU reports read as their runs measured."""
    entry = {"full": {"1": 1.0, "2": 1.7}, "unroll_cost": 0.08, "unroll_cost_fast": 0.07}
    loop = {"1": {"modes": {"full": {"unroll_cost": 0.13}, "fast": {"unroll_cost": 0.15}}},
            "8": {"modes": {"full": {"unroll_cost": 0.09}, "fast": {"unroll_cost": 0.03}}}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"pass_cost": {"7b": entry}, "pass_vs_unroll": loop}))
    c = read_pass_cost(path)
    assert (c.unroll_cost, c.unroll_cost_fast) == (0.13, 0.15) and "pass_vs_unroll at batch 1" in c.source
    assert c.cost("full", 2) == 1.7  # the rows' table is pass_cost's still
    plain = read_pass_cost(_report(tmp_path, {"7b": entry}))
    assert (plain.unroll_cost, plain.unroll_cost_fast) == (0.08, 0.07)
    path.write_text(json.dumps({"pass_cost": {"7b": entry}, "pass_vs_unroll": {"1": {"modes": {"fast": {
        "unroll_cost": -1}}}}}))
    with pytest.raises(AdjustError, match=r"pass_vs_unroll\.1\.modes\.fast\.unroll_cost must be a number >= 0"):
        read_pass_cost(path)
    path.write_text(json.dumps({"pass_cost": {"7b": entry}, "pass_vs_unroll": {"1": {"modes": {"full": {
        "unroll_cost": 0.13}}}}}))
    assert (read_pass_cost(path).unroll_cost, read_pass_cost(path).unroll_cost_fast) == (0.13, 0.07)  # fast: untimed
    shipped = read_pass_cost(Path(__file__).parents[2] / "results" / "gpu_bench_7b_sampler2.json")
    assert (shipped.unroll_cost, shipped.unroll_cost_fast) == (0.1299, 0.1478)


def test_unroll_cost_flag_takes_one_c_or_one_per_mode():
    assert parse_unroll_cost(None) is None and parse_unroll_cost("0.13") == 0.13
    assert parse_unroll_cost("full=0.13, fast=0.148") == {"full": 0.13, "fast": 0.148}
    assert parse_unroll_cost("fast=0") == {"fast": 0.0}
    for bad, words in (("fast=0.1,fast=0.2", "repeated unroll mode 'fast'"), ("slow=0.1", "unknown unroll mode"),
                       ("full=x", "'x' is not a number"), ("abc", "'abc' is not a number"),
                       ("full=-0.1", ">= 0, got -0.1"), ("inf", ">= 0, got inf")):
        with pytest.raises(AdjustError, match=re.escape(words)):
            parse_unroll_cost(bad)


@torch.inference_mode()
def test_measure_pass_cost_times_both_unrolls(tiny_base):
    from adjust.sampler import JointSampler, SamplerConfig

    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    x = torch.tensor([5, 6, 7] + [tiny_base.mask_id] * 13)
    out = measure_pass_cost(tiny_base, x, (3, 11), rows=(1, 2), repeats=2, warmup=0, kinds=("full",),
                            sampler=sampler, unroll_k=4)
    assert out["unroll_cost"] > 0 and out["unroll_cost_fast"] > 0 and out["unroll_fast_ms"] > 0
    assert (out["unroll_fast_rows"], out["unroll_k"]) == (2 * 3 + 1, 4)  # 2(K-1) kept + the one written


@torch.inference_mode()
def test_measure_pass_cost_on_a_cached_base(tiny_base):
    x = torch.tensor([5, 6, 7] + [tiny_base.mask_id] * 9)
    out = measure_pass_cost(tiny_base, x, (3, 7), rows=(1, 2, 4), repeats=2, warmup=0)
    assert out["rows"] == [1, 2, 4] and out["block"] == [3, 7] and out["canvas"] == 12
    for kind in ("full", "span"):
        assert out[kind]["1"] == 1.0 and all(v > 0 for v in out[kind].values())
        assert set(out[f"{kind}_ms"]) == {"1", "2", "4"}


def test_bench_and_frontier_flags_fail_before_loading(capsys, tiny_model_dir, tmp_path):
    for argv, names in ((["--pass-cost", tmp_path / "missing.json"], ["--pass-cost", "missing.json"]),
                        (["--unroll-cost", "-1"], ["--unroll-cost", "-1"])):
        for cmd in (["bench"], ["eval", "frontier", "--out-dir", tmp_path / "out"]):
            capsys.readouterr()
            rc = main([str(a) for a in cmd + ["--base", "no/such/model"] + argv])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and err[0].startswith("adjust: error:"), err
            assert all(n in err[0] for n in names), err[0]
    assert not (tmp_path / "out").exists()


def test_bench_reports_tokens_per_pass_equivalent(capsys, tiny_model_dir, tmp_path):
    report_path = _report(tmp_path, {"any": {"full": {"1": 1.0, "2": 2.0}, "unroll_cost": 0.5}})
    argv = ["bench", "--base", tiny_model_dir, "--strategies", "exact,speculative:depth=2;drafter=self",
            "--gen-length", 6, "--batch-sizes", "1", "--repeats", 1, "--warmup", 0, "--json"]
    reports = []
    for extra in ([], ["--pass-cost", report_path], ["--pass-cost", report_path, "--unroll-cost", "0"]):
        capsys.readouterr()
        assert main([str(a) for a in argv + extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    free, linear, zero_c = reports
    assert free["pass_cost"]["source"].startswith("none") and free["pass_cost"]["unroll_cost"] == 0.0
    assert linear["pass_cost"]["unroll_cost"] == 0.5 and zero_c["pass_cost"]["unroll_cost"] == 0.0
    assert str(report_path) in linear["pass_cost"]["source"]
    for rep in reports:
        exact = next(r for r in rep["results"] if r["strategy"] == "exact")
        assert exact["tokens_per_pass_equivalent"] == 1.0
    spec = [next(r for r in rep["results"] if r["strategy"].startswith("speculative")) for rep in reports]
    assert spec[0]["tokens_per_pass_equivalent"] == spec[0]["tokens_per_full_pass"]  # rows free
    assert spec[1]["tokens_per_pass_equivalent"] == pytest.approx(6 / (spec[1]["rows_per_full_pass"]
                                                                       * spec[1]["full_passes"]), rel=0.02)


def test_bench_charges_each_row_its_unroll_modes_c(capsys, tiny_model_dir, tmp_path):
    report_path = _report(tmp_path, {"any": {"full": {"1": 1.0}, "unroll_cost": 0.5, "unroll_cost_fast": 0.25}})
    capsys.readouterr()
    assert main([str(a) for a in ["bench", "--base", tiny_model_dir, "--fresh-sampler", "--strategies", "adjust:4",
                                  "--unroll", "full,fast", "--gen-length", 8, "--batch-sizes", "1", "--repeats", 1,
                                  "--warmup", 0, "--unroll-repeats", 1, "--pass-cost", report_path, "--json"]]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["pass_cost"]["unroll_costs"] == {"full": 0.5, "fast": 0.25} and rep["pass_cost"]["unroll_cost"] == 0.5
    rows = {r["unroll"]: r for r in rep["results"] if r["strategy"] == "adjust:4"}
    for mode, c in (("full", 0.5), ("fast", 0.25)):  # 8 tokens: 2 full passes and 6 unrolls
        r = rows[mode]
        assert (r["full_passes"], r["sampler_passes"]) == (2, 6)
        assert r["tokens_per_pass_equivalent"] == pytest.approx(8 / (2 + c * 6), rel=1e-3)


def test_frontier_charges_each_point_its_unroll_modes_c(tiny_base):
    from adjust.eval.frontier import sweep as F
    from adjust.sampler import JointSampler, SamplerConfig

    torch.manual_seed(0)
    tiny_sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    cost = PassCost({"full": {1: 1.0}}, 0.5, "test", 0.25)
    res = F.run_frontier(tiny_base, tiny_sampler, ["list: cat dog sun =", "list: fox hen ant bee ="],
                         families=["adjust"], grids=["adjust:K=4"], gen_length=8, batch_size=2, batch_sizes=(1,),
                         timing_prompts=1, repeats=1, warmup=0, unrolls=("full", "fast"), pass_cost=cost,
                         progress=False)
    assert res["settings"]["pass_cost"]["unroll_costs"] == {"full": 0.5, "fast": 0.25}
    assert "0.5 (full unroll), 0.25 (fast unroll)" in res["settings"]["pass_cost"]["note"]
    points = {p["unroll"]: p for p in res["points"] if p["strategy"] == "adjust"}
    assert set(points) == {"full", "fast"}
    for mode, c in (("full", 0.5), ("fast", 0.25)):  # 8 tokens: 2 full passes of 4 tokens, 3 unrolls each
        sp = points[mode]["speed"]["1"]
        assert sp["tokens_per_full_pass"] == 4.0
        assert sp["tokens_per_pass_equivalent"] == pytest.approx(4 / (1 + 3 * c), abs=1e-4)
