"""Instruct models: --chat (the tokenizer's chat template on each prompt) and early exit at EOS / end-of-turn."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from published import write_dream, write_llada  # noqa: E402

from adjust.base import load_base  # noqa: E402
from adjust.base.checkpoint import INDEX  # noqa: E402
from adjust.cli import main  # noqa: E402
from adjust.decode import generate  # noqa: E402
from adjust.sampling import SamplingConfig  # noqa: E402
from adjust.strategies import make_strategy  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"dream": write_dream(root / "dream", seed=1), "llada": write_llada(root / "llada", seed=2),
            "plain": write_dream(root / "plain", seed=3, chat=False)}


def run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_dream_chat_prompt(dirs):
    base = load_base(dirs["dream"], chat=True)
    tok = base.tokenizer
    ids = base.encode("the fox")
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nthe fox<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert tok.decode(ids) == want
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # Qwen2/Dream adds no BOS: none added
    plain = load_base(dirs["dream"]).encode("the fox")
    assert tok.decode(plain) == "the fox"  # plain prompts stay plain
    assert base.encode("") == []  # "" is unconditional, with or without --chat


def test_llada_chat_prompt_has_one_bos(dirs):
    """LLaDA's template writes BOS itself, and its tokenizer adds BOS to plain text: exactly one BOS."""
    base = load_base(dirs["llada"], chat=True)
    tok = base.tokenizer
    bos = tok.bos_token_id
    assert tok.encode("a")[0] == bos  # the tokenizer's own post-processor adds BOS
    ids = base.encode("the fox")
    assert ids[0] == bos and ids.count(bos) == 1
    plain = load_base(dirs["llada"]).encode("the fox")  # plain prompts get BOS too, as LLaDA's tokenizer adds it
    assert plain[0] == bos and plain.count(bos) == 1 and tok.decode(plain) == "<|startoftext|>the fox"
    assert tok.decode(ids) == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nthe fox<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_prompt_adds_bos_when_template_lacks_it(dirs, tmp_path):
    """A template without BOS on a tokenizer that adds one: BOS is put first (once)."""
    import shutil

    path = tmp_path / "llada"
    shutil.copytree(dirs["llada"], path)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf["chat_template"] = conf["chat_template"].replace("bos_token + content", "content")
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    base = load_base(path, chat=True)
    ids = base.encode("the fox")
    assert ids[0] == base.tokenizer.bos_token_id and ids.count(base.tokenizer.bos_token_id) == 1


