#!/usr/bin/env python
"""The cost of one base pass of r rows on the CPU, relative to one row (issue 26; docs/speculative.md).

For each shipped model: the canvas of a batch-1 decoding at the start of generation (Shakespeare: "ROMEO:" +
64 masks; the task model: a held-out task prompt + 10 masks, its whole context), repeated r = 1..16 times as
rows of one batch. Timed (adjust.eval.costs.measure_pass_cost): "full" = one whole-canvas pass
(`base.hidden_states`), "span" = the active block only, `base.span_hidden` on a block of 16 after a
`base.cache_pass` of the same rows; and one unroll of the model's joint sampler on the one-row canvas. One
thread, repeats interleaved (every (kind, r) once per repeat, the order rotated), medians. The JSON is a
`--pass-cost` report (`adjust bench` / `adjust eval frontier`).

  nice python benchmarks/pass_cost.py --out results/pass_cost_cpu       # writes .json and .md, a few minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GEN = {"shakespeare-base": 64, "task-base": 10}


def canvas_of(name: str, base) -> torch.Tensor:
    if name == "task-base":
        from adjust.eval import tasks as T

        prompt = base.encode(T.examples(next(iter(T.TASKS)), 1, seed=1, split="eval")[0].prompt)
    else:
        prompt = base.encode("ROMEO:")
    return torch.tensor(prompt + [base.mask_id] * GEN[name])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shakespeare-base,task-base")
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--block", type=int, default=16, help="active block length of the cached passes")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. results/pass_cost_cpu)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from adjust.eval.costs import cost_table_markdown, measure_pass_cost
    from adjust.eval.report import benchmark_arg_error, print_and_write
    from adjust.loader import ModelSpec, load_models
    from adjust.provenance import code_version

    error = benchmark_arg_error([("--max-rows", args.max_rows, 1), ("--block", args.block, 1),
                                 ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                                 ("--threads", args.threads, 1)], args.out)
    if error:
        print(error, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    version = code_version()  # of the code that runs (read before, not after, the minutes of measuring)
    tables = {}
    for name in [m for m in args.models.split(",") if m]:
        base, sampler = load_models(ModelSpec(base=str(ROOT / "models" / name)))
        x = canvas_of(name, base)
        L = len(x)
        lo = max(0, min(L - GEN[name], L - args.block))
        block = (lo, min(L, lo + args.block))
        print(f"[pass_cost] {name}: canvas {L}, block {block}", file=sys.stderr, flush=True)
        tables[name] = measure_pass_cost(base, x, block, range(1, args.max_rows + 1), args.repeats, args.warmup,
                                         sampler=sampler)
    report = {"code_version": version, "device": "cpu", "threads": args.threads, "pass_cost": tables,
              "note": "full / span: median wall-clock of one base pass of r rows over one row's (full: the whole "
                      "canvas, base.hidden_states; span: the active block after a cache_pass, base.span_hidden); "
                      "unroll_cost: one sampler unroll on the whole one-row canvas over one full one-row pass"}
    md = "\n".join([
        f"# Cost of one base pass of r rows, CPU, {args.threads} thread(s)", "",
        f"Code version {version.get('commit', '?')}{' (dirty)' if version.get('dirty') else ''}; "
        f"benchmarks/pass_cost.py, {args.repeats} interleaved repeats, medians. Relative to one row.", "",
        cost_table_markdown(tables), "",
        *[f"- {n}: canvas {t['canvas']} positions, block {t['block']}, one sampler unroll = "
          f"{t.get('unroll_cost', float('nan')):.3f} of a one-row full pass" for n, t in tables.items()], ""])
    print_and_write(report, md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
