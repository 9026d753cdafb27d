"""`adjust eval frontier`: Pareto fronts and dominance on hand-made points; the grid syntax; the shared
interleaved timing; the command end to end on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from adjust.errors import AdjustError
from adjust.eval.frontier import sweep as F
from adjust.eval.frontier import analysis as A
from adjust.eval.frontier.measures import C2stAuc
from adjust.eval.bench import interleaved_runs, paired_ratio
from adjust.eval.specs import spec_key
from adjust.sampler import JointSampler, SamplerConfig
from adjust.strategies import STRATEGIES, strategy_names

from test_cli import assert_one_error_line, cli

pytest.importorskip("matplotlib")
torch.set_num_threads(1)


def P(label, family, q, s):
    return {"label": label, "family": family, "q": q, "s": s}


# --------------------------------------------------------------------------------------------
# Pareto fronts and dominance on hand-made points
# --------------------------------------------------------------------------------------------

def test_pareto_front_keeps_ties_and_drops_dominated_points():
    pts = [P("a", "x", 0.9, 100), P("a-twin", "x", 0.9, 100),  # identical: both stay
           P("slower", "x", 0.9, 90),  # same quality, slower: dominated by a
           P("worse", "x", 0.8, 100),  # same speed, worse: dominated by a
           P("fast", "x", 0.5, 200), P("fast-worse", "x", 0.4, 200), P("mid", "x", 0.7, 150),
           P("no-quality", "x", None, 500)]  # unmeasured points are left out
    assert [p["label"] for p in A.pareto_front(pts)] == ["fast", "mid", "a", "a-twin"]
    assert A.dominates(pts[0], pts[2]) and A.dominates(pts[0], pts[3])
    assert not A.dominates(pts[0], pts[1]) and not A.dominates(pts[1], pts[0])
    assert A.pareto_front([]) == []


def test_family_fronts_anchor_exact_to_parallel_and_adjust_only():
    pts = [P("exact", "exact", 0.9, 100), P("parallel:2", "parallel", 0.5, 200),
           P("adjust:2", "adjust", 0.9, 90), P("threshold:tau=0.9", "threshold", 0.8, 300)]
    fronts = {f: [p["label"] for p in fr] for f, fr in A.family_fronts(pts).items()}
    assert fronts == {"parallel": ["parallel:2", "exact"], "adjust": ["exact"],  # adjust:2 is slower than exact
                      "threshold": ["threshold:tau=0.9"]}


def test_dominance_names_the_fastest_adjust_point_or_none():
    pts = [P("exact", "exact", 0.90, 100),
           P("threshold:tau=0.9", "threshold", 0.85, 300), P("threshold:tau=0.5", "threshold", 0.40, 600),
           P("parallel:2", "parallel", 0.50, 200),
           P("adjust:2", "adjust", 0.85, 310), P("adjust:4", "adjust", 0.86, 450),
           P("adjust-threshold:tau=0.9", "adjust-threshold", 0.84, 900),  # fastest but less valid than tau=0.9
           P("adjust:8", "adjust", 0.50, 200)]  # as valid as parallel:2 at the same speed: not a dominator
    by_peer = {d["peer"]: d for d in A.dominance(pts)}
    assert set(by_peer) == {"threshold:tau=0.9", "threshold:tau=0.5", "parallel:2"}  # exact is no peer point
    d = by_peer["threshold:tau=0.9"]
    assert d["dominated_by"] == "adjust:4" and d["by_family"] == "adjust" and d["dominators"] == 2
    assert d["speed_ratio"] == pytest.approx(1.5)
    assert by_peer["threshold:tau=0.5"]["dominated_by"] == "adjust-threshold:tau=0.9"
    assert by_peer["threshold:tau=0.5"]["speed_ratio"] == pytest.approx(1.5)
    # parallel:2 (0.5, 200): adjust:8 ties it exactly, adjust:4 is more valid and faster
    assert by_peer["parallel:2"]["dominated_by"] == "adjust-threshold:tau=0.9"
    assert by_peer["parallel:2"]["dominators"] == 3  # adjust:2, adjust:4, adjust-threshold; not the tie adjust:8
    # a peer nobody beats: none
    alone = A.dominance([P("threshold:tau=0.3", "threshold", 0.9, 1000), P("adjust:2", "adjust", 0.95, 999)])
    assert [(d["peer"], d["dominated_by"], d["dominators"], d["speed_ratio"]) for d in alone] == [
        ("threshold:tau=0.3", None, 0, None)]


# --------------------------------------------------------------------------------------------
# grid syntax and planning
# --------------------------------------------------------------------------------------------

def test_parse_grid_product_and_k_alias():
    fam, pts = F.parse_grid("threshold:tau=0.9,0.5")
    assert fam == "threshold" and pts == [{"tau": 0.9}, {"tau": 0.5}]
    fam, pts = F.parse_grid("adjust-threshold:tau=0.9,0.7;max_tokens_per_pass=4,8")
    assert len(pts) == 4 and {"tau": 0.7, "max_tokens_per_pass": 8} in pts
    assert F.parse_grid("adjust:K=2,4,2")[1] == [{"tokens_per_pass": 2}, {"tokens_per_pass": 4}]
    assert F.parse_grid("adjust:K=2,4|K=8;group=2,4|K=4")[1] == [
        {"tokens_per_pass": 2}, {"tokens_per_pass": 4}, {"tokens_per_pass": 8, "group": 2},
        {"tokens_per_pass": 8, "group": 4}]  # the union of the sets, in order, without repeats
    for bad in ("nosuch:K=2", "adjust", "adjust:", "adjust:K", "adjust:K=2|", "adjust:K=two", "adjust:K=2;K=4", "threshold:tau=nan"):
        with pytest.raises(AdjustError):
            F.parse_grid(bad)


def test_every_default_grid_parses():
    for family, text in F.DEFAULT_GRIDS.items():
        assert F.parse_grid(text)[0] == family
        assert family in A.PEER_FAMILIES + A.ADJUST_FAMILIES


def test_plan_points_skips_what_cannot_run_and_refuses_it_when_asked(monkeypatch):
    monkeypatch.setitem(F.DEFAULT_GRIDS, "made-up", "made-up:K=2")  # a family whose strategy is not registered
    plan, notes = F.plan_points(with_sampler=False)
    families = {f for f, _, _ in plan}
    assert plan[0] == ("exact", "exact", {}) and "parallel" in families and "threshold" in families
    assert "adjust" not in families and "made-up" not in families
    assert any("made-up" in n and "not registered" in n for n in notes)
    assert any(n.startswith("skipped family adjust") for n in notes)
    with pytest.raises(AdjustError, match="not registered"):
        F.plan_points(["made-up"])
    with pytest.raises(AdjustError, match="needs a joint sampler"):
        F.plan_points(["adjust"], with_sampler=False)
    with pytest.raises(AdjustError, match="not among --families"):
        F.plan_points(["parallel"], ["threshold:tau=0.5"])
    with pytest.raises(AdjustError, match="larger than --gen-length"):
        F.plan_points(["parallel"], ["parallel:K=2,8"], gen_length=4)  # a grid the user gave
    plan, notes = F.plan_points(["parallel"], gen_length=4)  # the default grid goes to K = 8: skipped, said
    assert [p for _f, _n, p in plan] == [{}, {"tokens_per_pass": 2}, {"tokens_per_pass": 3}, {"tokens_per_pass": 4}]
    assert notes == ["skipped parallel:6: K = 6 is larger than --gen-length 4",
                     "skipped parallel:8: K = 8 is larger than --gen-length 4"]
    with pytest.raises(AdjustError, match="tau"):
        F.plan_points(["threshold"], ["threshold:tau=1.5"])
    with pytest.raises(AdjustError, match="takes no"):
        F.plan_points(["threshold"], ["threshold:gamma=0.5"])
    plan, _ = F.plan_points(["parallel", "adjust"], ["adjust:K=2"])
    assert plan == ([("exact", "exact", {})] + [("parallel", "parallel", {"tokens_per_pass": k}) for k in (2, 3, 4, 6, 8)]
                    + [("adjust", "adjust", {"tokens_per_pass": 2})])


def test_timing_subset_takes_every_task_in_turn():
    records = [{"task": t, "prompt": f"{t}: {i} ="} for t in ("list", "pick") for i in range(3)]
    prompts = [r["prompt"] for r in records]
    assert F.timing_subset(prompts, records, 3) == ["list: 0 =", "pick: 0 =", "list: 1 ="]
    assert F.timing_subset(prompts, None, 2) == prompts[:2]
    assert F.timing_subset(None, None, 2) == ["", ""]


def test_interleaved_runs_pairs_every_repeat():
    calls = []
    runs = [(k, (lambda k: lambda seed: calls.append((k, seed)) or seed * 10)(k)) for k in "abc"]
    out = interleaved_runs(runs, repeats=3, warmup=1, seed=5)
    assert out == {k: [50, 60, 70] for k in "abc"}  # every run once per repeat, seed + r
    assert calls[:3] == [("a", 10_005), ("b", 10_005), ("c", 10_005)]  # warm-up first
    assert [k for k, _ in calls[3:6]] == ["a", "b", "c"] and [k for k, _ in calls[6:9]] == ["b", "c", "a"]
    calls.clear()
    interleaved_runs(runs, repeats=4, warmup=0, seed=0, shuffle=True)
    orders = ["".join(k for k, _ in calls[i:i + 3]) for i in range(0, 12, 3)]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders) and len(set(orders)) > 1
    assert paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 0.0]) == 2.5  # the zero reference is left out


# --------------------------------------------------------------------------------------------
# end to end on a tiny random model
# --------------------------------------------------------------------------------------------

TASK_PROMPTS = ["list: cat dog sun =", "list: fox hen ant bee =", "pick: bakori tumesa lipodu =",
                "reverse: cat dog sun =", "reverse: owl pig rat ="]


@pytest.fixture(scope="module")
def tiny_sampler(tiny_base):
    torch.manual_seed(0)
    return JointSampler(SamplerConfig.for_base(tiny_base)).eval()


@pytest.fixture(scope="module")
def sampler_dir(tiny_sampler, tmp_path_factory):
    d = tmp_path_factory.mktemp("frontier") / "sampler"
    tiny_sampler.save(d)
    return d


@pytest.fixture
def task_prompts(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TASK_PROMPTS))
    return path


def _two_point_grids() -> list[str]:
    """Every registered family's grid cut to its first two points."""
    strategy_names()
    out = []
    for family, text in F.DEFAULT_GRIDS.items():
        if family in STRATEGIES:
            pts = F.parse_grid(text)[1][:2]
            axes = {k: list(dict.fromkeys(p[k] for p in pts)) for k in pts[0]}
            out.append(f"{family}:" + ";".join(f"{spec_key(k)}={','.join(map(str, v))}" for k, v in axes.items()))
    return out


