"""benchmarks/unroll_profile.py on a tiny model: the real decoding loop, timed piece by piece, in seconds."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def unroll_profile():
    from tests.benchmarks.bench_loader import load_benchmark

    return load_benchmark("unroll_profile")


def test_tiny_profile_of_both_modes(unroll_profile, tiny_model_dir, tmp_path, capsys):
    from adjust.base import load_base
    from adjust.provenance import code_version
    from adjust.sampler import JointSampler, SamplerConfig

    import adjust.decode as decode
    from adjust.base.tiny import TinyBase

    before = (decode.StepContext.unroll_sampler, decode.log_probs, JointSampler.forward_rows, TinyBase.logits)
    JointSampler(SamplerConfig.for_base(load_base(tiny_model_dir))).save(tmp_path / "sampler")
    out = tmp_path / "out" / "profile.json"
    rc = unroll_profile.main(["--base", str(tiny_model_dir), "--sampler", str(tmp_path / "sampler"), "--gen-length", "16",
                              "--batch-sizes", "1,2", "--repeats", "1", "--ranks", "2", "--json", str(out)])
    assert rc == 0
    # the timers are gone again: the library is as it was
    assert (decode.StepContext.unroll_sampler, decode.log_probs, JointSampler.forward_rows, TinyBase.logits) == before
    assert "logits" not in vars(TinyBase)
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report and report["code_version"] == code_version()
    assert {(r["batch_size"], r["unroll"]) for r in report["rows"]} == {(b, m) for b in (1, 2) for m in ("full", "fast")}
    for r in report["rows"]:
        assert r["unrolls_per_run"] == 12 and r["full_passes_per_run"] == 4  # K = 4: 16 tokens in 4 steps
        u, f = r["per_unroll_ms"], r["per_full_pass_ms"]
        assert set(u) == set(f) == set(report["pieces"])
        assert f["base pass"] > 0 and u["base pass"] == 0 and f["sampler layer"] == 0 < u["sampler layer"]
        assert u["LM head"] > 0 and f["LM head"] > 0
        assert (u["sampler keys/values"] > 0) == (r["unroll"] == "fast")  # once per step, fast only
        assert r["unroll_ms"] == pytest.approx(sum(u.values()), abs=1e-3) and r["unroll_cost_step"] > 0
    ranks = report["pick_ranks"]
    shares = [ranks["within_top"][m] for m in ("1", "2", "3", "6", "12")]  # K = 4: 1, 2, K-1, 2(K-1), 4(K-1)
    assert ranks["picks"] == 2 * 12 and 0 <= shares[0] and shares == sorted(shares) and shares[-1] <= 1


def test_bad_mode_is_refused(unroll_profile, capsys):
    assert unroll_profile.main(["--unroll", "quick"]) == 2
    assert "unknown --unroll 'quick'" in capsys.readouterr().err
