#!/usr/bin/env python
"""Where the time of one ADJUST unroll goes, piece by piece, in each unroll mode (issue 13, point 4).

ADJUST at K (default 4) generates GEN tokens (default 64, unconditional) on a base with its joint sampler
(default: the shipped models/shakespeare-base and the sampler beside it), at each batch size, once per
repeat and unroll mode (`--unroll full` and `fast`, interleaved, the order rotated per repeat, after one
untimed warm-up run of each). The real decoding loop runs; this script only wraps the functions it
calls with timers (nothing is replaced), each charged its own time (its callees' excluded) to the phase
it ran in:

  full pass  the base's pass (`_Loop.full_pass`) and everything the strategy does from it up to the
             step's first unroll (its distributions, scores, pick, sampling and write);
  unroll     from the start of an unroll to the start of the next one (or the end of the step): the
             sampler (`keys_values` once per step when the mode has them, the layer on its rows), the
             LM head (`base.logits`), log-softmax and filters (`sampling.log_probs`), order scores,
             choosing, sampling + writing (`StepContext.commit`), and `other` (gathers, candidate
             bookkeeping, the strategy's own loop).

Per mode and batch size: per-unroll milliseconds of each piece and per-full-pass milliseconds of each
piece, and two ratios: `unroll_cost_bench` = (sampler + LM head per unroll) / (base pass + its LM head per
full pass), the definition of `adjust bench`'s unroll_cost, and `unroll_cost_step` = everything charged to
the unroll phase / everything charged to the full-pass phase (what a step really pays). A piece's figure
is, for each wrapped function charged to it, the median time of one call times its calls per unroll (per
full pass), summed (the means are in `mean_per_unroll_ms` / `mean_per_full_pass_ms`). With one thread
(the default) the clock is the process's CPU time (`time.process_time`): on a machine shared with other
jobs, wall time charges a long call (a full pass) for the time the scheduler gave others while a short one
(a piece of an unroll) mostly fits between preemptions, which biases the ratio; CPU time charges each the
work it did. With more threads it is wall time. Wrapper overhead (~1 us a call) is included.

With --ranks N (default 16; 0 = off): N unconditional full-mode generations at K, and for every token
picked after an unroll its rank, by the full pass's order score of the step, among the positions that
were masked at the step's first unroll: `pick_ranks.within_top[M]` is the share of those picks that
`--unroll fast` with M kept positions could have made (it keeps 2(K - 1)).

Usage:
  OMP_NUM_THREADS=1 python benchmarks/unroll_profile.py --json results/unroll/profile_cpu.json   # ~1-2 min
  python benchmarks/unroll_profile.py --base DIR --gen-length 16 --batch-sizes 1 --repeats 1         # seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

PIECES = ("base pass", "sampler keys/values", "sampler layer", "LM head", "log-softmax/filters", "order scores",
          "choose", "sample+write", "other")


class Profiler:
    """Exclusive time of each call of the wrapped functions, by (phase, piece, function); a stack of open calls
    subtracts callees from their caller."""

    def __init__(self):
        self.phase = None  # None outside a step: time is not charged
        self.calls: dict = {}
        self.stack: list = []
        self.unrolls = 0
        self.passes = 0
        self.wrapped: list = []  # (owner, attr, original) to put back
        self.clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    def wrap(self, owner, attr: str, piece: str, before=None) -> None:
        fn = getattr(owner, attr)
        self.wrapped.append((owner, attr, vars(owner).get(attr)))  # None: inherited, not the owner's own
        prof, name = self, f"{getattr(owner, '__name__', owner)}.{attr}"

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if before is not None:
                before()
            prof.stack.append(0.0)
            t0 = prof.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                total = prof.clock() - t0
                inner = prof.stack.pop()
                if prof.stack:
                    prof.stack[-1] += total
                if prof.phase is not None:
                    prof.calls.setdefault((prof.phase, piece, name), []).append(total - inner)

        setattr(owner, attr, timed)

    def restore(self) -> None:
        """Put every wrapped function back (the library is as it was before `instrument`)."""
        while self.wrapped:
            owner, attr, original = self.wrapped.pop()
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)

    def start_unroll(self) -> None:
        self.phase = "unroll"
        self.unrolls += 1


def instrument(prof: Profiler, base, sampler, strategy) -> None:
    import adjust.decode as decode
    from adjust.sampler import JointSampler

    def full_pass():
        prof.phase = "full"
        prof.passes += 1

    prof.wrap(decode._Loop, "full_pass", "base pass", before=full_pass)
    prof.wrap(type(strategy), "step", "other")
    prof.wrap(decode.StepContext, "unroll_sampler", "other", before=prof.start_unroll)
    prof.wrap(decode.StepContext, "distributions", "other")
    prof.wrap(decode.StepContext, "scores", "other")
    prof.wrap(decode.StepContext, "remaining", "other")
    prof.wrap(decode.StepContext, "choose", "choose")
    prof.wrap(decode.StepContext, "commit", "sample+write")
    prof.wrap(JointSampler, "keys_values", "sampler keys/values")
    for attr in ("forward", "forward_span", "forward_rows"):
        prof.wrap(JointSampler, attr, "sampler layer")
    prof.wrap(type(base), "logits", "LM head")
    prof.wrap(decode, "log_probs", "log-softmax/filters")
    prof.wrap(decode, "order_scores", "order scores")


def pick_ranks(base, sampler, k: int, n: int, gen_length: int, seed: int) -> dict:
    """Ranks of full-mode ADJUST's picks after an unroll by the full pass's order scores (see the docstring)."""
    from adjust.decode import generate
    from adjust.strategies.adjust import Adjust

    ranks: list[int] = []

    class Probe(Adjust):  # Adjust's rule, unchanged, with the ranks of its later picks noted
        def step(self, ctx) -> None:
            one = torch.ones(ctx.x.shape[0], dtype=torch.long, device=ctx.x.device)
            prior, hidden, first = ctx.hidden, None, None
            for j in range(self.k):
                rows, cols, logp = ctx.distributions(hidden)
                if len(rows) == 0:
                    return
                scores = ctx.scores(logp, rows)
                chosen = ctx.choose(scores, rows, one)
                if j == 0:
                    full = (rows, cols, scores)
                elif j == 1:  # the positions masked at the step's first unroll
                    first = {(int(r), int(c)) for r, c in zip(rows, cols)}
                if j > 0:
                    fr, fc, fs = full
                    for e in chosen.tolist():
                        r, c = int(rows[e]), int(cols[e])
                        pool = [float(s) for rr, cc, s in zip(fr.tolist(), fc.tolist(), fs) if (rr, cc) in first
                                and rr == r]
                        mine = float(fs[((fr == r) & (fc == c)).nonzero()[0, 0]])
                        ranks.append(1 + sum(v > mine for v in pool))
                ctx.commit(chosen, rows, cols, logp)
                if j + 1 < self.k and ctx.remaining().any():
                    hidden = prior = ctx.unroll_sampler(prior)

    generate(base, [[] for _ in range(n)], Probe(k), gen_length=gen_length, seed=seed, sample_indices=list(range(n)),
             sampler=sampler)
    tops = sorted({1, 2, k - 1, 2 * (k - 1), 4 * (k - 1)})
    return {"k": k, "generations": n, "gen_length": gen_length, "seed": seed, "picks": len(ranks),
            "within_top": {str(m): round(sum(r <= m for r in ranks) / max(1, len(ranks)), 4) for m in tops},
            "median_rank": statistics.median(ranks) if ranks else None}


def measure(prof: Profiler, base, sampler, strategy, modes, sizes, args) -> list[dict]:
    """One row per (batch size, mode): the pieces of an unroll and of a full pass (see the module docstring)."""
    from adjust.decode import generate

    def run(B, mode, seed):
        return generate(base, [[] for _ in range(B)], strategy, gen_length=args.gen_length, seed=seed,
                        sample_indices=list(range(B)), sampler=sampler, unroll=mode)

    rows = []
    for B in sizes:
        for mode in modes:  # warm-up, not charged
            run(B, mode, args.seed + 10_000)
        acc = {m: {"calls": {}, "unrolls": 0, "passes": 0, "seconds": 0.0, "tokens": 0, "runs": []} for m in modes}
        for r in range(args.repeats):
            shift = r % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                prof.calls, prof.unrolls, prof.passes, prof.phase = {}, 0, 0, None
                g = run(B, mode, args.seed + r)
                prof.phase = None
                a = acc[mode]
                for key, v in prof.calls.items():
                    a["calls"].setdefault(key, []).extend(v)
                a["unrolls"] += prof.unrolls
                a["passes"] += prof.passes
                a["seconds"] += g.stats.seconds
                a["tokens"] += g.stats.decoded_tokens
                a["runs"].append({"seconds": round(g.stats.seconds, 5), "unrolls": prof.unrolls,
                                  "passes": prof.passes})
        for mode in modes:
            a = acc[mode]
            fig = {}
            for stat in ("median", "mean"):
                agg = statistics.median if stat == "median" else statistics.fmean
                for phase, count in (("unroll", a["unrolls"]), ("full", a["passes"])):
                    per = dict.fromkeys(PIECES, 0.0)
                    for (ph, piece, _), times in a["calls"].items():
                        if ph == phase:
                            per[piece] += 1e3 * agg(times) * len(times) / max(1, count)
                    fig[stat, phase] = {p: round(v, 4) for p, v in per.items()}
            per_unroll, per_pass = fig["median", "unroll"], fig["median", "full"]
            u, f = sum(per_unroll.values()), sum(per_pass.values())
            bench_u = per_unroll["sampler keys/values"] + per_unroll["sampler layer"] + per_unroll["LM head"]
            bench_f = per_pass["base pass"] + per_pass["LM head"]
            rows.append({"batch_size": B, "unroll": mode, "k": args.k,
                         "unrolls_per_run": a["unrolls"] / args.repeats, "full_passes_per_run": a["passes"] / args.repeats,
                         "per_unroll_ms": per_unroll, "per_full_pass_ms": per_pass,
                         "mean_per_unroll_ms": fig["mean", "unroll"], "mean_per_full_pass_ms": fig["mean", "full"],
                         "unroll_ms": round(u, 4), "full_pass_ms": round(f, 4),
                         "unroll_cost_bench": round(bench_u / bench_f, 4), "unroll_cost_step": round(u / f, 4),
                         "tokens_per_second": round(a["tokens"] / a["seconds"], 2), "runs": a["runs"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="model directory (default: the shipped models/shakespeare-base)")
    ap.add_argument("--sampler", default=None, help="sampler directory (default: <base>/sampler)")
    ap.add_argument("--k", type=int, default=4, help="ADJUST's tokens per full pass")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--unroll", default="full,fast", help="comma-separated unroll modes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=16, help="full-mode generations whose later picks are ranked "
                    "by the full pass's order scores (0 = off)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)

    from adjust.decode import unroll_plan
    from adjust.errors import AdjustError
    from adjust.io import check_output_dir, write_json
    from adjust.loader import ModelSpec, load_models
    from adjust.provenance import code_version
    from adjust.strategies import make_strategy

    torch.set_num_threads(args.threads)
    try:
        modes = [m.strip() for m in args.unroll.split(",") if m.strip()]
        for m in modes:
            unroll_plan(m)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        if args.json:
            from pathlib import Path

            if Path(args.json).is_dir():
                raise AdjustError(f"--json {args.json} is a directory")
            check_output_dir(Path(args.json).parent, "--json")
        base, sampler = load_models(ModelSpec(base=args.base, sampler=args.sampler), "required")
        strategy = make_strategy("adjust", tokens_per_pass=args.k)
    except (AdjustError, ValueError) as e:
        print(f"unroll_profile: error: {e}", file=sys.stderr)
        return 2
    prof = Profiler()
    instrument(prof, base, sampler, strategy)
    try:
        rows = measure(prof, base, sampler, strategy, modes, sizes, args)
    finally:
        prof.restore()

    ranks = pick_ranks(base, sampler, args.k, args.ranks, args.gen_length, args.seed) if args.ranks > 0 else None
    report = {"base": base.name, "sampler": str(args.sampler or "beside the base"), "dtype": str(base.dtype),
              "threads": torch.get_num_threads(), "gen_length": args.gen_length, "k": args.k,
              "repeats": args.repeats, "seed": args.seed, "pieces": list(PIECES), "rows": rows,
              "clock": "process CPU time" if prof.clock is time.process_time else "wall",
              "pick_ranks": ranks, "load_average": [round(v, 2) for v in os.getloadavg()],
              "command": "python benchmarks/unroll_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "code_version": code_version()}
    for row in rows:
        print(f"batch {row['batch_size']} unroll {row['unroll']}: one unroll {row['unroll_ms']:.3f} ms, one full "
              f"pass {row['full_pass_ms']:.3f} ms -> {row['unroll_cost_step']:.3f} of a full pass "
              f"({row['unroll_cost_bench']:.3f} by bench's definition); {row['tokens_per_second']:.1f} tokens/s",
              file=sys.stderr)
        for p in PIECES:
            print(f"    {p:<22}{row['per_unroll_ms'][p]:>9.3f} ms/unroll{row['per_full_pass_ms'][p]:>10.3f} ms/pass",
                  file=sys.stderr)
    if ranks is not None:
        print(f"full mode at K = {args.k}: of {ranks['picks']} picks after an unroll, within the full pass's best M: "
              + ", ".join(f"M={m}: {v:.3f}" for m, v in ranks["within_top"].items()), file=sys.stderr)
    if args.json:
        write_json(args.json, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