def test_cli_end_to_end_on_task_prompts(capsys, tiny_model_dir, sampler_dir, task_prompts, tmp_path):
    grids = _two_point_grids()
    args = ["eval", "frontier", "--base", tiny_model_dir, "--sampler", sampler_dir, "--prompts", task_prompts,
            "--gen-length", 8, "--batch-sizes", "1,2", "--timing-prompts", 2, "--repeats", 1, "--warmup", 0,
            "--out-dir", tmp_path / "out", "--json"]
    for g in grids:
        args += ["--grid", g]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    result = json.loads(out)
    files = result["files"]
    assert json.loads(open(files["json"]).read())["points"] == result["points"]
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(files["markdown"]).read()
    assert "## Fronts and dominance, batch 1" in md and "## Fronts and dominance, batch 2" in md
    assert "Targets" not in md and "targets" not in result  # acceptance targets are not the library's
    assert result["mode"] == "validity" and result["panels"] == ["list", "pick", "reverse", "all"]
    points = {p["label"]: p for p in result["points"]}
    families = [f for f in F.DEFAULT_GRIDS if f in STRATEGIES]
    assert len(points) == 1 + 2 * len(families) and points["exact"]["family"] == "exact"
    for p in points.values():
        assert p["label"] in md
        assert set(p["speed"]) == {"1", "2"}
        assert p["quality"]["all"]["n"] == len(TASK_PROMPTS) and 0 <= p["quality"]["all"]["value"] <= 1
        assert p["quality"]["list"]["n"] == 2
        for sp in p["speed"].values():
            assert sp["tokens_per_second"] > 0 and len(sp["tokens_per_second_repeats"]) == 1
    assert points["exact"]["speed"]["1"]["ratio_to_exact"] == 1.0 and points["exact"]["tokens_per_full_pass"] == 1.0
    assert points["parallel:3"]["tokens_per_full_pass"] == pytest.approx(8 / 3, abs=1e-4)
    assert points["adjust:2"]["sampler_passes"] > 0
    assert "tok/pass-eq B=1" in md and "rows assumed free" in md  # no --pass-cost: cost(r) = 1, said so
    assert result["settings"]["pass_cost"]["source"].startswith("none")
    for p in points.values():
        sp = p["speed"]["1"]
        assert sp["drafts_accepted"] <= sp["drafts_proposed"] and sp["rows_per_full_pass"] >= 1
        if p["family"] != "speculative":
            assert sp["drafts_proposed"] == 0 and sp["rows_per_full_pass"] == 1
            if p["sampler_passes"] == 0:  # no unrolls, no extra rows: tokens per full pass
                assert sp["tokens_per_pass_equivalent"] == sp["tokens_per_full_pass"]
    spec = [p["speed"]["1"] for p in points.values() if p["family"] == "speculative"]
    assert spec and all(sp["drafts_proposed"] > 0 and sp["rows_per_full_pass"] > 1 for sp in spec)
    for B in ("1", "2"):
        a = result["analysis"][B]["all"]
        assert set(a["fronts"]) == set(families)
        # every peer point on its family front gets a dominance line, naming an ADJUST point or none
        on_fronts = {lab for f, labs in a["fronts"].items() if A.side(f) == "peer" for lab in labs if lab != "exact"}
        assert {d["peer"] for d in a["dominance"]} == on_fronts
        for d in a["dominance"]:
            assert d["dominated_by"] is None or points[d["dominated_by"]]["side"] == "adjust"
    s = result["settings"]
    assert s["threads"] == 1 and s["timing_prompts"] == ["list: cat dog sun =", "pick: bakori tumesa lipodu ="]
    assert result["code_version"] and s["grids"]["parallel"] == next(g for g in grids if g.startswith("parallel:"))


