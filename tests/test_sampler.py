"""The joint sampler: save/load round trip and refusing a base it was not made for."""

from __future__ import annotations

import json

import pytest
import torch

from adjust.errors import AdjustError
from adjust.sampler import JointSampler, SamplerConfig, default_sampler_path

from conftest import make_tiny_base


@pytest.fixture(scope="module")
def sampler(tiny_base):
    torch.manual_seed(5)
    return JointSampler(SamplerConfig.for_base(tiny_base)).eval()


def test_sampler_shapes(tiny_base, sampler):
    ids = torch.tensor([[5, 6, tiny_base.mask_id, 7]])
    prior = tiny_base.hidden_states(ids)
    with torch.no_grad():
        out = sampler(tiny_base, ids, prior)
    assert out.shape == prior.shape
    assert not torch.equal(out, prior)


def test_save_load_round_trip_identical_outputs(tiny_base, sampler, tmp_path):
    sampler.save(tmp_path / "s")
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    loaded = JointSampler.load(tmp_path / "s", tiny_base)
    assert not loaded.training
    assert loaded.cfg == sampler.cfg
    ids = torch.tensor([[5, 6, tiny_base.mask_id, 7, tiny_base.mask_id], [tiny_base.pad_id, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    prior = tiny_base.hidden_states(ids, mask)
    with torch.no_grad():
        for m in (None, mask):
            assert torch.equal(sampler(tiny_base, ids, prior, m), loaded(tiny_base, ids, prior, m))
    # loadable without a base too
    assert JointSampler.load(tmp_path / "s").cfg == sampler.cfg


def test_sampler_refuses_another_base(tokenizer, tiny_base, sampler, tmp_path):
    other = make_tiny_base(tokenizer, seed=2)
    sampler.check_base(tiny_base)
    with pytest.raises(AdjustError, match="distill a sampler"):
        sampler.check_base(other)
    sampler.save(tmp_path / "s")
    with pytest.raises(AdjustError):
        JointSampler.load(tmp_path / "s", other)


def test_sampler_load_errors(tmp_path, sampler, tiny_model_dir):
    with pytest.raises(AdjustError):
        JointSampler.load(tmp_path / "missing")
    with pytest.raises(AdjustError, match="not an ADJUST sampler"):
        JointSampler.load(tiny_model_dir)
    sampler.save(tmp_path / "s")
    w = tmp_path / "s" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdjustError, match="corrupt"):
        JointSampler.load(tmp_path / "s")
    sampler.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdjustError, match="do not fit"):
        JointSampler.load(tmp_path / "t")


def test_default_sampler_path(tmp_path):
    assert default_sampler_path(tmp_path) is None
    (tmp_path / "sampler").mkdir()
    assert default_sampler_path(tmp_path) == tmp_path / "sampler"
