"""Rollouts, distill and train-base as a new user runs them: checked inputs, exact and guarded resume,
low-precision bases, and one `adjust: error:` line (exit 2) for every bad case. Through the real CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adjust.cli import main
from adjust.distill import train as dt
from adjust.distill.rollouts import load_rollouts, make_rollouts
from adjust.distill.train import STATE_FILE, DistillConfig, distill
from adjust.errors import AdjustError
from adjust.sampler import JointSampler
from adjust.sampling import SamplingConfig

from test_cli import cli  # (rc, stdout, stderr) of `adjust argv...` in-process; fails on a traceback

G = 8
ROLL = ["--gen-length", G, "--shard-size", 4, "--batch-size", 4, "--seed", 1, "--quiet"]
DIST = ["--steps", 2, "--batch-size", 4, "--warmup", 1, "--max-unrolls", 2, "--eval-every", 2, "--quiet"]


def one_error(rc, err, *words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adjust: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def rollouts(capsys, base_dir, out, n, *extra):
    return cli(capsys, "rollouts", "--base", base_dir, "--out", out, "--num-samples", n, *ROLL, *extra)


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """12 rollouts of the tiny base in shards of 4, made through the CLI."""
    out = tmp_path_factory.mktemp("made") / "r"
    assert main([str(a) for a in ["rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 12, *ROLL]]) == 0
    return out


# --------------------------------------------------------------------------------------------
# point 1: a bfloat16 / float16 base distils in one process
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_distill_a_low_precision_base(capsys, tiny_model_dir, tmp_path, dtype):
    base_args = ["--base", tiny_model_dir, "--dtype", dtype]
    rc, _, err = cli(capsys, "rollouts", *base_args, "--out", tmp_path / "r", "--num-samples", 8, *ROLL)
    assert rc == 0, err
    rc, out, err = cli(capsys, "distill", *base_args, "--rollouts", tmp_path / "r", "--out", tmp_path / "s", *DIST)
    assert rc == 0, err
    result = json.loads(out)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["val_kl"]))
    # float32 master weights and Adam moments, whatever the base's dtype
    state = torch.load(tmp_path / "s" / STATE_FILE, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["sampler"].values())
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert state["settings"]["dtype"] == dtype
    # the saved sampler generates with the low-precision base
    rc, out, err = cli(capsys, "generate", *base_args, "--sampler", tmp_path / "s", "--strategy", "adjust", "-K", 2,
                       "--gen-length", G, "--json")
    assert rc == 0, err
    assert len(json.loads(out)["samples"][0]["token_ids"]) == G


def test_distill_a_bf16_base_under_accelerate_mixed_precision(tiny_base, made, tmp_path):
    """docs/multi_gpu.md's recipe: accelerate's bf16 autocast hands the sampler's outputs back in float32."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    base = type(tiny_base)(tiny_base.cfg, tiny_base.tokenizer, name=tiny_base.name)
    base.load_state_dict(tiny_base.state_dict())
    base = base.to(torch.bfloat16).eval().requires_grad_(False)
    try:
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        result = distill(base, load_rollouts(made, base), tmp_path / "s",
                         DistillConfig(**{**CFG, "steps": 2, "eval_every": 2}), progress=False, accelerator=acc)
    finally:
        AcceleratorState._reset_state(True)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["val_kl"]))


def test_low_precision_sampler_output_keeps_the_prior_dtype(tiny_base):
    from adjust.sampler import SamplerConfig

    sampler = JointSampler(SamplerConfig.for_base(tiny_base))  # float32 weights
    x = torch.full((1, G), tiny_base.mask_id)
    prior = tiny_base.hidden_states(x).to(torch.bfloat16)
    out = sampler(tiny_base, x, prior)
    assert out.dtype == torch.bfloat16
    sampler.to(torch.bfloat16)
    assert sampler(tiny_base, x, prior).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# point 2: rerunning rollouts never mixes shards
# --------------------------------------------------------------------------------------------