def test_same_seed_same_quality_and_two_sided_hook(tiny_base, tiny_sampler):
    seen = []

    def mean_id_gap(base, exact_samples, strategy_samples):  # a real (if crude) two-sided statistic
        seen.append((len(exact_samples), len(strategy_samples)))
        mean = lambda ss: sum(sum(s["token_ids"]) for s in ss) / sum(len(s["token_ids"]) for s in ss)  # noqa: E731
        return {"name": "mean-id-gap", "value": abs(mean(exact_samples) - mean(strategy_samples)), "se": None}

    kw = dict(families=["parallel", "adjust"], grids=["parallel:K=2", "adjust:K=2"], num_samples=4, gen_length=8,
              batch_sizes=(1,), timing_prompts=1, repeats=1, warmup=0, nll_draws=1, progress=False,
              two_sided=mean_id_gap)
    first = F.run_frontier(tiny_base, tiny_sampler, None, **kw)
    again = F.run_frontier(tiny_base, tiny_sampler, None, **kw)
    assert first["mode"] == "text" and first["panels"] == ["text"] and first["settings"]["measure"] == "mean-id-gap"
    assert seen == [(4, 4)] * 6  # exact reference set vs each point's set, for exact, parallel:2 and adjust:2
    for a, b in zip(first["points"], again["points"]):
        assert a["label"] == b["label"] and a["quality"] == b["quality"] and a["nll"] == b["nll"]
        assert a["tokens_per_full_pass"] == b["tokens_per_full_pass"]
        assert a["quality"]["text"]["score"] == -a["quality"]["text"]["value"]  # a distance: lower is better
    assert first["points"][0]["two_sided"]["value"] >= 0  # exact vs exact: the noise floor
    assert first["settings"]["reference_seed"] == 1
    nll_only = F.run_frontier(tiny_base, tiny_sampler, None, quality="nll", **dict(kw, two_sided=None))
    assert nll_only["settings"]["measure"] == "nll"
    assert [p["quality"]["text"]["value"] for p in nll_only["points"]] == [p["nll"] for p in first["points"]]


