"""Training the tiny base: loss goes down, checkpoints are loadable, resume continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from adjust import train_base as tb
from adjust.base import load_base
from adjust.base.tiny import EOS, MASK, PAD, TinyConfig, token_ids
from adjust.errors import AdjustError
from adjust.train_base import STATE_FILE, TrainConfig, lr_at, train_base, train_tokenizer

from conftest import CORPUS


def model_cfg() -> TinyConfig:
    return TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, tokenizer_size=300,
                      max_length=32)


def train_cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=steps, batch_size=8, seq_len=32, eval_every=10, warmup=3, lr=3e-3,
                                 eval_batches=2), **kw})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.txt"
    path.write_text("\n".join(CORPUS * 2))
    assert 3000 < path.stat().st_size < 10000
    return path


def history(out_dir) -> list[dict]:
    return torch.load(out_dir / STATE_FILE, weights_only=True)["history"]


def test_training_lowers_validation_loss(data_file, tmp_path):
    out = tmp_path / "m"
    result = train_base(data_file, out, train_cfg(30), model_cfg(), progress=False)
    hist = history(out)
    assert [h["step"] for h in hist] == [10, 20, 30]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert result["step"] == 30 and result["val_loss"] == hist[-1]["val_loss"]
    # the output directory is a loadable model directory recording its training
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["step"] == 30
    base = load_base(out)
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert base.max_length >= 32
    ids = torch.tensor([base.encode("the dog sleeps in the sun")])
    assert base(ids).logits.shape == (1, ids.shape[1], base.vocab_size)


def test_resume_continues_the_step_count(data_file, tmp_path, capsys):
    out = tmp_path / "m"
    train_base(data_file, out, train_cfg(10), model_cfg(), progress=False)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 10
    capsys.readouterr()
    result = train_base(data_file, out, train_cfg(20), model_cfg(), progress=False)
    assert "resuming from step 10" in capsys.readouterr().err
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["step"] == 20 and result["step"] == 20
    assert [h["step"] for h in state["history"]] == [10, 20]
    # asking for no more steps than done trains nothing and keeps the state
    train_base(data_file, out, train_cfg(20), model_cfg(), progress=False)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 20


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(data_file, tmp_path, monkeypatch):
    """Kill training at step 15 (last checkpoint: 10); resuming to 20 gives the weights of a straight run."""
    straight = tmp_path / "straight"
    train_base(data_file, straight, train_cfg(20), model_cfg(), progress=False)

    real = tb.masked_diffusion_nll
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 15:
            raise Interrupted
        return real(*a, **kw)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(tb, "masked_diffusion_nll", dying)
    with pytest.raises(Interrupted):
        train_base(data_file, out, train_cfg(20), model_cfg(), progress=False)
    monkeypatch.setattr(tb, "masked_diffusion_nll", real)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 10

    train_base(data_file, out, train_cfg(20), model_cfg(), progress=False)
    a = torch.load(straight / STATE_FILE, weights_only=True)
    b = torch.load(out / STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the whole log too (the train_loss EMA is resumed), but for the wall-clock times
    assert [{k: v for k, v in h.items() if k != "elapsed_s"} for h in a["history"]] == \
        [{k: v for k, v in h.items() if k != "elapsed_s"} for h in b["history"]]


def test_resume_refuses_another_model_config(data_file, tmp_path):
    out = tmp_path / "m"
    train_base(data_file, out, train_cfg(10), model_cfg(), progress=False)
    other = model_cfg()
    other.hidden_size = 64
    with pytest.raises(AdjustError):
        train_base(data_file, out, train_cfg(20), other, progress=False)


def test_too_small_data_is_an_error(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words here")
    with pytest.raises(AdjustError, match="too small"):
        train_base(small, tmp_path / "m", train_cfg(5), model_cfg(), progress=False)


def test_empty_and_missing_data_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(AdjustError):
        train_base(empty, tmp_path / "m", train_cfg(5), model_cfg(), progress=False)
    with pytest.raises(AdjustError):
        train_base(tmp_path / "nope.txt", tmp_path / "m", train_cfg(5), model_cfg(), progress=False)


# --- --packing documents ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"say {w}:", "completion": f" {w} {w}"} for w in " ".join(CORPUS).split()[:120]]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_document_batches_start_each_document_at_position_0():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    batches = tb.DocumentBatches(docs, prompt_lengths=[1, 2, 0], seq_len=8, eos_id=2)
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(200):
        ids, eligible = batches(4, g)
        L = ids.shape[1]
        lengths.add(L)
        assert 3 <= L <= 8
        for row, ok in zip(ids.tolist(), eligible.tolist()):
            doc = next(d for d in docs if row[:len(d)] == d)  # a whole document from position 0
            assert len(doc) < L and row[len(doc):] == [2] * (L - len(doc))  # then EOS to the end
            n_prompt = [1, 2, 0][docs.index(doc)]
            assert ok == [False] * n_prompt + [True] * (L - n_prompt)  # the prompt is never masked
    assert lengths == set(range(3, 9))  # every length that fits some document is drawn


def test_documents_packing_trains_on_completions_only(pairs_file, tmp_path):
    out = tmp_path / "m"
    cfg = train_cfg(20, packing="documents", seq_len=32)
    result = train_base(pairs_file, out, cfg, model_cfg(), progress=False)
    hist = history(out)
    assert result["step"] == 20 and hist[-1]["val_loss"] < hist[0]["val_loss"]
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["settings"]["packing"] == "documents"


def test_documents_packing_refuses_a_document_longer_than_the_context(pairs_file, tmp_path):
    with pytest.raises(AdjustError, match="shorter than --seq-len 4"):
        train_base(pairs_file, tmp_path / "m", train_cfg(5, packing="documents", seq_len=4), model_cfg(),
                   progress=False)
    with pytest.raises(AdjustError, match="unknown --packing"):
        train_base(pairs_file, tmp_path / "m", train_cfg(5, packing="lines"), model_cfg(), progress=False)
    assert not (tmp_path / "m").exists()


def test_untied_lm_head(data_file, tmp_path):
    cfg = model_cfg()
    cfg.tie_embeddings = False
    train_base(data_file, tmp_path / "m", train_cfg(10), cfg, progress=False)
    base = load_base(tmp_path / "m")
    assert base.model.head is not None
    assert not torch.equal(base.model.head.weight, base.model.embed.weight)
    h = torch.randn(3, cfg.hidden_size)
    assert torch.allclose(base.lm_head(h), h @ base.model.head.weight.T)


def test_tokenizer_special_tokens_come_first():
    tok = train_tokenizer(CORPUS, 300)
    assert len(tok) <= 300
    ids = token_ids(tok)
    assert [tok.convert_ids_to_tokens(i) for i in (ids["pad_id"], ids["mask_id"], ids["eos_id"])] == [PAD, MASK, EOS]
    assert sorted(ids.values()) == [0, 1, 2]
    text = "The dog sleeps in the sun."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    warm = [lr_at(s, cfg) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert lr_at(9, cfg) == pytest.approx(1.0)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"batch_size": 4}, {"seed": 1}, {"warmup": 5}])
def test_resume_refuses_changed_training_settings_by_name(data_file, tmp_path, change):
    out = tmp_path / "m"
    train_base(data_file, out, train_cfg(10), model_cfg(), progress=False)
    key = next(iter(change))
    with pytest.raises(AdjustError, match=f"--{key.replace('_', '-')} was {getattr(train_cfg(10), key)}, now"):
        train_base(data_file, out, train_cfg(20, **change), model_cfg(), progress=False)
    # --steps and --eval-every may change: they say how long to train and how often to checkpoint
    assert train_base(data_file, out, train_cfg(20, eval_every=5), model_cfg(), progress=False)["step"] == 20


def test_resume_refuses_other_data(data_file, tmp_path):
    out = tmp_path / "m"
    train_base(data_file, out, train_cfg(10), model_cfg(), progress=False)
    other = tmp_path / "other.txt"
    other.write_text(data_file.read_text() + "\nOne more line of text.")
    with pytest.raises(AdjustError, match="--data"):
        train_base(other, out, train_cfg(20), model_cfg(), progress=False)


def test_truncated_trainer_state_is_one_clear_error(data_file, tmp_path, capsys):
    from adjust.cli import main

    out = tmp_path / "m"
    train_base(data_file, out, train_cfg(10), model_cfg(), progress=False)
    state = out / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    rc = main([str(a) for a in ["train-base", "--data", data_file, "--out", out, "--steps", 20, "--batch-size", 8,
                                "--seq-len", 32, "--hidden-size", 32, "--layers", 1, "--heads", 2,
                                "--intermediate-size", 64, "--quiet"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("adjust: error: corrupt trainer state"), err
