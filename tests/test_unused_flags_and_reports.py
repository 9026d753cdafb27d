"""Defects a second real pretrained model showed: flags a strategy does not use are refused (never ignored),
reports are written all or nothing, distinct-n on text without spaces, --stop-at-eos token ids, [UNK] hints,
and an error's own line after a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from adjust.cli import main
from adjust.errors import AdjustError

sys.path.insert(0, str(Path(__file__).parent / "base"))  # mlm_families: tiny masked LMs of each family


def one_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("adjust: error: ")
    return err[-1]


@pytest.mark.parametrize("argv, flag", [
    (["--strategy", "threshold", "--order", "random"], "--order"),
    (["--strategy", "factor", "--order", "confidence"], "--order"),
    (["--strategy", "entropy-bound", "--order", "margin"], "--order"),
    (["--strategy", "exact", "--cache-refresh", "2"], "--cache-refresh"),
    (["--strategy", "parallel", "-K", "2", "--unroll", "fast"], "--unroll"),
    (["--strategy", "exact", "--sampler", "models/shakespeare-base/sampler"], "--sampler"),
])
def test_generate_refuses_a_flag_the_strategy_does_not_use(capsys, argv, flag):
    assert flag in one_error(capsys, ["generate", "--gen-length", "4", *argv])


def test_flags_the_strategy_uses_are_accepted(capsys):
    for argv in (["--strategy", "parallel", "-K", "2", "--order", "random"],
                 ["--strategy", "adjust", "-K", "2", "--unroll", "fast", "--sampler", "models/shakespeare-base/sampler"],
                 ["--strategy", "exact", "--block-length", "4", "--cache", "prefix", "--cache-refresh", "2"]):
        capsys.readouterr()
        assert main(["generate", "--gen-length", "8", "--json", *argv]) == 0


def test_server_refuses_order_and_unroll_a_strategy_does_not_use():
    from adjust.base import load_base
    from adjust.serve.errors import ApiError
    from adjust.serve.requests import parse_request

    base = load_base("models/shakespeare-base")
    ids = [base.encode("ROMEO:")]
    for body, param in (({"strategy": "threshold", "order": "random"}, "order"),
                        ({"strategy": "parallel", "tokens_per_pass": 2, "unroll": "fast"}, "unroll")):
        with pytest.raises(ApiError) as e:
            parse_request({"prompt": "ROMEO:", **body}, base, None, ids, {}, 0)
        assert e.value.param == param


def test_report_needs_matplotlib_up_front_and_is_written_as_a_set(tmp_path, monkeypatch):
    from adjust.eval.report import check_out_dir, write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(AdjustError, match="matplotlib"):
        check_out_dir(tmp_path / "r")
    monkeypatch.undo()

    def plot_ok(result, path):
        Path(path).write_bytes(b"png " + str(result["v"]).encode())

    def plot_fails(result, path):
        raise RuntimeError("the plot failed")

    files = write_report({"v": 1}, tmp_path / "r", "x", lambda r: f"table {r['v']}\n", plot_ok)
    before = {k: Path(p).read_bytes() for k, p in files.items()}
    with pytest.raises(RuntimeError):
        write_report({"v": 2}, tmp_path / "r", "x", lambda r: f"table {r['v']}\n", plot_fails)
    assert {k: Path(p).read_bytes() for k, p in files.items()} == before  # the old set, whole
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["x.json", "x.md", "x.png"]  # no temporary left


def test_report_location_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_error(capsys, ["eval", "frontier", "--out-dir", tmp_path / "file" / "sub", "--num-samples", "2"])
    assert "--out-dir" in err and "cannot hold a report" in err


def test_distinct_n_on_text_without_spaces():
    from adjust.eval.metrics import distinct_n

    assert distinct_n(["MKTAYIAKQR"], 2) == 1.0  # residues, character by character
    assert distinct_n(["AAAA"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["the cat the cat"], 2) == pytest.approx(2 / 3)  # words where there are spaces


def test_stop_at_eos_token_ids_end_at_the_stop_token():
    from adjust.decode import generate_texts
    from adjust.loader import ModelSpec, load_models
    from adjust.strategies import make_strategy

    base, _ = load_models(ModelSpec(base="models/shakespeare-base"), "none")
    newline = base.encode("a\nb")[1]
    base.extra_stop_ids = (newline,)  # a frequent token as the stop, so that answers end
    samples, _ = generate_texts(base, ["ROMEO:"], make_strategy("parallel", tokens_per_pass=4), gen_length=32,
                                num_samples=6, early_exit=True)
    ended = [s for s in samples if newline in s["token_ids"]]
    assert ended
    for s in ended:
        assert s["token_ids"][-1] == newline and s["token_ids"].count(newline) == 1


def test_unknown_text_hints_name_the_cause(tmp_path):
    import mlm_families as mf

    from adjust.base import load_base

    esm = load_base(str(mf.write("esm", tmp_path / "esm")))
    with pytest.raises(AdjustError, match="capitals") as e:
        esm.encode("m k t a y")
    assert "spaces" not in str(e.value)
    # an AntiBERTy-like WordPiece vocabulary of single capitals: residues written together are unknown
    from transformers import BertTokenizer

    from adjust.base.hf import unknown_text_hint

    letters = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                               + list("ACDEFGHIKLMNPQRSTVWY"))}, do_lower_case=False)
    assert letters("EVQLV", add_special_tokens=False)["input_ids"] == [letters.unk_token_id]
    hint = unknown_text_hint(letters, "EVQLV")
    assert "separate them with spaces" in hint and "capitals" not in hint
    assert "capitals" in unknown_text_hint(letters, "e v q l v")


def test_error_gets_its_own_line_after_a_progress_bar(capsys):
    from tqdm import tqdm

    capsys.readouterr()
    bar = tqdm(total=10, desc="work", file=sys.stderr)
    bar.update(3)
    assert main(["generate", "--strategy", "threshold", "--order", "random"]) == 2
    err = capsys.readouterr().err
    assert "\nadjust: error: " in err and err.rstrip("\n").splitlines()[-1].startswith("adjust: error: ")
