"""ADJUST: one full pass, then up to K-1 unrolls of the trained joint sampler (docs/method.md section 3)."""

from __future__ import annotations

import torch

from ..errors import AdjustError
from . import Strategy, register


@register("adjust")
class Adjust(Strategy):
    """K tokens per full pass, each conditioned on the ones written before it in the step.

    Rule: pick the best-scored masked position (order rule) from the current
    distributions, sample it, write it; then one sampler unroll on the updated canvas gives
    new distributions for the next pick. An unroll whose output would not be used (the
    last token of a step, or no mask left in the block) is never run. With K = 1 this is
    exactly `exact`.

    `group` G (default 1; ours, docs/method.md section 9): each draw writes the G best-scored
    positions at once, each from its own distribution, so a step is ceil(K / G) draws (the last
    one K - G * (draws - 1) tokens) and ceil(K / G) - 1 unrolls. G = 1 is the rule above; G = K is
    `parallel` with the same K, token for token (no unroll runs).
    """

    uses_sampler = True

    def __init__(self, tokens_per_pass: int = 4, group: int = 1):
        super().__init__(tokens_per_pass)
        if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= self.k:
            raise AdjustError(f"--group must be an integer from 1 to K ({self.k}), got {group!r}")
        self.group = group

    def describe(self) -> str:
        return super().describe() if self.group == 1 else f"{self.name}(K={self.k},group={self.group})"

    def step(self, ctx) -> None:
        prior, hidden, left = ctx.hidden, None, self.k
        while left > 0:
            rows, cols, logp = ctx.distributions(hidden)
            if len(rows) == 0:
                return
            take = min(self.group, left)
            counts = torch.full((ctx.x.shape[0],), take, dtype=torch.long, device=ctx.x.device)
            ctx.commit(ctx.choose(ctx.scores(logp, rows), rows, counts), rows, cols, logp)
            left -= take
            if left > 0 and ctx.remaining().any():
                hidden = prior = ctx.unroll_sampler(prior)
