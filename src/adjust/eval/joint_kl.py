"""`adjust eval joint-kl`: how far K tokens from one full pass are from the true K-token joint.

From a held-out state x^t of an exact rollout, the true joint of the next K tokens is K
sequential base passes: at step j the order rule picks position i_j from the base's
distributions given x with y_<j written, and y_j ~ p_base(. | x, y_<j). Along that path,

    log p(y)        = sum_j log p_base(y_j at i_j | x, y_<j)          (the truth)
    log q_par(y)    = sum_j log p_base(y_j at i_j | x)                (product of marginals)
    log q_adjust(y) = sum_j log q_sampler(y_j at i_j | x, y_<j)        (chained sampler unrolls)

and KL(p || q) = E_{y ~ p}[log p(y) - log q(y)], estimated by Monte-Carlo over states and
draws. Positions follow the true path for all three, so the KL is over the tokens written at
those positions. Distributions are untempered (T = 1).

Noise. The draws of one state share that state, so standard errors are taken over distinct
states (all draws of a state averaged first; a state drawn twice counts once, with both
draws): se(KL) = sd over states / sqrt(states). The ratio
R = KL_adjust / KL_parallel gets a delta-method standard error over the same states,
se(R) = sd_s(a_s - R p_s) / (sqrt(states) |mean p|), which accounts for the two KLs being
measured on the same paths. A ratio is only a finding when KL_parallel is clearly above zero:
if it is within two standard errors of zero (a Monte-Carlo estimate can even come out
negative), the ratio is not reported and `ratio_note` says why.

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
from ..provenance import code_version
from ..sampling import order_scores
from ..splits import held_out_split


@torch.no_grad()
def joint_kl(base, sampler, rollouts: Rollouts, k: int, num_states: int = 64, draws: int = 4,
             order: str = "entropy", seed: int = 0, batch_size: int = 16, states: list | None = None,
             progress: bool = False, block_length: int | None = None, cache: str = "none") -> dict:
    """Per-step KL of parallel and ADJUST against the true K-token joint (nats per K-token step)."""
    _check_k(k, rollouts)
    from ..decode import check_cache

    check_cache(base, cache, block_length, None)
    if block_length is not None and block_length < 1:
        raise AdjustError(f"--block-length must be at least 1, got {block_length}")
    G = rollouts.gen_length
    if order == "random":
        raise AdjustError("joint-kl needs a deterministic order rule (entropy, confidence or margin)")
    g = torch.Generator().manual_seed(seed)
    if states is None:
        pool = held_out_split(len(rollouts))[1]  # the rollouts distill held out
        ns = [pool[i] for i in torch.randint(len(pool), (num_states,), generator=g).tolist()]
        ts = torch.randint(0, G - k + 1, (num_states,), generator=g).tolist()
        states = list(zip(ns, ts))
    if draws < 1 or not states:
        raise AdjustError(f"joint-kl needs at least one state and one draw, got {len(states)} states, {draws} draws")
    cluster = {state: i for i, state in enumerate(dict.fromkeys((int(n), int(t)) for n, t in states))}
    jobs = [(cluster[(int(n), int(t))], n, t) for n, t in states for _ in range(draws)]
    gaps = {"parallel": [], "adjust": []}
    job_state: list[int] = []
    device = base.device
    bar = tqdm(total=len(jobs), desc=f"joint-kl K={k}", disable=not progress, leave=False)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        for items in group_by_length(chunk, lambda job: len(rollouts.prompts[job[1]])):
            x = rollouts.states([n for _, n, _ in items], [t for _, _, t in items], base.mask_id).to(device)
            job_state += [s for s, _, _ in items]
            start = len(rollouts.prompts[items[0][1]])
            lp, lpar, ladj = _one_batch(base, sampler, x, k, order, g, block_length, start, cache)
            gaps["parallel"] += (lp - lpar).tolist()
            if ladj is not None:
                gaps["adjust"] += (lp - ladj).tolist()
        bar.update(len(chunk))
    bar.close()
    out = {"tokens_per_pass": k, "num_states": len(states), "distinct_states": len(cluster), "draws_per_state": draws}
    if block_length is not None:
        out.update(block_length=block_length, cache=cache)
    per_state = {name: _state_means(vals, job_state, len(cluster)) for name, vals in gaps.items() if vals}
    out.update(summarize(per_state["parallel"], per_state.get("adjust")))
    return out


def _check_k(k: int, rollouts: Rollouts) -> None:
    if k < 1:
        raise AdjustError(f"--tokens-per-pass must be at least 1, got {k}")
    if k > rollouts.gen_length:
        raise AdjustError(f"--tokens-per-pass {k} is larger than the rollouts' generation length {rollouts.gen_length}")


def _state_means(vals: list[float], job_state: list[int], num_states: int) -> torch.Tensor:
    """Mean over each distinct state's draws: (num_states,) float64."""
    total = torch.zeros(num_states, dtype=torch.float64).index_add_(
        0, torch.tensor(job_state), torch.tensor(vals, dtype=torch.float64))
    return total / torch.bincount(torch.tensor(job_state), minlength=num_states).double()


