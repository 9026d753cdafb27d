"""`adjust eval quality` end to end on a tiny random base: report files, cache reuse, skipping, CLI --json."""

from __future__ import annotations

import json

import pytest
import torch

from adjust.cli import main
from adjust.distill.rollouts import make_rollouts
from adjust.errors import AdjustError
from adjust.eval.quality import normalize_specs, run_quality
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig

pytest.importorskip("mauve")
pytest.importorskip("matplotlib")

SMALL = dict(num_samples=6, gen_length=8, batch_size=6, nll_draws=1, joint_kl_states=2, joint_kl_draws=1,
             progress=False)


@pytest.fixture(scope="module")
def sampler(tiny_base):
    torch.manual_seed(5)
    return JointSampler(SamplerConfig.for_base(tiny_base)).eval()


def test_normalize_specs():
    assert normalize_specs(["exact", ("parallel", 2), ("threshold", {"tau": 0.9}), ("parallel", 2)]) == [
        ("exact", {}), ("parallel", {"tokens_per_pass": 2}), ("threshold", {"tau": 0.9})]
    with pytest.raises(AdjustError):
        normalize_specs([("parallel", "two")])


def test_report_files_and_cache_reuse(tiny_base, sampler, tmp_path):
    rollouts = make_rollouts(tiny_base, tmp_path / "rollouts", 20, 8, SamplingConfig(), batch_size=20, progress=False)
    kw = dict(SMALL, cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    first = run_quality(tiny_base, sampler, [("parallel", 2), ("adjust", 2)], joint_kl_rollouts=rollouts, **kw)
    assert [r["label"] for r in first["rows"]] == ["exact", "parallel:2", "adjust:2"]
    assert sorted(first["cache"]["generated"]) == ["adjust:2@seed1", "exact@seed0", "exact@seed1", "parallel:2@seed1"]
    assert first["cache"]["hits"] == []
    exact, par, adj = first["rows"]
    assert exact["tokens_per_full_pass"] == pytest.approx(1.0) and exact["speed_vs_exact"] == pytest.approx(1.0)
    assert par["tokens_per_full_pass"] == pytest.approx(2.0) and adj["tokens_per_full_pass"] == pytest.approx(2.0)
    assert adj["sampler_passes"] > 0 and par["sampler_passes"] == 0
    for r in first["rows"]:
        assert 0 <= r["mauve"] <= 1 and r["nll"] > 0 and 0 <= r["distinct_2"] <= 1 and r["tokens_per_second"] > 0
    assert first["settings"]["mauve_noise_floor"] == exact["mauve"]
    assert exact["joint_kl"] is None and par["joint_kl"] is not None and adj["joint_kl"] is not None
    assert {"platform", "cpu_count", "torch"} <= set(first["machine"])

    files = first["files"]
    on_disk = json.loads(open(files["json"]).read())
    assert on_disk["rows"] == first["rows"]
    md = open(files["markdown"]).read()
    header = "| strategy | K/param | tokens/full pass | MAUVE | NLL | distinct-2 | joint-KL | tokens/s | speed vs exact |"
    assert header in md
    assert "| adjust | K=2 |" in md
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*.tmp"))

    # one more strategy: only it is generated; every other set (and every number) comes back from the cache
    second = run_quality(tiny_base, sampler, [("parallel", 2), ("adjust", 2), ("parallel", {"tokens_per_pass": 4})],
                         **kw)
    assert second["cache"]["generated"] == ["parallel:4@seed1"]
    assert sorted(second["cache"]["hits"]) == ["adjust:2@seed1", "exact@seed0", "exact@seed1", "parallel:2@seed1"]
    for a, b in zip(first["rows"], second["rows"]):
        assert (a["label"], a["mauve"], a["nll"], a["tokens_per_second"], a["c2st_auc"]) == (
            b["label"], b["mauve"], b["nll"], b["tokens_per_second"], b["c2st_auc"])
    assert second["rows"][-1]["tokens_per_full_pass"] == pytest.approx(4.0)


def test_skipping_and_errors(tiny_base, tmp_path, capsys):
    kw = dict(SMALL, cache_dir=None, out_dir=None, featurizer=lambda texts: torch.randn(len(texts), 4).numpy())
    out = run_quality(tiny_base, None, [("adjust", 2), ("parallel", 3)], **kw)  # no sampler: adjust is skipped
    assert [r["label"] for r in out["rows"]] == ["exact", "parallel:3"]
    assert any("adjust:2" in n and "sampler" in n for n in out["notes"])
    assert "adjust: warning: skipped adjust:2" in capsys.readouterr().err
    with pytest.raises(AdjustError, match="unknown strategy"):
        run_quality(tiny_base, None, [("no-such-strategy", 2)], **kw)
    with pytest.raises(AdjustError, match="takes no"):
        run_quality(tiny_base, None, [("parallel", {"tau": 0.5})], **kw)


def test_default_list_skips_unregistered(tiny_base, monkeypatch):
    from adjust.eval import quality

    monkeypatch.setattr(quality, "DEFAULT_STRATEGIES", [("parallel", {"tokens_per_pass": 4}), ("not-yet", {"x": 1})])
    kw = dict(SMALL, cache_dir=None, featurizer=lambda t: torch.randn(len(t), 4).numpy())
    out = run_quality(tiny_base, None, None, **kw)
    assert [r["label"] for r in out["rows"]] == ["exact", "parallel:4"]
    assert any("not-yet" in n and "not registered" in n for n in out["notes"])


def test_cli_json(tiny_model_dir, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["eval", "quality", "--base", str(tiny_model_dir), "--num-samples", "4", "--gen-length", "6",
               "--strategies", "parallel:3", "--nll-draws", "1", "--cache-dir", str(tmp_path / "c"),
               "--out-dir", str(tmp_path / "o"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    obj = json.loads(out)
    assert [r["label"] for r in obj["rows"]] == ["exact", "parallel:3"]
    assert (tmp_path / "o" / "quality.md").is_file() and (tmp_path / "o" / "quality.png").is_file()
    rc = main(["eval", "quality", "--base", str(tiny_model_dir), "--strategies", "parallel:x", "--json"])
    assert rc == 2 and "adjust: error:" in capsys.readouterr().err


def test_cached_samples_are_keyed_on_the_generating_code(tiny_base, tmp_path, monkeypatch):
    from adjust.eval import quality

    def cache():
        return quality.SampleCache(tmp_path, tiny_base, None, 3, 4, SamplingConfig(), 3, False)

    first = cache()
    assert first.key("exact", {}, quality.build_strategy("exact", {}), 0)["code"] == quality.sampling_code_version()
    assert first.get("exact", {}, 0)["cached"] is False
    again = cache()
    assert again.get("exact", {}, 0)["cached"] is True and again.hits == ["exact@seed0"]
    monkeypatch.setattr(quality, "sampling_code_version", lambda: "0.1.0+changedcode")
    changed = cache()
    assert changed.get("exact", {}, 0)["cached"] is False and changed.generated == ["exact@seed0"]


def test_report_records_the_code_version(tiny_base, sampler, tmp_path):
    from adjust.provenance import code_version

    result = run_quality(tiny_base, sampler, [("parallel", 2)], cache_dir=None, out_dir=tmp_path, **SMALL)
    assert result["code_version"] == code_version()
    assert json.loads((tmp_path / "quality.json").read_text())["code_version"] == code_version()


def test_blocks_and_cache(tiny_base, sampler, tmp_path):
    """--block-length/--cache: the evaluated sets are decoded with the cache, the exact reference without."""
    kw = dict(SMALL, cache_dir=tmp_path / "cache", out_dir=None, featurizer=lambda texts: torch.randn(len(texts), 4).numpy())
    out = run_quality(tiny_base, sampler, [("adjust", 2)], block_length=4, kv_cache="dual", **kw)
    assert out["settings"]["kv_cache"] == "dual" and out["settings"]["block_length"] == 4
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert sorted(n.split("-seed")[0] for n in names) == ["adjust_2-dual", "exact", "exact-dual"]  # reference uncached
    assert out["rows"][1]["full_passes"] == 2 * 2  # 2 blocks of 4 at K=2
    with pytest.raises(AdjustError, match="needs --block-length"):
        run_quality(tiny_base, sampler, [("adjust", 2)], kv_cache="dual", **kw)


def test_c2st_column_and_its_noise_floor(tiny_base, tiny_model_dir, tmp_path, capsys):
    """The two-sample test against exact: one AUC per row, the exact row's is the reported noise floor, in the
    table and the JSON; 0 folds turns it off and leaves the other columns; bad folds are refused."""
    kw = dict(SMALL, num_samples=40, cache_dir=tmp_path / "cache", featurizer=lambda t: torch.randn(len(t), 4).numpy())
    out = run_quality(tiny_base, None, [("parallel", 8)], out_dir=tmp_path / "out", **kw)
    exact, par = out["rows"]
    assert out["settings"]["c2st_noise_floor"] == exact["c2st_auc"]
    assert out["settings"]["c2st_noise_floor_se"] == exact["c2st_auc_se"] and out["settings"]["c2st"]["folds"] == 5
    for r in out["rows"]:
        assert 0 <= r["c2st_auc"] <= 1 and r["c2st_auc_se"] >= 0 and 0 <= r["c2st_accuracy"] <= 1
        assert 0 <= r["mauve_base"] <= 1 and r["nll_stderr"] > 0
    assert out["settings"]["mauve_base_noise_floor"] == exact["mauve_base"]
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| speed vs exact | C2ST AUC | MAUVE (base) |" in md and "noise floor (exact vs exact)" in md
    assert f"| {exact['c2st_auc']:.3f} ± {exact['c2st_auc_se']:.3f} |" in md

    off = run_quality(tiny_base, None, [("parallel", 8)], c2st_folds=0, out_dir=tmp_path / "off", **kw)
    assert off["settings"]["c2st"] is None and all(r["c2st_auc"] is None is r["mauve_base"] for r in off["rows"])
    assert "C2ST AUC: held-out" not in (tmp_path / "off" / "quality.md").read_text()
    assert [r["mauve"] for r in off["rows"]] != [None, None]
    with pytest.raises(AdjustError, match="--c2st-folds"):
        run_quality(tiny_base, None, [("parallel", 8)], c2st_folds=1, **kw)
    capsys.readouterr()
    assert main(["eval", "quality", "--base", str(tiny_model_dir), "--strategies", "parallel:2", "--c2st-folds", "-1",
                 "--json"]) == 2
    assert "adjust: error: --c2st-folds" in capsys.readouterr().err
