"""`adjust eval joint-kl`: how far K tokens from one full pass are from the true K-token joint.

From a held-out state x^t of an exact rollout, the true joint of the next K tokens is K
sequential base passes: at step j the order rule picks position i_j from the base's
distributions given x with y_<j written, and y_j ~ p_base(. | x, y_<j). Along that path,

    log p(y)        = sum_j log p_base(y_j at i_j | x, y_<j)          (the truth)
    log q_par(y)    = sum_j log p_base(y_j at i_j | x)                (product of marginals)
    log q_adjust(y) = sum_j log q_sampler(y_j at i_j | x, y_<j)        (chained sampler unrolls)

and KL(p || q) = E_{y ~ p}[log p(y) - log q(y)], estimated by Monte-Carlo over states and
draws, with its standard error. Positions follow the true path for all three, so the KL is
over the tokens written at those positions. Distributions are untempered (T = 1).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..batching import group_by_length
from ..distill.rollouts import Rollouts
from ..errors import AdjustError
from ..sampling import order_scores
from ..splits import held_out_split


@torch.no_grad()
def joint_kl(base, sampler, rollouts: Rollouts, k: int, num_states: int = 64, draws: int = 4,
             order: str = "entropy", seed: int = 0, batch_size: int = 16, states: list | None = None,
             progress: bool = False) -> dict:
    """Per-step KL of parallel and ADJUST against the true K-token joint (nats per K-token step)."""
    if k < 1:
        raise AdjustError(f"--tokens-per-pass must be at least 1, got {k}")
    G = rollouts.gen_length
    if k > G:
        raise AdjustError(f"--tokens-per-pass {k} is larger than the rollouts' generation length {G}")
    if order == "random":
        raise AdjustError("joint-kl needs a deterministic order rule (entropy, confidence or margin)")
    g = torch.Generator().manual_seed(seed)
    if states is None:
        pool = held_out_split(len(rollouts))[1]  # the rollouts distill held out
        ns = [pool[i] for i in torch.randint(len(pool), (num_states,), generator=g).tolist()]
        ts = torch.randint(0, G - k + 1, (num_states,), generator=g).tolist()
        states = list(zip(ns, ts))
    jobs = [(n, t) for n, t in states for _ in range(draws)]
    gaps = {"parallel": [], "adjust": []}
    device = base.device
    bar = tqdm(total=len(jobs), desc=f"joint-kl K={k}", disable=not progress, leave=False)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        for items in group_by_length(chunk, lambda job: len(rollouts.prompts[job[0]])):
            x = rollouts.states([n for n, _ in items], [t for _, t in items], base.mask_id).to(device)
            lp, lpar, ladj = _one_batch(base, sampler, x, k, order, g)
            gaps["parallel"] += (lp - lpar).tolist()
            if ladj is not None:
                gaps["adjust"] += (lp - ladj).tolist()
        bar.update(len(chunk))
    bar.close()
    out = {"tokens_per_pass": k, "num_states": len(states), "draws_per_state": draws}
    for name, vals in gaps.items():
        if vals:
            v = torch.tensor(vals, dtype=torch.float64)
            out[f"kl_{name}"] = v.mean().item()
            out[f"kl_{name}_stderr"] = (v.std(unbiased=True) / math.sqrt(len(v))).item() if len(v) > 1 else 0.0
    return out


def _gather(logp_full: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return logp_full[torch.arange(len(pos)), pos, tok]


def _one_batch(base, sampler, x: torch.Tensor, k: int, order: str, g: torch.Generator):
    B = x.shape[0]
    rows = torch.arange(B, device=x.device)
    h0 = base.hidden_states(x)
    logp0 = torch.log_softmax(base.logits(h0), -1)  # (B, L, V), the one full pass
    lp = torch.zeros(B, dtype=torch.float64)
    lpar, ladj = lp.clone(), lp.clone()
    prior, q = h0, logp0
    cur, logp_true = x.clone(), logp0
    for j in range(k):
        masked = cur == base.mask_id
        scores = order_scores(logp_true.reshape(-1, logp_true.shape[-1]), order).view(B, -1).double()
        pos = scores.masked_fill(~masked, float("-inf")).argmax(-1)  # (B,)
        here = logp_true[rows, pos].double()  # (B, V)
        gumbel = -torch.log(-torch.log(torch.rand(here.shape, generator=g, dtype=torch.float64)
                                       .clamp(1e-300, 1 - 1e-16))).to(here.device)
        tok = (here + gumbel).argmax(-1)
        lp += here[rows, tok].cpu()
        lpar += _gather(logp0, pos, tok).double().cpu()
        if sampler is not None:
            ladj += _gather(q, pos, tok).double().cpu()
        cur[rows, pos] = tok
        if j + 1 < k:
            logp_true = torch.log_softmax(base.logits(base.hidden_states(cur)), -1)
            if sampler is not None:
                prior = sampler(base, cur, prior)
                q = torch.log_softmax(base.logits(prior), -1)
    return lp, lpar, (ladj if sampler is not None else None)
