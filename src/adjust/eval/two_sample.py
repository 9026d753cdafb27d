"""A two-sided distributional test of generated text against exact samples: a classifier two-sample test.

Why: NLL under the base alone rewards mode-seeking (a set of the base's most likely texts
scores better than exact sampling itself), and MAUVE on MiniLM sentence features cannot tell
our small models' sets apart. A classifier two-sample test (C2ST) asks instead whether a
classifier can tell a strategy's samples from exact samples at all: a set that is too
repetitive and a set that is too noisy are both told apart from exact, so it is two-sided.

    base_features(base, token_ids)        (n, 2H) features of each sample from the frozen base
    c2st(features_a, features_b)          held-out AUC of a logistic regression telling a from b
    c2st_samples(base, samples_a, samples_b)   both steps for two lists of generations

Features: the base reads each sample's whole canvas (prompt + generation, no masks) in one
full pass; its final hidden states at the generation positions are pooled into their mean and
their standard deviation over those positions (2H numbers per sample; every generated
position counts, EOS padding included, as the sample was written).

Classifier: an L2-regularised logistic regression (float64, Newton's method in torch; features
standardised on the training folds) in stratified k-fold cross-validation; the penalty is
chosen per outer fold from L2_GRID by an inner cross-validation on the training part only, so
the held-out folds never inform it. Reported: the held-out ROC AUC averaged over the folds
(0.5: the classifier cannot tell the sets apart; 1.0: it always can; either direction of
mismatch raises it), its standard error (DeLong's variance of each fold's AUC over its
held-out samples, averaged over the disjoint folds and divided by their number: the noise of
the finite sample sets, not of the classifier's training), held-out accuracy, and
`auc_null_sd`, the standard deviation of a fixed scorer's AUC on sets of these sizes drawn
from one distribution (Mann-Whitney: sqrt((n_a + n_b + 1) / (12 n_a n_b))), the scale of the
noise. The noise floor that matters is measured: two independent exact sets (different
seeds) through the same test.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AdjustError

# L2 penalties (on standardised features, per sample of the mean loss) the inner cross-validation picks from.
L2_GRID = (1.0, 0.1, 0.01, 0.001)
FEATURES = "mean and standard deviation over the generation positions of the base's final hidden states"


# --------------------------------------------------------------------------------------------
# Features from the base
# --------------------------------------------------------------------------------------------

def _token_ids(samples) -> list[list[int]]:
    """Token-id lists from lists of ids or from generations ({"token_ids": ...}, as generate_texts returns)."""
    out = []
    for s in samples:
        ids = s["token_ids"] if isinstance(s, dict) else s
        out.append([int(i) for i in ids])
    return out


@torch.no_grad()
def base_features(base, token_ids, prompt_ids=None, batch_size: int = 50) -> np.ndarray:
    """(n, 2 * hidden_size) float64 features of n generations: see the module docstring.

    token_ids: the generated ids of each sample (lists of ints, or generations with "token_ids").
    prompt_ids: the prompt before every generation (one list of ids for all, or one list per sample);
    None = unconditional (no prompt). Samples are batched by canvas length, without padding.
    """
    from ..batching import group_by_length

    gens = _token_ids(token_ids)
    if not gens:
        raise AdjustError("two-sample test: the sample set is empty")
    if batch_size < 1:
        raise AdjustError(f"--batch-size must be at least 1, got {batch_size}")
    if prompt_ids is None or all(isinstance(i, (int, np.integer)) for i in prompt_ids):
        prompts = [[int(i) for i in (prompt_ids or [])]] * len(gens)
    else:
        prompts = [[int(i) for i in p] for p in prompt_ids]
        if len(prompts) != len(gens):
            raise AdjustError(f"two-sample test: {len(prompts)} prompts for {len(gens)} samples")
    for n, (p, g) in enumerate(zip(prompts, gens)):
        if not g:
            raise AdjustError(f"two-sample test: sample {n} has no generated tokens")
        if len(p) + len(g) > base.max_length:
            raise AdjustError(f"two-sample test: sample {n} is {len(p) + len(g)} tokens with its prompt, more than "
                              f"the base's context of {base.max_length}")
        if min(p + g) < 0 or max(p + g) >= base.vocab_size:
            raise AdjustError(f"two-sample test: sample {n} has a token id outside the base's vocabulary "
                              f"(0..{base.vocab_size - 1})")
    out = np.empty((len(gens), 2 * base.hidden_size), dtype=np.float64)
    for group in group_by_length(range(len(gens)), lambda i: len(prompts[i]) + len(gens[i])):
        for lo in range(0, len(group), batch_size):
            chunk = group[lo:lo + batch_size]
            x = torch.tensor([prompts[i] + gens[i] for i in chunk], dtype=torch.long, device=base.device)
            h = base.hidden_states(x).double()
            for b, i in enumerate(chunk):
                g = h[b, len(prompts[i]):]  # the generation positions
                out[i, : base.hidden_size] = g.mean(0).cpu().numpy()
                out[i, base.hidden_size:] = g.std(0, unbiased=False).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Classifier two-sample test
# --------------------------------------------------------------------------------------------

def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def roc_auc_var(scores_pos, scores_neg) -> tuple[float, float]:
    """(AUC, DeLong's variance of it). AUC = P(a positive scores above a negative), ties counted half (the
    Mann-Whitney statistic); the variance is over draws of the scored samples, for a fixed scorer."""
    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    m, n = len(pos), len(neg)
    both = _ranks(np.concatenate([pos, neg]))
    v10 = (both[:m] - _ranks(pos)) / n  # per positive: the share of negatives it beats
    v01 = 1 - (both[m:] - _ranks(neg)) / m  # per negative: the share of positives that beat it
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    return float(v10.mean()), float(var)


def roc_auc(scores_pos, scores_neg) -> float:
    """P(a positive scores above a negative), ties counted half."""
    return roc_auc_var(scores_pos, scores_neg)[0]


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, w: torch.Tensor | None = None,
                  max_iter: int = 100) -> torch.Tensor:
    """Weights (d + 1,) (the last one the unpenalised intercept) minimising mean BCE + l2 / 2 * |w|^2.

    Newton's method with a backtracking line search (the objective is strictly convex for l2 > 0),
    started from `w` (a warm start) or zero; stops when the largest gradient entry is below 1e-8.
    """
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    pen = torch.full((d + 1,), float(l2), dtype=x.dtype)
    pen[-1] = 0.0
    ridge = torch.diag(pen + 1e-10)  # + a hair, so the intercept's curvature never vanishes on separable data
    w = torch.zeros(d + 1, dtype=x.dtype) if w is None else w.clone()

    def objective(v):
        return float(F.binary_cross_entropy_with_logits(xa @ v, y) + 0.5 * (pen * v * v).sum())

    current = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(xa @ w)
        grad = xa.T @ (p - y) / n + pen * w
        if float(grad.abs().max()) < 1e-8:
            break
        hess = (xa.T * (p * (1 - p))) @ xa / n + ridge
        step = torch.linalg.solve(hess, grad)
        t, decrease = 1.0, float(grad @ step)
        while True:
            trial = objective(w - t * step)
            if trial <= current - 1e-4 * t * decrease or t < 1e-10:
                break
            t /= 2
        w, current = w - t * step, trial
    return w


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12 * (1 + np.abs(mean)), sd, 1.0)  # constant features stay constant (0)
    return [torch.from_numpy((a - mean) / sd) for a in (train, *others)]


def _folds(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index of each of n items: a random permutation dealt round-robin into k folds."""
    out = np.empty(n, dtype=np.int64)
    out[rng.permutation(n)] = np.arange(n) % k
    return out