def test_rollouts_rerun_with_more_samples_extends_to_exactly_n(capsys, tiny_model_dir, tiny_base, tmp_path):
    out = tmp_path / "r"
    assert rollouts(capsys, tiny_model_dir, out, 10)[0] == 0  # shards 0-4, 4-8, 8-10
    rc, _, err = rollouts(capsys, tiny_model_dir, out, 12)  # 8-10 is replaced by 8-12, not kept beside it
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000000-00000004.safetensors", "shard-00000004-00000008.safetensors",
        "shard-00000008-00000012.safetensors"]
    r = load_rollouts(out, tiny_base)
    assert len(r) == 12
    fresh = tmp_path / "fresh"
    assert rollouts(capsys, tiny_model_dir, fresh, 12)[0] == 0
    f = load_rollouts(fresh, tiny_base)
    assert torch.equal(r.tokens, f.tokens) and torch.equal(r.order, f.order)


def test_rollouts_rerun_with_fewer_samples_or_other_settings_is_refused(capsys, tiny_model_dir, tiny_base, tmp_path):
    out = tmp_path / "r"
    assert rollouts(capsys, tiny_model_dir, out, 12)[0] == 0
    one_error(*rollouts(capsys, tiny_model_dir, out, 10)[::2], "holds 12 rollouts", "--num-samples 10")
    one_error(*rollouts(capsys, tiny_model_dir, out, 12, "--temperature", 0.5)[::2], "other settings", "--temperature")
    rc, _, err = cli(capsys, "rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 12,
                     *[a if a != G else G + 1 for a in ROLL])
    one_error(rc, err, "--gen-length")
    assert len(load_rollouts(out, tiny_base)) == 12  # untouched


def test_load_rollouts_refuses_repeats_and_gaps(made, tmp_path, tiny_base):
    dup = tmp_path / "dup"
    shutil.copytree(made, dup)
    shutil.copy(dup / "shard-00000004-00000008.safetensors", dup / "shard-00000004-00000008-copy.safetensors")
    with pytest.raises(AdjustError, match="4 repeated"):
        load_rollouts(dup, tiny_base)
    gap = tmp_path / "gap"
    shutil.copytree(made, gap)
    (gap / "shard-00000004-00000008.safetensors").unlink()
    with pytest.raises(AdjustError, match="4 of 12 samples missing"):
        load_rollouts(gap)


def test_single_process_rollouts_check_the_set_is_complete(capsys, tiny_model_dir, made, tmp_path, tiny_base):
    bad = tmp_path / "bad"
    shutil.copytree(made, bad)
    # a shard under the right name holding the wrong samples: loading names it, a rerun recomputes it
    shutil.copy(bad / "shard-00000000-00000004.safetensors", bad / "shard-00000004-00000008.safetensors")
    with pytest.raises(AdjustError, match="4 repeated.*other samples than its name says: shard-00000004-00000008"):
        load_rollouts(bad, tiny_base)
    rc, _, err = rollouts(capsys, tiny_model_dir, bad, 12)
    assert rc == 0 and "shard-00000004-00000008.safetensors holds other samples than its name says; recomputing" in err
    assert torch.equal(load_rollouts(bad, tiny_base).tokens, load_rollouts(made, tiny_base).tokens)


# --------------------------------------------------------------------------------------------
# point 9: joint-kl and distill refuse incomplete sets and foreign ids; bad settings write nothing
# --------------------------------------------------------------------------------------------

@pytest.fixture
def gapped(made, tmp_path):
    gap = tmp_path / "gap"
    shutil.copytree(made, gap)
    (gap / "shard-00000004-00000008.safetensors").unlink()  # a killed run's missing shard
    return gap


@pytest.fixture
def foreign(made, tmp_path, tiny_base):
    bad = tmp_path / "foreign"
    shutil.copytree(made, bad)
    shard = bad / "shard-00000008-00000012.safetensors"
    state = load_file(str(shard))
    state["tokens"][2, 3] = tiny_base.vocab_size + 5  # a row a small draw may never touch
    save_file(state, str(shard))
    return bad


def _sampler_dir(tiny_base, tmp_path):
    from adjust.sampler import SamplerConfig

    d = tmp_path / "sampler"
    JointSampler(SamplerConfig.for_base(tiny_base)).save(d)
    return d


