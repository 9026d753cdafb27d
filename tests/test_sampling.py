"""Per-position distributions (temperature, top-k, top-p), order scores and the per-row RNG."""

from __future__ import annotations

import math

import pytest
import torch

from adjust.errors import AdjustError
from adjust.sampling import (ORDERS, RowRNG, SamplingConfig, entropy, log_probs, order_scores, row_seed,
                             sample_tokens)

# A hand-made distribution, deliberately not sorted: token -> probability.
PROBS = [0.05, 0.5, 0.13, 0.25, 0.07]  # distinct, sums to 1


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()[None]  # (1, V)


def kept(logp: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logp[0]).nonzero().flatten().tolist())


def nucleus(probs, top_p) -> set[int]:
    """Reference: the smallest set of most likely tokens whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    out, mass = set(), 0.0
    for i in order:
        out.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_keeps_exactly_the_k_most_likely(k):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 0.5]])
    logp = log_probs(logits, SamplingConfig(top_k=k))
    expected = set(logits[0].argsort(descending=True)[:k].tolist())
    assert kept(logp) == expected
    # renormalised, relative probabilities unchanged
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    ref = torch.softmax(logits[0, sorted(expected)], -1)
    assert torch.allclose(logp[0, sorted(expected)].exp(), ref, atol=1e-6)


def test_top_k_zero_or_large_is_no_filter():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    for k in (0, 3, 10):
        assert kept(log_probs(logits, SamplingConfig(top_k=k))) == {0, 1, 2}


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_nucleus(top_p):
    logp = log_probs(logits_of(PROBS), SamplingConfig(top_p=top_p))
    assert kept(logp) == nucleus(PROBS, top_p)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    keep = sorted(kept(logp))
    total = sum(PROBS[i] for i in keep)
    for i in keep:
        assert logp[0, i].exp().item() == pytest.approx(PROBS[i] / total, rel=1e-5)


def test_top_p_always_keeps_the_top_token():
    logp = log_probs(logits_of(PROBS), SamplingConfig(top_p=1e-6))
    assert kept(logp) == {1}


def test_top_k_then_top_p():
    # top-k=3 leaves {1: .5, 3: .25, 2: .13} -> renormalised .568, .284, .148; top-p .8 keeps {1, 3}
    logp = log_probs(logits_of(PROBS), SamplingConfig(top_k=3, top_p=0.8))
    assert kept(logp) == {1, 3}


def test_temperature_scales_logits():
    logits = torch.tensor([[0.0, 1.0, 3.0, -2.0]])
    for t in (0.5, 1.0, 2.0):
        got = log_probs(logits, SamplingConfig(temperature=t))
        assert torch.allclose(got, torch.log_softmax(logits / t, -1), atol=1e-6)
    # temperature 0: the untempered distribution (for the order rules), argmax when sampling
    got = log_probs(logits, SamplingConfig(temperature=0))
    assert torch.allclose(got, torch.log_softmax(logits, -1), atol=1e-6)


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(50, 11)
    logp = log_probs(logits, SamplingConfig(temperature=0))
    rows = torch.arange(50) % 3
    toks = sample_tokens(logp, rows, RowRNG([1, 2, 3], "cpu"), greedy=True)
    assert torch.equal(toks, logits.argmax(-1))


def test_sampling_frequencies_match_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logp = probs.log()[None].expand(20000, -1)
    toks = sample_tokens(logp, torch.zeros(20000, dtype=torch.long), RowRNG([5], "cpu"), greedy=False)
    freq = torch.bincount(toks, minlength=4).double() / len(toks)
    assert freq[3] == 0  # a probability-0 (-inf) token is never drawn
    assert torch.allclose(freq[:3], probs[:3].double(), atol=0.015)


def test_filtered_tokens_are_never_drawn():
    logits = torch.arange(6.0)[None].expand(4000, -1)
    logp = log_probs(logits, SamplingConfig(top_k=2, temperature=5.0))
    toks = sample_tokens(logp, torch.zeros(4000, dtype=torch.long), RowRNG([0], "cpu"), greedy=False)
    assert set(toks.tolist()) == {4, 5}


def test_rows_draw_independently_of_the_batch():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 9), -1)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    s0, s1 = row_seed(1, [4, 5], 0), row_seed(1, [6], 0)
    together = sample_tokens(logp, rows, RowRNG([s0, s1], "cpu"), greedy=False)
    alone = sample_tokens(logp[3:], torch.zeros(3, dtype=torch.long), RowRNG([s1], "cpu"), greedy=False)
    assert torch.equal(together[3:], alone)


def test_row_seed_depends_on_seed_prompt_and_index():
    a = row_seed(0, [1, 2, 3], 0)
    assert a == row_seed(0, [1, 2, 3], 0)
    others = {row_seed(1, [1, 2, 3], 0), row_seed(0, [1, 2, 4], 0), row_seed(0, [1, 2, 3], 1), row_seed(0, [], 0)}
    assert a not in others and len(others) == 4
    assert 0 <= a < 2 ** 63


def test_order_scores():
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    logp = p.log()
    h = -(p * p.log().nan_to_num(0, neginf=0)).sum(-1)
    assert torch.allclose(order_scores(logp, "entropy"), -h, atol=1e-6)
    assert torch.allclose(entropy(logp), h, atol=1e-6)
    assert not torch.isnan(order_scores(logp, "entropy")).any()  # 0 * log 0 counts as 0
    assert torch.allclose(order_scores(logp, "confidence"), torch.tensor([0.7, 0.25]), atol=1e-6)
    assert torch.allclose(order_scores(logp, "margin"), torch.tensor([0.5, 0.0]), atol=1e-6)
    noise = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.equal(order_scores(logp, "random", noise), noise)
    assert set(ORDERS) == {"entropy", "confidence", "margin", "random"}


def test_nan_logits_are_an_error():
    with pytest.raises(AdjustError):
        log_probs(torch.tensor([[0.0, math.nan]]), SamplingConfig())


@pytest.mark.parametrize("kw", [dict(order="best"), dict(temperature=-0.1), dict(temperature=math.nan),
                                dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_config_validation(kw):
    with pytest.raises(AdjustError):
        SamplingConfig(**kw)