def _scores(xa_tr, xb_tr, tests, l2s) -> list[list[np.ndarray]]:
    """Fit on (a = 1, b = 0) training features at each penalty of `l2s` (each fit warm-started from the
    previous one); per penalty, the logits of each test array."""
    train = np.concatenate([xa_tr, xb_tr])
    x, *t = _standardise(train, *tests)
    y = torch.cat([torch.ones(len(xa_tr)), torch.zeros(len(xb_tr))]).double()
    out, w = [], None
    for l2 in l2s:
        w = _fit_logistic(x, y, l2, w)
        out.append([(ti @ w[:-1] + w[-1]).numpy() for ti in t])
    return out


def _choose_l2(xa: np.ndarray, xb: np.ndarray, inner_folds: int, rng: np.random.Generator) -> float:
    """The penalty of L2_GRID with the best mean inner held-out AUC (ties: the stronger penalty)."""
    k = min(inner_folds, len(xa), len(xb))
    if k < 2:
        return L2_GRID[0]
    fa, fb = _folds(len(xa), k, rng), _folds(len(xb), k, rng)
    aucs = np.zeros(len(L2_GRID))
    for f in range(k):
        per_l2 = _scores(xa[fa != f], xb[fb != f], [xa[fa == f], xb[fb == f]], L2_GRID)
        aucs += [roc_auc(sa, sb) for sa, sb in per_l2]
    return L2_GRID[int(np.argmax(aucs))]  # the first (strongest) of equals


