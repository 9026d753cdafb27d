#!/usr/bin/env python
"""Peak memory of one distillation step, chunked KL vs full-vocabulary logits (issue 5, item 4).

For each base (a Dream stand-in = bidirectional Qwen2 with Dream's shift, a LLaDA stand-in =
bidirectional Llama, a BERT masked LM, our tiny model), all random and all with the same
deliberately large vocabulary (default 32768 rows; the tokenizer has ~300 tokens, the rest are
padding rows, banned like a real model's), one training step of `adjust distill` is run:
`adjust.distill.train.example_loss` + `backward()` on synthetic rollouts (random tokens, random
unmasking orders, start step t = 0 so every generated position but the U revealed ones is
scored: the largest number of scored positions a batch can have).

Two ways of computing KL(p_base || q_sampler) are compared on the same batch:

* chunk=C    the library path (`adjust.distill.loss.kl_per_position`): logits made per chunk of
             C scored positions, under activation checkpointing;
* unchunked  a reference defined only here: the same per-position KL (`_chunk_kl`) on all scored
             positions at once, without checkpointing, i.e. full-vocabulary logits for every
             scored position of the batch held by autograd. The library is not changed; the
             reference is swapped in for `kl_per_position` inside `example_loss` for that run.

Peak memory of the step is what the step allocates on top of what was resident before it
(base and sampler weights are not counted; the sampler's gradients are):
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step;
  CPU:  torch.profiler with profile_memory=True; the peak of the CPU allocator's running total
        ("Total Allocated" of its [memory] events), which counts every tensor storage allocated
        and freed during the step. Exact and deterministic, unlike process RSS.
Reported per step and per example (/ batch size), next to the size of one side's
full-vocabulary float32 logits for an example's scored positions (positions x vocab x 4 bytes).

Usage:
  python benchmarks/distill_memory.py --json results/distill_memory_cpu.json          # ~1 min, 1 CPU thread
  python benchmarks/distill_memory.py --vocab-size 2048 --seq-length 32 --batch-size 2 --chunks 16   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # stand_ins: test stand-ins, not the package

MODELS = ("dream", "llada", "bert", "tiny")
LABELS = {"dream": "Dream stand-in (Qwen2)", "llada": "LLaDA stand-in (Llama)", "bert": "BERT masked LM",
          "tiny": "adjust tiny model"}
DOCS = [f"the quick brown fox {i} jumps over the lazy dog, and the cat sat on the mat by the river."
        for i in range(40)]
MB = 1 << 20


def log(msg: str) -> None:
    print(f"[distill_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the bases ----------------------------------------------------------------------------------
def save_base(kind: str, out: Path, args) -> Path:
    """A random base of `kind` saved to `out`, loaded back by `load` (Dream/LLaDA: stand-ins, tests/stand_ins.py)."""
    from stand_ins import save_random_bert, save_stand_in

    from adjust.train_base import train_tokenizer

    tok = train_tokenizer(DOCS, 300)  # ids 0, 1, 2 = pad, mask, eos
    H, layers, heads = args.hidden_size, args.layers, args.heads
    max_len = max(128, args.prompt_length + args.seq_length)
    if args.vocab_size < len(tok) + 8:
        raise SystemExit(f"--vocab-size must exceed the tokenizer's {len(tok)} tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if kind in ("dream", "llada"):
            return save_stand_in(kind, out, tok, hidden_size=H, num_layers=layers, num_heads=heads,
                                    vocab_size=args.vocab_size, max_length=max_len, seed=args.seed)
        if kind == "bert":
            return save_random_bert(out, tok, hidden_size=H, num_layers=layers, num_heads=heads,
                                       intermediate_size=4 * H, vocab_size=args.vocab_size, max_length=max_len,
                                       seed=args.seed)
        if kind == "tiny":
            from adjust.base.tiny import TinyBase, TinyConfig, token_ids

            cfg = TinyConfig(vocab_size=args.vocab_size, hidden_size=H, num_layers=layers, num_heads=heads,
                             intermediate_size=int(16 * round(8 / 3 * H / 16)), max_length=max_len,
                             tokenizer_size=len(tok), **token_ids(tok))
            TinyBase(cfg, tok, name="tiny-bench").save(out)
            return out
    raise SystemExit(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")


def synthetic_rollouts(base, n: int, prompt_length: int, gen_length: int, seed: int):
    """Rollouts with random (allowed) tokens and uniformly random unmasking orders."""
    from adjust.distill.rollouts import Rollouts

    g = torch.Generator().manual_seed(seed)
    skip = {*base.banned_ids, base.eos_id}
    usable = torch.tensor([i for i in range(min(len(base.tokenizer), base.vocab_size)) if i not in skip])
    pick = lambda *shape: usable[torch.randint(len(usable), shape, generator=g)]  # noqa: E731
    prompts = pick(n, prompt_length).tolist() if prompt_length else [[] for _ in range(n)]
    tokens = pick(n, gen_length)
    order = torch.stack([torch.randperm(gen_length, generator=g) for _ in range(n)])
    return Rollouts(prompts, tokens, order, {"base": base.identity()})


# --- one step, measured -------------------------------------------------------------------------
@contextlib.contextmanager
def unchunked_kl():
    """Inside: example_loss computes the KL on all positions at once, without checkpointing (reference)."""
    from adjust.distill import loss as kl_loss
    from adjust.distill import train

    def full(base, teacher_hidden, student_hidden, chunk=None):
        return kl_loss._chunk_kl(base, teacher_hidden.detach(), student_hidden)

    saved = train.kl_per_position
    train.kl_per_position = full
    try:
        yield
    finally:
        train.kl_per_position = saved


def step(base, sampler, rollouts, ns, ts, u: int, chunk: int) -> float:
    from adjust.distill.train import example_loss

    loss = example_loss(base, sampler, rollouts, ns, ts, u, chunk)
    loss.backward()
    return float(loss.detach())


def cpu_peak(trace: dict) -> int:
    """Peak, over the profiled window, of the bytes allocated minus freed since the window opened.

    A running sum of the [memory] events' Bytes (negative for frees), in event order. Not the
    events' "Total Allocated": that total persists across profiling sessions and keeps blocks
    that were freed while the profiler was off. Blocks allocated before the window and freed
    in it are not reported by the profiler (no size known), so they are never subtracted.
    """
    mem = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"
           and e.get("args", {}).get("Device Type", 0) == 0]
    if not mem:
        raise RuntimeError("the profiler recorded no CPU memory events")
    mem.sort(key=lambda e: (float(e.get("ts", 0)), int(e["args"].get("Ev Idx", 0))))
    total = peak = 0
    for e in mem:
        total += int(e["args"]["Bytes"])
        peak = max(peak, total)
    return peak


def measure(fn, device: torch.device) -> tuple[int, float]:
    """(peak bytes allocated by fn() above what was allocated before, fn's return value)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return cpu_peak(trace), out


def run_model(kind: str, args, device: torch.device, chunks: list[int], root: Path) -> dict:
    from adjust.base import load_base
    from adjust.sampler import JointSampler, SamplerConfig

    t0 = time.time()
    path = save_base(kind, root / kind, args)
    if kind in ("dream", "llada"):
        from stand_ins import load_stand_in

        base = load_stand_in(kind, path, device=str(device))
    else:
        base = load_base(path, device=str(device))
    torch.manual_seed(args.seed)
    sampler = JointSampler(SamplerConfig.for_base(base)).to(device)
    sampler.train()
    B, P, G, u = args.batch_size, args.prompt_length, args.seq_length, args.unrolls
    rollouts = synthetic_rollouts(base, B, P, G, args.seed)
    ns, ts = list(range(B)), [0] * B  # t = 0: G - u scored positions per example, the most there can be
    positions = B * (G - u)
    full_logits = positions * base.vocab_size * 4  # one side, float32
    step(base, sampler, rollouts, ns, ts, u, chunks[0])  # warm-up: lazily built caches are not counted
    runs = []
    for mode in [f"chunk={c}" for c in chunks] + ["unchunked"]:
        chunk = int(mode.split("=")[1]) if mode.startswith("chunk=") else positions
        ctx = unchunked_kl() if mode == "unchunked" else contextlib.nullcontext()
        sampler.zero_grad(set_to_none=True)  # freed before the window: the step allocates its gradients
        with ctx:
            peak, kl = measure(lambda: step(base, sampler, rollouts, ns, ts, u, chunk), device)
        runs.append({"mode": mode, "chunk": chunk if mode != "unchunked" else None,
                     "checkpointed": mode != "unchunked", "chunks_per_step": math.ceil(positions / chunk),
                     "peak_mb": round(peak / MB, 2), "peak_mb_per_example": round(peak / MB / B, 2),
                     "kl": round(kl, 6)})
    ref = runs[-1]["peak_mb"]
    for r in runs:
        r["vs_unchunked"] = round(r["peak_mb"] / ref, 3) if ref else None
    row = {"model": kind, "label": LABELS[kind], "base_class": type(base).__name__,
           "net_class": type(getattr(base, "net", getattr(base, "model", base))).__name__,
           "vocab_size": base.vocab_size, "tokenizer_size": len(base.tokenizer), "banned_ids": len(base.banned_ids),
           "hidden_size": base.hidden_size, "base_params": sum(p.numel() for p in base.parameters()),
           "sampler_params": sum(p.numel() for p in sampler.parameters()),
           "scored_positions": positions, "scored_positions_per_example": G - u,
           "full_logits_mb_per_example": round(full_logits / MB / B, 2), "runs": runs,
           "seconds": round(time.time() - t0, 1)}
    log(f"{kind}: " + ", ".join(f"{r['mode']} {r['peak_mb_per_example']} MB/example" for r in runs)
        + f" (full logits {row['full_logits_mb_per_example']} MB/example) in {row['seconds']} s")
    return row


def table(report: dict) -> str:
    modes = [r["mode"] for r in report["results"][0]["runs"]] if report["results"] else []
    head = ["model", "vocab", "scored pos/ex", "full logits MB/ex"] + [f"{m} MB/ex" for m in modes] \
        + [f"{m} / unchunked" for m in modes[:-1]]
    rows = [head]
    for r in report["results"]:
        runs = r["runs"]
        rows.append([r["label"], str(r["vocab_size"]), str(r["scored_positions_per_example"]),
                     f"{r['full_logits_mb_per_example']:.1f}"] + [f"{x['peak_mb_per_example']:.1f}" for x in runs]
                    + [f"{x['vs_unchunked']:.2f}" for x in runs[:-1]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    c = report["config"]
    lines.append(f"batch {c['batch_size']} x {c['prompt_length'] + c['seq_length']} tokens, U = {c['unrolls']}, "
                 f"t = 0; peak = bytes allocated by one step (example_loss + backward) above the resident weights, "
                 f"{report['measured_with']}; MB = 2^20 bytes")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=128, help="generated tokens per example (the canvas)")
    ap.add_argument("--prompt-length", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--unrolls", type=int, default=1, help="U, sampler unrolls in the step")
    ap.add_argument("--chunks", default="256", help="comma-separated KL chunk sizes (library path) to measure")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = ap.parse_args(argv)

    from adjust.base import resolve_device

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if not chunks or min(chunks) < 1:
        ap.error("--chunks needs positive sizes")
    if not 1 <= args.unrolls < args.seq_length:
        ap.error("--unrolls must be in 1 .. seq-length - 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    device = resolve_device(args.device)
    measured = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                else "CPU allocator total from torch.profiler(profile_memory=True)")
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="distill_memory_") as root:
        for kind in models:
            results.append(run_model(kind, args, device, chunks, Path(root)))
    report = {"benchmark": "distill_memory", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "measured_with": measured,
              "config": {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "layers", "heads", "seq_length",
                                                       "prompt_length", "batch_size", "unrolls", "seed")}
              | {"chunks": chunks, "start_step": 0},
              "results": results, "seconds": round(time.time() - t0, 1)}
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
