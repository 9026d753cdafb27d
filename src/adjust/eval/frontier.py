"""`adjust eval frontier`: every strategy family's knob swept on the same work, quality against speed.

What is measured, per point (a strategy at one setting of its knob, with one key/value cache mode):

* quality, once, on all the prompts (batched; the tokens do not depend on the batch size), seed `seed`:
  - on verifiable task prompts (`python -m adjust.eval.tasks prompts`): the validity of the answers
    (`adjust.eval.tasks.evaluate_tasks`' rule), per task and pooled ("all"), with its binomial
    standard error;
  - on free text (a file of plain prompts, or unconditional): the NLL of the generated tokens under
    the base's own masked-diffusion bound (given the prompt), and, when a two-sided measure is
    given (`two_sided`), its value against an independent set of exact samples (seed `seed` + 1,
    so the exact point's value is the measure's noise floor). NLL alone rewards mode-seeking
    (a strategy can sit below exact's own NLL), so a two-sided measure is the one to rank by.
* tokens per full pass (the achieved K, from the quality run's Stats);
* wall-clock tokens/s at each batch size, side by side (`bench.interleaved_runs`): `warmup` untimed
  runs of every point, then `repeats` repeats, each running every point once in a shuffled order,
  on the same `timing_prompts` prompts (each decoded as a batch of B samples), `threads` CPU
  threads. Reported: the median tokens/s and the median over repeats of the paired ratio to
  exact's tokens/s in the same repeat (exact uncached when several cache modes are swept).

Analysis, per batch size and quality panel (each task and "all", or the one free-text measure):

* each family's Pareto front (maximise quality and tokens/s; exact is the K = 1 point of the
  parallel and adjust families) and the overall front;
* for every peer point (families parallel, threshold, factor, entropy-bound) on its family's
  front: the fastest ADJUST-family point (adjust, adjust-threshold, threshold-adjust) that
  dominates it (quality at least as good, tokens/s higher), with the tokens/s ratio, or none;
* two targets at batch 1 (or the smallest batch size timed): validity: every peer point
  within 3 validity points of exact has an ADJUST-family point at least as valid with >= 1.25x
  its tokens/s; front: every point of the overall front faster than 1.5x exact is ADJUST-family
  (for s > 1.5x exact, the best quality reachable at >= s tokens/s is then ADJUST's).

Plugging in: a new family is one line of DEFAULT_GRIDS (and its side: PEER_FAMILIES or
ADJUST_FAMILIES); a two-sided measure is a function (base, exact_samples, strategy_samples) ->
{"name", "value", "se"[, "score"]} registered in TWO_SIDED_MEASURES (DEFAULT_TWO_SIDED names the
one used when `--quality auto` meets free text). Samples are `decode.generate_texts`' dicts
({"prompt", "text", "token_ids", ...}); "score" orders points (higher = closer to exact) and
defaults to -value (a distance to exact).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import weakref
from typing import Callable

import torch

from ..errors import AdjustError
from ..provenance import code_version
from ..sampling import SamplingConfig
from ..strategies import STR_PARAMS
from .bench import _median, interleaved_runs, paired_ratio
from .specs import K_ALIASES, _value, build_strategy, spec_key, spec_label

# Each family's grid, in the --grid syntax: FAMILY:key=v,v,...;key=v,... (the Cartesian product).
DEFAULT_GRIDS: dict[str, str] = {
    "parallel": "parallel:K=2,3,4,6,8",
    "adjust": "adjust:K=2,3,4,6,8|K=8,16;group=2,4",
    "threshold": "threshold:tau=0.95,0.9,0.8,0.7,0.5,0.3",
    "factor": "factor:factor=0.5,1,2,4",
    "entropy-bound": "entropy-bound:gamma=0.01,0.1,0.5,1,2",
    "adjust-threshold": "adjust-threshold:tau=0.95,0.9,0.8,0.7,0.5;max_tokens_per_pass=8",
    "threshold-adjust": "threshold-adjust:tau=0.9,0.7,0.5;K=2,4",
    "speculative": "speculative:depth=2,4,8;drafter=sampler,self",  # lossless: exact's tokens, at fewer passes
}
PEER_FAMILIES = ("parallel", "threshold", "factor", "entropy-bound")
ADJUST_FAMILIES = ("adjust", "adjust-threshold", "threshold-adjust", "speculative")
ANCHORED = ("parallel", "adjust")  # exact is their K = 1 point

VALIDITY_MARGIN = 0.03  # "within 3 points of exact validity"
SPEEDUP_TARGET = 1.25  # an ADJUST-family point >= 1.25x the peer's tokens/s
FRONT_SPEED = 1.5  # the ADJUST family on the overall front above 1.5x exact's tokens/s

# name -> fn(base, exact_samples, strategy_samples) -> {"name", "value", "se"[, "score"]}
def c2st_auc(base, exact_samples, strategy_samples) -> dict:
    """The classifier two-sample test (adjust.eval.two_sample) of a strategy's samples against exact ones:
    held-out AUC (0.5 = indistinguishable), its standard error, and score -|AUC - 0.5| (higher = closer)."""
    from .two_sample import base_features, c2st

    def features(samples):
        return base_features(base, samples, [base.encode(s["prompt"]) if s.get("prompt") else [] for s in samples])

    # the exact reference set is the same for every point of a sweep: its features are computed once
    key = tuple((s.get("prompt") or "", tuple(s["token_ids"])) for s in exact_samples)
    if _REFERENCE.get("key") != key or _REFERENCE["base"]() is not base:
        _REFERENCE.clear()
        _REFERENCE.update(key=key, base=weakref.ref(base), features=features(exact_samples))
    r = c2st(_REFERENCE["features"], features(strategy_samples))
    return {"name": "c2st_auc", "value": r["auc"], "se": r["auc_se"], "score": -abs(r["auc"] - 0.5)}


c2st_auc.min_samples = 10  # 5 cross-validation folds of at least 2 samples each
_REFERENCE: dict = {}  # c2st_auc's last exact reference set: {"key", "base" (a weak reference), "features"}


TWO_SIDED_MEASURES: dict[str, Callable] = {"c2st": c2st_auc}
DEFAULT_TWO_SIDED: str | None = "c2st"
QUALITY_MODES = ("auto", "validity", "nll")


# --------------------------------------------------------------------------------------------
# The sweep: families, grids, points
# --------------------------------------------------------------------------------------------

def side(family: str) -> str:
    """"adjust" (the ADJUST family), "peer" or "exact"."""
    return "adjust" if family in ADJUST_FAMILIES else "peer" if family in PEER_FAMILIES else "exact"


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
    from ..strategies import STRATEGIES, strategy_names

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
# Pareto fronts, dominance, targets: pure functions of points {"label", "family", "q", "s"[, "v"]}
# (q: the quality score, higher = better; s: tokens/s; v: the quality as reported, default q)
# --------------------------------------------------------------------------------------------

def _v(p: dict):
    return p.get("v", p["q"])


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b in quality `q` and speed `s`, and better in one of them."""
    return a["q"] >= b["q"] and a["s"] >= b["s"] and (a["q"] > b["q"] or a["s"] > b["s"])


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (identical points are all kept), fastest first."""
    pts = [p for p in points if p["q"] is not None and p["s"] is not None]
    front = [p for p in pts if not any(dominates(o, p) for o in pts)]
    return sorted(front, key=lambda p: (-p["s"], -p["q"], p["label"]))


def family_fronts(points: list[dict]) -> dict[str, list[dict]]:
    """Each family's front; exact points join the parallel and adjust families (their K = 1)."""
    families = list(dict.fromkeys(p["family"] for p in points if p["family"] != "exact"))
    exact = [p for p in points if p["family"] == "exact"]
    return {f: pareto_front([p for p in points if p["family"] == f] + (exact if f in ANCHORED else []))
            for f in families}