def auc_null_sd(n_a: int, n_b: int) -> float:
    """Standard deviation of a fixed scorer's AUC on n_a vs n_b samples of one distribution."""
    return math.sqrt((n_a + n_b + 1) / (12 * n_a * n_b))


def c2st(features_a, features_b, folds: int = 5, seed: int = 0, inner_folds: int = 3) -> dict:
    """Classifier two-sample test of two feature sets (n_a, d) and (n_b, d): see the module docstring.

    Returns {"auc", "auc_se", "accuracy", "n", "n_a", "n_b", "folds", "fold_aucs", "l2", "auc_null_sd"}.
    "auc" is the probability that the held-out classifier scores an `a` sample above a `b` sample.
    Deterministic for a given seed (the fold split and the inner splits come from it).
    """
    xa = np.asarray(features_a, dtype=np.float64)
    xb = np.asarray(features_b, dtype=np.float64)
    for name, x in (("first", xa), ("second", xb)):
        if x.ndim != 2:
            raise AdjustError(f"two-sample test: the {name} feature set must be a (samples, features) array, "
                              f"got shape {x.shape}")
        if x.shape[0] == 0:
            raise AdjustError(f"two-sample test: the {name} sample set is empty")
        if not np.isfinite(x).all():
            raise AdjustError(f"two-sample test: the {name} feature set has non-finite values")
    if xa.shape[1] != xb.shape[1]:
        raise AdjustError(f"two-sample test: the feature sets differ in dimension ({xa.shape[1]} vs {xb.shape[1]})")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise AdjustError(f"two-sample test: folds must be an integer of at least 2, got {folds!r}")
    if min(len(xa), len(xb)) < folds:
        raise AdjustError(f"two-sample test: {folds} folds need at least {folds} samples per set, got "
                          f"{len(xa)} and {len(xb)}")
    rng = np.random.default_rng(seed)
    fa, fb = _folds(len(xa), folds, rng), _folds(len(xb), folds, rng)
    aucs, variances, correct, l2s = [], [], 0, []
    for f in range(folds):
        tra, trb = xa[fa != f], xb[fb != f]
        l2 = _choose_l2(tra, trb, inner_folds, rng)
        [(sa, sb)] = _scores(tra, trb, [xa[fa == f], xb[fb == f]], [l2])
        auc, var = roc_auc_var(sa, sb)
        aucs.append(auc)
        variances.append(var)
        correct += int((sa > 0).sum() + (sb <= 0).sum())
        l2s.append(l2)
    # the folds' test sets are disjoint: the variance of the mean AUC is the mean fold variance / folds
    return {"auc": float(np.mean(aucs)), "auc_se": math.sqrt(float(np.mean(variances)) / folds),
            "accuracy": correct / (len(xa) + len(xb)), "n": len(xa) + len(xb), "n_a": len(xa), "n_b": len(xb),
            "folds": folds, "fold_aucs": [float(a) for a in aucs], "l2": l2s,
            "auc_null_sd": auc_null_sd(len(xa), len(xb))}


def c2st_samples(base, samples_a, samples_b, prompts_a=None, prompts_b=None, folds: int = 5, seed: int = 0,
                 batch_size: int = 50) -> dict:
    """c2st of two lists of generations (token-id lists or {"token_ids": ...}) on `base_features`.

    prompts_a / prompts_b: each set's prompt ids as `base_features` takes them; prompts_b defaults to prompts_a.
    """
    prompts_b = prompts_a if prompts_b is None else prompts_b
    return c2st(base_features(base, samples_a, prompts_a, batch_size),
                base_features(base, samples_b, prompts_b, batch_size), folds=folds, seed=seed)
