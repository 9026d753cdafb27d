#!/usr/bin/env python
"""How far the dual cache's frozen keys/values drift within a block, per layer (issue 23, point 6).

On the task model over held-out task prompts: exact decoding (T = 1), the 10-token answer in blocks of 5,
the dual cache (`--cache dual`). After every pass of a block that leaves masks in it (so the next pass is a
cached one), each layer's relative drift ||KV_cached - KV_true|| / ||KV_true|| of the positions the cache
freezes, where KV_true is what a whole-canvas pass (`base.cache_pass`) on the current canvas gives, keys and
values together, per sequence, over the prompt and over the other blocks of the answer separately; as a
function of the tokens written in the block since the refresh. Layer 0 cannot drift (its keys/values
depend on a position's own token only), a check of the measurement.

Ablation (`--ablation`): task validity when, before every cached pass, the frozen keys/values of only
some layers are set to the true ones (a whole-canvas pass, untimed): none (the dual cache), each layer
alone, each set of lower and of upper layers, all (the uncached tokens); and when, before every cached pass,
the n frozen positions per sequence whose true keys/values at layer l moved most get their true keys/values
in every layer (an oracle of the positions a refresh rule could recompute; l = 1, the first that can drift,
and the last layer).

  nice python benchmarks/cache_drift.py --out results/cache_drift --ablation      # writes .json and .md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GEN, BLOCK = 10, 5


def batches(base, records, batch_size: int):
    """Records grouped by (task, prompt length) in batches: unpadded canvases, as the evaluation decodes them."""
    groups: dict = {}
    for r in records:
        ids = base.encode(r["prompt"])
        groups.setdefault((r["task"], len(ids)), []).append((r, ids))
    for key in sorted(groups):
        g = groups[key]
        for s in range(0, len(g), batch_size):
            yield key[0], g[s:s + batch_size]


def decode(base, strategy, prompts, seed: int, fresh_layers=(), fresh_positions=None, on_pass=None):
    """Exact decoding with the dual cache; before every cached pass the frozen keys/values of `fresh_layers` are
    set to the true ones (`fresh_positions` = (n, l): those of the n positions that moved most at layer l, in
    every layer), and `on_pass(loop, true_kv, writes)` sees the cache and the true keys/values."""
    from adjust.decode import Decoding

    run = Decoding(base, strategy, gen_length=GEN, block_length=BLOCK, seed=seed, cache="dual")
    run.add(prompts)
    loop, written_at_refresh = run.loop, None
    while True:
        if not loop.advance():
            break
        if not loop.refreshes_next() and (on_pass is not None or fresh_layers or fresh_positions):
            lo, hi = loop.block
            true_kv = base.cache_pass(loop.x)[1]
            writes = int((loop.x[:, lo:hi] != base.mask_id).sum(1).float().mean()) - written_at_refresh
            if on_pass is not None:
                on_pass(loop, true_kv, writes)
            for layer in fresh_layers:
                for cached, true in zip(loop._kv[layer], true_kv[layer]):
                    cached.copy_(true)
            if fresh_positions:
                n, at = fresh_positions
                moved = sum((c - t).square().sum((1, 3)) for c, t in zip(loop._kv[at], true_kv[at]))  # (B, L)
                moved[:, lo:hi] = -1
                top = moved.topk(n, dim=1).indices[:, None, :, None]
                for layer_kv, layer_true in zip(loop._kv, true_kv):
                    for cached, true in zip(layer_kv, layer_true):
                        idx = top.expand(-1, cached.shape[1], -1, cached.shape[3])
                        cached.scatter_(2, idx, true.gather(2, idx))
        elif loop.refreshes_next():
            lo, hi = loop.block
            written_at_refresh = int((loop.x[:, lo:hi] != base.mask_id).sum(1).float().mean())
        run.step()
    return loop.x[:, loop.gen_start:]


def drift_rows(loop, true_kv, writes: int, mask_id: int) -> list[dict]:
    """Per layer and region (prompt, rest of the answer): the mean over sequences of the relative drift."""
    lo, hi = loop.block
    P, L = loop.gen_start, loop.x.shape[1]
    regions = {"prompt": list(range(P)), "answer_other_blocks": [p for p in range(P, L) if not lo <= p < hi]}
    rows = []
    for layer, ((ck, cv), (tk, tv)) in enumerate(zip(loop._kv, true_kv)):
        for name, cols in regions.items():
            if not cols:
                continue
            c = torch.cat([ck[:, :, cols], cv[:, :, cols]], 1).flatten(1).float()
            t = torch.cat([tk[:, :, cols], tv[:, :, cols]], 1).flatten(1).float()
            rel = (c - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
            rows.append({"layer": layer, "region": name, "writes": writes, "block": (lo - P) // BLOCK,
                         "sum": float(rel.sum()), "n": rel.numel()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="held-out prompts per task")
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out prompts (as `tasks prompts --seed`)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ablation", action="store_true", help="also task validity with some layers (or positions) "
                   "kept fresh")
    p.add_argument("--positions", default="1,2,3,5", help="ablation: counts n of the positions kept fresh")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. results/cache_drift)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from adjust.eval import tasks as T
    from adjust.eval.report import benchmark_arg_error, print_and_write
    from adjust.eval.specs import build_strategy
    from adjust.loader import ModelSpec, load_models
    from adjust.provenance import code_version

    try:
        counts = [int(c) for c in args.positions.split(",") if c.strip()]
    except ValueError:
        counts = [0]
    error = benchmark_arg_error([("--n", args.n, 1), ("--batch-size", args.batch_size, 1),
                                 ("--threads", args.threads, 1), ("--positions", min(counts, default=0), 1)], args.out)
    if error:
        print(error, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    version = code_version()  # of the code that runs (read before the measuring)
    base, _ = load_models(ModelSpec(base=str(ROOT / "models" / "task-base")), "none")
    layers = len(base.model.blocks)
    records = [{"task": t, "prompt": ex.prompt} for t in T.TASKS for ex in T.examples(t, args.n, args.seed, "eval")]
    exact = build_strategy("exact", {})

    acc: dict = {}

    def on_pass(loop, true_kv, writes):
        for r in drift_rows(loop, true_kv, writes, base.mask_id):
            a = acc.setdefault((r["layer"], r["region"], r["writes"]), [0.0, 0])
            a[0] += r["sum"]
            a[1] += r["n"]

    with torch.inference_mode():
        for _, chunk in batches(base, records, args.batch_size):
            decode(base, exact, [ids for _, ids in chunk], args.seed, on_pass=on_pass)
    drift = [{"layer": k[0], "region": k[1], "writes": k[2], "mean_relative_drift": round(s / n, 5), "n": n}
             for k, (s, n) in sorted(acc.items())]

    ablation = []
    if args.ablation:
        sets = [()] + [(l,) for l in range(layers)] + [tuple(range(m)) for m in range(2, layers)] \
            + [tuple(range(m, layers)) for m in range(1, layers - 1)] + [tuple(range(layers))]
        runs = [({"fresh_layers": list(fresh)}, {"fresh_layers": fresh}) for fresh in sets]
        runs += [({"fresh_positions": n, "ranked_at_layer": at}, {"fresh_positions": (n, at)})
                 for at in (1, layers - 1) for n in counts]
        for row, how in runs:
            valid: dict = {}
            with torch.inference_mode():
                for task, chunk in batches(base, records, args.batch_size):
                    out = decode(base, exact, [ids for _, ids in chunk], args.seed, **how)
                    for (r, _), ids in zip(chunk, out.tolist()):
                        valid.setdefault(task, []).append(T.is_valid(r["prompt"], base.decode(ids)))
            row.update({t: round(sum(v) / len(v), 4) for t, v in valid.items()})
            row["all"] = round(sum(sum(v) for v in valid.values()) / sum(len(v) for v in valid.values()), 4)
            ablation.append(row)
            print(f"[cache_drift] {row}", file=sys.stderr, flush=True)

    report = {"code_version": version, "model": "task-base", "layers": layers, "prompts_per_task": args.n,
              "prompt_seed": args.seed, "strategy": "exact", "gen_length": GEN, "block_length": BLOCK,
              "cache": "dual", "threads": args.threads, "drift": drift, "ablation": ablation,
              "command": "python benchmarks/cache_drift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "note": "mean_relative_drift: mean over sequences of ||KV_cached - KV_true|| / ||KV_true|| (keys and "
                      "values of the region's positions together) before a cached pass, `writes` tokens written in "
                      "the block since its refresh; ablation: task validity with those layers' frozen keys/values "
                      "set to the true ones before every cached pass"}
    regions = sorted({d["region"] for d in drift})
    writes = sorted({d["writes"] for d in drift})
    md = [f"# Dual-cache drift within a block, task model ({layers} layers)", "",
          f"Code version {version.get('commit', '?')}{' (dirty)' if version.get('dirty') else ''}; "
          f"`{report['command']}`. Exact decoding, {args.n} held-out prompts per task, 10 tokens in blocks of 5.", "",
          "Mean relative drift ||KV_cached - KV_true|| / ||KV_true|| of the frozen positions before a cached pass, "
          "by tokens written in the block since its refresh:", "",
          "| region | layer | " + " | ".join(f"{w} written" for w in writes) + " |",
          "|---|---|" + "---|" * len(writes)]
    table = {(d["region"], d["layer"], d["writes"]): d["mean_relative_drift"] for d in drift}
    for region in regions:
        for layer in range(layers):
            md.append(f"| {region} | {layer} | " + " | ".join(f"{table.get((region, layer, w), float('nan')):.3f}"
                                                            for w in writes) + " |")
    if ablation:
        tasks = [t for t in ablation[0] if t != "fresh_layers"]
        md += ["", "Task validity when, before every cached pass, these frozen keys/values are set to the true ones "
               "(layers: all positions of those layers; n positions: in every layer, the n per sequence whose true "
               "keys/values moved most at layer l):", "",
               "| kept true | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for row in ablation:
            what = (f"layers {','.join(map(str, row['fresh_layers'])) or 'none'}" if "fresh_layers" in row
                    else f"{row['fresh_positions']} positions, ranked at layer {row['ranked_at_layer']}")
            md.append(f"| {what} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    print_and_write(report, "\n".join(md) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
