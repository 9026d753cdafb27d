"""The paper's samplers: `adjust convert paper-sampler` loads what the paper's training code writes, exactly,
and `adjust distill --sampler-arch paper` trains that architecture.

tests/fixtures/paper-sampler-dream-tiny (its README says how it was made) was written by the paper's own code:
a tiny Dream base in the published layout, the sampler's state dict with and without the `drafter.` prefix,
and three cases with both unrolls' hidden states and log-probs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adjust.cli import main
from adjust.loader import ModelSpec, load_models

FIXTURE = Path(__file__).parent / "fixtures" / "paper-sampler-dream-tiny"
sys.path.insert(0, str(Path(__file__).parent / "base"))  # published.py: checkpoint writers


def convert(capsys, weights, out, base=FIXTURE / "base") -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["convert", "paper-sampler", "--weights", str(weights), "--base", str(base), "--out", str(out)])
    cap = capsys.readouterr()
    return rc, cap.out if rc == 0 else cap.err.strip()


@pytest.mark.parametrize("weights", ["drafter.safetensors", "drafter_noprefix.safetensors"])
def test_converted_sampler_reproduces_the_papers_unrolls(capsys, tmp_path, weights):
    rc, out = convert(capsys, FIXTURE / weights, tmp_path / "s")
    assert rc == 0 and json.loads(out)["tensors"] == 12
    base, sampler = load_models(ModelSpec(base=str(FIXTURE / "base"), sampler=str(tmp_path / "s")), "required")
    cfg = sampler.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, cfg.proj_bias, cfg.intermediate_size) == (4, 2, True, True, 176)
    cases = load_file(str(FIXTURE / "cases.safetensors"))
    with torch.no_grad():
        for i in range(3):
            c = lambda k: cases[f"case{i}.{k}"]  # noqa: E731
            assert torch.allclose(base.hidden_states(c("input_ids")), c("prior"), atol=1e-5)
            prior = c("prior")
            for k in (1, 2):
                hidden = sampler(base, c(f"unroll{k}.tokens"), prior)
                logp = torch.log_softmax(base.lm_head(hidden).float(), dim=-1)  # raw, as the paper's code
                assert (hidden - c(f"unroll{k}.hidden")).abs().max() < 1e-5
                assert (logp - c(f"unroll{k}.logprobs")).abs().max() < 1e-5
                prior = c(f"unroll{k}.hidden")  # unroll 2 starts from unroll 1's output


def test_full_checkpoint_pickled_or_safetensors(capsys, tmp_path):
    state = load_file(str(FIXTURE / "drafter.safetensors"))
    full = {**state, "base_model.model.embed_tokens.weight": torch.zeros(3, 2)}  # the frozen base: ignored
    save_file(full, str(tmp_path / "full.safetensors"))
    assert convert(capsys, tmp_path / "full.safetensors", tmp_path / "a")[0] == 0
    torch.save({"state_dict": full, "epoch": 3}, tmp_path / "last.ckpt")  # a Lightning checkpoint
    assert convert(capsys, tmp_path / "last.ckpt", tmp_path / "b")[0] == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_weights_are_one_clear_error(capsys, tmp_path):
    import collections

    torch.save({"state_dict": collections.Counter(a=1)}, tmp_path / "objects.ckpt")  # needs more than weights-only
    rc, err = convert(capsys, tmp_path / "objects.ckpt", tmp_path / "x")
    assert rc == 2 and err.startswith("adjust: error: ") and "save_file" in err and len(err.splitlines()) == 1
    state = load_file(str(FIXTURE / "drafter_noprefix.safetensors"))
    del state["norm_embed.0.weight"]
    save_file(state, str(tmp_path / "short.safetensors"))
    rc, err = convert(capsys, tmp_path / "short.safetensors", tmp_path / "y")
    assert rc == 2 and "missing norm_embed.0.weight" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_shapes_are_checked_against_the_base(capsys, tmp_path):
    from published import write_dream

    other = write_dream(tmp_path / "other", seed=3, hidden=32, inter=80)
    rc, err = convert(capsys, FIXTURE / "drafter.safetensors", tmp_path / "z", base=other)
    assert rc == 2 and "does not fit base" in err and not (tmp_path / "z").exists()


def test_converted_sampler_generates_serves_and_refuses_another_base(capsys, tmp_path):
    from published import write_dream

    assert convert(capsys, FIXTURE / "drafter.safetensors", tmp_path / "s")[0] == 0
    capsys.readouterr()
    assert main(["generate", "--base", str(FIXTURE / "base"), "--sampler", str(tmp_path / "s"), "--strategy", "adjust",
                 "-K", "4", "--gen-length", "8", "--prompt", "hello", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["sampler_passes"] == 3 * 2  # K - 1 unrolls in each of 2 full passes

    from adjust.serve.app import create_app

    from serve.conftest import LiveServer  # the serve tests' live server
    from serve.test_serve_api import post

    base, sampler = load_models(ModelSpec(base=str(FIXTURE / "base"), sampler=str(tmp_path / "s")), "required")
    s = LiveServer(create_app(base, sampler, batch_wait_ms=5))
    try:
        status, body = post(s.url + "/v1/completions", {"prompt": "hello", "max_tokens": 8, "strategy": "adjust",
                                                       "tokens_per_pass": 4, "seed": 1})
    finally:
        s.stop()
    assert status == 200 and body["adjust_stats"]["sampler_passes"] == 6
    other = write_dream(tmp_path / "other", seed=3)
    capsys.readouterr()
    assert main(["generate", "--base", str(other), "--sampler", str(tmp_path / "s"), "--strategy", "adjust",
                 "-K", "2", "--gen-length", "4"]) == 2
    assert "trained for base" in capsys.readouterr().err


def test_harness_runs_with_the_converted_sampler(capsys, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from adjust.harness.model import AdjustLM

    assert convert(capsys, FIXTURE / "drafter.safetensors", tmp_path / "s")[0] == 0
    lm = AdjustLM(base=str(FIXTURE / "base"), sampler=str(tmp_path / "s"), strategy="adjust", tokens_per_pass=2)
    req = Instance("generate_until", {}, ("hello", {"until": ["\n"], "max_gen_toks": 6}), 0)
    assert isinstance(lm.generate_until([req])[0], str)


def test_distill_trains_the_papers_architecture(capsys, tmp_path):
    base_dir = FIXTURE / "base"
    capsys.readouterr()
    assert main(["rollouts", "--base", str(base_dir), "--prompt", "hello", "--out", str(tmp_path / "r"),
                 "--num-samples", "8", "--gen-length", "6", "--quiet"]) == 0
    assert main(["distill", "--base", str(base_dir), "--rollouts", str(tmp_path / "r"), "--out", str(tmp_path / "p"),
                 "--steps", "2", "--batch-size", "4", "--sampler-arch", "paper", "--quiet"]) == 0
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["num_kv_heads"], cfg["qkv_bias"], cfg["proj_bias"], cfg["intermediate_size"]) == (2, True, True, 176)
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert "proj.bias" in weights and weights["block.attn.qkv.weight"].shape == (64 + 2 * 32, 64)
    assert main(["distill", "--base", str(base_dir), "--rollouts", str(tmp_path / "r"), "--out", str(tmp_path / "q"),
                 "--steps", "2", "--sampler-arch", "theirs"]) == 2
    assert "--sampler-arch" in capsys.readouterr().err
