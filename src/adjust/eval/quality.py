"""`adjust eval quality`: sample quality against speed, the paper's protocol (docs/method.md section 6).

Protocol. `num_samples` unconditional samples of `gen_length` tokens at T = 1.0 are drawn
with `exact` (K = 1) as the reference set Q (seed s). Every evaluated configuration,
`exact` itself included, is sampled with seed s + 1, so no set shares random numbers with
Q; the `exact` row's MAUVE and C2ST AUC (two independent exact sets) are the noise floors: a
strategy cannot be told apart from exact joint sampling once it reaches them. Per configuration:

    MAUVE vs Q, the C2ST AUC vs Q (a classifier two-sample test on the base's own hidden states,
    adjust.eval.two_sample: 0.5 = indistinguishable, two-sided, unlike NLL), NLL under the
    evaluator (the base's own bound, or a causal LM), distinct-2/3, achieved tokens per full
    pass, tokens/s and speed relative to exact, and, with rollouts, the joint KL of parallel /
    ADJUST at their K (adjust.eval.joint_kl).

With `block_length` (semi-autoregressive blocks) and `kv_cache` ("prefix" / "dual", see
adjust.decode): every evaluated set is decoded in those blocks with that key/value cache; the
reference Q is exact in the same blocks without a cache. `unroll` ("fast", see adjust.decode):
the evaluated sets that use the joint sampler compute its unrolls that way.

Samples are cached in `cache_dir`, one JSON file per (base, sampler if used, strategy,
parameters, sampling, num_samples, gen_length, blocks, key/value cache and unroll mode if set, seed, and the version of the generating code:
`adjust.provenance.sampling_code_version()`): a rerun with one more strategy only generates
that one, and a change to the code that writes tokens regenerates every set. Tokens/s come
from the run that generated the samples (the machine is recorded with them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

from ..decode import Stats, generate_texts
from ..errors import AdjustError
from ..io import read_json, write_json
from ..provenance import code_version, sampling_code_version
from ..sampling import SamplingConfig
from .metrics import (MINILM, distinct_n, featurize, finite_mean, finite_stderr, mauve_score, nll_under_base,
                      nll_under_causal_lm)
from .report import save_figure
from .report import write_report as _write_report
from .specs import build_strategy, spec_label
from .two_sample import FEATURES as C2ST_FEATURES
from .two_sample import base_features, c2st

CACHE_VERSION = 1

# The default sweep: fixed-K parallel and ADJUST as in the paper, plus the adaptive peers.
DEFAULT_STRATEGIES: list[tuple[str, dict]] = (
    [("parallel", {"tokens_per_pass": k}) for k in (2, 3, 4, 8)]
    + [("adjust", {"tokens_per_pass": k}) for k in (2, 3, 4, 8)]
    + [("threshold", {"tau": t}) for t in (0.9, 0.7, 0.5)]
    + [("factor", {"factor": f}) for f in (0.5, 1.0, 2.0)]
    + [("entropy-bound", {"gamma": g}) for g in (0.01, 0.1, 1.0)]
    + [("adjust-threshold", {"tau": t, "max_tokens_per_pass": 8}) for t in (0.9, 0.7)]
    + [("threshold-adjust", {"tau": 0.9, "tokens_per_pass": k}) for k in (2, 4)]
)


def machine_info(device=None) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": str(device) if device is not None else "cpu"}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def normalize_specs(strategies) -> list[tuple[str, dict]]:
    """[(name, K | params dict | None) or "name"] -> [(name, params)]."""
    out = []
    for item in strategies:
        name, arg = (item, None) if isinstance(item, str) else item
        if arg is None:
            params = {}
        elif isinstance(arg, bool) or not isinstance(arg, (int, dict)):
            raise AdjustError(f"strategy {name!r}: expected K (an int) or a dict of parameters, got {arg!r}")
        else:
            params = {"tokens_per_pass": arg} if isinstance(arg, int) else dict(arg)
        if (name, params) not in out:
            out.append((name, params))
    return out


def _fingerprint_module(module) -> str:
    """Short hash of a fixed slice of every weight tensor (cheap even for a large sampler)."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(torch.round(t.detach().flatten()[:4096].float().cpu() * 1e4).to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class SampleCache:
    """Generated sample sets on disk, one JSON file per configuration; counts hits and generations."""

    def __init__(self, cache_dir, base, sampler, num_samples, gen_length, sampling, batch_size, progress,
                 block_length: int | None = None):
        self.block_length = block_length
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.base, self.sampler = base, sampler
        self.num_samples, self.gen_length, self.sampling = num_samples, gen_length, sampling
        self.batch_size, self.progress = batch_size, progress
        self.base_id = base.identity()
        self.sampler_id = _fingerprint_module(sampler) if sampler is not None else None
        self.code = sampling_code_version()
        self.hits: list[str] = []
        self.generated: list[str] = []

    def key(self, name, params, strategy, seed, kv_cache: str = "none", unroll: str = "full") -> dict:
        extra = {"block_length": self.block_length} if self.block_length else {}  # keys of earlier sets unchanged
        if kv_cache != "none":
            extra["kv_cache"] = kv_cache
        if unroll != "full" and strategy.uses_sampler:
            extra["unroll"] = unroll
        return {"version": CACHE_VERSION, "code": self.code, "base": self.base_id, "dtype": str(self.base.dtype),
                "sampler": self.sampler_id if strategy.uses_sampler else None,
                "strategy": name, "params": params, "describe": strategy.describe(),
                "sampling": dataclasses.asdict(self.sampling), "num_samples": self.num_samples,
                "gen_length": self.gen_length, "seed": seed, **extra}

    def path(self, key: dict, label: str) -> Path | None:
        if self.dir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", label + "".join(f"-{key[k]}" for k in ("kv_cache", "unroll")
                                                                  if k in key))
        return self.dir / f"{slug}-seed{key['seed']}-n{self.num_samples}-g{self.gen_length}-{digest}.json"

    def get(self, name: str, params: dict, seed: int, kv_cache: str = "none", unroll: str = "full") -> dict:
        """{"texts", "token_ids", "stats": Stats, "machine", "path", "cached"} of one configuration."""
        strategy = build_strategy(name, params)
        label = spec_label(name, params)
        key = self.key(name, params, strategy, seed, kv_cache, unroll)
        path = self.path(key, label)
        if path is not None and path.is_file():
            try:
                obj = read_json(path, "cached samples")
            except AdjustError as e:
                print(f"adjust: warning: ignoring unreadable cache file ({e}); regenerating", file=sys.stderr)
                obj = None
            if obj is not None and obj.get("key") == json.loads(json.dumps(key)):
                self.hits.append(f"{label}@seed{seed}")
                return {"texts": obj["texts"], "token_ids": obj["token_ids"], "stats": Stats(**obj["stats"]),
                        "machine": obj.get("machine"), "path": str(path), "cached": True}
        samples, stats = generate_texts(self.base, [""], strategy, self.sampling, gen_length=self.gen_length,
                                        num_samples=self.num_samples, batch_size=self.batch_size, seed=seed,
                                        sampler=self.sampler if strategy.uses_sampler else None,
                                        progress=self.progress, block_length=self.block_length, cache=kv_cache,
                                        unroll=unroll)
        self.generated.append(f"{label}@seed{seed}")
        entry = {"key": key, "describe": strategy.describe(), "machine": machine_info(self.base.device),
                 "stats": dataclasses.asdict(stats), "texts": [s["text"] for s in samples],
                 "token_ids": [s["token_ids"] for s in samples]}
        if path is not None:
            write_json(path, entry)
        return {"texts": entry["texts"], "token_ids": entry["token_ids"], "stats": stats,
                "machine": entry["machine"], "path": None if path is None else str(path), "cached": False}