def summarize(par: torch.Tensor, adj: torch.Tensor | None = None) -> dict:
    """KL estimates with standard errors over states, and the ratio ADJUST / parallel when it means something.

    par, adj: per-state mean gaps log p - log q (paired: entry s of both is state s). Returns
    kl_parallel, kl_parallel_stderr, and with `adj` kl_adjust, kl_adjust_stderr,
    adjust_over_parallel and its stderr (None when not a finding) and ratio_note (why not).
    The standard errors are None with fewer than two states.
    """
    n = len(par)
    se = (lambda v: (v.std(unbiased=True) / math.sqrt(n)).item()) if n > 1 else (lambda v: None)  # noqa: E731
    p = par.mean().item()
    out = {"kl_parallel": p, "kl_parallel_stderr": se(par)}
    if adj is None:
        return out
    a = adj.mean().item()
    out.update(kl_adjust=a, kl_adjust_stderr=se(adj), adjust_over_parallel=None,
               adjust_over_parallel_stderr=None, ratio_note=None)
    sp = out["kl_parallel_stderr"]
    if sp is None:
        out["ratio_note"] = "ratio not reported: a standard error needs at least two states"
    elif p <= 2 * sp:
        out["ratio_note"] = (f"ratio not reported: KL(parallel) {p:.4g} is within two standard errors "
                             f"(2 x {sp:.3g}) of zero")
    else:
        r = a / p
        out["adjust_over_parallel"] = r
        out["adjust_over_parallel_stderr"] = se(adj - r * par) / abs(p)
    return out


def joint_kl_report(base, sampler, rollouts: Rollouts, ks, num_states: int = 64, draws: int = 4,
                    order: str = "entropy", seed: int = 0, rollouts_source: str | None = None,
                    sampler_source: str | None = None, progress: bool = False, block_length: int | None = None,
                    cache: str = "none") -> dict:
    """`joint_kl` at each K of `ks` (same seed, order, states and draws per K) as one report:
    {"rows": [one per K], "settings", "base", "code_version"}; see markdown_table."""
    ks = list(ks)
    if not ks:
        raise AdjustError("joint-kl needs at least one K")
    for k in ks:  # every K checked before any is computed
        _check_k(k, rollouts)
    rows = [joint_kl(base, sampler, rollouts, k, num_states=num_states, draws=draws, order=order, seed=seed,
                     progress=progress, block_length=block_length, cache=cache) for k in ks]
    return {"rows": rows,
            "settings": {"tokens_per_pass": ks, "num_states": num_states, "draws_per_state": draws, "order": order,
                         "seed": seed, "rollouts": rollouts_source, "rollouts_count": len(rollouts),
                         "held_out_pool": len(held_out_split(len(rollouts))[1]), "gen_length": rollouts.gen_length,
                         "sampler": sampler_source, "block_length": block_length, "cache": cache, "units": "nats per K-token step",
                         "stderr": "over distinct states (each state's draws averaged first); ratio by the delta method"},
            "base": getattr(base, "name", None), "code_version": code_version()}


def _pm(v, se, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def markdown_table(result: dict) -> str:
    """The report as a Markdown table: one row per K, then the notes on ratios not reported."""
    s = result["settings"]
    lines = [f"Joint KL to the true K-token joint, {s['num_states']} held-out states of exact rollouts "
             f"x {s['draws_per_state']} draws each, order {s['order']}, seed {s['seed']}; "
             f"{s['units']}, ± one standard error over states.",
             "",
             "| K | KL(true joint \\|\\| parallel) | KL(true joint \\|\\| ADJUST) | ADJUST / parallel |",
             "|---|---|---|---|"]
    notes = []
    for r in result["rows"]:
        if r.get("adjust_over_parallel") is not None:
            ratio = _pm(r["adjust_over_parallel"], r["adjust_over_parallel_stderr"], 2)
        elif r.get("ratio_note"):
            notes.append(f"K = {r['tokens_per_pass']}: {r['ratio_note']}.")
            ratio = "not reported (see below)"
        else:
            ratio = "-"
        lines.append(f"| {r['tokens_per_pass']} | {_pm(r['kl_parallel'], r['kl_parallel_stderr'])} | "
                     f"{_pm(r.get('kl_adjust'), r.get('kl_adjust_stderr'))} | {ratio} |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """KL of parallel and ADJUST against K, with one-standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.8))
    rows = sorted(result["rows"], key=lambda r: r["tokens_per_pass"])
    ks = [r["tokens_per_pass"] for r in rows]
    for name, label in (("parallel", "parallel (product of marginals)"), ("adjust", "ADJUST")):
        if all(r.get(f"kl_{name}") is not None for r in rows):
            ax.errorbar(ks, [r[f"kl_{name}"] for r in rows], yerr=[r[f"kl_{name}_stderr"] or 0 for r in rows],
                        marker="o", capsize=3, label=label)
    ax.set_xlabel("tokens per full pass K")
    ax.set_ylabel("KL to the true joint (nats / step)")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result.get('base') or ''}: joint KL vs K", fontsize=10)
    save_figure(fig, path)


def write_report(result: dict, out_dir) -> dict:
    """joint_kl.json, joint_kl.md and joint_kl.png in `out_dir` (each atomically); their paths."""
    from .report import write_report as write

    return write(result, out_dir, "joint_kl", markdown_table, plot)


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
