"""The masked-diffusion bound: shape, what may be masked, reproducibility."""

from __future__ import annotations

import torch

from adjust.likelihood import estimate_nll, masked_diffusion_nll


class Recorder:
    def __init__(self, base):
        self._base = base
        self.inputs = []

    def __getattr__(self, name):
        return getattr(self._base, name)

    def hidden_states(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return self._base.hidden_states(input_ids, attention_mask)


def test_only_eligible_tokens_are_masked(tiny_base):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 24))
    eligible = torch.zeros_like(ids, dtype=torch.bool)
    eligible[:, 10:] = True
    spy = Recorder(tiny_base)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        nll = masked_diffusion_nll(spy, ids, eligible, generator=g)
        assert nll.shape == (4,) and torch.isfinite(nll).all() and (nll >= 0).all()
    for x in spy.inputs:
        assert torch.equal(x[:, :10], ids[:, :10])
        changed = x != ids
        assert (x[changed] == tiny_base.mask_id).all()


def test_nothing_eligible_costs_nothing(tiny_base):
    ids = torch.randint(3, 200, (2, 8))
    nll = masked_diffusion_nll(tiny_base, ids, torch.zeros_like(ids, dtype=torch.bool))
    assert torch.equal(nll, torch.zeros(2))


def test_estimate_is_reproducible_by_seed(tiny_base):
    ids = torch.randint(3, 200, (3, 16), generator=torch.Generator().manual_seed(1))
    a = estimate_nll(tiny_base, ids, draws=3, seed=4)
    assert torch.equal(a, estimate_nll(tiny_base, ids, draws=3, seed=4))
    assert not torch.equal(a, estimate_nll(tiny_base, ids, draws=3, seed=5))
    # a random model is no better than uniform by much: the bound is of order log V
    assert (a > 1.0).all()
