"""benchmarks/frontier_targets.py: the acceptance targets' verdicts on hand-made points and on a real report."""

from __future__ import annotations

import json

import pytest
from bench_loader import load_benchmark

T = load_benchmark("frontier_targets")


def P(label, family, q, s):
    return {"label": label, "family": family, "q": q, "s": s}


def test_validity_target_on_hand_made_points():
    exact = P("exact", "exact", 0.90, 100)
    ours = [P("adjust:4", "adjust", 0.89, 400), P("adjust:2", "adjust", 0.95, 150)]
    near = P("threshold:tau=0.9", "threshold", 0.88, 300)  # within 3 points of 0.90; adjust:4 is 1.33x
    edge = P("parallel:2", "parallel", 0.87, 200)  # exactly 3 points below: checked
    far = P("threshold:tau=0.5", "threshold", 0.80, 1000)  # more than 3 points below: not checked
    v = T.validity_target([exact, near, edge, far] + ours, exact["q"])
    assert v["met"] is True and not v["vacuous"]
    checked = {c["peer"]: c for c in v["checked"]}
    assert set(checked) == {"threshold:tau=0.9", "parallel:2"}
    assert checked["threshold:tau=0.9"]["witness"] == "adjust:4"
    assert checked["threshold:tau=0.9"]["witness_ratio"] == pytest.approx(400 / 300, abs=1e-4)
    # just under 1.25x fails, and the report says how close the best as-valid ADJUST point came
    slow = P("threshold:tau=0.8", "threshold", 0.88, 321)
    v = T.validity_target([exact, slow] + ours, exact["q"])
    assert v["met"] is False and v["failed"] == ["threshold:tau=0.8"]
    assert v["checked"][0]["fastest_as_valid"] == "adjust:4" and v["checked"][0]["witness"] is None
    # a peer more valid than every ADJUST point: no witness, none as valid
    v = T.validity_target([exact, P("factor:factor=1", "factor", 0.99, 50)] + ours, exact["q"])
    assert v["met"] is False and v["checked"][0]["fastest_as_valid"] is None
    # no peer near exact: met, and marked vacuous
    v = T.validity_target([exact, far] + ours, exact["q"])
    assert v["met"] is True and v["vacuous"]


def test_front_target_on_hand_made_points():
    exact = P("exact", "exact", -5.4, 100)
    slow_peer = P("threshold:tau=0.9", "threshold", -5.3, 140)  # on the front, but below 1.5x
    ours = [P("adjust:4", "adjust", -5.5, 250), P("adjust:8", "adjust", -5.9, 400)]
    t = T.front_target([exact, slow_peer] + ours, 100)
    assert t["met"] is True and t["front_above"] == ["adjust:8", "adjust:4"] and t["peers_on_front_above"] == []
    fast_peer = P("parallel:8", "parallel", -5.95, 500)  # the fastest point is a peer
    t = T.front_target([exact, slow_peer, fast_peer] + ours, 100)
    assert t["met"] is False and t["peers_on_front_above"] == ["parallel:8"]
    dominated_peer = P("parallel:4", "parallel", -6.5, 240)  # above 1.5x but off the front: no harm
    assert T.front_target([exact, dominated_peer] + ours, 100)["met"] is True
    assert T.front_target([exact, slow_peer], 100)["met"] is None  # nothing faster than 1.5x exact