@pytest.mark.parametrize("which", ["gapped", "foreign"])
def test_distill_and_joint_kl_refuse_incomplete_or_foreign_rollouts(capsys, request, tiny_model_dir, tiny_base,
                                                                     tmp_path, which):
    bad = request.getfixturevalue(which)
    words = ("incomplete", "4 of 12 samples missing") if which == "gapped" else ("token id", "outside the vocabulary")
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", bad, "--out", tmp_path / "s", *DIST)
    one_error(rc, err, *words)
    assert not (tmp_path / "s").exists()
    rc, _, err = cli(capsys, "eval", "joint-kl", "--base", tiny_model_dir, "--sampler", _sampler_dir(tiny_base, tmp_path),
                     "--rollouts", bad, "-K", 2, "--num-states", 2, "--draws", 1)
    one_error(rc, err, *words)


@pytest.mark.parametrize("bad", [["--gen-length", 1000], ["--batch-size", 0], ["--shard-size", 0],
                                 ["--num-samples", 0]])
def test_rollouts_with_bad_settings_write_nothing(capsys, tiny_model_dir, tmp_path, bad):
    out = tmp_path / "r"
    args = ["rollouts", "--base", tiny_model_dir, "--out", out, "--num-samples", 4, *ROLL]
    for i in range(0, len(args) - 1):
        if args[i] == bad[0]:
            args[i + 1] = bad[1]
    one_error(*cli(capsys, *args)[::2], bad[0])
    assert not (out / "rollouts.json").exists()
    if bad[0] == "--gen-length":  # the corrected rerun is not refused as "other settings"
        assert rollouts(capsys, tiny_model_dir, out, 4)[0] == 0


# --------------------------------------------------------------------------------------------
# point 10: --out naming a file, truncated resume states
# --------------------------------------------------------------------------------------------

@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    return f


def test_rollouts_out_is_a_file(capsys, tiny_model_dir, a_file):
    one_error(*rollouts(capsys, tiny_model_dir, a_file, 4)[::2], "is a file")
    assert a_file.read_text() == "not a directory"


def test_distill_out_is_a_file_is_refused_before_training(capsys, monkeypatch, tiny_model_dir, made, a_file):
    def no_training(*a, **kw):
        raise AssertionError("a training step ran before --out was checked")

    monkeypatch.setattr(dt, "example_loss", no_training)
    for out in (a_file, a_file / "sub"):
        rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", out, *DIST)
        one_error(rc, err, "is a file")


def test_distill_sampler_layers(capsys, tiny_model_dir, made, tmp_path):
    """--sampler-layers N trains a sampler of N blocks; 0 is refused naming the flag, before any work; a resume
    with another N is refused naming it."""
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", tmp_path / "z", *DIST,
                     "--sampler-layers", 0)
    one_error(rc, err, "--sampler-layers", "got 0")
    assert not (tmp_path / "z").exists()
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", tmp_path / "s", *DIST,
                     "--sampler-layers", 2)
    assert rc == 0, err
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_layers"] == 2
    assert any(k.startswith("more_blocks.0.") for k in load_file(str(tmp_path / "s" / "model.safetensors")))
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", tmp_path / "s",
                     "--steps", 4, *DIST[2:])  # the same run, longer, but with the default one block
    one_error(rc, err, "other settings", "--sampler-layers")


def test_train_base_out_is_a_file_is_refused_before_training(capsys, monkeypatch, tmp_path, a_file):
    from adjust import train_base as tb
    from conftest import CORPUS

    def no_training(*a, **kw):
        raise AssertionError("a training step ran before --out was checked")

    monkeypatch.setattr(tb, "masked_diffusion_nll", no_training)
    data = tmp_path / "t.txt"
    data.write_text("\n".join(CORPUS * 2))
    rc, _, err = cli(capsys, "train-base", "--data", data, "--out", a_file, "--steps", 2, "--batch-size", 2,
                     "--seq-len", 16, "--hidden-size", 32, "--layers", 1, "--heads", 2, "--intermediate-size", 64,
                     "--vocab-size", 300, "--quiet")
    one_error(rc, err, "is a file")


def test_truncated_distill_state_is_one_clear_error(capsys, tiny_model_dir, made, tmp_path):
    out = tmp_path / "s"
    assert cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", out, *DIST)[0] == 0
    state = out / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", out,
                     *["--steps", 4, *DIST[2:]])
    one_error(rc, err, "corrupt distill state", "delete it")


