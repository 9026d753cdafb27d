#!/usr/bin/env python
"""Speculative ADJUST against exact decoding on the CPU (docs/speculative.md): full passes and tokens/s.

For each shipped model (its held-out prompts: the task model's eval prompts of every task, Shakespeare's
character cues), temperature 0 and 1, the `exact` target and `speculative` with both drafters at each depth:
every prompt decoded alone (batch 1, the setting of the wall-clock target), one thread. Reports tokens per full
pass (base calls), base rows per pass, the drafts' acceptance, wall-clock tokens/s and the ratios to exact; checks
each speculative run wrote exactly exact's tokens. `--dual-models` (default the Shakespeare model) also run with
the dual key/value cache and `--dual-block` blocks, at depth 4 (exact with the same cache is the reference).
`--branched` (default 4:1,3:2) adds depth:branch points without a cache: alternative first drafts, compared with
the chains of about the same rows per pass (depth 5). `--rules coupled,sampling` also runs rule (a), speculative
sampling (not exact's tokens for a seed, so `identical` is "-" there; its exactness is a distribution's, tested by
tests/strategies/test_speculative.py's goodness-of-fit test).

`--sampler MODEL=DIR` drafts with another sampler of that model (e.g. one distilled for longer unrolls).

  python benchmarks/speculative.py --out results/speculative        # writes .json and .md, ~5 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE_PROMPTS = ["ROMEO:", "JULIET:", "KING RICHARD III:", "First Citizen:", "MENENIUS:", "HAMLET:"]


def prompts_for(name: str, base, n: int) -> list[list[int]]:
    if name == "task-base":
        from adjust.eval import tasks as T

        per = max(1, n // len(T.TASKS))
        return [base.encode(e.prompt) for t in T.TASKS for e in T.examples(t, per, seed=1, split="eval")][:n]
    return [base.encode(p) for p in SHAKESPEARE_PROMPTS[:n]]


def run_config(base, sampler, prompts, strategy, temperature: float, gen_length: int,
               cache: str = "none", block_length: int | None = None) -> tuple[dict, list]:
    from adjust.decode import generate
    from adjust.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=temperature)
    tokens, agg = [], dict(passes=0, rows=0, proposed=0, accepted=0, unrolls=0, tokens=0, seconds=0.0)
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        out = generate(base, [p], strategy, sampling, gen_length=gen_length, seed=i, cache=cache,
                       block_length=block_length,
                       sampler=sampler if strategy.takes_sampler or strategy.uses_sampler else None)
        agg["seconds"] += time.perf_counter() - t0
        s = out.stats
        agg["passes"] += s.full_passes
        agg["rows"] += s.base_rows
        agg["proposed"] += s.drafts_proposed
        agg["accepted"] += s.drafts_accepted
        agg["unrolls"] += s.sampler_passes
        agg["tokens"] += gen_length
        tokens.append(out.tokens[0].tolist())
    return {"strategy": strategy.describe(), "temperature": temperature, "prompts": len(prompts),
            "cache": cache if cache == "none" else f"{cache}, blocks of {block_length}",
            "gen_length": gen_length, "full_passes": agg["passes"], "sampler_passes": agg["unrolls"],
            "tokens_per_full_pass": round(agg["tokens"] / agg["passes"], 3),
            "rows_per_full_pass": round(agg["rows"] / agg["passes"], 2),
            "drafts_proposed": agg["proposed"], "drafts_accepted": agg["accepted"],
            "acceptance": round(agg["accepted"] / agg["proposed"], 3) if agg["proposed"] else None,
            "seconds": round(agg["seconds"], 3), "tokens_per_second": round(agg["tokens"] / agg["seconds"], 1)}, tokens


def measure(models: list[str], depths: list[int], temperatures: list[float], n_prompts: int,
            gen_lengths: dict, dual_models: list[str], dual_block: int, branched=(), rules=("coupled",),
            samplers: dict | None = None, threshold_tau: float | None = None) -> list[dict]:
    from adjust.base import load_base
    from adjust.sampler import JointSampler
    from adjust.strategies import make_strategy

    rows = []
    for name in models:
        base = load_base(ROOT / "models" / name)
        sampler_dir = (samplers or {}).get(name) or ROOT / "models" / name / "sampler"
        sampler = JointSampler.load(sampler_dir, base)
        prompts, gen = prompts_for(name, base, n_prompts), gen_lengths[name]
        chains = [(d, 0) for d in depths] + [(d, b) for d, b in branched]
        settings = [("none", None, chains)] + ([("dual", dual_block, [(4, 0)])] if name in dual_models else [])
        targets = [("exact", {})] + ([("threshold", {"tau": threshold_tau})] if threshold_tau is not None else [])
        for (cache, block, ds), t, (target, tp) in ((c, t, g) for c in settings for t in temperatures
                                                    for g in targets):
            ref, ref_tokens = run_config(base, sampler, prompts, make_strategy(target, **tp), t, gen, cache, block)
            ref.update(model=name, identical=True, sampler=os.path.relpath(sampler_dir, ROOT))
            rows.append(ref)
            by = {}
            for d, b in ds:
                for rule in rules:
                    if rule != "coupled" and (b or target != "exact"):
                        continue  # alternative first drafts and the threshold target need the coupled rule
                    if b and target != "exact":
                        continue
                    for drafter in ("sampler", "self"):
                        extra = {} if target == "exact" else {"target": target, **tp}
                        strategy = make_strategy("speculative", depth=d, drafter=drafter, branch=b, rule=rule,
                                                 **extra)
                        r, toks = run_config(base, sampler, prompts, strategy, t, gen, cache, block)
                        r.update(model=name, identical=toks == ref_tokens if rule == "coupled" else None,
                                 passes_vs_exact=round(ref["full_passes"] / r["full_passes"], 3),
                                 speed_vs_exact=round(r["tokens_per_second"] / ref["tokens_per_second"], 3))
                        by[(d, b, drafter, rule)] = r
                        rows.append(r)
                        print(f"{name} T={t} cache {r['cache']} {r['strategy']}: {r['tokens_per_full_pass']} "
                              f"tokens/pass, {r['passes_vs_exact']}x fewer passes, {r['speed_vs_exact']}x tokens/s, "
                              f"identical {r['identical']}", file=sys.stderr, flush=True)
            for (d, b, drafter, rule), s in by.items():
                if drafter == "sampler":
                    s["passes_vs_self"] = round(by[(d, b, "self", rule)]["full_passes"] / s["full_passes"], 3)
    return rows


def markdown(report: dict) -> str:
    v = report["code_version"]
    lines = [f"# Speculative ADJUST vs its target, CPU, batch 1 ({v.get('commit', 'no commit')[:12]}"
             f"{', dirty' if v.get('dirty') else ''})", "",
             f"Prompts decoded alone, one thread; {report['note']}", "",
             "| model | cache | T | strategy | tokens / full pass | rows / pass | acceptance | passes vs target | "
             "passes vs self | tokens/s | speed vs target | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} (gen {r['gen_length']}) | {r['cache']} | {r['temperature']:g} | "
                     f"{r['strategy']} | "
                     f"{r['tokens_per_full_pass']} | {r['rows_per_full_pass']} | {r['acceptance'] or '-'} | "
                     f"{r.get('passes_vs_exact', 1.0)}x | "
                     f"{str(r['passes_vs_self']) + 'x' if 'passes_vs_self' in r else '-'} | "
                     f"{r['tokens_per_second']} | {r.get('speed_vs_exact', 1.0)}x | "
                     f"{'-' if r['identical'] is None else r['identical']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shakespeare-base,task-base")
    p.add_argument("--depths", default="2,4,5,8")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--prompts", type=int, default=6, help="prompts per model, each decoded alone")
    p.add_argument("--gen-shakespeare", type=int, default=64)
    p.add_argument("--gen-task", type=int, default=10)
    p.add_argument("--branched", default="4:1,3:2", help="depth:branch points also run without a cache")
    p.add_argument("--dual-models", default="shakespeare-base", help="models also run with the dual cache")
    p.add_argument("--dual-block", type=int, default=16, help="block length of the dual-cache runs")
    p.add_argument("--sampler", action="append", default=[], metavar="MODEL=DIR",
                   help="draft with the sampler in DIR for that model (repeatable; default: the model's own)")
    p.add_argument("--threshold-target", type=float, default=None, metavar="TAU",
                   help="also wrap threshold at this tau (--target threshold, coupled rule) beside its own runs")
    p.add_argument("--rules", default="coupled", help="acceptance rules of the speculative runs: coupled, sampling")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. results/speculative)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from adjust.eval.report import print_and_write
    from adjust.provenance import code_version

    depths = [int(d) for d in args.depths.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    if args.out is not None and not Path(args.out).parent.is_dir():
        print(f"adjust: error: --out {args.out}: its folder does not exist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    version = code_version()  # of the code that runs (read before, not after, the minutes of measuring)
    with torch.inference_mode():
        rows = measure(args.models.split(","), depths, temps, args.prompts,
                       {"shakespeare-base": args.gen_shakespeare, "task-base": args.gen_task},
                       [m for m in args.dual_models.split(",") if m], args.dual_block,
                       [tuple(int(v) for v in x.split(":")) for x in args.branched.split(",") if x],
                       tuple(r for r in args.rules.split(",") if r),
                       dict(s.split("=", 1) for s in args.sampler), args.threshold_target)
    report = {"code_version": version, "threads": args.threads, "rows": rows,
              "note": "full passes = calls of the base (a speculative pass computes its drafted rows too); "
                      "target = the decoding it wraps, the exact or threshold row above it; passes and speed vs "
                      "target = its full passes over speculative's, speculative's wall-clock tokens/s over its; "
                      "identical = the target's very tokens; passes vs self = self drafter's passes over the "
                      "sampler drafter's at the same depth (the same row budget)."}
    print_and_write(report, markdown(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