def _fastest(candidates: list[dict]) -> dict | None:
    return max(candidates, key=lambda p: (p["s"], p["q"]), default=None)


def dominance(points: list[dict], fronts: dict[str, list[dict]] | None = None) -> list[dict]:
    """For each peer point on its family's front: the fastest ADJUST-family point with quality >= its
    quality and higher tokens/s (`dominated_by`, None if there is none), the tokens/s ratio, and how
    many ADJUST-family points dominate it."""
    fronts = family_fronts(points) if fronts is None else fronts
    ours = [p for p in points if side(p["family"]) == "adjust" and p["q"] is not None and p["s"] is not None]
    out = []
    for family, front in fronts.items():
        if side(family) != "peer":
            continue
        for peer in front:
            if peer["family"] != family:
                continue  # exact on the parallel front
            winners = [a for a in ours if a["q"] >= peer["q"] and a["s"] > peer["s"]]
            best = _fastest(winners)
            out.append({"peer": peer["label"], "family": family, "quality": _v(peer), "tokens_per_second": peer["s"],
                        "dominated_by": None if best is None else best["label"],
                        "by_family": None if best is None else best["family"],
                        "by_quality": None if best is None else _v(best),
                        "by_tokens_per_second": None if best is None else best["s"],
                        "speed_ratio": None if best is None or not peer["s"] else round(best["s"] / peer["s"], 4),
                        "dominators": len(winners)})
    return out