def test_free_text_defaults_to_the_c2st_two_sided_measure(tiny_base):
    kw = dict(families=["parallel"], grids=["parallel:K=4"], gen_length=8, batch_sizes=(1,), timing_prompts=1,
              repeats=1, warmup=0, nll_draws=1, progress=False)
    res = F.run_frontier(tiny_base, None, ["The dog", "A cat sat on"], num_samples=6, **kw)
    assert res["settings"]["measure"] == "c2st_auc"
    for p in res["points"]:
        t = p["two_sided"]
        assert t["name"] == "c2st_auc" and 0.0 <= t["value"] <= 1.0 and t["se"] >= 0
        assert p["quality"]["text"]["score"] == -abs(t["value"] - 0.5)  # two-sided: either direction is worse
    with pytest.raises(AdjustError, match="needs at least 10 samples"):  # checked before any generation
        F.run_frontier(tiny_base, None, ["The dog", "A cat sat on"], num_samples=4, **kw)


def test_c2st_reuses_the_reference_features_without_changing_the_result(tiny_base, tokenizer, monkeypatch):
    """The exact set's base features are computed once per sweep; every value equals a fresh computation,
    and another reference set or another base is not served stale features."""
    from conftest import make_tiny_base

    from adjust.decode import generate_texts
    from adjust.eval import two_sample
    from adjust.strategies import make_strategy

    def samples(strategy, seed):
        return generate_texts(tiny_base, ["The dog"], strategy, gen_length=6, num_samples=12, seed=seed)[0]

    ref, a = samples(make_strategy("exact"), 1), samples(make_strategy("parallel", tokens_per_pass=2), 0)
    b = samples(make_strategy("exact"), 2)
    calls = []
    real = two_sample.base_features
    monkeypatch.setattr(two_sample, "base_features", lambda *args, **kw: calls.append(args[0]) or real(*args, **kw))
    measure = C2stAuc()  # one per sweep: it keeps the reference set's features for that sweep only
    first, second = measure(tiny_base, ref, a), measure(tiny_base, ref, b)
    assert len(calls) == 3  # the reference once, then each strategy's set
    for got, other in ((first, a), (second, b)):
        fresh = two_sample.c2st_samples(tiny_base, ref, other, [tiny_base.encode("The dog")] * 12)
        assert got["value"] == fresh["auc"] and got["se"] == fresh["auc_se"]
    calls.clear()
    measure(tiny_base, b, a)  # another reference set: recomputed
    other_base = make_tiny_base(tokenizer, seed=1)
    measure(other_base, b, a)  # the same set under another base: recomputed with that base
    assert calls == [tiny_base, tiny_base, other_base, other_base]
    calls.clear()
    C2stAuc()(tiny_base, b, a)  # a new sweep's measure starts with nothing kept
    assert calls == [tiny_base, tiny_base]