def _available(specs, explicit: bool, sampler) -> tuple[list, list[str]]:
    """Drop configurations that cannot run here (with a note); unknown names are errors only if explicit."""
    from ..strategies import STRATEGIES, strategy_names

    strategy_names()
    keep, notes = [], []
    for name, params in specs:
        if name not in STRATEGIES:
            if explicit:
                build_strategy(name, params)  # raises the usual "unknown strategy" error
            notes.append(f"skipped {spec_label(name, params)}: strategy {name!r} is not registered")
            continue
        if STRATEGIES[name].uses_sampler and sampler is None:
            notes.append(f"skipped {spec_label(name, params)}: needs a joint sampler (--sampler)")
            continue
        build_strategy(name, params)  # bad parameters fail before any generation
        keep.append((name, params))
    return keep, notes


def _param_text(name: str, params: dict) -> str:
    if not params:
        return "K=1" if name == "exact" else "-"
    return ", ".join(f"{'K' if k == 'tokens_per_pass' else k}={v}" for k, v in params.items())


def run_quality(base, sampler=None, strategies=None, num_samples: int = 500, gen_length: int = 64, seed: int = 0,
                cache_dir="results/cache", featurizer=MINILM, evaluator: str = "base", joint_kl_rollouts=None,
                batch_size: int = 50, out_dir=None, nll_draws: int = 8, joint_kl_states: int = 64,
                joint_kl_draws: int = 4, mauve_seed: int = 25, sampling: SamplingConfig | None = None,
                progress: bool = True, block_length: int | None = None, kv_cache: str = "none",
                c2st_folds: int = 5, unroll: str = "full") -> dict:
    """Evaluate `strategies` (default: DEFAULT_STRATEGIES) against exact sampling; see the module docstring.

    c2st_folds: cross-validation folds of the two-sample test (at most num_samples are used); 0 = no test.

    strategies: list of (name, K) or (name, {param: value}) or "name". Returns one JSON-ready
    dict: rows, settings, machine, notes, cache {hits, generated}, and with `out_dir` the paths
    of quality.json / quality.md / quality.png written there.
    """
    from tqdm.auto import tqdm

    if num_samples < 2:
        raise AdjustError(f"--num-samples must be at least 2 for MAUVE, got {num_samples}")
    if nll_draws < 1:
        raise AdjustError(f"--nll-draws must be at least 1, got {nll_draws}")
    if isinstance(c2st_folds, bool) or not isinstance(c2st_folds, int) or c2st_folds < 0 or c2st_folds == 1:
        raise AdjustError(f"--c2st-folds must be 0 (no two-sample test) or at least 2, got {c2st_folds!r}")
    c2st_folds = min(c2st_folds, num_samples)
    from ..decode import check_cache, unroll_plan

    check_cache(base, kv_cache, block_length, None)
    unroll_plan(unroll)
    sampling = sampling or SamplingConfig(temperature=1.0)
    explicit = strategies is not None
    specs = normalize_specs(DEFAULT_STRATEGIES if strategies is None else strategies)
    specs = [("exact", {})] + [s for s in specs if s[0] != "exact"]  # exact first: the K = 1 row
    specs, notes = _available(specs, explicit, sampler)
    for n in notes:
        print(f"adjust: warning: {n}", file=sys.stderr)

    cache = SampleCache(cache_dir, base, sampler, num_samples, gen_length, sampling, batch_size, progress,
                        block_length)
    reference = cache.get("exact", {}, seed)
    features = lambda texts: featurize(texts, featurizer, base.device, progress=False)  # noqa: E731
    q_features = features(reference["texts"])
    q_base_features = base_features(base, reference["token_ids"], batch_size=batch_size) if c2st_folds else None

    rollouts = None
    if joint_kl_rollouts is not None:
        from ..distill.rollouts import Rollouts, load_rollouts

        rollouts = (joint_kl_rollouts if isinstance(joint_kl_rollouts, Rollouts)
                    else load_rollouts(joint_kl_rollouts, base))
    kl_by_k: dict[int, dict] = {}

    rows = []
    for name, params in tqdm(specs, desc="eval quality", disable=not progress):
        got = cache.get(name, params, seed + 1, kv_cache, unroll)
        texts, stats = got["texts"], got["stats"]
        if evaluator == "base":
            nll = nll_under_base(base, got["token_ids"], draws=nll_draws, seed=seed, batch_size=batch_size,
                                 progress=progress)
        else:
            nll = nll_under_causal_lm(evaluator, texts, device=base.device, progress=progress)
        two = {}
        if c2st_folds:
            p_base_features = base_features(base, got["token_ids"], batch_size=batch_size)
            two = c2st(p_base_features, q_base_features, folds=c2st_folds, seed=seed)
            two["mauve"] = mauve_score(p_features=p_base_features, q_features=q_base_features, seed=mauve_seed)
        row = {"strategy": name, "label": spec_label(name, params), "params": params,
               "param_text": _param_text(name, params),
               "describe": build_strategy(name, params).describe(),
               "tokens_per_full_pass": stats.tokens_per_full_pass,
               "mauve": mauve_score(p_features=features(texts), q_features=q_features, seed=mauve_seed),
               "c2st_auc": two.get("auc"), "c2st_auc_se": two.get("auc_se"), "c2st_accuracy": two.get("accuracy"),
               "mauve_base": two.get("mauve"),
               "nll": finite_mean(nll), "nll_stderr": finite_stderr(nll),
               "distinct_2": distinct_n(texts, 2), "distinct_3": distinct_n(texts, 3),
               "joint_kl": None, "joint_kl_stderr": None,
               "tokens_per_second": stats.tokens_per_second, "speed_vs_exact": None,
               "full_passes": stats.full_passes, "sampler_passes": stats.sampler_passes, "seconds": stats.seconds,
               "cached": got["cached"], "samples_file": got["path"], "timing_machine": got["machine"]}
        k = params.get("tokens_per_pass")
        if rollouts is not None and name in ("parallel", "adjust") and k:
            if k not in kl_by_k:
                from .joint_kl import joint_kl

                try:
                    kl_by_k[k] = joint_kl(base, sampler, rollouts, k, num_states=joint_kl_states, draws=joint_kl_draws,
                                          order=sampling.order, seed=seed, progress=progress)
                except AdjustError as e:
                    kl_by_k[k] = {}
                    notes.append(f"joint-KL at K={k} not computed: {e}")
                    print(f"adjust: warning: {notes[-1]}", file=sys.stderr)
            kl = kl_by_k[k]
            row["joint_kl"], row["joint_kl_stderr"] = kl.get(f"kl_{name}"), kl.get(f"kl_{name}_stderr")
        rows.append(row)
    exact_tps = rows[0]["tokens_per_second"]
    for row in rows:
        row["speed_vs_exact"] = row["tokens_per_second"] / exact_tps if exact_tps > 0 else None

    result = {
        "rows": rows,
        "settings": {"num_samples": num_samples, "gen_length": gen_length, "seed": seed,
                     "block_length": block_length, "kv_cache": kv_cache, "unroll": unroll,
                     "reference": f"exact, seed {seed}", "candidates_seed": seed + 1,
                     "sampling": dataclasses.asdict(sampling), "featurizer": featurizer if isinstance(featurizer, str)
                     else getattr(featurizer, "__name__", "callable"),
                     "mauve_buckets": "auto (n/10, at least 2)", "mauve_seed": mauve_seed,
                     "evaluator": evaluator, "nll": "nats per token" + (
                         f", masked-diffusion bound of the base, {nll_draws} draws" if evaluator == "base" else ""),
                     "mauve_noise_floor": rows[0]["mauve"],
                     "c2st": {"features": C2ST_FEATURES, "folds": c2st_folds, "seed": seed,
                              "classifier": "L2 logistic regression, penalty by inner 3-fold cross-validation",
                              "auc": f"held-out ROC AUC of the evaluated set vs exact (seed {seed}), mean over "
                                     "folds; se: DeLong over the held-out samples"} if c2st_folds else None,
                     "c2st_noise_floor": rows[0]["c2st_auc"], "c2st_noise_floor_se": rows[0]["c2st_auc_se"],
                     "mauve_base_noise_floor": rows[0]["mauve_base"],
                     "base": base.identity(),
                     "sampler": cache.sampler_id, "joint_kl_rollouts": None if joint_kl_rollouts is None
                     else str(joint_kl_rollouts) if isinstance(joint_kl_rollouts, (str, os.PathLike)) else "in memory",
                     "batch_size": batch_size, "cache_dir": None if cache_dir is None else str(cache_dir)},
        "machine": machine_info(base.device),
        "code_version": code_version(),
        "notes": notes,
        "cache": {"hits": cache.hits, "generated": cache.generated},
    }
    result = _json_safe(result)
    if out_dir is not None:
        result["files"] = write_report(result, out_dir)
    return result


