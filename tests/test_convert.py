"""`adjust convert bert`: a pickled BERT masked LM in AntiBERTy's layout becomes a safetensors directory.

The source is a tiny random BertForMaskedLM saved exactly as AntiBERTy ships its weights: a pickled
`pytorch_model.bin` (torch.save of the state dict) with a pooler, extra classification heads and the
position_ids buffer, a config.json with model_type bert, and a vocab.txt of amino-acid letters.
"""

from __future__ import annotations

import fractions
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adjust.base import load_base  # noqa: E402
from adjust.cli import main  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"ACDEFGHIKLMNPQRSTVWY"]


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("antiberty_like")
    cfg = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2,
               layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute")
    torch.manual_seed(0)
    net = transformers.BertForMaskedLM(transformers.BertConfig(**cfg)).eval()
    state = dict(net.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["bert.pooler.dense.weight"] = torch.randn(32, 32)
    state["bert.pooler.dense.bias"] = torch.zeros(32)
    for head, n in (("species", 6), ("chain", 2), ("graft", 2)):
        state[f"cls.{head}.weight"] = torch.randn(n, 32)
        state[f"cls.{head}.bias"] = torch.zeros(n)
    torch.save(state, root / "pytorch_model.bin")  # the pickled format
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["AntiBERTy"], **cfg}))
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root, net


def _convert(root, out):
    return main(["convert", "bert", "--weights", str(root / "pytorch_model.bin"), "--config",
                 str(root / "config.json"), "--vocab", str(root / "vocab.txt"), "--out", str(out)])


def test_convert_keeps_logits_and_tokens(pickled, tmp_path, capsys):
    root, net = pickled
    assert _convert(root, tmp_path / "conv") == 0
    report = json.loads(capsys.readouterr().out)
    assert "cls.species.weight" in report["dropped"] and "bert.pooler.dense.weight" in report["dropped"]
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    base = load_base(tmp_path / "conv")  # auto: a masked LM, through transformers' own BertForMaskedLM
    tok = base.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in VOCAB] == list(range(len(VOCAB)))
    assert tok.encode("E V Q L", add_special_tokens=False) == [VOCAB.index(c) for c in "EVQL"]
    ids = torch.tensor([[2, *(VOCAB.index(c) for c in "EVQLVESG"), 4, 4, 3]])
    with torch.no_grad():
        ref = net(input_ids=ids).logits
        mine = base.lm_head(base.hidden_states(ids))
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    assert base.eos_id == VOCAB.index("[SEP]") and base.mask_id == VOCAB.index("[MASK]")
    assert set(base.banned_ids) == {0, 1, 2, 4}  # pad, unk, cls, mask: never generated; [SEP] ends an answer


def test_masked_lm_prompts_start_with_cls_and_refuse_unknown(pickled, tmp_path, capsys):
    root, _ = pickled
    assert _convert(root, tmp_path / "conv") == 0
    base = load_base(tmp_path / "conv")
    assert base.encode("E V Q") == [2, VOCAB.index("E"), VOCAB.index("V"), VOCAB.index("Q")]
    assert base.encode("") == [2]  # unconditional generation starts from [CLS] too
    base.prompt_specials = False
    assert base.encode("E V Q") == [VOCAB.index(c) for c in "EVQ"]
    capsys.readouterr()
    # residues written without spaces are one unknown word: refused, never silently replaced by [UNK]
    assert main(["generate", "--base", str(tmp_path / "conv"), "--prompt", "EVQL", "--gen-length", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adjust: error:") and "[UNK]" in err and "spaces" in err and len(err.splitlines()) == 1
    assert main(["generate", "--base", str(tmp_path / "conv"), "--prompt", "E V Q L", "--gen-length", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"][0]["token_ids"]) == 4


def test_convert_refuses_bad_input(pickled, tmp_path, capsys):
    root, _ = pickled
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert _convert(root, tmp_path / "taken") == 2
    assert "not an empty directory" in capsys.readouterr().err

    # a pickle that would build an arbitrary object (here a fractions.Fraction): weights_only refuses it
    torch.save({"w": torch.zeros(1), "obj": fractions.Fraction(1, 3)}, tmp_path / "evil.bin")
    assert main(["convert", "bert", "--weights", str(tmp_path / "evil.bin"), "--config", str(root / "config.json"),
                 "--vocab", str(root / "vocab.txt"), "--out", str(tmp_path / "o1")]) == 2
    assert "weights-only" in capsys.readouterr().err
    (tmp_path / "vocab.txt").write_text("A\nC\n")
    assert main(["convert", "bert", "--weights", str(root / "pytorch_model.bin"), "--config",
                 str(root / "config.json"), "--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "special tokens" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_masked_lm_generation_can_end_at_sep(pickled, tmp_path, capsys):
    """--stop-at-eos: once [SEP] is written, the rest of the sequence is [SEP], not decoded, and counted."""
    root, net = pickled
    state = torch.load(root / "pytorch_model.bin", weights_only=True)
    sep = VOCAB.index("[SEP]")
    state["cls.predictions.bias"][sep] += 4.0  # a model that often ends early
    state["cls.predictions.decoder.bias"][sep] += 4.0
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert main(["convert", "bert", "--weights", str(tmp_path / "pytorch_model.bin"), "--config",
                 str(root / "config.json"), "--vocab", str(root / "vocab.txt"), "--out", str(tmp_path / "conv")]) == 0
    capsys.readouterr()
    args = ["generate", "--base", str(tmp_path / "conv"), "--prompt", "E V Q L", "--gen-length", "12",
            "--num-samples", "6", "--json"]
    assert main(args + ["--stop-at-eos"]) == 0
    out = json.loads(capsys.readouterr().out)
    ended = 0
    for s in out["samples"]:
        ids = s["token_ids"]
        if sep in ids:
            ended += 1
            assert set(ids[ids.index(sep):]) == {sep}
            assert "[SEP]" not in s["text"]
    assert ended and out["stats"]["eos_filled"] > 0
    assert main(args) == 0  # without the flag every position is decoded
    assert json.loads(capsys.readouterr().out)["stats"]["eos_filled"] == 0
