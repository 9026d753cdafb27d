"""Adaptive strategies: how many tokens a full pass unmasks depends on the model's confidence.

Peers (docs/method.md section 8) use only the full pass; `adjust-threshold` and `threshold-adjust`
add the sampler (docs/method.md section 9). Confidence = the largest probability of a position's
distribution after temperature / top-k / top-p; every rule unmasks at least one token per full pass.
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


def confidence(logp: torch.Tensor) -> torch.Tensor:
    """(N, V) filtered log-probs -> (N,) confidence: the largest probability of each distribution."""
    return logp.max(-1).values.exp()


class _Adaptive(Strategy):
    adaptive = True
    uses_order = False  # each rule ranks positions by its own score (confidence, entropy), not by --order

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


def _number(name: str, value) -> float:
    """`value` if it is a number (a spec's value that is not one arrives as text), else AdjustError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdjustError(f"--{name} must be a number, got {value!r}")
    return value


def _check_unit(name: str, value: float) -> float:
    if not 0 < _number(name, value) <= 1:
        raise AdjustError(f"--{name} must be in (0, 1], got {value}")
    return value


@register("threshold")
class Threshold(_Adaptive):
    """Fast-dLLM threshold: unmask every masked position whose confidence >= tau (at least the best one)."""

    def __init__(self, tau: float = 0.9):
        super().__init__()
        self.tau = _check_unit("tau", tau)

    def counts(self, logp, rows, B):
        return torch.bincount(rows, weights=(confidence(logp) >= self.tau).double(), minlength=B).long()

    def describe(self):
        return f"threshold(tau={self.tau})"


@register("factor")
class Factor(_Adaptive):
    """Fast-dLLM factor rule: sort confidences c_1 >= c_2 >= ...; accept the first n while
    c_n >= 1 - f / (n + 1) holds for every n' <= n (at least one)."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        if not _number("factor", factor) > 0:
            raise AdjustError(f"--factor must be positive, got {factor}")
        self.f = factor

    def counts(self, logp, rows, B):
        table, valid = _per_row_sorted(confidence(logp), rows, B, descending=True)
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
        if not _number("gamma", gamma) >= 0:
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
                confident = confidence(logp[chosen]) >= self.tau
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


@register("threshold-adjust")
class ThresholdAdjust(Strategy):
    """Threshold first, then ADJUST: the confident positions come free from the full pass, one sampler draw goes
    to an uncertain position away from them, and further draws only where the sampler is confident (docs/method.md
    section 9).

    Rule, per sequence, in each step:
    1. from the full pass, commit every masked position of the block whose confidence (largest
       probability after temperature / top-k / top-p, as `threshold` measures it) is >= tau, each
       drawn from its own marginal; no unroll is spent on them;
    2. if no position is that confident, commit instead the one best position by the order rule
       (so every full pass writes at least one token, as `adjust`'s first pick);
    3. if masks remain in the block farther than `spacing` positions from every token written in this step (and
       K >= 2): one sampler unroll on the canvas as it is now (every token written in this step included), and
       commit the best-scored (order rule) of those positions, drawn from the sampler's distribution, however
       unsure: the draw `threshold` cannot make without another full pass;
    4. then, while such masks remain and fewer than K - 1 unrolls have run: one more unroll, and commit its best
       such position only if the sampler's confidence there is >= tau; the first one below tau ends the
       sequence's step (as `adjust-threshold`).
    Why the spacing (default 2): a sampler of one or two layers conditions poorly on a token written in the same
    step right next to the position it draws (the task model's `either`: a group's second word written confidently,
    the sampler's draw beside it takes the other group's first word, below `threshold`'s validity without the
    spacing; docs/results.md "Verifiable tasks"); neighbours are also where text depends most.
    Why step 4 is gated: a second unsure draw in one step must condition on the first, and where the sampler
    has not learned that dependency (the task model's `pick`: copy the word just written) ungated draws fall to
    `adjust`'s validity, while a confident one is what the full pass would have made free next. K = 1 is
    `threshold` except for the fallback pick of step 2 (order rule here, the most confident position there: the
    same with --order confidence); with tau = 1.0 and spacing 0 on a model whose probabilities never reach 1 it is
    `adjust` with K = min(K, 2). A batch's rows are independent: an unroll runs while any row is still drawing, and
    a row that is not takes nothing from it.
    """

    uses_sampler = True
    adaptive = True

    def __init__(self, tau: float = 0.9, tokens_per_pass: int = 2, spacing: int = 2):
        super().__init__(tokens_per_pass)
        self.tau = _check_unit("tau", tau)
        if isinstance(spacing, bool) or not isinstance(spacing, int) or spacing < 0:
            raise AdjustError(f"--spacing must be an integer >= 0, got {spacing!r}")
        self.spacing = spacing

    def _mark(self, near: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Mark every position within `spacing` of a written (rows, cols) in `near`, the (B, L + 2 spacing) table
        whose columns spacing .. spacing + L - 1 are the canvas's (a margin each side: no index falls outside)."""
        for offset in range(2 * self.spacing + 1):
            near[rows, cols + offset] = True

    def step(self, ctx) -> None:
        B = ctx.x.shape[0]
        rows, cols, logp = ctx.distributions()
        confident = confidence(logp) >= self.tau
        unsure = torch.bincount(rows[confident], minlength=B) == 0  # rows with no confident position
        fallback = ctx.choose(ctx.scores(logp, rows), rows, unsure.long())
        written = torch.cat([confident.nonzero(as_tuple=True)[0], fallback])
        ctx.commit(written, rows, cols, logp)
        L, s = ctx.x.shape[1], self.spacing
        margin = torch.zeros((B, L + 2 * s), dtype=torch.bool, device=ctx.x.device)
        near = margin[:, s:s + L]  # (B, L) view: within `spacing` of a token written in this step
        self._mark(margin, rows[written], cols[written])
        drawing = torch.ones(B, dtype=torch.bool, device=ctx.x.device)
        hidden = ctx.hidden
        for j in range(1, self.k):
            left, at = ctx.unroll_candidates()
            drawing &= torch.bincount(left, weights=(~near[left, at]).float(), minlength=B) > 0  # one it may draw
            if not drawing.any():
                return
            hidden = ctx.unroll_sampler(hidden, eligible=~near)
            rows, cols, logp = ctx.distributions(hidden)
            scores = ctx.scores(logp, rows).masked_fill(near[rows, cols], float("-inf"))
            chosen = ctx.choose(scores, rows, drawing.long())
            if j > 1:  # step 4: only a confident draw
                sure = confidence(logp[chosen]) >= self.tau
                drawing[rows[chosen[~sure]]] = False
                chosen = chosen[sure]
            if len(chosen):
                ctx.commit(chosen, rows, cols, logp)
                self._mark(margin, rows[chosen], cols[chosen])

    def describe(self):
        return f"threshold-adjust(tau={self.tau},K={self.k},spacing={self.spacing})"
