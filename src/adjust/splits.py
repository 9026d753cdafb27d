"""The held-out split of exact rollouts, written once.

`adjust distill` trains the sampler on the rollouts before the split and reports its held-out
KL on the ones after it; `adjust eval joint-kl` (and `eval quality --rollouts`) draw their
states from the same held-out tail, so no figure is measured on a trajectory the sampler was
trained on. Rollouts are i.i.d. draws (their order carries no meaning), so the tail is as good
a sample as any.

Other splits are other facts, each owned by its own module: the verifiable tasks hold out item
sets by a hash (`adjust.eval.tasks.split_of`), and `adjust train-base` validates on the tail of
its corpus (`adjust.train_base`).
"""

from __future__ import annotations

HELD_OUT_FRACTION = 0.05  # of the rollouts, the last ones


def held_out_split(n: int, fraction: float = HELD_OUT_FRACTION) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of `n` rollouts: the last round(n * fraction) are held
    out, at least one when n > 1 (none of one rollout). 1024 rollouts: 973 + 51; 7200: 6840 + 360."""
    n_val = max(1, int(round(n * fraction))) if n > 1 else 0
    return list(range(n - n_val)), list(range(n - n_val, n))
