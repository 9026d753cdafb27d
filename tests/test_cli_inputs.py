"""Inputs a new user tries: each is refused with one line `adjust: error: ...` and exit 2, before any work.

Flags a strategy does not use, prompts that cannot be read or encoded, unreadable or incomplete
model directories, sampling settings out of range, weights that cannot be read or do not fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from adjust.errors import AdjustError
from adjust.eval.specs import build_strategy
from adjust.strategies import make_strategy

from test_cli import assert_one_error_line, cli


def assert_refused(rc, err, *words):
    """Exit 2, one `adjust: error:` line, naming each of `words`."""
    assert_one_error_line(rc, err, *words)


# --------------------------------------------------------------------------------------------
# flags a strategy does not use are refused (issue 10, point 7): one rule with `eval --strategies`
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,flag,value", [
    ("threshold", "-K", "4"),
    ("factor", "--tokens-per-pass", "2"),
    ("entropy-bound", "-K", "2"),
    ("adjust-threshold", "-K", "4"),
    ("parallel", "--tau", "0.9"),
    ("exact", "--tau", "0.9"),
    ("adjust", "--gamma", "0.5"),
    ("threshold", "--gamma", "0.5"),
    ("parallel", "--max-tokens-per-pass", "8"),
    ("threshold", "--max-tokens-per-pass", "8"),
    ("adjust", "--factor", "1.0"),
    ("entropy-bound", "--tau", "0.9"),
], ids=lambda a: str(a))
def test_unused_strategy_flag_is_refused(capsys, tiny_model_dir, strategy, flag, value):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", strategy, flag, value,
                       "--gen-length", 4)
    shown = "--tokens-per-pass" if flag == "-K" else flag
    assert_refused(rc, err, shown, repr(strategy))


@pytest.mark.parametrize("strategy,extra", [
    ("exact", ["-K", "1"]),
    ("parallel", ["-K", "2"]),
    ("threshold", ["--tau", "0.8"]),
    ("factor", ["--factor", "1.5"]),
    ("entropy-bound", ["--gamma", "0.2"]),
], ids=lambda a: str(a))
def test_used_strategy_flags_still_work(capsys, tiny_model_dir, strategy, extra):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", strategy, *extra,
                       "--gen-length", 4, "--json")
    assert rc == 0, err
    assert len(json.loads(out)["samples"][0]["token_ids"]) == 4


def test_exact_takes_k_1_only(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", "exact", "-K", "4")
    assert_refused(rc, err, "exact", "--tokens-per-pass")
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", "exact", "-K", "0")
    assert_refused(rc, err, "--tokens-per-pass must be at least 1")


def test_one_rule_for_flags_and_specs():
    """The library call and an `eval --strategies` spec refuse the same parameter, each in its own spelling."""
    with pytest.raises(AdjustError, match=r"strategy 'threshold' takes no -K/--tokens-per-pass; it accepts: --tau"):
        make_strategy("threshold", tokens_per_pass=4)
    with pytest.raises(AdjustError, match=r"strategy 'threshold' takes no K; it accepts: tau"):
        build_strategy("threshold", {"tokens_per_pass": 4})
    with pytest.raises(AdjustError, match=r"takes no --tau; it accepts: -K/--tokens-per-pass"):
        make_strategy("parallel", tau=0.9)
    with pytest.raises(AdjustError, match=r"takes no tau; it accepts: K"):
        build_strategy("parallel", {"tau": 0.9})
    with pytest.raises(AdjustError, match="takes no name"):  # a key named like make_strategy's argument
        build_strategy("threshold", {"name": 3})
    # not given (None) is not "given": the strategy's default applies
    assert make_strategy("threshold", tokens_per_pass=None, tau=None).tau == 0.9


def test_max_tokens_per_pass_zero_names_its_flag(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", "adjust-threshold",
                       "--max-tokens-per-pass", "0")
    assert_refused(rc, err, "--max-tokens-per-pass must be at least 1")
    assert "--tokens-per-pass" not in err.replace("--max-tokens-per-pass", "")


# --------------------------------------------------------------------------------------------
# prompts (issue 10, point 10)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompts_file_with_invalid_utf8(capsys, tiny_model_dir, tmp_path, suffix):
    f = tmp_path / f"p{suffix}"
    good = b"the dog\n" if suffix == ".txt" else b'{"prompt": "the dog"}\n'
    f.write_bytes(good + good + b"caf\xe9 latin-1\n")  # line 3 is Latin-1, not UTF-8
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", f)
    assert_refused(rc, err, f"{f}:3", "UTF-8", "0xe9")


def test_prompts_jsonl_with_lone_surrogate_escape(capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "the dog"}\n{"prompt": "bad \\udcff"}\n')  # valid JSON, not valid text
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", f)
    assert_refused(rc, err, f"{f}:2", "UTF-8")


def test_prompt_argument_with_undecodable_bytes(capsys, tmp_path):
    # What Python makes of `adjust generate --prompt $'\xff'` in a UTF-8 locale (surrogateescape).
    # The base does not even exist: the prompt is refused before any model loads.
    rc, out, err = cli(capsys, "generate", "--base", tmp_path / "no-model", "--prompt", "ok", "--prompt", "\udcff")
    assert_refused(rc, err, "--prompt argument 2", "UTF-8")


def test_library_encode_refuses_undecodable_text(tiny_base):
    with pytest.raises(AdjustError, match="UTF-8"):
        tiny_base.encode("the \udcff dog")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_prompts_file_is_refused(capsys, tiny_model_dir, tmp_path, content, suffix):
    f = tmp_path / f"p{suffix}"
    f.write_text(content)
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", f)
    assert_refused(rc, err, str(f), "no prompts")
    assert out == ""  # no unconditional samples


def test_training_data_with_a_stray_byte_is_read_with_a_warning(tmp_path, capsys):
    from adjust.data import read_examples

    f = tmp_path / "corpus.txt"
    f.write_bytes(b"line one\ncaf\xe9\n")
    assert read_examples(f) == [("", "line one\ncaf\ufffd\n")]
    err = capsys.readouterr().err
    assert f"{f}:2 is not valid UTF-8" in err and err.startswith("adjust: warning:")


# --------------------------------------------------------------------------------------------
# unreadable model files (issue 10, point 10)
# --------------------------------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def open_dir():
    """A scratch directory any user may enter (pytest's tmp_path is private to its owner), removed after."""
    d = Path(tempfile.mkdtemp(prefix="adjust-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def unreadable(path: Path):
    """`path` really unreadable by this process for the duration: chmod 000, and as root (whose reads
    ignore permission bits) the effective user id is switched to `nobody` meanwhile, so the kernel
    itself refuses the open with EACCES. Skips where neither makes the path unreadable."""
    mode = path.stat().st_mode
    path.chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(NOBODY)
        try:
            os.listdir(path) if path.is_dir() else open(path, "rb").close()
        except PermissionError:
            pass
        else:
            pytest.skip("cannot make a path unreadable here")
        yield path
    finally:
        if as_root:
            os.seteuid(0)
        path.chmod(mode)


@pytest.fixture
def model_with_sampler(open_dir, tiny_model_dir, tiny_base):
    """A copy of the tiny model, with a (fresh) sampler beside it, in a directory `nobody` can read."""
    from adjust.sampler import JointSampler, SamplerConfig

    d = open_dir / "model"
    shutil.copytree(tiny_model_dir, d)
    torch.manual_seed(0)
    JointSampler(SamplerConfig.for_base(tiny_base)).save(d / "sampler")
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


GEN = ["--gen-length", "4", "--json"]


@pytest.mark.parametrize("target,words", [
    ("", ["cannot read", "model config.json"]),  # the base directory itself
    ("config.json", ["cannot read", "model config.json"]),
    ("model.safetensors", ["cannot read", "model weights"]),
    ("tokenizer.json", ["cannot read", "tokenizer"]),
    ("sampler", ["cannot read", "sampler config.json"]),
    ("sampler/config.json", ["cannot read", "sampler config.json"]),
    ("sampler/model.safetensors", ["cannot read", "sampler weights"]),
], ids=lambda a: a if isinstance(a, str) else None)
def test_unreadable_model_files(capsys, model_with_sampler, target, words):
    d = model_with_sampler
    argv = ["generate", "--base", d, "--strategy", "adjust", "-K", "2", *GEN]
    rc, out, err = cli(capsys, *argv)  # readable: works (and every module it needs is imported now)
    assert rc == 0, err
    with unreadable(d / target if target else d):
        rc, out, err = cli(capsys, *argv)
    assert_refused(rc, err, *words)
    assert "corrupt" not in err  # unreadable is not corrupt
    assert "Permission denied" in err


# --------------------------------------------------------------------------------------------
# config.json fields, weights that do not fit (issue 10, point 10)
# --------------------------------------------------------------------------------------------

def _edit_config(path: Path, drop=(), **set_):
    cfg = json.loads(path.read_text())
    for k in drop:
        del cfg[k]
    cfg.update(set_)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field", ["hidden_size", "num_layers", "mask_id", "eos_id", "tokenizer_size",
                                   "rope_theta", "norm_eps", "max_length"])
def test_base_config_missing_a_field_is_refused(capsys, tiny_model_dir, tmp_path, field):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    _edit_config(d / "config.json", drop=[field])
    rc, out, err = cli(capsys, "generate", "--base", d, *GEN)
    assert_refused(rc, err, "lacks the field", field, str(d / "config.json"))


def test_base_config_optional_field_keeps_its_documented_default(capsys, tiny_model_dir, tmp_path):
    """tie_embeddings came after models were saved; without it a model is tied (models/shakespeare-base)."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    _edit_config(d / "config.json", drop=["tie_embeddings"])
    rc, out, err = cli(capsys, "generate", "--base", d, *GEN)
    assert rc == 0, err


@pytest.mark.parametrize("field,value", [("hidden_size", "32"), ("num_layers", 1.5), ("tie_embeddings", "yes"),
                                         ("mask_id", True), ("rope_theta", None)])
def test_base_config_field_of_the_wrong_type_is_refused(capsys, tiny_model_dir, tmp_path, field, value):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    _edit_config(d / "config.json", **{field: value})
    rc, out, err = cli(capsys, "generate", "--base", d, *GEN)
    assert_refused(rc, err, f"field {field} must be")


@pytest.mark.parametrize("field", ["hidden_size", "num_heads", "intermediate_size", "rope_theta", "norm_eps", "base"])
def test_sampler_config_missing_a_field_is_refused(capsys, model_with_sampler, field):
    d = model_with_sampler
    _edit_config(d / "sampler" / "config.json", drop=[field])
    rc, out, err = cli(capsys, "generate", "--base", d, "--strategy", "adjust", "-K", "2", *GEN)
    assert_refused(rc, err, "sampler config.json", "lacks the field", field)


def test_shipped_configs_hold_every_required_field():
    """The shipped models still load under the rule (their config.json files predate it)."""
    from adjust.base.tiny import TinyConfig
    from adjust.io import config_from_json
    from adjust.sampler import SamplerConfig

    root = Path(__file__).resolve().parents[1] / "models"
    for cfg in sorted(root.glob("*/config.json")):
        TinyConfig.from_dict(json.loads(cfg.read_text()), cfg)
        s = cfg.parent / "sampler" / "config.json"
        config_from_json(SamplerConfig, json.loads(s.read_text()), s, "sampler config.json")


def test_state_dict_mismatch_names_the_tensors(capsys, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    w = load_file(str(d / "model.safetensors"))
    w.pop("norm.weight")  # missing
    w["extra.weight"] = torch.zeros(2)  # unexpected
    w["embed.weight"] = w["embed.weight"][:, :16].contiguous()  # wrong shape
    save_file(w, str(d / "model.safetensors"))
    rc, out, err = cli(capsys, "generate", "--base", d, *GEN)
    assert_refused(rc, err, "do not fit", "missing: norm.weight", "unexpected: extra.weight", "embed.weight")
    # many names: the first few, then a count
    w = {f"stray{i}.weight": torch.zeros(1) for i in range(10)}
    save_file(w, str(d / "model.safetensors"))
    rc, out, err = cli(capsys, "generate", "--base", d, *GEN)
    assert_refused(rc, err, "unexpected: stray0.weight", "and 6 more", "missing: embed.weight")


# --------------------------------------------------------------------------------------------
# sampling settings (issue 10, point 10)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,words", [
    ("--temperature", "inf", ["--temperature"]),
    ("--temperature", "1e-300", ["--temperature", "0 (greedy)"]),
    ("--temperature", "nan", ["--temperature"]),
    ("--temperature", "-0.5", ["--temperature"]),
    ("--top-p", "0", ["--top-p"]),
    ("--top-p", "nan", ["--top-p"]),
    ("--top-p", "1.01", ["--top-p"]),
    ("--top-k", "-1", ["--top-k"]),
], ids=lambda a: a if isinstance(a, str) else None)
def test_sampling_settings_out_of_range(capsys, tmp_path, flag, value, words):
    # refused before any model loads: the base does not exist
    rc, out, err = cli(capsys, "generate", "--base", tmp_path / "no-model", flag, value)
    assert_refused(rc, err, *words)
    assert "NaN" not in err


@pytest.mark.parametrize("temperature", ["1e-6", "0.001", "0"])
def test_small_temperatures_give_finite_distributions(capsys, tiny_model_dir, temperature):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--temperature", temperature, *GEN)
    assert rc == 0, err


@pytest.mark.parametrize("base_type", ["llada", "dream", "masked-lm"])
def test_unreadable_base_directory_with_a_hugging_face_base_type(capsys, model_with_sampler, base_type):
    d = model_with_sampler
    cli(capsys, "generate", "--base", d, *GEN)  # imports what the failing call needs while readable
    with unreadable(d):
        rc, out, err = cli(capsys, "generate", "--base", d, "--base-type", base_type, *GEN)
    assert_refused(rc, err, "cannot read", str(d), "Permission denied")
