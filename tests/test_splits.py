"""The held-out split of rollouts: one function (adjust.splits), the one distillation uses."""

from __future__ import annotations

import pytest

from adjust.distill.rollouts import Rollouts
from adjust.distill.train import DistillConfig, split
from adjust.splits import held_out_split


@pytest.mark.parametrize("n,n_train", [(1024, 973), (7200, 6840)])
def test_shipped_samplers_split(n, n_train):
    """The counts their cards state (models/*/sampler/README.md): unchanged by the move."""
    train, held = held_out_split(n)
    assert (len(train), len(held)) == (n_train, n - n_train)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 19, 20, 30, 50, 70, 99, 1024, 7200])
def test_split_is_a_tail_and_a_partition(n):
    train, held = held_out_split(n)
    assert train + held == list(range(n))
    assert (len(held) >= 1) == (n > 1)
    assert len(train) >= 1


@pytest.mark.parametrize("n", [2, 10, 30, 70, 1024])
def test_distill_uses_it(n):
    import torch

    r = Rollouts([[]] * n, torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, 4, dtype=torch.long), {})
    assert split(r, DistillConfig()) == held_out_split(n)


def test_joint_kl_draws_states_from_the_same_held_out_rollouts(tiny_base):
    """70 rollouts: distill holds out the last 4 (round(3.5)); joint-kl drew from the last 3 (70 // 20)."""
    import torch

    from adjust.eval.joint_kl import joint_kl

    class Recording(Rollouts):
        def states(self, ns, ts, mask_id):
            used.update(ns)
            return super().states(ns, ts, mask_id)

    n, G = 70, 4
    used: set[int] = set()
    eos = tiny_base.eos_id
    r = Recording([[]] * n, torch.full((n, G), eos), torch.arange(G).repeat(n, 1), {})
    joint_kl(tiny_base, None, r, 1, num_states=200, draws=1, seed=0)
    assert sorted(used) == held_out_split(n)[1]