def validity_target(points: list[dict], exact_q: float, margin: float = VALIDITY_MARGIN,
                    speedup: float = SPEEDUP_TARGET) -> dict:
    """Every peer point with validity >= exact's - margin needs an ADJUST-family point at least as valid
    with tokens/s >= speedup x its own. {"met", "checked": [per peer point], "failed": [labels]}."""
    ours = [p for p in points if side(p["family"]) == "adjust" and p["q"] is not None and p["s"] is not None]
    checked = []
    for peer in points:
        if side(peer["family"]) != "peer" or peer["q"] is None or peer["s"] is None:
            continue
        if peer["q"] < exact_q - margin - 1e-12:
            continue
        best = _fastest([a for a in ours if a["q"] >= peer["q"] and a["s"] >= speedup * peer["s"]])
        near = _fastest([a for a in ours if a["q"] >= peer["q"]])  # the best an ADJUST point does at that validity
        checked.append({"peer": peer["label"], "family": peer["family"], "quality": _v(peer),
                        "tokens_per_second": peer["s"], "met": best is not None,
                        "witness": None if best is None else best["label"],
                        "witness_ratio": None if best is None or not peer["s"] else round(best["s"] / peer["s"], 4),
                        "fastest_as_valid": None if near is None else near["label"],
                        "fastest_as_valid_ratio": None if near is None or not peer["s"] else round(near["s"] / peer["s"], 4)})
    failed = [c["peer"] for c in checked if not c["met"]]
    return {"met": not failed, "vacuous": not checked, "margin": margin, "speedup": speedup, "exact_quality": exact_q,
            "checked": checked, "failed": failed}


def front_target(points: list[dict], exact_s: float, factor: float = FRONT_SPEED) -> dict:
    """Whether every point of the overall front faster than factor x exact's tokens/s is ADJUST-family.

    For any speed s above factor x exact, the best quality at >= s tokens/s is then an ADJUST-family
    point's. "met" is None when no front point is that fast (nothing to decide)."""
    front = pareto_front(points)
    fast = [p for p in front if p["s"] > factor * exact_s]
    peers = [p["label"] for p in fast if side(p["family"]) != "adjust"]
    return {"met": None if not fast else not peers, "factor": factor, "exact_tokens_per_second": exact_s,
            "front_above": [p["label"] for p in fast], "peers_on_front_above": peers,
            "front": [p["label"] for p in front]}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _task_records(prompts: list[str]) -> list[dict] | None:
    """[{"task", "prompt"}] if every prompt is a task prompt, None if none is; mixed is an error."""
    from .tasks import task_of

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
    """(mode "validity" | "text", two-sided function or None, the free-text panel's measure name)."""
    if quality not in QUALITY_MODES and quality not in TWO_SIDED_MEASURES:
        raise AdjustError(f"--quality {quality!r}: choose from {', '.join(list(QUALITY_MODES) + list(TWO_SIDED_MEASURES))}")
    if quality == "validity" or (quality == "auto" and records is not None):
        if records is None:
            raise AdjustError("--quality validity needs task prompts (python -m adjust.eval.tasks prompts)")
        return "validity", None, None
    if quality in TWO_SIDED_MEASURES:
        return "text", TWO_SIDED_MEASURES[quality], quality
    if quality == "nll":
        return "text", None, "nll"
    if two_sided is None and DEFAULT_TWO_SIDED is not None:
        two_sided = TWO_SIDED_MEASURES[DEFAULT_TWO_SIDED]
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