class Unpickled:
    """Would run code on an unpickling load (its __reduce__ calls a function of this module)."""

    def __reduce__(self):
        return (_ran, ())


RAN = []


def _ran():
    RAN.append(True)
    return "ran"


def test_resume_state_is_not_unpickled(capsys, tiny_model_dir, made, tmp_path):
    out = tmp_path / "s"
    assert cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", out, *DIST)[0] == 0
    state = torch.load(out / STATE_FILE, weights_only=True)
    state["history"].append(Unpickled())
    torch.save(state, out / STATE_FILE)
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--rollouts", made, "--out", out,
                     *["--steps", 4, *DIST[2:]])
    one_error(rc, err, "corrupt distill state")
    assert RAN == []  # the object's code never ran


# --------------------------------------------------------------------------------------------
# point 4: resume is guarded and exact; a checkpoint is one unit
# --------------------------------------------------------------------------------------------

CFG = dict(steps=10, batch_size=4, lr=3e-3, warmup=2, max_unrolls=2, eval_every=5, val_examples=4, seed=0)


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"max_unrolls": 3}, {"batch_size": 3}, {"seed": 1},
                                    {"entropy_windows": 0.5}, {"warmup": 3}, {"min_lr_ratio": 0.5}])
def test_distill_resume_refuses_changed_settings(tiny_base, made, tmp_path, change):
    r = load_rollouts(made, tiny_base)
    distill(tiny_base, r, tmp_path / "s", DistillConfig(**{**CFG, "steps": 5}), progress=False)
    key = next(iter(change))
    with pytest.raises(AdjustError, match=f"--{key.replace('_', '-')} was {CFG.get(key, 0.0 if key != 'min_lr_ratio' else 1.0)}"):
        distill(tiny_base, r, tmp_path / "s", DistillConfig(**{**CFG, **change}), progress=False)


def test_distill_resume_refuses_other_rollouts_and_dtype(capsys, tiny_base, tiny_model_dir, made, tmp_path):
    r = load_rollouts(made, tiny_base)
    distill(tiny_base, r, tmp_path / "s", DistillConfig(**{**CFG, "steps": 5}), progress=False)
    other = tmp_path / "r2"
    make_rollouts(tiny_base, other, 12, G, SamplingConfig(), seed=2, batch_size=4, shard_size=4, progress=False)
    with pytest.raises(AdjustError, match="--rollouts"):
        distill(tiny_base, load_rollouts(other, tiny_base), tmp_path / "s", DistillConfig(**CFG), progress=False)
    rc, _, err = cli(capsys, "distill", "--base", tiny_model_dir, "--dtype", "bfloat16", "--rollouts", made,
                     "--out", tmp_path / "s", "--steps", 10, "--batch-size", 4, "--lr", 3e-3, "--warmup", 2,
                     "--max-unrolls", 2, "--eval-every", 5, "--quiet")
    one_error(rc, err, "--dtype was float32, now bfloat16")


class Interrupted(Exception):
    pass