def test_same_seed_same_validity_on_rerun(tiny_base, tiny_sampler):
    kw = dict(families=["threshold", "adjust"], grids=["threshold:tau=0.5", "adjust:K=4"], gen_length=8,
              batch_size=2, batch_sizes=(1,), timing_prompts=1, repeats=1, warmup=0, progress=False)
    first = F.run_frontier(tiny_base, tiny_sampler, TASK_PROMPTS, **kw)
    again = F.run_frontier(tiny_base, tiny_sampler, TASK_PROMPTS, **dict(kw, batch_size=5))  # batching: no matter
    assert [p["quality"] for p in first["points"]] == [p["quality"] for p in again["points"]]
    assert [p["tokens_per_full_pass"] for p in first["points"]] == [p["tokens_per_full_pass"] for p in again["points"]]


def test_free_text_prompts_score_the_continuation(tiny_base):
    res = F.run_frontier(tiny_base, None, ["The dog", "A cat sat on"], families=["parallel"], grids=["parallel:K=2"],
                         num_samples=2, gen_length=6, batch_sizes=(2,), timing_prompts=1, repeats=1, warmup=0,
                         nll_draws=1, progress=False, quality="nll")
    assert res["mode"] == "text" and res["settings"]["measure"] == "nll" and res["settings"]["target_batch_size"] == 2
    assert [p["label"] for p in res["points"]] == ["exact", "parallel:2"]
    assert all(p["quality"]["text"]["n"] == 4 and p["nll"] > 0 for p in res["points"])
    with pytest.raises(AdjustError, match="mix task prompts"):
        F.run_frontier(tiny_base, None, ["The dog", "list: cat dog ="], families=["parallel"], progress=False)
    with pytest.raises(AdjustError, match="needs task prompts"):
        F.run_frontier(tiny_base, None, ["The dog"], quality="validity", progress=False)


