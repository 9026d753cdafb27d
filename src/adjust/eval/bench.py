"""`adjust bench`: wall-clock throughput of the decoding strategies, side by side in one run.

What is measured (unconditional generation, `gen_length` tokens per sequence):

* tokens/s of every strategy at each batch size. All strategies run in one process on the
  same base; after `warmup` untimed runs each, the timed repeats are interleaved (repeat r
  runs every strategy once, the order rotated by r) so that machine noise hits all of them
  alike. Repeat r uses seed `seed + r` for every strategy. Reported: the median tokens/s
  and the median over repeats of the paired ratio tokens/s / exact's tokens/s in the same
  repeat (exact's ratio is 1.0 by construction).
* the cost of one sampler unroll relative to one full pass, on the same canvas (a finished
  generation with half its positions masked again): full = base.hidden_states + logits at
  the masked positions; unroll = what ADJUST's inner loop pays for one unroll in each unroll
  mode of `unrolls` ("full": the sampler on the whole canvas + logits at the masked positions;
  "fast": see adjust.decode), measured over the K - 1 = `unroll_k` - 1 unrolls of a step so that
  work done once per step is shared out (`pass_vs_unroll`). Medians of `unroll_repeats`
  interleaved timings. `unroll_cost[B]` holds every mode under "modes" and the first one at
  its top level.
* for ADJUST at each K: the ideal speedup K / (1 + (K - 1) * unroll_cost) over exact
  (K tokens for one full pass and K - 1 unrolls), the achieved speedup, and their ratio.
* the same two calls' floating-point operations (torch's FlopCounterMode: matrix products and
  attention) and `flop_bound_speedup` = K / (1 + (K - 1) * flop_ratio): the speedup if time
  were proportional to FLOPs, i.e. if an unroll ran its arithmetic exactly as efficiently as a
  full pass. It is not a hard limit: hardware or kernels that run the unroll's smaller matrix
  products more efficiently than the full pass's (or that hide its cost) would beat it.

With `unrolls` (`--unroll full,fast`), every strategy that uses the sampler runs in each unroll
mode (each row has its `unroll`; the ideal speedup of a row uses its mode's unroll cost).
With `caches` (`--cache none,prefix,dual`, needs `block_length`): every strategy runs with each
cache mode, all interleaved in the same repeats; each row has its `cache`, its paired ratio to
the same strategy uncached in the same repeat (`ratio_to_uncached`), the positions the base and
the sampler computed per full pass and per unroll, and the unroll's measured cost relative to a
full pass of that run (`unroll_cost_in_run`: a cached pass with a cache). With `cache_verifies`
(`--cache-verify 0,3`) every cache mode runs with each count of verified positions (`cache_verify`
in the row; decode's module docstring). `ratio_to_exact` is to uncached exact.
`prompt_length` > 0: every sequence continues one prompt of that many tokens,
sampled once by the base itself (exact decoding from an empty prompt, seed `seed`), so the
workload has a long left context without any data file.

The timing of fixed-K ADJUST does not depend on the sampler's weights, so `fresh_sampler`
(an untrained sampler sized for the base) gives valid fixed-K timings when no trained one
exists; tokens per pass of an adaptive sampler strategy are then meaningless, and those are
skipped.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..decode import generate
from ..errors import AdjustError
from ..provenance import code_version
from ..sampling import SamplingConfig

ADAPTIVE = ("threshold", "entropy-bound", "adjust-threshold", "threshold-adjust")


def default_specs(ks=(2, 4, 8), with_sampler: bool = True, trained_sampler: bool = True) -> tuple[list, list]:
    """([(name, params)], [skipped]): exact, parallel:K, adjust:K, the adaptive ones registered, and speculative at
    depth 4 with each drafter (the sampler's only with a trained sampler: an untrained one's drafts mean nothing)."""
    from ..strategies import STRATEGIES, strategy_names

    names = strategy_names()
    specs = [("exact", {})] + [("parallel", {"tokens_per_pass": k}) for k in ks]
    skipped = []
    if with_sampler:
        specs += [("adjust", {"tokens_per_pass": k}) for k in ks]
    else:
        skipped.append({"strategy": "adjust", "reason": "no joint sampler (pass --sampler DIR or --fresh-sampler)"})
    for name in ADAPTIVE:
        if name not in names:
            skipped.append({"strategy": name, "reason": "not registered in this version"})
        elif STRATEGIES[name].uses_sampler and not (with_sampler and trained_sampler):
            skipped.append({"strategy": name, "reason": "needs a trained joint sampler"})
        else:
            specs.append((name, {}))
    if "speculative" in names:
        specs.append(("speculative", {"depth": 4, "drafter": "self"}))
        if with_sampler and trained_sampler:
            specs.append(("speculative", {"depth": 4, "drafter": "sampler"}))
        else:
            skipped.append({"strategy": "speculative:depth=4;drafter=sampler", "reason": "needs a trained joint sampler"})
    return specs, skipped


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleaved_runs(runs: list, repeats: int, warmup: int, seed: int, shuffle: bool = False, bar=None) -> dict:
    """Time several runs side by side: {key: [fn(seed + r) for r in range(repeats)]} for runs [(key, fn)].

    Each fn runs `warmup` times untimed first (seeds seed + 10_000 + w). Then repeat r runs every
    fn once with seed `seed + r`, the order rotated by r (`shuffle`: shuffled by a generator seeded
    with seed + r instead), so that machine noise (a busy neighbour, a frequency change) hits all
    of them alike and ratios within one repeat are paired. `bar` (a tqdm bar) advances once a call.
    """
    import random

    for w in range(warmup):
        for _, fn in runs:
            fn(seed + 10_000 + w)
            if bar is not None:
                bar.update(1)
    out: dict = {key: [] for key, _ in runs}
    for r in range(repeats):
        if shuffle:
            order = list(runs)
            random.Random(seed + r).shuffle(order)
        else:
            shift = r % len(runs)
            order = runs[shift:] + runs[:shift]
        for key, fn in order:
            out[key].append(fn(seed + r))
            if bar is not None:
                bar.update(1)
    return out


def paired_ratio(values, reference) -> float:
    """Median over repeats of values[r] / reference[r] (repeats with a non-positive reference left out)."""
    return _median([v / e for v, e in zip(values, reference) if e > 0])


def time_call(fn, device) -> float:
    """Seconds one call of `fn` takes, all its device work included (CUDA events on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def pass_vs_unroll(base, sampler, x: torch.Tensor, repeats: int = 30, warmup: int = 2, unrolls=("full",),
                   k: int = 4) -> dict:
    """Median time of one full pass vs one sampler unroll on canvas `x`, each + logits where it computes them.

    full = base.hidden_states(x) then base.logits at the masked positions. unroll, per mode of `unrolls`
    ("full", "fast", see adjust.decode) = one ADJUST step's K - 1 unrolls as the decoding loop runs them
    (`decode.StepContext.unroll_sampler`, each on the previous one's output; for "fast" the sampler's
    keys/values once per step and its kept rows), each followed by base.logits where its distributions are
    computed (`StepContext.unroll_candidates`), divided by K - 1: the once-per-step work is shared out over
    the step's unrolls. No token is written in between (the canvas stays `x`). For "full" this is the sampler
    on the whole canvas + logits at every masked position. Timed alternately, `repeats` times each, after
    `warmup` untimed calls of each. The first mode's figures are also at the top level.
    """
    import dataclasses

    from ..decode import StepContext, _Loop, unroll_plan
    from ..sampling import RowRNG

    device = base.device
    x = x.to(device)
    rows, cols = (x == base.mask_id).nonzero(as_tuple=True)
    prior = base.hidden_states(x)
    unrolls = list(dict.fromkeys(unrolls))
    counts = {}

    def step_of(mode):
        loop = _Loop(base, x.clone(), None, 0, SamplingConfig(), RowRNG([0] * x.shape[0], device), sampler, False,
                     unroll=unroll_plan(mode), k=k)
        ctx0 = StepContext(loop, prior, 0)
        r, _, logp = ctx0.distributions()  # the step's full pass: not timed
        ctx0.scores(logp, r)

        def unrolls_of_one_step():
            ctx, h, logit_rows = dataclasses.replace(ctx0), prior, 0
            for _ in range(max(1, k - 1)):
                h = ctx.unroll_sampler(h)
                ur, uc = ctx.unroll_candidates()
                base.logits(h[ur, uc])
                logit_rows += len(ur)
            counts[mode] = (loop.stats.positions_per_unroll, logit_rows / max(1, k - 1))
        return unrolls_of_one_step

    fns = {"full": lambda: base.logits(base.hidden_states(x)[rows, cols])}
    fns.update({("unroll", m): step_of(m) for m in unrolls})
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_call(fns[name], device))
    per = max(1, k - 1)
    f = _median(times["full"])
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    out = {"full_pass_ms": round(1e3 * f, 4), "full_pass_flops": flops["full"], "masked_positions": int(len(rows)),
           "repeats": repeats, "k": k, "modes": {}}
    for m in unrolls:
        u = _median(times[("unroll", m)]) / per
        out["modes"][m] = {"unroll_ms": round(1e3 * u, 4), "unroll_cost": round(u / f, 4),
                           "unroll_flops": None if flops[("unroll", m)] is None else flops[("unroll", m)] // per,
                           "flop_ratio": (None if None in (flops[("unroll", m)], flops["full"])
                                          else round(flops[("unroll", m)] / per / flops["full"], 4)),
                           "sampler_positions_per_unroll": round(counts[m][0], 2),
                           "logit_positions_per_unroll": round(counts[m][1], 2)}
    first = unrolls[0]
    return {**out, "unroll": first, **out["modes"][first]}


