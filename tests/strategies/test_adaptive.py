"""Adaptive strategies on a dummy base with hand-made confidences: exact positions per rule."""

import math

import pytest
import torch

from adjust.decode import generate
from adjust.errors import AdjustError
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy

CONF = [0.95, 0.5, 0.92, 0.3, 0.99, 0.6]  # probability of token 2 at each of 6 positions
OTHERS = 5  # tokens 3..7 share the rest; 0 (mask) and 1 (pad) are banned


def table() -> torch.Tensor:
    rows = []
    for c in CONF:
        p = [1e-9, 1e-9, c] + [(1 - c) / OTHERS] * OTHERS
        rows.append(torch.tensor(p).log())
    return torch.stack(rows)


def entropy_of(c: float) -> float:
    o = (1 - c) / OTHERS
    return -c * math.log(c) - OTHERS * o * math.log(o)


def first_pass(dummy_base, strategy, sampler=None):
    base = dummy_base(table())
    out = generate(base, [[]], strategy, SamplingConfig(), gen_length=len(CONF), record_history=True,
                   sampler=sampler)
    return out, {u[0] for u in out.history[0][0]["unmasked"]}


@pytest.mark.parametrize("tau,expected", [(0.9, {0, 2, 4}), (0.96, {4}), (0.999, {4}), (0.55, {0, 2, 4, 5})])
def test_threshold_unmasks_every_position_at_or_above_tau(dummy_base, tau, expected):
    _, first = first_pass(dummy_base, make_strategy("threshold", tau=tau))
    assert first == expected


@pytest.mark.parametrize("f,expected", [(1.0, {4, 0, 2}), (0.2, {4, 0}), (0.01, {4}), (2.5, {4, 0, 2, 5})])
def test_factor_accepts_prefix_while_nth_confidence_clears_its_bar(dummy_base, f, expected):
    # f=2.5: bars 1 - 2.5/(n+1) = -0.25, 0.17, 0.375, 0.5, 0.583 vs 0.99 .95 .92 .6 .5 -> the 5th fails
    _, first = first_pass(dummy_base, make_strategy("factor", factor=f))
    assert first == expected


def test_entropy_bound_accepts_largest_prefix_within_gamma(dummy_base):
    h = sorted((entropy_of(c), i) for i, c in enumerate(CONF))
    # accepting k lowest-entropy positions costs sum of the first k-1 entropies
    for k in range(1, len(CONF) + 1):
        gamma = sum(e for e, _ in h[: k - 1]) + 1e-6
        _, first = first_pass(dummy_base, make_strategy("entropy-bound", gamma=gamma))
        assert first == {i for _, i in h[:k]}, k


def test_adaptive_strategies_report_achieved_tokens_per_pass(dummy_base):
    out, first = first_pass(dummy_base, make_strategy("threshold", tau=0.9))
    assert out.stats.full_passes == len(out.history[0])
    assert out.stats.tokens_per_full_pass == pytest.approx(len(CONF) / out.stats.full_passes)
    assert out.stats.tokens_per_full_pass > 1


def identity_sampler(base) -> JointSampler:
    """A sampler with zero weights returns its prior unchanged: its distributions = the full pass's."""
    s = JointSampler(SamplerConfig(base.hidden_size, 1, 16, base=base.identity()))
    for p in s.parameters():
        torch.nn.init.zeros_(p)
    return s


def test_adjust_threshold_stops_at_first_unconfident_pick(dummy_base):
    base = dummy_base(table())
    s = identity_sampler(base)
    out = generate(base, [[]], make_strategy("adjust-threshold", tau=0.9), SamplingConfig(), gen_length=6,
                   record_history=True, sampler=s)
    step0 = out.history[0][0]["unmasked"]
    # entropy order = confidence order here: 4 (full pass), then 0, 2 from unrolls; 5 (0.6) is refused
    assert [u[0] for u in step0] == [4, 0, 2]
    assert [u[2] for u in step0] == [0, 1, 2]


def test_adjust_threshold_respects_its_cap(dummy_base):
    base = dummy_base(table())
    out = generate(base, [[]], make_strategy("adjust-threshold", tau=0.1, max_tokens_per_pass=2),
                   SamplingConfig(), gen_length=6, record_history=True, sampler=identity_sampler(base))
    assert all(len(step["unmasked"]) <= 2 for step in out.history[0])
    assert out.stats.full_passes == 3
    assert out.stats.sampler_passes == 3  # one unroll per pass: the second token of each


@pytest.mark.parametrize("name,kw", [("threshold", {"tau": 0}), ("threshold", {"tau": 1.5}),
                                     ("factor", {"factor": -1}), ("entropy-bound", {"gamma": -0.1}),
                                     ("adjust-threshold", {"tau": 0.9, "max_tokens_per_pass": 0}),
                                     # a spec's value that is not a number arrives as text (threshold:tau=abc)
                                     ("threshold", {"tau": "abc"}), ("factor", {"factor": "x"}),
                                     ("entropy-bound", {"gamma": "x"}), ("adjust-threshold", {"tau": "x"})])
def test_bad_parameters_are_refused(name, kw):
    with pytest.raises(AdjustError):
        make_strategy(name, **kw)