def test_distill_resume_after_interruption_matches_an_uninterrupted_run(tiny_base, made, tmp_path, monkeypatch):
    """Kill distillation at step 7 (last checkpoint: 5); resuming to 10 gives the sampler of a straight run."""
    r = load_rollouts(made, tiny_base)
    cfg = DistillConfig(**CFG)
    distill(tiny_base, r, tmp_path / "straight", cfg, progress=False)

    real = dt.lr_at

    def dying(step, c):
        if step == 7:
            raise Interrupted
        return real(step, c)

    monkeypatch.setattr(dt, "lr_at", dying)
    with pytest.raises(Interrupted):
        distill(tiny_base, r, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(dt, "lr_at", real)
    assert torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)["step"] == 5
    distill(tiny_base, r, tmp_path / "cut", cfg, progress=False)
    a = torch.load(tmp_path / "straight" / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 10
    for k in a["sampler"]:
        assert torch.equal(a["sampler"][k], b["sampler"][k]), k
    assert a["history"] == [{**h, "elapsed_s": x["elapsed_s"]} for h, x in zip(b["history"], a["history"])]
    sa, sb = JointSampler.load(tmp_path / "straight", tiny_base), JointSampler.load(tmp_path / "cut", tiny_base)
    for (k, v), w in zip(sa.state_dict().items(), sb.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_checkpoint_cut_between_its_files_is_refused_and_repaired(tiny_base, made, tmp_path):
    r = load_rollouts(made, tiny_base)
    out = tmp_path / "s"
    distill(tiny_base, r, out, DistillConfig(**{**CFG, "steps": 5}), progress=False)
    old_weights = (out / "model.safetensors").read_bytes()
    distill(tiny_base, r, out, DistillConfig(**CFG), progress=False)
    (out / "model.safetensors").write_bytes(old_weights)  # as if the run died after the state, before the weights
    with pytest.raises(AdjustError, match="mixes checkpoints: config.json is from step 10, model.safetensors from step 5"):
        JointSampler.load(out, tiny_base)
    distill(tiny_base, r, out, DistillConfig(**CFG), progress=False)  # nothing left to train: rewrites the files
    state = torch.load(out / STATE_FILE, weights_only=True)
    loaded = JointSampler.load(out, tiny_base)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state["sampler"][k]), k


# --------------------------------------------------------------------------------------------
# point 7 (second half): the sampler records what it was distilled on; other decoding warns once
# --------------------------------------------------------------------------------------------

def test_sampler_records_its_rollouts_decoding_and_warns_once_on_others(capsys, tiny_base, tmp_path):
    from adjust.decode import generate
    from adjust.strategies import make_strategy

    roll = tmp_path / "r"
    make_rollouts(tiny_base, roll, 8, G, SamplingConfig(temperature=0.8, top_k=20, order="margin"), seed=1,
                  batch_size=4, shard_size=4, progress=False)
    distill(tiny_base, load_rollouts(roll, tiny_base), tmp_path / "s",
            DistillConfig(**{**CFG, "steps": 2, "eval_every": 2}), progress=False)
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["distilled_on"] == {"order": "margin", "temperature": 0.8, "top_p": 1.0, "top_k": 20,
                                     "block_length": None}
    sampler = JointSampler.load(tmp_path / "s", tiny_base)
    adjust = make_strategy("adjust", tokens_per_pass=2)
    capsys.readouterr()
    same = SamplingConfig(temperature=0.8, top_k=20, order="margin")
    generate(tiny_base, [[]], adjust, same, G, sampler=sampler)
    generate(tiny_base, [[]], adjust, same, G, block_length=G, sampler=sampler)  # one block of G = no blocks
    assert capsys.readouterr().err == ""
    for _ in range(3):
        generate(tiny_base, [[]], adjust, SamplingConfig(order="margin", top_k=20), G, sampler=sampler)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("adjust: warning:") and "temperature 1.0 (distilled with 0.8)" in err[0]
    generate(tiny_base, [[]], adjust, same, G, block_length=4, sampler=sampler)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "block_length 4 (distilled with None)" in err[0]


# --------------------------------------------------------------------------------------------
# point 8: rollouts batch prompts by length (the shared grouping)
# --------------------------------------------------------------------------------------------

def test_rollouts_batch_prompts_of_equal_length_together(tiny_base, tmp_path, monkeypatch):
    from adjust.distill import rollouts as ro

    prompts = ["The cat", "The bird", "The dog"]  # 4, 4 and 3 tokens
    ids = [tiny_base.encode(p) for p in prompts]
    assert len(ids[0]) == len(ids[1]) != len(ids[2])
    batches, real = [], ro.generate

    def spy(base, batch_prompts, *a, **kw):
        batches.append(batch_prompts)
        return real(base, batch_prompts, *a, **kw)

    monkeypatch.setattr(ro, "generate", spy)
    make_rollouts(tiny_base, tmp_path / "r", 9, G, SamplingConfig(), prompts=prompts, seed=4, batch_size=6,
                  shard_size=9, progress=False)
    assert [len(b) for b in batches] == [6, 3]  # samples of "The cat" and "The bird" share one batch
    assert sorted(map(tuple, batches[0])) == sorted([tuple(ids[0])] * 3 + [tuple(ids[1])] * 3)
    r = load_rollouts(tmp_path / "r", tiny_base)
    assert [r.prompts[n] for n in range(9)] == [ids[n % 3] for n in range(9)]