def count_flops(fn) -> int | None:
    """Floating-point operations of one call of `fn`, as torch's FlopCounterMode counts them (the
    matrix products and attention, which are nearly all the work; elementwise ops are not counted).

    None where this torch's counter cannot count the call: some versions (2.11 on a GPU) refuse
    attention whose key/value heads are fewer than its query heads (grouped-query attention, as Dream's)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except AssertionError as e:  # torch.utils.flop_counter's "sdpa_flop_count: ... shapes are incompatible"
        if "sdpa_flop_count" not in str(e):
            raise
        return None
    return counter.get_total_flops()


def unroll_cost(base, sampler, batch_size: int, gen_length: int, repeats: int = 30, seed: int = 0,
                canvas: torch.Tensor | None = None, unrolls=("full",), k: int = 4) -> dict:
    """`pass_vs_unroll` on a mid-generation canvas: `canvas` (default random tokens) with half re-masked."""
    g = torch.Generator().manual_seed(seed)
    if canvas is None:
        banned = set(base.banned_ids) | {base.eos_id}
        usable = torch.tensor([i for i in range(base.vocab_size) if i not in banned])
        canvas = usable[torch.randint(len(usable), (batch_size, gen_length), generator=g)]
    x = canvas[:batch_size].clone()
    x[torch.rand(x.shape, generator=g) < 0.5] = base.mask_id
    return pass_vs_unroll(base, sampler, x, repeats, unrolls=unrolls, k=k)


def ideal_speedup(k: int, cost: float) -> float:
    """Tokens per unit time of K-token ADJUST over exact, if only full passes and unrolls cost anything."""
    return k / (1 + (k - 1) * cost)


def bench_prompt(base, prompt_length: int, seed: int) -> list[int]:
    """A prompt of `prompt_length` tokens sampled by the base itself (exact, from an empty prompt)."""
    from ..strategies import make_strategy

    if prompt_length <= 0:
        return []
    return generate(base, [[]], make_strategy("exact"), gen_length=prompt_length, seed=seed).tokens[0].tolist()


def cache_settings(caches, verifies, base=None, block_length: int | None = None) -> list[tuple[str, int]]:
    """The (cache mode, --cache-verify count) pairs a bench times: each cache mode with every count, no cache with
    0 only; each checked as `decode.check_cache` checks one setting (base None: the arguments only), and a count
    with no cache mode to verify is refused as `check_cache` refuses it."""
    from ..decode import check_cache

    if any(verifies) and all(c == "none" for c in caches):
        check_cache(base, "none", block_length, None, max(verifies))
    pairs = [(c, v) for c in caches for v in (verifies if c != "none" else [0])]
    for c, v in pairs:
        check_cache(base, c, block_length, None, v)
    return pairs


def run_bench(base, sampler=None, gen_length: int = 64, batch_sizes=(1, 8), ks=(2, 4, 8), repeats: int = 5,
              warmup: int = 1, unroll_repeats: int = 30, seed: int = 0,
              sampling: SamplingConfig = SamplingConfig(), specs: list | None = None,
              sampler_source: str | None = None, progress: bool = False, prompt_length: int = 0,
              block_length: int | None = None, caches=("none",), unrolls=("full",), unroll_k: int = 4,
              pass_cost=None, unroll_cost_given: float | dict | None = None, cache_verifies=(0,)) -> dict:
    """The report (see the module docstring). `pass_cost` (adjust.eval.costs.PassCost, default: rows free) and
    `unroll_cost_given` (c, or {unroll mode: c}; default the report's, else 0): each row's
    `tokens_per_pass_equivalent`."""
    from tqdm.auto import tqdm

    from .costs import FREE, check_unroll_cost, tokens_per_pass_equivalent, unroll_costs_of

    from ..decode import unroll_plan
    from .specs import build_strategy, spec_label

    if gen_length < 1 or repeats < 1 or warmup < 0 or unroll_repeats < 1:
        raise AdjustError("--gen-length, --repeats and --unroll-repeats must be at least 1, --warmup at least 0")
    if not batch_sizes or min(batch_sizes) < 1:
        raise AdjustError("--batch-sizes must list positive integers, e.g. 1,8")
    if prompt_length < 0:
        raise AdjustError(f"--prompt-length must be at least 0, got {prompt_length}")
    if prompt_length + gen_length > base.max_length:
        raise AdjustError(f"--prompt-length {prompt_length} + --gen-length {gen_length} exceeds the model's context "
                          f"of {base.max_length} tokens")
    caches = list(dict.fromkeys(caches)) or ["none"]
    verifies = list(dict.fromkeys(cache_verifies)) or [0]
    settings = cache_settings(caches, verifies, base, block_length)
    unrolls = list(dict.fromkeys(unrolls)) or ["full"]
    for u in unrolls:
        unroll_plan(u)
    pass_cost = pass_cost or FREE
    c_unroll = unroll_costs_of(pass_cost, check_unroll_cost(unroll_cost_given), ["full"] + unrolls)  # per mode
    skipped = []
    if specs is None:
        specs, skipped = default_specs(ks, sampler is not None, sampler_source not in (None, "fresh"))
    if not any(name == "exact" and not params for name, params in specs):
        specs = [("exact", {})] + list(specs)
    strategies = []
    for name, params in specs:
        s = build_strategy(name, params)
        if s.uses_sampler and sampler is None:
            skipped.append({"strategy": spec_label(name, params), "reason": "no joint sampler"})
            continue
        strategies.append((spec_label(name, params), s))
    if sampler is not None:
        sampler.check_base(base)

    results, cost, vs_ideal = [], {}, []
    # every strategy with every cache (a cache with every --cache-verify); those with a sampler also every unroll
    runs_list = [(label, s, c, v, u) for label, s in strategies for c, v in settings
                 for u in (unrolls if s.uses_sampler else unrolls[:1])]
    total = len(batch_sizes) * len(runs_list) * (warmup + repeats)
    prompt = bench_prompt(base, prompt_length, seed)
    bar = tqdm(total=total, desc="bench", disable=not progress, leave=False)
    for B in batch_sizes:
        prompts = [list(prompt) for _ in range(B)]

        def run(s, c, v, u):
            return lambda seed_r: generate(base, prompts, s, sampling, gen_length, block_length, seed=seed_r,
                                           sample_indices=list(range(B)), sampler=sampler, cache=c, unroll=u,
                                           cache_verify=v)

        gens = interleaved_runs([((label, c, v, u), run(s, c, v, u)) for label, s, c, v, u in runs_list], repeats,
                                warmup, seed, bar=bar)
        runs = {key: [g.stats for g in gs] for key, gs in gens.items()}
        last = gens[(runs_list[0][0], *runs_list[0][2:])][-1]
        ref_cache = "none" if "none" in caches else caches[0]
        ref_verify = 0 if ref_cache == "none" else verifies[0]
        exact_tps = [st.tokens_per_second for st in runs[("exact", ref_cache, ref_verify, unrolls[0])]]
        for label, s, c, v, u in runs_list:
            stats = runs[(label, c, v, u)]
            tps = [st.tokens_per_second for st in stats]
            row = {
                "strategy": label, "name": s.name, "k": s.k, "batch_size": B, "cache": c, "cache_verify": v,
                "unroll": u, "tokens_per_second": round(_median(tps), 3),
                "ratio_to_exact": 1.0 if (label, c, v) == ("exact", ref_cache, ref_verify)
                else round(paired_ratio(tps, exact_tps), 4),
                "tokens_per_full_pass": round(_median([st.tokens_per_full_pass for st in stats]), 4),
                "full_passes": _median([st.full_passes for st in stats]),
                "sampler_passes": _median([st.sampler_passes for st in stats]),
                "positions_per_full_pass": round(_median([st.positions_per_full_pass for st in stats]), 2),
                "rows_per_full_pass": round(_median([st.base_rows / max(1, st.full_passes) for st in stats]), 2),
                "drafts_proposed": _median([st.drafts_proposed for st in stats]),
                "drafts_accepted": _median([st.drafts_accepted for st in stats]),
                "tokens_per_pass_equivalent": round(_median([tokens_per_pass_equivalent(st, pass_cost, c_unroll[u])
                                                             for st in stats]), 4),
                "seconds": [round(st.seconds, 5) for st in stats],
            }
            if s.uses_sampler:
                row["positions_per_unroll"] = round(_median([st.positions_per_unroll for st in stats]), 2)
                in_run = [st.unroll_cost for st in stats if st.unroll_cost is not None]
                row["unroll_cost_in_run"] = round(_median(in_run), 4) if in_run else None
            if "none" in caches:
                plain = [st.tokens_per_second for st in runs[(label, "none", 0, u)]]
                row["ratio_to_uncached"] = round(paired_ratio(tps, plain), 4)
            results.append(row)
        if sampler is not None:
            canvas = last.tokens if last is not None else None
            cost[str(B)] = unroll_cost(base, sampler, B, gen_length, unroll_repeats, seed, canvas, unrolls, unroll_k)
            for row in results:
                if (row["batch_size"] == B and row["name"] == "adjust" and row["k"] > 1 and row["cache"] == ref_cache
                        and row["cache_verify"] == ref_verify):
                    m = cost[str(B)]["modes"][row["unroll"]]
                    ideal = ideal_speedup(row["k"], m["unroll_cost"])
                    vs_ideal.append({"strategy": row["strategy"], "k": row["k"], "batch_size": B, "unroll": row["unroll"],
                                     "unroll_cost": m["unroll_cost"], "ideal_speedup": round(ideal, 4),
                                     "achieved_speedup": row["ratio_to_exact"],
                                     "flop_bound_speedup": (None if m["flop_ratio"] is None else
                                                            round(ideal_speedup(row["k"], m["flop_ratio"]), 4)),
                                     "fraction_of_ideal": round(row["ratio_to_exact"] / ideal, 4)})
    bar.close()
    return {
        "base": base.name, "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "gen_length": gen_length, "batch_sizes": list(batch_sizes),
        "prompt_length": prompt_length, "block_length": block_length, "caches": caches, "cache_verifies": verifies,
        "unrolls": unrolls,
        "repeats": repeats, "warmup": warmup, "seed": seed,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "order": sampling.order},
        "sampler": sampler_source, "results": results, "unroll_cost": cost, "adjust_vs_ideal": vs_ideal,
        "skipped": skipped, "code_version": code_version(),
        "pass_cost": {"source": pass_cost.source, "unroll_cost": c_unroll["full"],
                      "unroll_costs": {u: c_unroll[u] for u in unrolls},
                      "note": pass_cost.describe({u: c_unroll[u] for u in unrolls})},
        "notes": ("tokens_per_second: median over repeats; ratio_to_exact: median over repeats of the paired "
                  "ratio to exact's tokens/s in the same repeat at the same batch size; ideal_speedup = "
                  "K / (1 + (K-1) * unroll_cost); flop_bound_speedup = K / (1 + (K-1) * flop_ratio), the "
                  "speedup if time were proportional to FLOPs (equal efficiency of unroll and full pass), "
                  "not a hard limit; ratio_to_uncached: median over repeats of the paired ratio to "
                  "the same strategy without a cache; unroll_cost_in_run: one unroll's mean time over one full "
                  "pass's in the decoding runs (a cached pass when a cache is on)"),
    }


def format_table(report: dict) -> str:
    """The report as a readable table."""
    lines = [f"base {report['base']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
             f"prompt {report.get('prompt_length', 0)} + gen_length {report['gen_length']}, blocks "
             f"{report.get('block_length') or 'none'}, {report['repeats']} repeats (median), sampler: "
             f"{report['sampler'] or 'none'}"]
    for B in report["batch_sizes"]:
        lines.append("")
        lines.append(f"batch {B}")
        lines.append(f"  {'strategy':<26}{'cache':>7}{'unroll':>7}{'tokens/s':>12}{'x exact':>10}{'x uncached':>11}{'tok/pass':>10}"
                     f"{'tok/eq':>8}{'passes':>8}{'unrolls':>9}{'pos/pass':>9}{'rows/pass':>10}")
        for row in report["results"]:
            if row["batch_size"] == B:
                unc = row.get("ratio_to_uncached")
                cache = row.get("cache", "none") + (f"+v{row['cache_verify']}" if row.get("cache_verify") else "")
                lines.append(f"  {row['strategy']:<26}{cache:>7}{row.get('unroll', 'full'):>7}"
                             f"{row['tokens_per_second']:>12.1f}"
                             f"{row['ratio_to_exact']:>10.3f}{'' if unc is None else f'{unc:.3f}':>11}"
                             f"{row['tokens_per_full_pass']:>10.2f}{row.get('tokens_per_pass_equivalent', 0):>8.2f}"
                             f"{row['full_passes']:>8g}{row['sampler_passes']:>9g}"
                             f"{row.get('positions_per_full_pass', 0):>9g}{row.get('rows_per_full_pass', 0):>10g}")
        c = report["unroll_cost"].get(str(B))
        for mode, m in (c or {}).get("modes", {}).items():
            flops = ("FLOPs not counted by this torch" if m["flop_ratio"] is None else
                     f"FLOPs: {m['unroll_flops'] / 1e9:.3f} vs {c['full_pass_flops'] / 1e9:.3f} GFLOP, "
                     f"ratio {m['flop_ratio']:.3f}")
            lines.append(f"  one full pass {c['full_pass_ms']:.3f} ms, one sampler unroll ({mode}) {m['unroll_ms']:.3f} ms "
                         f"-> unroll cost {m['unroll_cost']:.3f} of a full pass ({flops})")
        for v in report["adjust_vs_ideal"]:
            if v["batch_size"] == B:
                lines.append(f"  {v['strategy']:<10} {v.get('unroll', 'full'):>5} ideal {v['ideal_speedup']:.2f}x, achieved "
                             f"{v['achieved_speedup']:.2f}x = {100 * v['fraction_of_ideal']:.0f}% of ideal; "
                             + ("FLOPs not counted" if v["flop_bound_speedup"] is None else
                                f"{v['flop_bound_speedup']:.2f}x if time were proportional to FLOPs"))
    if report.get("pass_cost"):
        lines.append(f"tok/eq: tokens per pass-equivalent; {report['pass_cost']['note']}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['strategy']}: {s['reason']}")
    return "\n".join(lines)
