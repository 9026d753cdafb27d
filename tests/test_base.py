"""The base-model interface and TinyBase: banning, decoding, padding, save/load round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adjust.base import embedding_fingerprint, load_base, resolve_device, resolve_dtype
from adjust.base.tiny import TinyBase
from adjust.errors import AdjustError

from conftest import make_tiny_base


def test_save_load_round_trip_gives_identical_logits(tiny_base, tiny_model_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny_model_dir.iterdir()}
    assert not [p for p in tiny_model_dir.iterdir() if p.name.endswith(".tmp")]
    loaded = load_base(tiny_model_dir)
    assert isinstance(loaded, TinyBase)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.manual_seed(0)
    ids = torch.randint(3, len(tiny_base.tokenizer), (2, 20))
    ids[:, 5:9] = tiny_base.mask_id
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for m in (None, mask):
        a, b = tiny_base(ids, m), loaded(ids, m)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    assert loaded.identity() == tiny_base.identity()
    for attr in ("mask_id", "pad_id", "eos_id", "vocab_size", "hidden_size", "max_length", "banned_ids"):
        assert getattr(loaded, attr) == getattr(tiny_base, attr), attr
    text = "the dog sleeps in the sun"
    assert loaded.encode(text) == tiny_base.encode(text)


def test_load_base_dtype(tiny_model_dir):
    b = load_base(tiny_model_dir, dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    ids = torch.tensor([b.encode("the dog")])
    assert b(ids).logits.dtype == torch.float32  # the head runs in float32


def test_load_base_errors(tmp_path, tiny_model_dir):
    with pytest.raises(AdjustError, match="not found"):
        load_base(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdjustError):
        load_base(tmp_path / "file")
    with pytest.raises(AdjustError):
        load_base(tiny_model_dir, base_type="gpt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AdjustError, match="not a masked"):
        load_base(other)
    # valid JSON config, but weights of another shape
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_model_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["hidden_size"] = 64
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdjustError, match="do not fit"):
        load_base(wrong)
    with pytest.raises(AdjustError):
        load_base(tiny_model_dir, dtype="float8")


def test_banned_ids_get_minus_inf(tiny_base):
    h = tiny_base.hidden_states(torch.tensor([[5, 6, tiny_base.mask_id]]))
    logits = tiny_base.logits(h)
    banned = list(tiny_base.banned_ids)
    assert tiny_base.mask_id in banned and tiny_base.pad_id in banned
    assert len(banned) == 2 + tiny_base.vocab_size - len(tiny_base.tokenizer)  # vocabulary padding too
    assert torch.isneginf(logits[..., banned]).all()
    allowed = [i for i in range(tiny_base.vocab_size) if i not in banned]
    assert torch.isfinite(logits[..., allowed]).all()


def test_decode_cuts_at_eos_and_drops_banned(tiny_base):
    ids = tiny_base.encode("the dog")
    assert tiny_base.decode(ids) == "the dog"
    assert tiny_base.decode(ids + [tiny_base.eos_id] + tiny_base.encode(" sun")) == "the dog"
    assert tiny_base.decode([tiny_base.mask_id] + ids + [tiny_base.pad_id]) == "the dog"


def test_left_padding_does_not_change_a_row(tiny_base):
    """A left-padded row sees the positions and keys it would see alone."""
    row = torch.tensor([[7, 8, 9, tiny_base.mask_id, tiny_base.mask_id, 10]])
    alone = tiny_base.hidden_states(row)
    padded = torch.cat([torch.full((1, 3), tiny_base.pad_id), row], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    together = tiny_base.hidden_states(padded, mask)
    assert torch.allclose(together[:, 3:], alone, atol=1e-5)


def test_fingerprint_tells_models_apart(tokenizer, tiny_base):
    assert embedding_fingerprint(tiny_base) == embedding_fingerprint(tiny_base)
    assert embedding_fingerprint(make_tiny_base(tokenizer, seed=1)) != embedding_fingerprint(tiny_base)


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float32") == torch.float32
    with pytest.raises(AdjustError):
        resolve_dtype("int8")
    with pytest.raises(AdjustError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AdjustError):
            resolve_device("cuda")