def run_frontier(base, sampler=None, prompts: list[str] | None = None, families: list[str] | None = None,
                 grids: list[str] | None = None, quality: str = "auto", num_samples: int | None = None,
                 gen_length: int | None = None, seed: int = 0, sampling: SamplingConfig | None = None,
                 batch_size: int = 64, batch_sizes=(1, 8), timing_prompts: int = 8, repeats: int = 3,
                 warmup: int = 1, threads: int | None = 1, caches=("none",), block_length: int | None = None,
                 unrolls=("full",),
                 nll_draws: int = 4, two_sided: Callable | None = None, out_dir=None, progress: bool = True,
                 sampler_source: str | None = None, prompts_source: str | None = None) -> dict:
    """Sweep, measure and analyse (see the module docstring); with `out_dir`, write frontier.json/.md/.png.

    prompts: task prompts (validity), plain prompts or None (unconditional free text). num_samples:
    samples per prompt (default 1; unconditional: 200). gen_length default: the tasks' region for task prompts
    (adjust.eval.tasks.DEFAULT_GEN_LENGTH), 64 otherwise. threads: torch CPU threads for the whole run
    (restored after; None leaves them). Every argument is checked before the first generation.
    """
    from tqdm.auto import tqdm

    from ..decode import check_cache, check_request, generate_texts, unroll_plan
    from ..strategies import STRATEGIES
    from .report import check_out_dir
    from .tasks import DEFAULT_GEN_LENGTH, evaluate_tasks

    # ---- every check before any work --------------------------------------------------------
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
                from .metrics import finite_mean, finite_stderr, nll_under_base

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
                    "tokens_per_full_pass": round(_median([st.tokens_per_full_pass for st in stats[pt["label"]]]), 4)}
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
                     "speed_reference": ref_label, "target_batch_size": target_b},
        "notes": notes, "code_version": code_version(),
    }
    from .quality import _json_safe, machine_info

    result["machine"] = machine_info(base.device)
    result["analysis"] = analyse(result)
    result["targets"] = targets(result)
    result = _json_safe(result)
    if out_dir is not None:
        result["files"] = write_report(result, out_dir)
    return result


def _qs(result: dict, panel: str, B: int) -> list[dict]:
    """The points as {"label", "family", "q", "s"} for one panel and batch size."""
    return [{"label": p["label"], "family": p["family"], "q": p["quality"][panel]["score"],
             "v": p["quality"][panel]["value"], "s": p["speed"][str(B)]["tokens_per_second"]}
            for p in result["points"] if panel in p["quality"]]


def analyse(result: dict) -> dict:
    """{batch size: {panel: {"fronts": {family: [labels]}, "overall": [labels], "dominance": [...]}}}."""
    out = {}
    for B in result["settings"]["batch_sizes"]:
        out[str(B)] = {}
        for panel in result["panels"]:
            pts = _qs(result, panel, B)
            fronts = family_fronts(pts)
            out[str(B)][panel] = {"fronts": {f: [p["label"] for p in fr] for f, fr in fronts.items()},
                                  "overall": [p["label"] for p in pareto_front(pts)],
                                  "dominance": dominance(pts, fronts)}
    return out


def targets(result: dict) -> dict:
    """The issue's targets at the target batch size, per panel."""
    B = result["settings"]["target_batch_size"]
    ref = result["settings"]["speed_reference"]
    out = {"batch_size": B, "validity": {} if result["mode"] == "validity" else None, "front": {}}
    for panel in result["panels"]:
        pts = _qs(result, panel, B)
        exact = next(p for p in pts if p["label"] == ref)
        out["front"][panel] = front_target(pts, exact["s"])
        if out["validity"] is not None:
            out["validity"][panel] = validity_target(pts, exact["q"])
    return out


# --------------------------------------------------------------------------------------------
# Report: JSON, Markdown, PNG
# --------------------------------------------------------------------------------------------

def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _verdict(met) -> str:
    return "**met**" if met is True else "**not met**" if met is False else "**undecided**"


