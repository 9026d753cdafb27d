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

All three go through the one decoding loop (`adjust.decode.Decoding`), started at the state:
the truth is K steps of `exact` (fresh full passes, the order rule on the true distributions);
`parallel` and `adjust` each take one step of their own strategy, teacher-forced along the
truth's path (`Decoding.force`): the strategy decides how many positions each draw writes, the
path decides which and what, and the loop records each token's log-probability in the
distribution the strategy would have drawn it from. So joint-KL measures exactly the code that
generates, with every option of it: `group` (ADJUST's grouped draws), `unroll` ("fast": the
path's remaining positions are the ones a fast step keeps, then its usual picks), and `cache`.

With `block_length` (semi-autoregressive decoding), a step stays in the state's current block,
the block of that size (counted from the generation start) holding the leftmost masked
position; a row whose block runs out of masks writes no more tokens in that step (for the truth
and both approximations alike). With `cache` "prefix" or "dual" (needs `block_length`), the
approximations run with that cache: ADJUST's sampler keys/values of the whole canvas come once
per step and each unroll computes only the block's rows. The state's full pass is a fresh one
either way (a cache is refreshed at a block start), so prefix and dual give the same joint-KL:
it measures the sampler side of the cache; the base side (stale keys/values in later passes of
a block) shows in NLL and task validity.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..batching import group_by_length
from ..distill.rollouts import Rollouts
from ..errors import AdjustError
from ..provenance import code_version
from ..sampling import SamplingConfig, row_seed
from ..splits import held_out_split
from ..strategies import make_strategy


@torch.inference_mode()
def joint_kl(base, sampler, rollouts: Rollouts, k: int, num_states: int = 64, draws: int = 4,
             order: str = "entropy", seed: int = 0, batch_size: int = 16, states: list | None = None,
             progress: bool = False, block_length: int | None = None, cache: str = "none", unroll: str = "full",
             group: int = 1) -> dict:
    """Per-step KL of parallel and ADJUST against the true K-token joint (nats per K-token step).

    `unroll`, `group` (ADJUST's draws of min(group, K) tokens) and `cache` as in decoding."""
    _check_k(k, rollouts)
    from ..decode import check_cache, unroll_plan

    check_cache(base, cache, block_length, None)
    unroll_plan(unroll)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise AdjustError(f"--group must be a positive integer, got {group!r}")
    if block_length is not None and block_length < 1:
        raise AdjustError(f"--block-length must be at least 1, got {block_length}")
    G = rollouts.gen_length
    if order == "random":
        raise AdjustError("joint-kl needs a deterministic order rule (entropy, confidence or margin)")
    sampling = SamplingConfig(order=order)  # untempered: the joint of the base itself
    g = torch.Generator().manual_seed(seed)
    if states is None:
        pool = held_out_split(len(rollouts))[1]  # the rollouts distill held out
        ns = [pool[i] for i in torch.randint(len(pool), (num_states,), generator=g).tolist()]
        ts = torch.randint(0, G - k + 1, (num_states,), generator=g).tolist()
        states = list(zip(ns, ts))
    if draws < 1 or not states:
        raise AdjustError(f"joint-kl needs at least one state and one draw, got {len(states)} states, {draws} draws")
    cluster = {state: i for i, state in enumerate(dict.fromkeys((int(n), int(t)) for n, t in states))}
    # each draw has its own generator: a function of the seed, the state and the draw's index
    jobs = [(cluster[(int(n), int(t))], int(n), int(t), row_seed(seed, [int(n), int(t)], d))
            for n, t in states for d in range(draws)]
    gaps = {"parallel": [], "adjust": []}
    job_state: list[int] = []
    strategies = [("parallel", make_strategy("parallel", tokens_per_pass=k), None, "full")]
    if sampler is not None:
        strategies.append(("adjust", make_strategy("adjust", tokens_per_pass=k, group=min(group, k)), sampler, unroll))
    bar = tqdm(total=len(jobs), desc=f"joint-kl K={k}", disable=not progress, leave=False)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        for items in group_by_length(chunk, lambda job: len(rollouts.prompts[job[1]])):  # no padding
            states_x = rollouts.states([n for _, n, _, _ in items], [t for _, _, t, _ in items], base.mask_id)
            start = len(rollouts.prompts[items[0][1]])
            for rows in _sharing_a_block(states_x, start, base.mask_id, block_length, cache):
                x, seeds = states_x[rows], [items[i][3] for i in rows]
                job_state += [items[i][0] for i in rows]
                truth, path, tokens = _true_path(base, x, start, k, sampling, block_length, seeds)
                for name, strategy, s_sampler, s_unroll in strategies:
                    approx = _forced_logp(base, strategy, s_sampler, x, start, path, tokens, sampling, block_length,
                                          cache, s_unroll, seeds)
                    gaps[name] += (truth - approx).tolist()
        bar.update(len(chunk))
    bar.close()
    out = {"tokens_per_pass": k, "num_states": len(states), "distinct_states": len(cluster), "draws_per_state": draws}
    if block_length is not None:
        out.update(block_length=block_length, cache=cache)
    if sampler is not None and (unroll != "full" or group != 1):
        out.update(unroll=unroll, group=min(group, k))
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
                    cache: str = "none", unroll: str = "full", group: int = 1) -> dict:
    """`joint_kl` at each K of `ks` (same seed, order, states and draws per K) as one report:
    {"rows": [one per K], "settings", "base", "code_version"}; see markdown_table."""
    ks = list(ks)
    if not ks:
        raise AdjustError("joint-kl needs at least one K")
    for k in ks:  # every K checked before any is computed
        _check_k(k, rollouts)
    rows = [joint_kl(base, sampler, rollouts, k, num_states=num_states, draws=draws, order=order, seed=seed,
                     progress=progress, block_length=block_length, cache=cache, unroll=unroll, group=group)
            for k in ks]
    return {"rows": rows,
            "settings": {"tokens_per_pass": ks, "num_states": num_states, "draws_per_state": draws, "order": order,
                         "seed": seed, "rollouts": rollouts_source, "rollouts_count": len(rollouts),
                         "held_out_pool": len(held_out_split(len(rollouts))[1]), "gen_length": rollouts.gen_length,
                         "sampler": sampler_source, "block_length": block_length, "cache": cache, "unroll": unroll,
                         "group": group, "units": "nats per K-token step",
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


def _sharing_a_block(x: torch.Tensor, start: int, mask_id: int, block_length: int | None, cache: str) -> list:
    """Row index lists of `x` to run together: all rows, or with a key/value cache (whose block all rows of a
    decoding share) the rows of each current block (the block holding the leftmost masked position)."""
    from ..decode import current_block

    if block_length is None or cache == "none":
        return [list(range(x.shape[0]))]
    block = current_block(x, start, mask_id, block_length).tolist()
    return [[i for i, b in enumerate(block) if b == v] for v in dict.fromkeys(block)]


def _true_path(base, x, start, k, sampling, block_length, seeds):
    """The truth from each state: K steps of `exact` through the decoding loop. (log p of the path (B,) float64,
    its generation-relative columns (B, K) and tokens (B, K); -1 pads a path cut short by its block's end)."""
    from ..decode import Decoding

    run = Decoding(base, make_strategy("exact"), sampling, x.shape[1] - start, block_length, logprobs=0)
    run.start_from(x, start, seeds)
    B = x.shape[0]
    # K tokens, or fewer where the current block has fewer masks: the loop's own candidates
    n = torch.bincount(run.loop.candidates()[0], minlength=B).clamp(max=k).cpu()
    path = torch.full((B, k), -1, dtype=torch.long)
    tokens = torch.zeros((B, k), dtype=torch.long)
    for j in range(k):
        before = run.loop.x.clone()
        if not run.step():
            break
        rows, cols = (run.loop.x != before).nonzero(as_tuple=True)
        rows, cols = rows.cpu(), cols.cpu()
        take = j < n[rows]  # a row's writes after its block ran out are not part of this step
        path[rows[take], j] = cols[take] - start
        tokens[rows[take], j] = run.loop.x[rows[take], cols[take]].cpu()
    return _path_logp(run, path, start), path, tokens


def _forced_logp(base, strategy, sampler, x, start, path, tokens, sampling, block_length, cache, unroll, seeds):
    """log q of each path (B,) float64: one step of `strategy` from the state, forced along the path."""
    from ..decode import Decoding

    run = Decoding(base, strategy, sampling, x.shape[1] - start, block_length, sampler=sampler, cache=cache,
                   unroll=unroll, logprobs=0)
    run.start_from(x, start, seeds)
    run.force(path, tokens)
    run.step()
    return _path_logp(run, path, start)


def _path_logp(run, path: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of the recorded log-probabilities at each row's path positions (B,) float64."""
    B = path.shape[0]
    on = path >= 0
    logp = run.loop.token_logp.cpu()[torch.arange(B)[:, None].expand_as(path)[on], (path + start)[on]].double()
    return torch.zeros(B, dtype=torch.float64).index_add_(0, torch.arange(B)[:, None].expand_as(path)[on], logp)
