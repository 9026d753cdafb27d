"""Adaptive strategies: how many tokens a full pass unmasks depends on the model's confidence.

Peers (docs/method.md section 8) use only the full pass; `adjust-threshold` adds the sampler
(docs/method.md section 9). Confidence = the largest probability of a position's distribution
after temperature / top-k / top-p; every rule unmasks at least one token per full pass.
"""

from __future__ import annotations

import torch

from ..batching import per_row_table
from ..errors import AdjustError
from ..sampling import entropy
from . import Strategy, register


def _per_row_sorted(values: torch.Tensor, rows: torch.Tensor, B: int, descending: bool):
    """values (N,) of row-major entries -> (B, M) table sorted per row (padding at the end) and its mask."""
    table, _, counts = per_row_table(values, rows, B, float("-inf") if descending else float("inf"))
    table = table.sort(dim=1, descending=descending, stable=True).values
    valid = torch.arange(table.shape[1], device=rows.device)[None] < counts[:, None]
    return table, valid


class _Adaptive(Strategy):
    adaptive = True

    def __init__(self):
        super().__init__(1)

    def counts(self, logp: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
        raise NotImplementedError

    def score(self, ctx, logp, rows):
        return logp.max(-1).values  # confidence

    def step(self, ctx) -> None:
        rows, cols, logp = ctx.distributions()
        n = self.counts(logp, rows, ctx.x.shape[0]).clamp(min=1)
        ctx.commit(ctx.choose(self.score(ctx, logp, rows), rows, n), rows, cols, logp)


def _check_unit(name: str, value: float, low_open: bool = True) -> float:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise AdjustError(f"--{name} must be in (0, 1], got {value}")
    return value


@register("threshold")
class Threshold(_Adaptive):
    """Fast-dLLM threshold: unmask every masked position whose confidence >= tau (at least the best one)."""

    def __init__(self, tau: float = 0.9):
        super().__init__()
        self.tau = _check_unit("tau", tau)

    def counts(self, logp, rows, B):
        conf = logp.max(-1).values.exp()
        return torch.bincount(rows, weights=(conf >= self.tau).double(), minlength=B).long()

    def describe(self):
        return f"threshold(tau={self.tau})"


@register("factor")
class Factor(_Adaptive):
    """Fast-dLLM factor rule: sort confidences c_1 >= c_2 >= ...; accept the first n while
    c_n >= 1 - f / (n + 1) holds for every n' <= n (at least one)."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        if not factor > 0:
            raise AdjustError(f"--factor must be positive, got {factor}")
        self.f = factor

    def counts(self, logp, rows, B):
        conf = logp.max(-1).values.exp()
        table, valid = _per_row_sorted(conf, rows, B, descending=True)
        n = torch.arange(1, table.shape[1] + 1, device=table.device, dtype=torch.float64)
        ok = (table >= 1 - self.f / (n + 1)) & valid
        return ok.long().cumprod(dim=1).sum(1)  # length of the accepted prefix

    def describe(self):
        return f"factor(f={self.f})"


@register("entropy-bound")
class EntropyBound(_Adaptive):
    """EB-sampler: sort masked positions by entropy H_1 <= H_2 <= ...; accept the largest k with
    sum_{i<=k} H_i - max_{i<=k} H_i <= gamma (a bound on the accepted tokens' mutual information)."""

    def __init__(self, gamma: float = 0.1):
        super().__init__()
        if not gamma >= 0:
            raise AdjustError(f"--gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def score(self, ctx, logp, rows):
        return -entropy(logp)

    def counts(self, logp, rows, B):
        table, valid = _per_row_sorted(entropy(logp), rows, B, descending=False)
        table = table.masked_fill(~valid, 0.0)
        excess = table.cumsum(1) - table  # sorted ascending, so max_{i<=k} H_i = H_k
        return ((excess <= self.gamma) & valid).sum(1)

    def describe(self):
        return f"entropy-bound(gamma={self.gamma})"


@register("adjust-threshold")
class AdjustThreshold(Strategy):
    """Adaptive ADJUST: after the first token of a full pass, keep unrolling the sampler while the
    next chosen position's confidence under the sampler is >= tau; at most `max_tokens_per_pass`."""

    uses_sampler = True
    adaptive = True

    def __init__(self, tau: float = 0.9, max_tokens_per_pass: int = 8):
        if not isinstance(max_tokens_per_pass, int) or max_tokens_per_pass < 1:
            raise AdjustError(f"--max-tokens-per-pass must be at least 1, got {max_tokens_per_pass}")
        super().__init__(max_tokens_per_pass)
        self.tau = _check_unit("tau", tau)

    def step(self, ctx) -> None:
        B = ctx.x.shape[0]
        active = torch.ones(B, dtype=torch.bool, device=ctx.x.device)
        prior, hidden = ctx.hidden, None
        for j in range(self.k):
            rows, cols, logp = ctx.distributions(hidden)
            if len(rows) == 0:
                return
            chosen = ctx.choose(ctx.scores(logp, rows), rows, active.long())
            if j > 0:  # the first token of a pass is always taken
                confident = logp[chosen].max(-1).values.exp() >= self.tau
                active[rows[chosen[~confident]]] = False
                chosen = chosen[confident]
            if len(chosen) == 0:
                return
            ctx.commit(chosen, rows, cols, logp)
            active &= ctx.remaining() > 0
            if j + 1 < self.k and active.any():
                hidden = prior = ctx.unroll_sampler(prior)

    def describe(self):
        return f"adjust-threshold(tau={self.tau},max={self.k})"
