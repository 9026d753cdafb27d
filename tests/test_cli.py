"""The command line: one JSON object with --json, and one "adjust: error:" line (no traceback) on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adjust.cli import main

from conftest import CORPUS


def cli(capsys, *argv):
    """Run `adjust argv...` in-process: (return code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # what `adjust` would show as a traceback
        out, err = capsys.readouterr()
        pytest.fail(f"uncaught {type(e).__name__}: {e} -- the CLI would print a Traceback")
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, *names):
    """Exit 2 and one `adjust: error:` line that names each of `names`: the flag, field or file at fault (at
    least one is required, so a case cannot pass on another error than its own)."""
    assert names, "name the flag, field or file the message must point at"
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adjust: error:"), err
    for name in names:
        assert str(name) in lines[0], (name, err)


# --------------------------------------------------------------------------------------------
# --json
# --------------------------------------------------------------------------------------------

def test_json_output_parallel_k4(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--strategy", "parallel", "-K", 4,
                       "--gen-length", 64, "--json")
    assert rc == 0, err
    obj = json.loads(out)  # the whole of stdout is exactly one JSON object
    assert isinstance(obj, dict) and set(obj) >= {"samples", "stats"}
    assert len(obj["samples"]) == 1
    s = obj["samples"][0]
    assert set(s) == {"prompt", "text", "token_ids"}
    assert s["prompt"] == "" and len(s["token_ids"]) == 64 and isinstance(s["text"], str)
    stats = obj["stats"]
    assert {"full_passes", "sampler_passes", "new_tokens", "tokens_per_full_pass", "seconds",
            "tokens_per_second"} <= set(stats)
    assert stats["full_passes"] == 16
    assert stats["sampler_passes"] == 0
    assert stats["new_tokens"] == 64
    assert stats["tokens_per_full_pass"] == pytest.approx(4.0)
    assert stats["seconds"] >= 0 and stats["tokens_per_second"] >= 0


def test_json_output_many_prompts(capsys, tiny_model_dir, tiny_base):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompt", "the dog", "--prompt", "the sun",
                       "--num-samples", 2, "--gen-length", 8, "--json", "--seed", 3)
    assert rc == 0, err
    obj = json.loads(out)
    assert [s["prompt"] for s in obj["samples"]] == ["the dog", "the dog", "the sun", "the sun"]
    for s in obj["samples"]:
        assert len(s["token_ids"]) == 8 and tiny_base.mask_id not in s["token_ids"]
    assert obj["stats"]["full_passes"] == 8 * 2  # exact, two batches (one per prompt length/group)
    # same command, same output tokens
    rc, out2, _ = cli(capsys, "generate", "--base", tiny_model_dir, "--prompt", "the dog", "--prompt", "the sun",
                      "--num-samples", 2, "--gen-length", 8, "--json", "--seed", 3)
    assert [s["token_ids"] for s in json.loads(out2)["samples"]] == [s["token_ids"] for s in obj["samples"]]


def test_text_output_and_steps(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompt", "the dog", "--gen-length", 6,
                       "--strategy", "parallel", "-K", 2, "--show-steps")
    assert rc == 0, err
    assert "the dog" in out
    assert sum(line.strip().startswith("pass") for line in out.splitlines()) == 3


def test_prompts_file(capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "the dog"}) + "\n" + json.dumps({"prompt": "the sun"}) + "\n")
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", f, "--gen-length", 4, "--json")
    assert rc == 0, err
    assert [s["prompt"] for s in json.loads(out)["samples"]] == ["the dog", "the sun"]


# --------------------------------------------------------------------------------------------
# bad input: one line, no traceback
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, names", [
    (["--strategy", "parallel", "--tokens-per-pass", "0"], ["--tokens-per-pass", "got 0"]),
    (["--strategy", "exact", "--tokens-per-pass", "0"], ["--tokens-per-pass", "got 0"]),
    (["--strategy", "adjust", "-K", "0"], ["--tokens-per-pass", "got 0"]),
    (["--strategy", "no-such-strategy"], ["strategy 'no-such-strategy'"]),
    (["--order", "no-such-order"], ["order rule 'no-such-order'"]),
    (["--gen-length", "0"], ["--gen-length", "got 0"]),
    (["--block-length", "0"], ["--block-length", "got 0"]),
    (["--num-samples", "0"], ["--num-samples", "got 0"]),
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["--top-p", "1.5"], ["--top-p", "got 1.5"]),
    (["--top-k", "-1"], ["--top-k", "got -1"]),
    (["--temperature", "-1"], ["--temperature", "got -1"]),
    (["--dtype", "int3"], ["--dtype 'int3'"]),
    (["--base-type", "gpt"], ["--base-type 'gpt'"]),
    (["--strategy", "adjust", "-K", "2"], ["--sampler"]),  # no sampler beside the base and none given
    (["--prompt", "the <|mask|> sat"], ["prompt", "mask token"]),
], ids=lambda a: " ".join(a) if isinstance(a, list) and a[0].startswith("-") else "")
def test_bad_generate_args(capsys, tiny_model_dir, extra, names):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, *extra)
    assert_one_error_line(rc, err, *names)