def _json_safe(obj):
    """NaN / inf -> None, so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Report: JSON, Markdown table, plot
# --------------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _c2st(auc, se) -> str:
    return "-" if auc is None else f"{auc:.3f}" + ("" if se is None else f" ± {se:.3f}")


def markdown_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"Quality vs speed: {s['num_samples']} unconditional samples x {s['gen_length']} tokens, "
             f"T = {s['sampling']['temperature']}, order {s['sampling']['order']}; MAUVE against exact "
             f"(seed {s['seed']}) with featurizer {s['featurizer']}; NLL under {s['evaluator']} "
             f"({s['nll']}). Noise floor (exact vs exact): MAUVE {_fmt(s['mauve_noise_floor'])}."
             + (f" C2ST AUC: held-out AUC of a classifier telling the set from exact ({s['c2st']['folds']}-fold; "
                f"features: {s['c2st']['features']}; 0.5 = indistinguishable, higher = further from exact in "
                f"either direction); noise floor (exact vs exact) "
                f"{_c2st(s['c2st_noise_floor'], s['c2st_noise_floor_se'])}. "
                f"MAUVE (base): MAUVE on those features, noise floor {_fmt(s['mauve_base_noise_floor'])}."
                if s.get("c2st") else ""),
             "",
             "| strategy | K/param | tokens/full pass | MAUVE | NLL | distinct-2 | joint-KL | tokens/s "
             "| speed vs exact | C2ST AUC | MAUVE (base) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kl = "-" if r["joint_kl"] is None else (f"{r['joint_kl']:.3f}" + (
            f" ± {r['joint_kl_stderr']:.3f}" if r.get("joint_kl_stderr") is not None else ""))
        speed = "-" if r["speed_vs_exact"] is None else f"{r['speed_vs_exact']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['param_text']} | {_fmt(r['tokens_per_full_pass'], 2)} | "
                     f"{_fmt(r['mauve'])} | {_fmt(r['nll'])} | {_fmt(r['distinct_2'])} | {kl} | "
                     f"{_fmt(r['tokens_per_second'], 1)} | {speed} | "
                     f"{_c2st(r.get('c2st_auc'), r.get('c2st_auc_se'))} | "
                     f"{_fmt(r.get('mauve_base'))} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, device {m['device']}"
              + (f" ({m['gpu']})" if m.get("gpu") else "") + ". Tokens/s are from the run that generated each "
              "sample set (cached sets keep their original timing)."]
    lines += [f"Note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Two panels like the paper's Figures 1 and 5: MAUVE vs tokens per full pass, MAUVE vs tokens/s; below
    them the same for the C2ST AUC (with its standard error) when the two-sample test ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = result["rows"][0]
    metrics = [("mauve", None, "MAUVE vs exact", (0, 1.05))]
    if exact.get("c2st_auc") is not None:
        metrics.append(("c2st_auc", "c2st_auc_se", "C2ST AUC vs exact (0.5 = same)", (0.3, 1.02)))
    fig, grid = plt.subplots(len(metrics), 2, figsize=(11, 4.2 * len(metrics)), squeeze=False)
    families: dict[str, list] = {}
    for r in result["rows"][1:]:
        families.setdefault(r["strategy"], []).append(r)
    for (y_key, se_key, y_label, y_lim), axes in zip(metrics, grid):
        for ax, x_key, x_label in ((axes[0], "tokens_per_full_pass", "tokens per full pass"),
                                   (axes[1], "tokens_per_second", "tokens / s")):
            for name, rs in families.items():
                pts = sorted((r[x_key], r[y_key], r.get(se_key) or 0.0) for r in rs
                             if r[x_key] is not None and r[y_key] is not None)
                if name in ("parallel", "adjust") and exact[y_key] is not None:
                    # fixed-K families start at K = 1
                    pts = [(exact[x_key], exact[y_key], exact.get(se_key) or 0.0)] + pts
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es if se_key else None, marker="o", capsize=2, label=name)
            if exact[y_key] is not None:
                ax.scatter([exact[x_key]], [exact[y_key]], marker="*", s=160, color="black", zorder=5, label="exact")
                ax.axhline(exact[y_key], color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.set_ylim(*y_lim)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{s['base'].get('name')}: {s['num_samples']} samples x {s['gen_length']} tokens, T = "
                 f"{s['sampling']['temperature']} (dotted: exact vs exact noise floor)", fontsize=10)
    save_figure(fig, path)


def write_report(result: dict, out_dir) -> dict:
    """quality.json, quality.md and quality.png in `out_dir` (each written atomically); their paths."""
    return _write_report(result, out_dir, "quality", markdown_table, plot)