@pytest.mark.parametrize("argv, names", [
    (["--families", "parallel,nosuch"], ["--families", "unknown family 'nosuch'"]),
    (["--grid", "threshold:tau=abc"], ["--grid 'threshold:tau=abc'", "is not a number"]),
    (["--grid", "threshold:tau=1.5"], ["threshold:tau=1.5", "--tau"]),
    (["--grid", "nosuch:K=2"], ["--grid 'nosuch:K=2'", "unknown family"]),
    (["--families", "parallel", "--grid", "adjust:K=2"], ["--grid 'adjust:K=2'", "not among --families"]),
    (["--cache", "none,dual"], ["--cache dual", "needs --block-length"]),
    (["--batch-sizes", "1,x"], ["--batch-sizes", "'1,x'"]),
    (["--quality", "mauve"], ["--quality 'mauve'"]),
    (["--timing-prompts", "0"], ["--timing-prompts", "got 0"]),
    (["--pass-cost", "nosuch.json"], ["--pass-cost", "nosuch.json"]),
    (["--unroll-cost", "nan"], ["--unroll-cost", "nan"]),
    (["--unroll-cost", "full=0.1,slow=0.2"], ["--unroll-cost", "unknown unroll mode 'slow'"]),
])
def test_bad_arguments_one_line_exit_2(capsys, tiny_model_dir, task_prompts, tmp_path, argv, names):
    rc, _, err = cli(capsys, "eval", "frontier", "--base", tiny_model_dir, "--prompts", task_prompts,
                     "--out-dir", tmp_path / "out", *argv)
    assert_one_error_line(rc, err, *names)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_fails_first(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, "eval", "frontier", "--base", tiny_model_dir, "--out-dir", tmp_path / "file")
    assert_one_error_line(rc, err, f"--out-dir {tmp_path / 'file'}", "not a directory")