def test_prompt_longer_than_context(capsys, tiny_model_dir, tiny_base):
    prompt = "the dog sleeps in the sun " * 40
    assert len(tiny_base.encode(prompt)) > tiny_base.max_length
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompt", prompt)
    assert_one_error_line(rc, err, "prompt", "--gen-length", "context")
    # also when only prompt + generation is too long
    prompt = "the dog"
    room = tiny_base.max_length - len(tiny_base.encode(prompt))
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompt", prompt, "--gen-length", room + 1)
    assert_one_error_line(rc, err, f"--gen-length ({room + 1})", "context")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--device", "cuda")
    assert_one_error_line(rc, err, "--device cuda")


def test_missing_model_dir(capsys, tmp_path):
    rc, out, err = cli(capsys, "generate", "--base", tmp_path / "no-such-model")
    assert_one_error_line(rc, err, "not found", tmp_path / "no-such-model")


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights(capsys, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc, out, err = cli(capsys, "generate", "--base", d)
    assert_one_error_line(rc, err, "corrupt", w)


@pytest.mark.parametrize("config", ['{"model_type": "adjust-tiny", ', "", "\x00\xff garbage", "[]", '"adjust-tiny"'],
                         ids=["truncated", "empty", "garbage", "json-list", "json-string"])
def test_invalid_config_json(capsys, tiny_model_dir, tmp_path, config):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "config.json").write_text(config)
    rc, out, err = cli(capsys, "generate", "--base", d)
    assert_one_error_line(rc, err, d / "config.json")


def test_missing_or_corrupt_tokenizer(capsys, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "tokenizer.json").write_text("{not json")
    rc, out, err = cli(capsys, "generate", "--base", d)
    assert_one_error_line(rc, err, "corrupt tokenizer", d / "tokenizer.json")
    (d / "tokenizer.json").unlink()
    rc, out, err = cli(capsys, "generate", "--base", d)
    assert_one_error_line(rc, err, "tokenizer not found", d / "tokenizer.json")


def test_missing_weights(capsys, tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    rc, out, err = cli(capsys, "generate", "--base", d)
    assert_one_error_line(rc, err, "weights not found", d / "model.safetensors")


def test_missing_prompts_file(capsys, tiny_model_dir, tmp_path):
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", tmp_path / "none.txt")
    assert_one_error_line(rc, err, "prompts file not found", tmp_path / "none.txt")


@pytest.mark.parametrize("content, fault", [("not json\n", "not valid JSON"),
                                            ('{"text": "no prompt key"}\n', '"prompt" string field'),
                                            ("[1, 2]\n", '"prompt" string field')],
                         ids=["not-json", "no-prompt-key", "not-an-object"])
def test_bad_prompts_jsonl(capsys, tiny_model_dir, tmp_path, content, fault):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    rc, out, err = cli(capsys, "generate", "--base", tiny_model_dir, "--prompts", f)
    assert_one_error_line(rc, err, f"{f}:1", fault)


# --------------------------------------------------------------------------------------------
# train-base
# --------------------------------------------------------------------------------------------

TINY_TRAIN = ["--steps", 2, "--batch-size", 2, "--seq-len", 16, "--eval-every", 1, "--vocab-size", 300,
              "--hidden-size", 32, "--layers", 1, "--heads", 2, "--intermediate-size", 64, "--warmup", 1, "--lr", 1e-3, "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli-data") / "toy.txt"
    p.write_text("\n".join(CORPUS))
    return p


def _with(args, **over):
    args = list(args)
    for k, v in over.items():
        flag = "--" + k.replace("_", "-")
        args[args.index(flag) + 1] = v
    return args


def test_train_base_cli_works(capsys, text_file, tmp_path):
    rc, out, err = cli(capsys, "train-base", "--data", text_file, "--out", tmp_path / "m", *TINY_TRAIN)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 2
    rc, out, err = cli(capsys, "generate", "--base", tmp_path / "m", "--gen-length", 4, "--json")
    assert rc == 0, err
    assert len(json.loads(out)["samples"][0]["token_ids"]) == 4


@pytest.mark.parametrize("content", ["", "  \n \n"], ids=["empty", "blank"])
def test_train_base_empty_data(capsys, tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    rc, out, err = cli(capsys, "train-base", "--data", p, "--out", tmp_path / "m", *TINY_TRAIN)
    assert_one_error_line(rc, err, "data file is empty", p)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_train_base_missing_and_too_small_data(capsys, tmp_path):
    rc, out, err = cli(capsys, "train-base", "--data", tmp_path / "none.txt", "--out", tmp_path / "m", *TINY_TRAIN)
    assert_one_error_line(rc, err, "data file not found", tmp_path / "none.txt")
    p = tmp_path / "small.txt"
    p.write_text("a few words only")
    rc, out, err = cli(capsys, "train-base", "--data", p, "--out", tmp_path / "m", *TINY_TRAIN)
    assert_one_error_line(rc, err, p, "too small")


@pytest.mark.parametrize("over, names", [
    (dict(steps=0), ["--steps must be at least 1, got 0"]), (dict(batch_size=0), ["--batch-size must", "got 0"]),
    (dict(seq_len=0), ["--seq-len must", "got 0"]), (dict(eval_every=0), ["--eval-every must", "got 0"]),
    (dict(heads=3), ["--heads (3)"]), (dict(hidden_size=30), ["--hidden-size (30)"]),
    (dict(lr=-1), ["--lr must be positive"])],
    ids=lambda d: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items()) if isinstance(d, dict) else "")
def test_train_base_bad_numbers(capsys, text_file, tmp_path, over, names):
    rc, out, err = cli(capsys, "train-base", "--data", text_file, "--out", tmp_path / "m", *_with(TINY_TRAIN, **over))
    assert_one_error_line(rc, err, *names)
