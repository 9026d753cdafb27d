"""`adjust eval frontier`, the sweep: every strategy family's knob run on the same work, quality and speed.

What is measured, per point (a strategy at one setting of its knob, with one key/value cache mode and unroll):

* quality, once, on all the prompts (batched; the tokens do not depend on the batch size), seed `seed`:
  - on verifiable task prompts (`python -m adjust.eval.tasks prompts`): the validity of the answers
    (`adjust.eval.tasks.evaluate_tasks`' rule), per task and pooled ("all"), with its binomial
    standard error;
  - on free text (a file of plain prompts, or unconditional): the NLL of the generated tokens under
    the base's own masked-diffusion bound (given the prompt), and, when a two-sided measure is
    given (`two_sided`, `measures.py`), its value against an independent set of exact samples (seed
    `seed` + 1, so the exact point's value is the measure's noise floor). NLL alone rewards mode-seeking
    (a strategy can sit below exact's own NLL), so a two-sided measure is the one to rank by.
* tokens per full pass (the achieved K, from the quality run's Stats);
* wall-clock tokens/s at each batch size, side by side (`bench.interleaved_runs`): `warmup` untimed
  runs of every point, then `repeats` repeats, each running every point once in a shuffled order,
  on the same `timing_prompts` prompts (each decoded as a batch of B samples), `threads` CPU
  threads. Reported: the median tokens/s and the median over repeats of the paired ratio to
  exact's tokens/s in the same repeat (exact uncached when several cache modes are swept).

The fronts and dominance are `analysis.py`'s, the Markdown and plot `report.py`'s. Plugging in: a new
family is one line of DEFAULT_GRIDS (and its side in `analysis.py`); a two-sided measure is a factory
registered in `measures.TWO_SIDED_MEASURES`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from typing import Callable

import torch

from ...errors import AdjustError
from ...provenance import code_version
from ...sampling import SamplingConfig
from ...strategies import STR_PARAMS
from ..bench import _median, interleaved_runs, paired_ratio
from ..specs import K_ALIASES, _value, build_strategy, spec_key, spec_label
from .analysis import analyse, side
from .measures import DEFAULT_TWO_SIDED, TWO_SIDED_MEASURES
from .report import write_report

# Each family's grid, in the --grid syntax: FAMILY:key=v,v,...;key=v,... (the Cartesian product).
DEFAULT_GRIDS: dict[str, str] = {
    "parallel": "parallel:K=2,3,4,6,8",
    "adjust": "adjust:K=2,3,4,6,8|K=8,16;group=2,4",
    "threshold": "threshold:tau=0.95,0.9,0.8,0.7,0.5,0.3",
    "factor": "factor:factor=0.5,1,2,4",
    "entropy-bound": "entropy-bound:gamma=0.01,0.1,0.5,1,2",
    "adjust-threshold": "adjust-threshold:tau=0.95,0.9,0.8,0.7,0.5;max_tokens_per_pass=8",
    "threshold-adjust": "threshold-adjust:tau=0.9,0.7,0.5;K=2,4",
    # lossless: exact's tokens at fewer passes (coupled), exact's distribution (speculative sampling), threshold's tokens
    "speculative": "speculative:depth=2,4,8;drafter=sampler,self|depth=4;drafter=sampler,self;rule=sampling"
                   "|depth=4;drafter=sampler,self;target=threshold;tau=0.9",
}
QUALITY_MODES = ("auto", "validity", "nll")


# --------------------------------------------------------------------------------------------
# The sweep: families, grids, points
# --------------------------------------------------------------------------------------------

def parse_families(text: str | None) -> list[str] | None:
    """"parallel,adjust" -> ["parallel", "adjust"]; None or "" -> None (every family); unknown names are errors."""
    if not text:
        return None
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in DEFAULT_GRIDS]
    if unknown:
        raise AdjustError(f"--families: unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                          f"{', '.join(map(repr, unknown))}; choose from {', '.join(DEFAULT_GRIDS)}")
    if not names:
        raise AdjustError("--families is empty")
    return names


def parse_grid(text: str) -> tuple[str, list[dict]]:
    """"threshold-adjust:tau=0.9,0.7;K=2,4" -> ("threshold-adjust", [{"tau": 0.9, "tokens_per_pass": 2}, ...]).

    The family is a strategy name; each key takes a comma-separated list of numbers (of words for a string
    parameter: speculative's drafter); the points are
    every combination. `K` (or `k`) is tokens_per_pass, as in --strategies specs. Several such sets
    joined by "|" give the union of their points, in order ("adjust:K=2,4|K=8;group=2,4").
    """
    family, colon, rest = text.partition(":")
    family = family.strip()
    if family not in DEFAULT_GRIDS:
        raise AdjustError(f"--grid {text!r}: unknown family {family!r}; choose from {', '.join(DEFAULT_GRIDS)}")
    if not colon or not rest.strip():
        raise AdjustError(f"--grid {text!r} has no values; e.g. --grid {DEFAULT_GRIDS[family]}")
    points: list[dict] = []
    for alternative in rest.split("|"):
        for point in _grid_points(text, family, alternative):
            if point not in points:
                points.append(point)
    return family, points


def _grid_points(text: str, family: str, rest: str) -> list[dict]:
    """The points of one "key=v,v;key=v" set of a --grid (every combination)."""
    axes: dict[str, list] = {}
    for part in rest.split(";"):
        if not part.strip():
            continue
        key, eq, values = part.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise AdjustError(f"--grid {text!r}: {part.strip()!r} is not key=value,value,...")
        key = "tokens_per_pass" if key in K_ALIASES else key
        if key in axes:
            raise AdjustError(f"--grid {text!r} sets {spec_key(key)!r} twice")
        vals = []
        for v in values.split(","):
            v = v.strip()
            x = _value(v)
            if not v or (isinstance(x, str) and key not in STR_PARAMS) or (not isinstance(x, str)
                                                                            and not math.isfinite(x)):
                raise AdjustError(f"--grid {text!r}: {spec_key(key)}={v!r} is not a number")
            if x not in vals:
                vals.append(x)
        axes[key] = vals
    if not axes:
        raise AdjustError(f"--grid {text!r} has no values; e.g. --grid {DEFAULT_GRIDS[family]}")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def plan_points(families: list[str] | None = None, grids: list[str] | None = None, with_sampler: bool = True,
                gen_length: int | None = None) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """([(family, strategy name, params)], notes): exact first, then every family's grid.

    `families` None: every family of DEFAULT_GRIDS, skipping (with a note) those whose strategy is
    not registered in this version or that need a joint sampler when `with_sampler` is False; named
    explicitly, such a family is an error. `grids`: --grid texts replacing those families' grids.
    Every point's strategy is built once here, so a bad value fails before any work.
    """
    from ...strategies import STRATEGIES, strategy_names

    strategy_names()  # registers the built-in strategies
    explicit = families is not None
    names = list(DEFAULT_GRIDS) if families is None else list(families)
    unknown = [n for n in names if n not in DEFAULT_GRIDS]
    if unknown:
        parse_families(",".join(unknown))  # the usual error
    overrides: dict[str, list[dict]] = {}
    for text in grids or []:
        family, points = parse_grid(text)
        if family in overrides:
            raise AdjustError(f"--grid gives the family {family!r} twice")
        if family not in names:
            raise AdjustError(f"--grid {text!r}: family {family!r} is not among --families ({', '.join(names)})")
        overrides[family] = points
    plan: list[tuple[str, str, dict]] = [("exact", "exact", {})]
    notes: list[str] = []
    for family in names:
        if family not in STRATEGIES:
            if explicit or family in overrides:
                raise AdjustError(f"family {family!r}: strategy {family!r} is not registered in this version")
            notes.append(f"skipped family {family}: strategy not registered in this version")
            continue
        if STRATEGIES[family].uses_sampler and not with_sampler:
            if explicit or family in overrides:
                raise AdjustError(f"family {family!r} needs a joint sampler; pass --sampler DIR")
            notes.append(f"skipped family {family}: needs a joint sampler (--sampler)")
            continue
        for params in overrides.get(family) or parse_grid(DEFAULT_GRIDS[family])[1]:
            label = spec_label(family, params)
            try:
                strategy = build_strategy(family, params)
            except (TypeError, ValueError) as e:
                raise AdjustError(f"--grid point {label}: {e}") from None
            except AdjustError as e:
                raise AdjustError(f"grid point {label}: {e}") from None
            if strategy.uses_sampler and not with_sampler:  # a point whose parameters ask for the sampler
                if family in overrides:
                    raise AdjustError(f"grid point {label} needs a joint sampler; pass --sampler DIR")
                notes.append(f"skipped {label}: needs a joint sampler (--sampler)")
                continue
            if gen_length is not None and not strategy.adaptive and strategy.k > gen_length:
                if family in overrides:
                    raise AdjustError(f"grid point {label}: K = {strategy.k} is larger than --gen-length {gen_length}")
                notes.append(f"skipped {label}: K = {strategy.k} is larger than --gen-length {gen_length}")
                continue
            if (family, family, params) not in plan:
                plan.append((family, family, params))
    return plan, notes


def point_label(name: str, params: dict, cache: str = "none", unroll: str = "full") -> str:
    return spec_label(name, params) + ("" if cache == "none" else f"+{cache}") + ("" if unroll == "full" else f"+{unroll}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _task_records(prompts: list[str]) -> list[dict] | None:
    """[{"task", "prompt"}] if every prompt is a task prompt, None if none is; mixed is an error."""
    from ..tasks import task_of

    tasks = []
    for p in prompts:
        try:
            tasks.append(task_of(p))
        except AdjustError:
            tasks.append(None)
    if all(t is None for t in tasks):
        return None
    if any(t is None for t in tasks):
        bad = next(p for p, t in zip(prompts, tasks) if t is None)
        raise AdjustError(f"the prompts mix task prompts and plain text (e.g. {bad!r}); use one kind per run")
    return [{"task": t, "prompt": p} for t, p in zip(tasks, prompts)]


def choose_quality(quality: str, records, two_sided) -> tuple[str, Callable | None, str | None]:
    """(mode "validity" | "text", the two-sided measure for this sweep or None, the free-text panel's measure name).

    A registered measure (`quality` naming one, or the default) is made fresh for the sweep by its factory."""
    if quality not in QUALITY_MODES and quality not in TWO_SIDED_MEASURES:
        raise AdjustError(f"--quality {quality!r}: choose from {', '.join(list(QUALITY_MODES) + list(TWO_SIDED_MEASURES))}")
    if quality == "validity" or (quality == "auto" and records is not None):
        if records is None:
            raise AdjustError("--quality validity needs task prompts (python -m adjust.eval.tasks prompts)")
        return "validity", None, None
    if quality in TWO_SIDED_MEASURES:
        return "text", TWO_SIDED_MEASURES[quality](), quality
    if quality == "nll":
        return "text", None, "nll"
    if two_sided is None and DEFAULT_TWO_SIDED is not None:
        two_sided = TWO_SIDED_MEASURES[DEFAULT_TWO_SIDED]()
    name = getattr(two_sided, "measure_name", None) or getattr(two_sided, "__name__", "two-sided")
    return "text", two_sided, ("nll" if quality == "nll" or two_sided is None else name)


def timing_subset(prompts: list[str] | None, records, n: int) -> list[str]:
    """`n` prompts for timing: round-robin over the tasks in file order (task prompts), the first n
    otherwise; unconditional: n empty prompts (each a batch of distinct samples)."""
    if prompts is None:
        return [""] * n
    if records is None:
        return prompts[:n]
    by_task: dict[str, list[str]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["prompt"])
    out = []
    for row in itertools.zip_longest(*by_task.values()):
        out += [p for p in row if p is not None]
    return out[:n]


def _check_two_sided(d, label: str) -> dict:
    if not isinstance(d, dict) or not {"name", "value", "se"} <= set(d):
        raise AdjustError(f"the two-sided quality measure returned {d!r} for {label}; expected "
                          "{'name', 'value', 'se'[, 'score']}")
    out = {"name": str(d["name"]), "value": float(d["value"]), "se": None if d["se"] is None else float(d["se"])}
    out["score"] = float(d["score"]) if d.get("score") is not None else -out["value"]
    return out


def _cost_columns(stats: list, pass_cost, c_unroll: float, tokens_per_pass_equivalent) -> dict:
    """Medians over the timed repeats: tokens per pass-equivalent, base rows per full pass, drafts (speculative)."""
    return {"tokens_per_pass_equivalent": round(_median([tokens_per_pass_equivalent(st, pass_cost, c_unroll)
                                                         for st in stats]), 4),
            "rows_per_full_pass": round(_median([st.base_rows / max(1, st.full_passes) for st in stats]), 3),
            "drafts_proposed": _median([st.drafts_proposed for st in stats]),
            "drafts_accepted": _median([st.drafts_accepted for st in stats])}


def run_frontier(base, sampler=None, prompts: list[str] | None = None, families: list[str] | None = None,
                 grids: list[str] | None = None, quality: str = "auto", num_samples: int | None = None,
                 gen_length: int | None = None, seed: int = 0, sampling: SamplingConfig | None = None,
                 batch_size: int = 64, batch_sizes=(1, 8), timing_prompts: int = 8, repeats: int = 3,
                 warmup: int = 1, threads: int | None = 1, caches=("none",), block_length: int | None = None,
                 unrolls=("full",),
                 nll_draws: int = 4, two_sided: Callable | None = None, out_dir=None, progress: bool = True,
                 sampler_source: str | None = None, prompts_source: str | None = None, pass_cost=None,
                 unroll_cost_given: float | dict | None = None) -> dict:
    """Sweep, measure and analyse (see the module docstring); with `out_dir`, write frontier.json/.md/.png as a set.

    prompts: task prompts (validity), plain prompts or None (unconditional free text). num_samples:
    samples per prompt (default 1; unconditional: 200). gen_length default: the tasks' region for task prompts
    (adjust.eval.tasks.DEFAULT_GEN_LENGTH), 64 otherwise. threads: torch CPU threads for the whole run
    (restored after; None leaves them). Every argument is checked before the first generation.
    """
    from tqdm.auto import tqdm

    from ...decode import check_cache, check_request, generate_texts, unroll_plan
    from ...strategies import STRATEGIES
    from ..report import check_out_dir
    from ..tasks import DEFAULT_GEN_LENGTH, evaluate_tasks

    from ..costs import FREE, check_unroll_cost, tokens_per_pass_equivalent, unroll_costs_of

    # ---- every check before any work --------------------------------------------------------
    pass_cost = pass_cost or FREE
    c_given = check_unroll_cost(unroll_cost_given)
    if out_dir is not None:
        check_out_dir(out_dir)
    sampling = sampling or SamplingConfig()
    records = _task_records(prompts) if prompts else None
    if prompts is not None and not prompts:
        raise AdjustError("no prompts (pass None for unconditional generation)")
    mode, measure, measure_name = choose_quality(quality, records, two_sided)
    gen_length = gen_length or (DEFAULT_GEN_LENGTH if records is not None else 64)
    num_samples = num_samples or (1 if prompts else 200)
    batch_sizes = list(dict.fromkeys(batch_sizes))
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise AdjustError(f"--batch-sizes must list positive integers, e.g. 1,8; got {batch_sizes}")
    for name, v, low in (("--num-samples", num_samples, 1), ("--batch-size", batch_size, 1),
                         ("--timing-prompts", timing_prompts, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0),
                         ("--nll-draws", nll_draws, 1), ("--gen-length", gen_length, 1)):
        if not isinstance(v, int) or v < low:
            raise AdjustError(f"{name} must be an integer >= {low}, got {v}")
    if threads is not None and threads < 1:
        raise AdjustError(f"--threads must be at least 1, got {threads}")
    n_samples = num_samples * (len(prompts) if prompts else 1)
    if measure is not None and n_samples < getattr(measure, "min_samples", 1):
        raise AdjustError(f"the two-sided measure {measure_name} needs at least {measure.min_samples} samples per "
                          f"strategy, got {n_samples}; raise --num-samples (or use --quality nll)")
    caches = list(dict.fromkeys(caches)) or ["none"]
    for c in caches:
        check_cache(base, c, block_length, None)
    if mode == "text" and prompts is None and num_samples < 2 and measure is not None:
        raise AdjustError("--num-samples must be at least 2 for a two-sided measure")
    plan, notes = plan_points(families, grids, sampler is not None, gen_length)
    encoded = [base.encode(p) for p in (prompts or [""])]
    check_request(base, encoded, gen_length, block_length)
    if sampler is not None:
        sampler.check_base(base)
    timing = timing_subset(prompts, records, timing_prompts)
    if len(timing) < timing_prompts:
        notes.append(f"timing on all {len(timing)} prompts (fewer than --timing-prompts {timing_prompts})")
    unrolls = list(dict.fromkeys(unrolls)) or ["full"]
    for u in unrolls:
        unroll_plan(u)
    c_unroll = unroll_costs_of(pass_cost, c_given, ["full"] + unrolls)  # each point's c is its unroll mode's
    points = [{"label": point_label(name, params, c, u), "family": family, "strategy": name, "params": params,
               "cache": c, "unroll": u, "side": side(family)} for family, name, params in plan for c in caches
              for u in (unrolls if STRATEGIES[name].uses_sampler else ["full"])]
    ref_label = point_label("exact", {}, "none" if "none" in caches else caches[0])
    for n in notes:
        print(f"adjust: warning: {n}", file=sys.stderr)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # ---- quality: once per point, all prompts ---------------------------------------------
        reference = None
        if mode == "text" and measure is not None:
            reference, _ = generate_texts(base, prompts or [""], build_strategy("exact", {}), sampling, gen_length,
                                          num_samples, batch_size, block_length, seed + 1, progress=progress)
        conditional = bool(prompts)
        for pt in tqdm(points, desc="frontier quality", disable=not progress):
            strategy = build_strategy(pt["strategy"], pt["params"])
            s_sampler = sampler if strategy.uses_sampler else None
            if mode == "validity":
                res = evaluate_tasks(base, s_sampler, records, [strategy], gen_length=gen_length, seed=seed,
                                     sampling=sampling, num_samples=num_samples, batch_size=batch_size,
                                     block_length=block_length, cache=pt["cache"], unroll=pt["unroll"])
                pt["quality"] = {}
                for row in res["results"]:
                    v, n = row["valid"], row["n"]
                    pt["quality"][row["task"]] = {"measure": "validity", "value": v, "n": n,
                                                  "se": round(math.sqrt(v * (1 - v) / n), 4), "score": v}
                    if row["task"] == "all":
                        pt.update(tokens_per_full_pass=row["tokens_per_full_pass"], full_passes=row["full_passes"],
                                  sampler_passes=row["sampler_passes"])
            else:
                samples, stats = generate_texts(base, prompts or [""], strategy, sampling, gen_length, num_samples,
                                                batch_size, block_length, seed, s_sampler, cache=pt["cache"],
                                                unroll=pt["unroll"])
                from ..metrics import finite_mean, finite_stderr, nll_under_base

                nll = nll_under_base(base, [s["token_ids"] for s in samples], draws=nll_draws, seed=seed,
                                     batch_size=batch_size,
                                     prompt_ids=[base.encode(s["prompt"]) for s in samples] if conditional else None)
                mean, se = finite_mean(nll), finite_stderr(nll)
                pt["nll"], pt["nll_se"] = mean, se
                pt["two_sided"] = None if measure is None else _check_two_sided(measure(base, reference, samples),
                                                                                pt["label"])
                if measure_name == "nll":
                    q = {"measure": "nll", "value": mean, "se": se, "n": sum(math.isfinite(v) for v in nll),
                         "score": None if mean is None else -mean}
                else:
                    t = pt["two_sided"]
                    q = {"measure": t["name"], "value": t["value"], "se": t["se"], "n": len(samples),
                         "score": t["score"]}
                pt["quality"] = {"text": q}
                d = stats.to_dict()
                pt.update(tokens_per_full_pass=d["tokens_per_full_pass"], full_passes=d["full_passes"],
                          sampler_passes=d["sampler_passes"])

        if measure_name != "nll" and mode == "text":
            measure_name = points[0]["two_sided"]["name"]  # as the measure calls itself

        # ---- speed: interleaved repeats per batch size ----------------------------------------
        total = len(batch_sizes) * len(points) * (warmup + repeats)
        bar = tqdm(total=total, desc="frontier timing", disable=not progress)
        unconditional = prompts is None
        for B in batch_sizes:
            def run(pt, B=B):
                strategy = build_strategy(pt["strategy"], pt["params"])
                s_sampler = sampler if strategy.uses_sampler else None
                per_prompt = B * len(timing) if unconditional else B
                return lambda seed_r: generate_texts(
                    base, [""] if unconditional else timing, strategy, sampling, gen_length, per_prompt, B,
                    block_length, seed_r, s_sampler, cache=pt["cache"], unroll=pt["unroll"])[1]

            stats = interleaved_runs([(pt["label"], run(pt)) for pt in points], repeats, warmup, seed, shuffle=True,
                                     bar=bar)
            ref = [st.tokens_per_second for st in stats[ref_label]]
            for pt in points:
                tps = [st.tokens_per_second for st in stats[pt["label"]]]
                pt.setdefault("speed", {})[str(B)] = {
                    "tokens_per_second": round(_median(tps), 3),
                    "ratio_to_exact": 1.0 if pt["label"] == ref_label else round(paired_ratio(tps, ref), 4),
                    "tokens_per_second_repeats": [round(t, 3) for t in tps],
                    "tokens_per_full_pass": round(_median([st.tokens_per_full_pass for st in stats[pt["label"]]]), 4),
                    **_cost_columns(stats[pt["label"]], pass_cost, c_unroll[pt["unroll"]],
                                    tokens_per_pass_equivalent)}
        bar.close()
    finally:
        torch.set_num_threads(old_threads)

    panels = list(points[0]["quality"])
    if "all" in panels:  # "all" last, after the tasks
        panels = [p for p in panels if p != "all"] + ["all"]
    target_b = 1 if 1 in batch_sizes else min(batch_sizes)
    result = {
        "mode": mode, "panels": panels, "points": points,
        "settings": {"base": base.identity(), "sampler": sampler_source if sampler is not None else None,
                     "prompts": prompts_source, "quality": quality, "measure": measure_name or "validity",
                     "prompt_count": len(prompts) if prompts else 0,
                     "tasks": None if records is None else {t: sum(r["task"] == t for r in records)
                                                            for t in dict.fromkeys(r["task"] for r in records)},
                     "num_samples": num_samples, "gen_length": gen_length, "seed": seed,
                     "reference_seed": seed + 1 if reference is not None else None,
                     "sampling": dataclasses.asdict(sampling), "batch_size": batch_size,
                     "batch_sizes": batch_sizes, "timing_prompts": timing, "repeats": repeats, "warmup": warmup,
                     "threads": torch.get_num_threads() if threads is None else threads, "caches": caches, "unrolls": unrolls,
                     "block_length": block_length, "nll_draws": nll_draws if mode == "text" else None,
                     "grids": {f: DEFAULT_GRIDS[f] for f in dict.fromkeys(p["family"] for p in points) if f != "exact"}
                     | {parse_grid(g)[0]: g for g in grids or []},
                     "speed_reference": ref_label, "target_batch_size": target_b,
                     "pass_cost": {"source": pass_cost.source, "unroll_cost": c_unroll["full"],
                                   "unroll_costs": {u: c_unroll[u] for u in unrolls},
                                   "note": pass_cost.describe({u: c_unroll[u] for u in unrolls})}},
        "notes": notes, "code_version": code_version(),
    }
    from ..quality import _json_safe, machine_info

    result["machine"] = machine_info(base.device)
    result["analysis"] = analyse(result)
    result = _json_safe(result)
    if out_dir is not None:
        result["files"] = write_report(result, out_dir)
    return result