def test_chat_without_template_is_one_error(dirs, capsys):
    rc, out, err = run(capsys, "generate", "--base", dirs["plain"], "--chat", "--prompt", "hi", "--gen-length", 4)
    assert rc == 2 and err.startswith("adjust: error: --chat:") and "no chat template" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _stop_heavy(path):
    """Make every position of a Dream checkpoint predict EOS or <|im_end|> (both stop tokens) with ~99%:
    the head sees only the first hidden unit; EOS's row is +10 there, end-of-turn's -10, the rest 0."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    tok_conf = json.loads((path / "tokenizer_config.json").read_text())
    im_end = next(int(i) for i, t in tok_conf["added_tokens_decoder"].items() if t["content"] == "<|im_end|>")
    index = json.loads((path / INDEX).read_text())["weight_map"]
    for name in ("lm_head.weight", "model.norm.weight"):
        shard = path / index[name]
        state = load_file(str(shard))
        w = torch.zeros_like(state[name])
        if name == "model.norm.weight":
            w[0] = 1.0
        else:
            w[cfg["eos_token_id"], 0], w[im_end, 0] = 10.0, -10.0
        state[name] = w
        save_file(state, str(shard))
    return path


def test_chat_generation_ends_at_stop_token(dirs, tmp_path, capsys):
    import shutil

    path = _stop_heavy(shutil.copytree(dirs["dream"], tmp_path / "stop"))
    base = load_base(path, chat=True)
    common = ("generate", "--base", path, "--prompt", "the fox", "--prompt", "a cat sat", "--gen-length", 16,
              "--strategy", "exact", "--json")
    rc, out, err = run(capsys, *common, "--chat")
    assert rc == 0, err
    obj = json.loads(out)
    stats = obj["stats"]
    for s in obj["samples"]:
        ids = s["token_ids"]
        first = next(n for n, i in enumerate(ids) if i in base.stop_ids)
        assert s["text"] == base.tokenizer.decode(ids[:first])  # text cut at the first stop token
        assert all(i == base.eos_id for i in ids[first + 1:])  # the rest is EOS, not decoded
    # the two prompts differ in length, so they run as two batches of one: exact decodes one token a pass
    assert stats["eos_filled"] > 0 and stats["full_passes"] == 2 * 16 - stats["eos_filled"]
    # without --chat (and so without early exit) every position is decoded, one per pass
    rc, out, err = run(capsys, *common)
    plain = json.loads(out)["stats"]
    assert rc == 0 and plain["eos_filled"] == 0 and plain["full_passes"] == 2 * 16


def test_rollouts_with_chat(dirs, tmp_path, capsys):
    """Rollouts store the chat-formatted prompt ids and stay full exact trajectories (no early exit)."""
    import shutil

    path = _stop_heavy(shutil.copytree(dirs["dream"], tmp_path / "stop"))
    rc, out, err = run(capsys, "rollouts", "--base", path, "--chat", "--out", tmp_path / "r", "--num-samples", 4,
                       "--gen-length", 8, "--prompt", "the fox", "--quiet")
    assert rc == 0, err
    from adjust.distill.rollouts import load_rollouts

    base = load_base(path, chat=True)
    r = load_rollouts(tmp_path / "r", base)
    assert r.prompts[0] == base.encode("the fox") and r.prompts[0][0] == base.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sorted(r.order[0].tolist()) == list(range(8))


def _table(L, V, eos_at, eos_id=2):
    """Position logits: a very confident EOS at `eos_at`, a weaker token 3 before it, token 4 after it."""
    t = torch.zeros(L, V)
    t[:eos_at, 3] = 4.0
    t[eos_at + 1:, 4] = 3.0
    t[eos_at, eos_id] = 20.0
    return t


@pytest.mark.parametrize("k", [1, 2])
def test_early_exit_rule(dummy_base, k):
    """EOS committed at p: every later masked position is EOS at once, counted in eos_filled, never decoded;
    with early exit off the loop decodes every position as before."""
    base = dummy_base(_table(8, 6, eos_at=3), mask_id=0, pad_id=1, eos_id=2)
    strategy = make_strategy("exact" if k == 1 else "parallel", tokens_per_pass=k)
    greedy = SamplingConfig(temperature=0.0, order="confidence")
    on = generate(base, [[]], strategy, greedy, gen_length=8, early_exit=True, record_history=True)
    off = generate(base, [[]], strategy, greedy, gen_length=8, early_exit=False)
    assert on.tokens[0].tolist() == [3, 3, 3, 2, 2, 2, 2, 2]
    assert off.tokens[0].tolist() == [3, 3, 3, 2, 4, 4, 4, 4]
    assert on.stats.eos_filled == 4 and off.stats.eos_filled == 0
    assert on.stats.full_passes == -(-4 // k) and off.stats.full_passes == -(-8 // k)
    decoded = sorted(pos for step in on.history[0] for pos, _, _ in step["unmasked"])
    assert decoded == [0, 1, 2, 3]
    assert on.stats.to_dict()["tokens_per_full_pass"] == pytest.approx(4 / on.stats.full_passes)


def test_early_exit_off_by_default_without_chat(dummy_base):
    base = dummy_base(_table(8, 6, eos_at=3), mask_id=0, pad_id=1, eos_id=2)
    greedy = SamplingConfig(temperature=0.0, order="confidence")
    default = generate(base, [[]], make_strategy("exact"), greedy, gen_length=8)
    assert default.tokens[0].tolist() == [3, 3, 3, 2, 4, 4, 4, 4] and default.stats.eos_filled == 0
