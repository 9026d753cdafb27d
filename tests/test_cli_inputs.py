"""Inputs a new user tries: each is refused with one line `adjust: error: ...` and exit 2, before any work.

Flags a strategy does not use, prompts that cannot be read or encoded, unreadable or incomplete
model directories, sampling settings out of range, weights that cannot be read or do not fit.
"""

from __future__ import annotations

import json
import shutil

import pytest

from adjust.errors import AdjustError
from adjust.eval.specs import build_strategy
from adjust.strategies import make_strategy

from test_cli import assert_one_error_line, cli


def assert_refused(rc, err, *words):
    """Exit 2, one `adjust: error:` line, naming each of `words`."""
    assert_one_error_line(rc, err)
    assert rc == 2
    for w in words:
        assert w in err, (w, err)


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
