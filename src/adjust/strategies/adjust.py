"""ADJUST: one full pass, then up to K-1 unrolls of the trained joint sampler (docs/method.md section 3)."""

from __future__ import annotations

import torch

from . import Strategy, register


@register("adjust")
class Adjust(Strategy):
    """K tokens per full pass, each conditioned on the ones written before it in the step.

    Rule: pick the best-scored masked position (order rule) from the current
    distributions, sample it, write it; then one sampler unroll on the updated canvas gives
    new distributions for the next pick. An unroll whose output would not be used (the
    last token of a step, or no mask left in the block) is never run. With K = 1 this is
    exactly `exact`.
    """

    uses_sampler = True

    def __init__(self, tokens_per_pass: int = 4):
        super().__init__(tokens_per_pass)

    def step(self, ctx) -> None:
        one = torch.ones(ctx.x.shape[0], dtype=torch.long, device=ctx.x.device)
        prior, hidden = ctx.hidden, None
        for j in range(self.k):
            rows, cols, logp = ctx.distributions(hidden)
            if len(rows) == 0:
                return
            ctx.commit(ctx.choose(ctx.scores(logp, rows), rows, one), rows, cols, logp)
            if j + 1 < self.k and ctx.remaining().any():
                hidden = prior = ctx.unroll_sampler(prior)
