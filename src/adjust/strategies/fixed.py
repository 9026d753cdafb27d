"""Fixed-K strategies that use only the full pass: `exact` (K = 1) and `parallel` (K marginals)."""

from __future__ import annotations

import torch

from ..errors import AdjustError
from . import Strategy, register


@register("parallel")
class Parallel(Strategy):
    """K tokens per full pass, each drawn independently from its own marginal (docs/method.md section 3).

    Rule: the K best-scored masked positions of the block (order rule, default lowest
    entropy), at most the number of masks left. Needs ceil(N / K) full passes for N tokens.
    """

    def __init__(self, tokens_per_pass: int = 4):
        super().__init__(tokens_per_pass)

    def step(self, ctx) -> None:
        rows, cols, logp = ctx.distributions()
        counts = torch.full((ctx.x.shape[0],), self.k, device=rows.device)
        ctx.commit(ctx.choose(ctx.scores(logp, rows), rows, counts), rows, cols, logp)


@register("exact")
class Exact(Parallel):
    """One token per full pass: the reference joint sampler (docs/method.md section 2)."""

    def __init__(self, tokens_per_pass: int = 1):
        super().__init__(tokens_per_pass)  # refuses K < 1
        if self.k != 1:
            raise AdjustError("strategy 'exact' unmasks one token per full pass; use 'parallel' or 'adjust' "
                              "for --tokens-per-pass > 1")