def markdown_table(result: dict) -> str:
    s = result["settings"]
    Bs = s["batch_sizes"]
    panels = result["panels"]
    q_title = "validity" if result["mode"] == "validity" else s["measure"]
    if result["mode"] == "validity":
        work = (f"{s['prompt_count']} task prompts ({', '.join(f'{t} {n}' for t, n in s['tasks'].items())}), "
                f"{s['num_samples']} answer(s) each")
    elif s["prompt_count"]:
        work = f"{s['prompt_count']} prompts, {s['num_samples']} sample(s) each"
    else:
        work = f"{s['num_samples']} unconditional samples"
    lines = [f"# Quality vs speed frontier: {s['base'].get('name')}", "",
             f"Quality: {q_title} on {work}, gen length {s['gen_length']}, T = {s['sampling']['temperature']}, "
             f"order {s['sampling']['order']}, seed {s['seed']}. Speed: median tokens/s of {s['repeats']} interleaved "
             f"repeats (shuffled order, {s['warmup']} warm-up), each run decoding "
             + (f"{len(s['timing_prompts'])} batch(es) of B unconditional samples, " if not s["prompt_count"] else
                f"{len(s['timing_prompts'])} prompt(s) as a batch of B samples each, ")
             + f"{s['threads']} thread(s), x exact = median paired ratio to {s['speed_reference']} in the same repeat.",
             ""]
    if result["mode"] == "text":
        lines += ["NLL: nats per generated token under the base's masked-diffusion bound (lower is not always "
                  "better: mode-seeking strategies can score below exact's own NLL)."
                  + ("" if s["measure"] == "nll" else f" Ranked by {s['measure']} against exact samples (seed "
                     f"{s['reference_seed']}); exact's own value is the noise floor."), ""]
    head = ["point", "family", "cache"]
    if result["mode"] == "validity":
        head += panels
    else:
        head += ["NLL"] + ([s["measure"]] if s["measure"] != "nll" else [])
    head += ["tok/pass"] + [h for B in Bs for h in (f"tok/s B={B}", f"x exact B={B}")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["points"]:
        row = [p["label"], p["family"], p["cache"]]
        if result["mode"] == "validity":
            row += [_f(p["quality"][t]["value"]) for t in panels]
        else:
            row.append(_f(p.get("nll")) + ("" if p.get("nll_se") is None else f" ± {p['nll_se']:.3f}"))
            if s["measure"] != "nll":
                q = p["quality"]["text"]
                row.append(_f(q["value"]) + ("" if q["se"] is None else f" ± {q['se']:.3f}"))
        row.append(_f(p.get("tokens_per_full_pass"), 2))
        for B in Bs:
            sp = p["speed"][str(B)]
            row += [_f(sp["tokens_per_second"], 1), _f(sp["ratio_to_exact"], 2)]
        lines.append("| " + " | ".join(row) + " |")

    t = result["targets"]
    TB = t["batch_size"]
    lines += ["", f"## Targets (batch {TB}, {s['threads']} thread(s))", ""]
    if t.get("validity"):
        for panel, v in t["validity"].items():
            head = (f"- validity, {panel}: {_verdict(v['met'])}"
                    + (" (no peer point within 3 points of exact's validity)" if v["vacuous"] else "")
                    + f" -- every peer point within {100 * v['margin']:.0f} points of exact ({v['exact_quality']:.3f}) "
                    f"needs an ADJUST-family point at least as valid with >= {v['speedup']}x its tokens/s.")
            lines.append(head)
            if panel == "all" or len(t["validity"]) == 1:
                for c in v["checked"]:
                    if c["met"]:
                        lines.append(f"  - {c['peer']} ({c['quality']:.3f}, {c['tokens_per_second']:.1f} tok/s): "
                                     f"{c['witness']} is {c['witness_ratio']:.2f}x as fast")
                    else:
                        near = ("no ADJUST-family point is as valid" if c["fastest_as_valid"] is None else
                                f"the fastest as valid, {c['fastest_as_valid']}, is {c['fastest_as_valid_ratio']:.2f}x")
                        lines.append(f"  - {c['peer']} ({c['quality']:.3f}, {c['tokens_per_second']:.1f} tok/s): "
                                     f"NOT met, {near}: the peer wins here")
    for panel, f in t["front"].items():
        fast = ", ".join(f["front_above"]) or "none"
        lines.append(f"- front above {f['factor']}x exact, {panel}: {_verdict(f['met'])} -- overall-front points "
                     f"faster than {f['factor']}x exact ({f['factor'] * f['exact_tokens_per_second']:.1f} tok/s): {fast}"
                     + (f"; peers among them: {', '.join(f['peers_on_front_above'])}" if f["peers_on_front_above"] else "")
                     + ("; no point is that fast" if f["met"] is None else ""))
    for B in Bs:
        lines += ["", f"## Fronts and dominance, batch {B}", ""]
        for panel in panels:
            a = result["analysis"][str(B)][panel]
            lines.append(f"**{panel}** overall front: {', '.join(a['overall'])}")
            lines.append("")
            for fam, labels in a["fronts"].items():
                lines.append(f"- {fam} front: {', '.join(labels)}")
            for d in a["dominance"]:
                if d["dominated_by"] is None:
                    lines.append(f"- peer {d['peer']} ({_f(d['quality'])}, {_f(d['tokens_per_second'], 1)} tok/s): "
                                 "no ADJUST-family point dominates it (a peer wins here)")
                else:
                    lines.append(f"- peer {d['peer']} ({_f(d['quality'])}, {_f(d['tokens_per_second'], 1)} tok/s): "
                                 f"dominated by {d['dominated_by']} ({_f(d['by_quality'])}, "
                                 f"{d['speed_ratio']:.2f}x its tokens/s; {d['dominators']} ADJUST-family point(s) dominate it)")
            lines.append("")
    m = result["machine"]
    lines += [f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, device {m['device']}"
              + (f" ({m['gpu']})" if m.get("gpu") else "") + f". Code version {result['code_version']}."]
    lines += [f"Note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


FAMILY_STYLE = {"exact": ("black", "*"), "parallel": ("tab:gray", "v"), "threshold": ("tab:orange", "s"),
                "factor": ("tab:brown", "D"), "entropy-bound": ("tab:purple", "P"), "adjust": ("tab:blue", "o"),
                "adjust-threshold": ("tab:green", "^"), "threshold-adjust": ("tab:red", "X"),
                "speculative": ("tab:cyan", "h")}


def plot(result: dict, path) -> None:
    """Quality (score) vs tokens/s at the target batch size; one panel per quality panel; each family's
    points as markers, its Pareto front as a line (peers dashed, ADJUST family solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    B = result["targets"]["batch_size"]
    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    s = result["settings"]
    if result["mode"] == "validity":
        ylabel = "validity"
    elif s["measure"] == "nll":
        ylabel = "-NLL under the base (nats/token; higher = better)"
    else:
        ylabel = f"{s['measure']} score (higher = closer to exact)"
    for ax, panel in zip(axes[0], panels):
        pts = _qs(result, panel, B)
        fronts = result["analysis"][str(B)][panel]["fronts"]
        by_label = {p["label"]: p for p in pts}
        for fam in dict.fromkeys(p["family"] for p in pts):
            color, marker = FAMILY_STYLE.get(fam, ("tab:cyan", "o"))
            fp = [p for p in pts if p["family"] == fam and p["q"] is not None]
            ax.scatter([p["s"] for p in fp], [p["q"] for p in fp], color=color, marker=marker,
                       s=110 if fam == "exact" else 30, zorder=4, label=fam, alpha=0.85)
            if fam in fronts:
                line = sorted((by_label[lab]["s"], by_label[lab]["q"]) for lab in fronts[fam])
                ax.plot(*zip(*line), color=color, linestyle="-" if side(fam) == "adjust" else "--", linewidth=1.2)
        ax.set_title(panel)
        ax.set_xlabel(f"tokens / s (batch {B}, {s['threads']} thread(s))")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{s['base'].get('name')}: quality vs speed, each family's Pareto front drawn "
                 "(solid: ADJUST family, dashed: peers)", fontsize=10)
    save_figure(fig, path)


def write_report(result: dict, out_dir) -> dict:
    """frontier.json, frontier.md and frontier.png in `out_dir` (each atomically); their paths."""
    from .report import write_report as write

    return write(result, out_dir, "frontier", markdown_table, plot)