def test_pass_equivalent_target_on_hand_made_points():
    def E(label, family, q, s, e):
        return {**P(label, family, q, s), "e": e}

    exact = E("exact", "exact", 0.98, 100, 1.0)
    peer = E("threshold:tau=0.9", "threshold", 0.975, 200, 2.0)  # within 1 point: the best peer there
    far = E("threshold:tau=0.5", "threshold", 0.90, 400, 4.0)  # too invalid to count
    win = E("threshold-adjust:tau=0.9;K=4", "threshold-adjust", 0.972, 210, 3.0)  # 1.5x e, 1.05x s
    t = T.pass_equivalent_target([exact, peer, far, win], exact["q"])
    assert t["met"] is True and t["best_peer"]["label"] == peer["label"] and t["witness"]["label"] == win["label"]
    assert t["best_adjust_ratios"] == {"pass_equivalent": 1.5, "tokens_per_second": 1.05}
    slow = E("adjust:8", "adjust", 0.975, 190, 5.0)  # more per pass-equivalent, slower on the CPU: not enough
    t = T.pass_equivalent_target([exact, peer, slow], exact["q"])
    assert t["met"] is False and t["best_adjust"]["label"] == "adjust:8" and t["witness"] is None
    invalid = E("adjust:4", "adjust", 0.96, 500, 4.0)  # 2 points below exact: not at that quality
    t = T.pass_equivalent_target([exact, peer, invalid], exact["q"])
    assert t["met"] is False and t["best_adjust"] is None
    # no peer that valid: exact is the bar
    t = T.pass_equivalent_target([exact, far, win], exact["q"])
    assert t["best_peer"]["label"] == "exact" and t["met"] is True
    assert T.pass_equivalent_target([P("exact", "exact", 0.98, 100)], 0.98)["met"] is None  # no e column


def test_script_reads_a_frontier_report_and_writes_its_verdicts(tmp_path, capsys):
    """On a hand-written report: exact, a peer within 3 points and an ADJUST point 1.5x as fast."""
    def point(label, family, v, s):
        return {"label": label, "family": family, "quality": {"all": {"value": v, "score": v}},
                "speed": {"1": {"tokens_per_second": s}}}

    report = {"mode": "validity", "panels": ["all"], "code_version": {"commit": "x" * 40},
              "settings": {"target_batch_size": 1, "speed_reference": "exact", "batch_sizes": [1]},
              "points": [point("exact", "exact", 0.9, 100), point("threshold:tau=0.9", "threshold", 0.89, 200),
                         point("adjust:4", "adjust", 0.9, 300)]}
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(report))
    assert T.main([str(path), "--md", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "- validity, all: **met**" in out and "adjust:4 is 1.50x as fast" in out
    assert (tmp_path / "t.md").read_text() == out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["validity"]["all"]["checked"][0]["witness"] == "adjust:4" and saved["front"]["all"]["met"] is True


def test_free_text_counts_points_within_exact_c2st_noise(tmp_path, capsys):
    """A C2ST panel: 'within exact' is within one standard error of exact's own AUC (score -|AUC - 0.5|)."""
    def point(label, family, auc, s, e):
        return {"label": label, "family": family, "speed": {"1": {"tokens_per_second": s,
                                                                 "tokens_per_pass_equivalent": e}},
                "quality": {"text": {"measure": "c2st_auc", "value": auc, "score": -abs(auc - 0.5), "se": 0.037}}}

    def verdict(adjust_auc):
        report = {"mode": "text", "panels": ["text"], "code_version": {"commit": "x" * 40},
                  "settings": {"target_batch_size": 1, "speed_reference": "exact", "batch_sizes": [1]},
                  "points": [point("exact", "exact", 0.497, 61, 1.0),
                             point("entropy-bound:gamma=0.5", "entropy-bound", 0.515, 66, 1.05),
                             point("parallel:2", "parallel", 0.722, 125, 2.0),  # far outside the noise
                             point("adjust:2+fast", "adjust", adjust_auc, 88, 1.8)]}
        path = tmp_path / "frontier.json"
        path.write_text(json.dumps(report))
        assert T.main([str(path)]) == 0
        return capsys.readouterr().out

    out = verdict(0.519)  # 0.019 from 0.5, within 0.003 + 0.037
    assert "- pass-equivalent, text: **met**" in out and "best peer point is entropy-bound:gamma=0.5" in out
    assert "AUC 0.497 +- 0.037" in out and "1.71x its tokens per pass-equivalent" in out
    out = verdict(0.56)  # outside the noise: no ADJUST point at exact's quality
    assert "- pass-equivalent, text: **not met**" in out and "no ADJUST-family point is that valid" in out
