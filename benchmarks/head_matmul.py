#!/usr/bin/env python
"""The LM head's product, plain (x @ W.T) against packed for oneDNN (`adjust.layers.head_matmul` with packing
forced on, whatever the head's size), on the CPU.

For each head (default: the shipped models' own, models/shakespeare-base 4096 x 256 and models/task-base
384 x 128) and each row count (the rows one decoding step scores: 6 = a fast unroll's kept positions at
K = 4, 35 = a full pass's masked positions at batch 1, 253 = at batch 8), both products are timed side by
side: `--repeats` rounds, each timing plain then packed (the order alternating by round), the median per
call reported with the ratio. Two conditions: "hot" (the same product again and again, the head stays in
the CPU's caches) and "evicted" (a 64 MB buffer is written before each call, as a full pass's weights
evict the head between two of a decoding loop's calls). One thread by default. Prints a table; --json
writes the figures.

  python benchmarks/head_matmul.py --json results/unroll/head_matmul_cpu.json     # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def time_pair(fns: dict, repeats: int, evict: torch.Tensor | None) -> dict:
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if evict is not None:
                evict.add_(1.0)
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default="models/shakespeare-base,models/task-base")
    p.add_argument("--rows", default="1,6,35,253")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from adjust.base import load_base
    from adjust.layers import head_matmul
    from adjust.provenance import code_version

    torch.set_num_threads(args.threads)
    evict = torch.zeros(16 * 1024 * 1024)  # 64 MB
    rows_out = []
    bases = [load_base(ROOT / path if not os.path.isabs(path) else path) for path in args.bases.split(",")]
    with torch.inference_mode():
        for base in bases:
            w = base.model.output_weight()
            owner = nn.Module()
            for n in (int(r) for r in args.rows.split(",")):
                x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(n))
                fns = {"plain": lambda: x @ w.T, "packed": lambda: head_matmul(x, w, owner, min_weights=0)}
                fns["packed"]()  # packs once
                packed_used = owner.__dict__.get("_packed_head", (None, None))[1] is not None
                row = {"base": base.name, "head": list(w.shape), "rows": n, "packed_available": packed_used}
                for cond, ev in (("hot", None), ("evicted", evict)):
                    t = time_pair(fns, args.repeats, ev)
                    row[cond] = {"plain_us": round(1e6 * t["plain"], 1), "packed_us": round(1e6 * t["packed"], 1),
                                 "speedup": round(t["plain"] / t["packed"], 3)}
                rows_out.append(row)
                print(f"{base.name:18s} {str(tuple(w.shape)):12s} rows {n:4d}  hot {row['hot']['plain_us']:8.1f} -> "
                      f"{row['hot']['packed_us']:8.1f} us ({row['hot']['speedup']:.2f}x)  evicted "
                      f"{row['evicted']['plain_us']:8.1f} -> {row['evicted']['packed_us']:8.1f} us "
                      f"({row['evicted']['speedup']:.2f}x)")
    out = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "rows": rows_out,
           "code_version": code_version()}
    if args.json:
        from adjust.io import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
