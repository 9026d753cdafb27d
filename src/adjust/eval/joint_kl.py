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

With `block_length` (semi-autoregressive decoding), every pick of a step is restricted to the
state's current block, the block of that size (counted from the generation start) holding the
leftmost masked position, as the decoding loop restricts it; a row whose block runs out of masks
writes no more tokens in that step (for the truth and both approximations alike). With
`cache` "prefix" or "dual" (needs `block_length`), ADJUST's unrolls run as the decoding loop
runs them with a key/value cache: the sampler's keys/values of the whole canvas come once per
step (after the step's first token, from the full pass's states) and each unroll computes only
the block's rows. The state's full pass is a fresh one either way (a cache is refreshed at a block
start), so prefix and dual give the same joint-KL: it measures the sampler side of the cache; the
base side (stale keys/values in later passes of a block) shows in NLL and task validity.
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
             progress: bool = False, block_length: int | None = None, cache: str = "none") -> dict:
    """Per-step KL of parallel and ADJUST against the true K-token joint (nats per K-token step)."""
    from ..decode import check_cache

    check_cache(base, cache, block_length, None)
    if block_length is not None and block_length < 1:
        raise AdjustError(f"--block-length must be at least 1, got {block_length}")
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
            start = len(rollouts.prompts[items[0][0]])
            lp, lpar, ladj = _one_batch(base, sampler, x, k, order, g, block_length, start, cache)
            gaps["parallel"] += (lp - lpar).tolist()
            if ladj is not None:
                gaps["adjust"] += (lp - ladj).tolist()
        bar.update(len(chunk))
    bar.close()
    out = {"tokens_per_pass": k, "num_states": len(states), "draws_per_state": draws}
    if block_length is not None:
        out.update(block_length=block_length, cache=cache)
    for name, vals in gaps.items():
        if vals:
            v = torch.tensor(vals, dtype=torch.float64)
            out[f"kl_{name}"] = v.mean().item()
            out[f"kl_{name}_stderr"] = (v.std(unbiased=True) / math.sqrt(len(v))).item() if len(v) > 1 else 0.0
    return out


def _gather(logp_full: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return logp_full[torch.arange(len(pos)), pos, tok]


def _blocks(x: torch.Tensor, mask_id: int, block_length: int | None, start: int) -> tuple:
    """(lo, hi) per row (B,): the current block, holding the leftmost masked position (the whole canvas without
    blocks)."""
    B, L = x.shape
    if block_length is None:
        return torch.zeros(B, dtype=torch.long, device=x.device), torch.full((B,), L, device=x.device)
    first = (x == mask_id).long().argmax(-1)  # the leftmost masked position (every state has one)
    lo = start + (first - start) // block_length * block_length
    return lo, torch.clamp(lo + block_length, max=L)


def _cached_unroll(base, sampler, cur, prior, kv, lo, hi):
    """The decoding loop's cached unroll: only each row's block rows, against the step's sampler keys/values."""
    out = prior.clone()
    for a in lo.unique().tolist():
        rows = (lo == a).nonzero(as_tuple=True)[0]
        b = int(hi[rows[0]])
        sub_kv = (kv[0][rows], kv[1][rows])
        out[rows, a:b] = sampler.forward_span(base, cur[rows], prior[rows], None, sub_kv, a, b)
    return out


def _one_batch(base, sampler, x: torch.Tensor, k: int, order: str, g: torch.Generator,
               block_length: int | None = None, start: int = 0, cache: str = "none"):
    B = x.shape[0]
    rows = torch.arange(B, device=x.device)
    lo, hi = _blocks(x, base.mask_id, block_length, start)
    cols = torch.arange(x.shape[1], device=x.device)[None]
    in_block = (cols >= lo[:, None]) & (cols < hi[:, None])
    kv = None
    h0 = base.hidden_states(x)
    logp0 = torch.log_softmax(base.logits(h0), -1)  # (B, L, V), the one full pass
    lp = torch.zeros(B, dtype=torch.float64)
    lpar, ladj = lp.clone(), lp.clone()
    prior, q = h0, logp0
    cur, logp_true = x.clone(), logp0
    for j in range(k):
        masked = (cur == base.mask_id) & in_block
        live = masked.any(-1).cpu()  # rows whose block still has a mask (all rows without blocks)
        scores = order_scores(logp_true.reshape(-1, logp_true.shape[-1]), order).view(B, -1).double()
        pos = scores.masked_fill(~masked, float("-inf")).argmax(-1)  # (B,)
        here = logp_true[rows, pos].double()  # (B, V)
        gumbel = -torch.log(-torch.log(torch.rand(here.shape, generator=g, dtype=torch.float64)
                                       .clamp(1e-300, 1 - 1e-16))).to(here.device)
        tok = (here + gumbel).argmax(-1)
        lp += torch.where(live, here[rows, tok].cpu(), 0.0)
        lpar += torch.where(live, _gather(logp0, pos, tok).double().cpu(), 0.0)
        if sampler is not None:
            ladj += torch.where(live, _gather(q, pos, tok).double().cpu(), 0.0)
        cur[rows, pos] = torch.where(live.to(cur.device), tok, cur[rows, pos])
        if j + 1 < k:
            logp_true = torch.log_softmax(base.logits(base.hidden_states(cur)), -1)
            if sampler is not None:
                if cache == "none":
                    prior = sampler(base, cur, prior)
                else:
                    if kv is None:  # once per step, after its first token, from the full pass's states
                        kv = sampler.keys_values(base, cur, h0)
                    prior = _cached_unroll(base, sampler, cur, prior, kv, lo, hi)
                q = torch.log_softmax(base.logits(prior), -1)
    return lp, lpar, (ladj if sampler is not None else None)
