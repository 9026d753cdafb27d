"""The classifier two-sample test (adjust.eval.two_sample): calibration under the null, power against
mode-seeking and over-dispersed sets on real base features, determinism, symmetry, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adjust.decode import generate_texts
from adjust.errors import AdjustError
from adjust.eval.two_sample import auc_null_sd, base_features, c2st, c2st_samples, roc_auc, roc_auc_var
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy

N, GEN = 60, 12


def _gaussians(n_a, n_b, shift=0.0, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d))
    a[:, 0] += shift
    return a, rng.normal(size=(n_b, d))


@pytest.fixture(scope="module")
def exact_sets(tiny_base):
    """Two independent exact sets (seeds 0 and 1) from the tiny base, token ids only."""
    sets = []
    for seed in (0, 1):
        samples, _ = generate_texts(tiny_base, [""], make_strategy("exact"), SamplingConfig(), gen_length=GEN,
                                    num_samples=N, batch_size=N, seed=seed)
        sets.append([s["token_ids"] for s in samples])
    return sets


def test_roc_auc_counts_ties_half():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([2, 1], [1, 0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_delong_variance_matches_its_definition():
    """Against the pairwise definition: V10_i = mean_j psi(x_i, y_j), V01_j = mean_i psi(x_i, y_j)."""
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, 9).astype(float), rng.integers(0, 6, 7).astype(float)  # with ties
    psi = (x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])
    auc, var = roc_auc_var(x, y)
    assert auc == pytest.approx(psi.mean())
    assert var == pytest.approx(psi.mean(1).var(ddof=1) / 9 + psi.mean(0).var(ddof=1) / 7)


def test_same_distribution_is_near_one_half():
    a, b = _gaussians(200, 200)
    out = c2st(a, b)
    assert abs(out["auc"] - 0.5) < 3 * out["auc_se"]
    assert out["auc_se"] == pytest.approx(out["auc_null_sd"], rel=0.25)  # the standard error is the null's spread
    assert out["n"] == 400 and out["n_a"] == out["n_b"] == 200 and len(out["fold_aucs"]) == out["folds"] == 5
    assert out["auc_null_sd"] == pytest.approx(auc_null_sd(200, 200))


def test_a_shift_is_detected_and_the_test_is_symmetric():
    a, b = _gaussians(150, 150, shift=1.0)
    ab, ba = c2st(a, b), c2st(b, a)
    assert ab["auc"] > 0.7 and ab["accuracy"] > 0.6  # Phi(1 / sqrt(2)) = 0.76 for the best linear rule
    assert ab["auc"] - 4 * ab["auc_se"] > 0.5
    assert abs(ab["auc"] - ba["auc"]) < 0.05


def test_deterministic_given_the_seed():
    a, b = _gaussians(80, 70, shift=0.3)
    assert c2st(a, b, seed=3) == c2st(a, b, seed=3)
    assert c2st(a, b, seed=3)["fold_aucs"] != c2st(a, b, seed=4)["fold_aucs"]


def test_base_features_shape_and_batching(tiny_base, exact_sets):
    one = base_features(tiny_base, exact_sets[0], batch_size=7)
    assert one.shape == (N, 2 * tiny_base.hidden_size) and one.dtype == np.float64
    np.testing.assert_allclose(base_features(tiny_base, exact_sets[0][:5], batch_size=50), one[:5], atol=1e-9)
    # the pooled statistics of one sample, by hand
    ids = torch.tensor([exact_sets[0][0]])
    h = tiny_base.hidden_states(ids)[0].double()
    np.testing.assert_allclose(one[0, :tiny_base.hidden_size], h.mean(0).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(one[0, tiny_base.hidden_size:], h.std(0, unbiased=False).detach().numpy(), atol=1e-6)
    # a prompt is read but not pooled; generations dicts are accepted
    prompted = base_features(tiny_base, [{"token_ids": exact_sets[0][0]}], prompt_ids=[5, 6, 7])
    h = tiny_base.hidden_states(torch.tensor([[5, 6, 7] + exact_sets[0][0]]))[0, 3:].double()
    np.testing.assert_allclose(prompted[0, :tiny_base.hidden_size], h.mean(0).detach().numpy(), atol=1e-6)


def test_two_exact_sets_are_indistinguishable(tiny_base, exact_sets):
    out = c2st_samples(tiny_base, exact_sets[1], exact_sets[0])
    assert abs(out["auc"] - 0.5) < 3 * out["auc_se"]


def test_mode_seeking_and_over_dispersed_sets_are_both_detected(tiny_base, exact_sets):
    """Two-sided: a low-temperature set (more likely than exact under the base) and a uniformly random set
    (less likely) are both told apart from exact."""
    cold, _ = generate_texts(tiny_base, [""], make_strategy("exact"), SamplingConfig(temperature=0.3), gen_length=GEN,
                             num_samples=N, batch_size=N, seed=1)
    allowed = [i for i in range(tiny_base.vocab_size) if i not in tiny_base.banned_ids]
    rng = np.random.default_rng(0)
    noisy = [[int(t) for t in rng.choice(allowed, GEN)] for _ in range(N)]
    for other in (cold, noisy):
        out = c2st_samples(tiny_base, other, exact_sets[0])
        assert out["auc"] > 0.8 and out["auc"] - 3 * out["auc_se"] > 0.5


def test_a_deliberately_repeated_token_is_detected(tiny_base, exact_sets):
    repeated = [ids[: GEN // 2] + [ids[0]] * (GEN - GEN // 2) for ids in exact_sets[1]]
    out = c2st_samples(tiny_base, repeated, exact_sets[0])
    assert out["auc"] > 0.8


def test_bad_input(tiny_base, exact_sets):
    a, b = _gaussians(20, 20)
    with pytest.raises(AdjustError, match="empty"):
        c2st(np.zeros((0, 8)), b)
    with pytest.raises(AdjustError, match="differ in dimension"):
        c2st(a, b[:, :5])
    with pytest.raises(AdjustError, match="samples, features"):
        c2st(a[:, 0], b)
    with pytest.raises(AdjustError, match="non-finite"):
        c2st(np.where(a > 2, np.nan, a), b)
    with pytest.raises(AdjustError, match="at least 30 samples per set"):
        c2st(a, b, folds=30)
    with pytest.raises(AdjustError, match="folds must be"):
        c2st(a, b, folds=1)
    with pytest.raises(AdjustError, match="empty"):
        base_features(tiny_base, [])
    with pytest.raises(AdjustError, match="no generated tokens"):
        base_features(tiny_base, [[]])
    with pytest.raises(AdjustError, match="context"):
        base_features(tiny_base, [[5] * (tiny_base.max_length + 1)])
    with pytest.raises(AdjustError, match="vocabulary"):
        base_features(tiny_base, [[5, tiny_base.vocab_size]])
    with pytest.raises(AdjustError, match="2 prompts for 1 samples"):
        base_features(tiny_base, [[5, 6]], prompt_ids=[[1], [2]])
    with pytest.raises(AdjustError, match="empty"):
        c2st_samples(tiny_base, exact_sets[0], [])
