#!/usr/bin/env python
"""ADJUST on a Dream-7B-sized model: full pass vs sampler unroll, and tokens/s (issue 5, item 5).

No download: the model is a transformers Qwen2ForCausalLM with Dream-v0-7B's shape
(hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064) and RANDOM
weights, built directly on the device in the chosen dtype and wrapped as a Dream stand-in by
tests/stand_ins.py's `stand_in_base` (Dream's adapter: bidirectional attention, Dream's one-place
shift, the load-time self-check). Speed does not depend on the weights, so the timings are those of Dream-7B in
this code path; the generated text is noise. The joint sampler is sized like the paper's
(one block with the base's MLP width 18944: ~0.28B parameters here, full multi-head attention,
vs the paper's ~0.26B with grouped KV heads), untrained: the fixed-K timings do not depend on
its weights either.

Measured, on one device, at each batch size (default 1 and 8), for a GEN-token generation
after a PROMPT-token prompt (default 256 + 256 = a 512-token canvas):

1. one full pass vs one sampler unroll on the canvas at the start of generation (all GEN
   positions masked), each followed by the logits at the masked positions, as ADJUST's loop
   runs them; medians of --pass-repeats alternating timings (CUDA events on a GPU). From the
   ratio c: the ideal ADJUST speedup over exact, K / (1 + (K - 1) c).
2. tokens/s of exact, parallel:K, threshold (--tau, default 0.9), adjust:K and threshold-adjust
   (tau, K) at K (default 4), side by side, the two sampler strategies in every unroll mode of
   --unroll (default full,fast; "+fast" in a label: `--unroll fast`, adjust.decode): after --warmup
   untimed runs of each, --repeats rounds each running every strategy once, the order
   rotated per round; median tokens/s and the median per-round ratio to exact. Exact needs
   one full pass per token (256 for the whole generation), so with --max-tokens M only the
   first M tokens of each sequence's GEN-token generation are timed (the canvas is the full
   512 tokens throughout): exact takes M full passes, K=4 strategies M/4. Equal tokens, not
   equal passes, so every strategy works through the same range of masked positions and its
   logits cost matches. The adaptive ones (threshold, threshold-adjust, speculative) follow the
   same rule: a run stops before the first full pass after which every sequence has M tokens,
   so its last pass may write past M, and its tokens/s counts the tokens it wrote. With random
   weights no position is ever confident (the largest probability is near 1/vocabulary), so
   threshold writes one token per full pass (M passes, exact's count, at the cost of its
   confidence rule) and threshold-adjust at most 2 (its one unsure draw where a masked position lies beyond its
   spacing, then an unroll whose pick is unsure and writes nothing): as for speculative
   below, the figure is the cost of their passes and unrolls, not the speedup a trained model's
   confidence would give. --tau 0 leaves both out. --max-tokens 0 times whole generations.
   Default: 64 for --size 7b, 0 for --size tiny.

3. with --cache (e.g. none,prefix,dual) and --block-length: every strategy with every
   key/value cache mode (adjust.decode), interleaved in the same rounds; ratio_to_uncached is
   the paired ratio to the same strategy without a cache. The cache needs our own transformer
   (`layers.Transformer`), so then the base is a native Dream (adjust.base.dream.DreamNative) of
   the same shape with random weights instead of the transformers stand-in (`--native` forces
   that without a cache too). The issue-12 configuration: a 512-token prompt, 256 generated
   tokens in blocks of 32:
     python benchmarks/gpu_bench.py --size 7b --prompt-length 512 --gen-length 256 --block-length 32 \
         --max-tokens 64 --cache none,prefix,dual --json results/gpu_bench_7b_cache.json

4. the cost of one base pass of r rows (--pass-rows, default 1,2,4,8,16) relative to one row, at batch 1's
   canvas (adjust.eval.costs.measure_pass_cost): "full" = the whole canvas; with the native Dream (--native or
   --cache) also "refresh" = the whole canvas keeping its keys/values and "span" = the active block only
   (--block-length, default 32, after the prompt) with the cache; and one sampler unroll relative to one
   one-row full pass, for both unroll modes: "unroll_cost" (full: the sampler on the whole canvas) and
   "unroll_cost_fast" (as `--unroll fast` computes one in a step at this K: the sampler's keys/values once per
   step, then K - 1 unrolls of 2(K - 1) kept rows + the one the step wrote from its full pass, 7 rows at
   K = 4, the whole divided by K - 1). Stored under "pass_cost", so the JSON is a `--pass-cost` report for
   `adjust bench` and `adjust eval frontier` (tokens per pass-equivalent at this shape; docs/speculative.md),
   which charge each point's unrolls the c of its unroll mode (adjust.eval.costs.unroll_cost_of).
5. speculative (--spec-depth D, default 4; 0 = none) with each drafter, at batch 1 only, beside exact. With
   random weights and an untrained sampler few drafts are accepted: the figure is what its rows and unrolls
   cost, not its speedup (combine the pass cost with the acceptance measured on trained models). The issue-26
   configuration (one H100/H200, ~5 min):
     python benchmarks/gpu_bench.py --size 7b --native --batch-sizes 1 --block-length 32 --cache none,dual \
         --json results/gpu_bench_7b_pass_cost.json

6. The issue-23 run (`--preset issue23`; flags given after it override its settings): native
   Dream-7B shape in bf16, prompt 256 + generation 256 in blocks of 32, --max-tokens 64, batch 1
   and 8, cache none and dual, exact / parallel:4 / threshold:0.9 / adjust:4 and adjust:4+fast /
   threshold-adjust:0.9:4 and its +fast at K = 4 (no speculative: the issue-26 run times it),
   pass-cost rows 1,2,4,8,16 with both unroll costs, 3 repeats after 1 warmup, written to
   results/gpu_bench_7b_issue23.json (from the repository root):
     python benchmarks/gpu_bench.py --preset issue23
   Measured: 214 s on one H200, 22.6 GiB at most (results/gpu_bench_7b_issue23.json; docs/results.md has its
   tables). Estimated before it ran at ~5 minutes on one H100/H200, from results/gpu_bench_7b_h200.json
   (older code, the transformers stand-in, uncached): a full pass of the 512-token canvas took 20-27 ms in
   the timed runs at batch 1 (exact: 0.66-0.86 s for 32 passes) and 114 ms at batch 8 (3.66 s / 32), an
   unroll 2 ms and 10 ms. One round at M = 64 runs 208 full passes (exact 64, threshold 64, parallel 16, the
   four sampler runs 16 each) and 192 unrolls: ~6 s at batch 1, ~26 s at batch 8, uncached; the dual cache's
   passes (the 32-row block, one whole-canvas refresh per block) cost at most as much, so <= 12 s and
   <= 51 s a round for both caches, x 4 rounds (warmup + 3) = <= 250 s; the pass costs (21 x the rows 1-16 of
   full, refresh and span, ~0.9 s each) ~20 s; pass_vs_unroll ~4 s; building ~11 s. Peak memory ~20 GB (that
   run's 20.6 GiB).

Usage:
  python benchmarks/gpu_bench.py --preset issue23                                # issue 23's run, one GPU
  python benchmarks/gpu_bench.py --size 7b --json results/gpu_bench_7b.json     # on one GPU, bf16
  python benchmarks/gpu_bench.py --size tiny --device cpu                        # seconds on a CPU (CI smoke)

With --json the report is written after the pass costs and after each batch size, with "complete": false
until the run ends, so a run cut off by a device's time limit leaves what it measured.

The 7b run needs ~17 GB of GPU memory (15.2 GB of weights, 0.6 GB sampler, ~6 GB of float32
logits at batch 8 peak) and takes about 3 minutes on an H100 after the model is built (estimated as in
item 6: the default strategies, speculative included, uncached, 4 rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # stand_ins: test stand-ins, not the package

SIZES = {
    # Dream-org/Dream-v0-Base-7B's config.json shape (Qwen2.5-7B), tokenizer facts included
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6,
               tokenizer_len=151667, mask_id=151666, eos_id=151643,
               prompt_length=256, gen_length=256, max_tokens=64, dtype="bfloat16"),
    # a few layers, small: the same code path in seconds on a CPU
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176, vocab_size=512, max_position_embeddings=1024, rope_theta=1e4,
                 tokenizer_len=500, mask_id=499, eos_id=498,
                 prompt_length=32, gen_length=32, max_tokens=0, dtype="float32"),
}


class IdTokenizer:
    """Stands in for Dream's tokenizer: ids only (text is the ids written out). Mask, EOS, pad and size."""

    def __init__(self, size: int, mask_id: int, eos_id: int):
        self.size, self.mask_token_id, self.eos_token_id, self.pad_token_id = size, mask_id, eos_id, eos_id

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_native(size: str, device: torch.device, dtype: torch.dtype):
    """A native Dream (our layers.Transformer, which takes the key/value cache) of this size, random weights."""
    from torch import nn

    from adjust.base.dream import DreamNative
    from adjust.base.native import NativeConfig

    s = SIZES[size]
    cfg = NativeConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_layers=s["num_hidden_layers"],
                       num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"],
                       intermediate_size=s["intermediate_size"], rope_theta=s["rope_theta"], norm_eps=1e-6,
                       tie_embeddings=False, qkv_bias=True, max_length=s["max_position_embeddings"],
                       mask_id=s["mask_id"], eos_id=s["eos_id"], pad_id=s["eos_id"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = cfg.build()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    tok = IdTokenizer(s["tokenizer_len"], s["mask_id"], s["eos_id"])
    base = DreamNative(cfg, net, tok, name=f"random native Dream {size}").eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def build(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, native: bool = False,
          sampler_layers: int = 1):
    """(base, sampler): a random Qwen2 of this size as a Dream stand-in (or with `native` our own Dream), and an
    untrained sampler for it."""
    import transformers

    from adjust.sampler import JointSampler, SamplerConfig

    s = SIZES[size]
    torch.manual_seed(seed)
    if native:
        base = build_native(size, device, dtype)
    else:
        cfg = transformers.Qwen2Config(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=s["max_position_embeddings"],
            rope_theta=s["rope_theta"], rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
            pad_token_id=s["eos_id"], eos_token_id=s["eos_id"], bos_token_id=s["eos_id"])
        with torch.device(device):  # weights are created (and randomly initialised) on the device, in dtype
            net = transformers.Qwen2ForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        tok = IdTokenizer(s["tokenizer_len"], s["mask_id"], s["eos_id"])
        from stand_ins import stand_in_base

        base = stand_in_base("dream", net, tok, name=f"random Qwen2 {size} as a Dream stand-in")
    scfg = SamplerConfig.for_base(base, intermediate_ratio=s["intermediate_size"] / s["hidden_size"],
                                  num_layers=sampler_layers)
    with torch.device(device):
        sampler = JointSampler(scfg)
    sampler = sampler.to(dtype=dtype).eval()
    for p in sampler.parameters():
        p.requires_grad_(False)
    return base, sampler


class _Stop(Exception):
    pass


class StopAfterTokens:
    """Poses as the base inside generate(): before a full pass, stop once every row has `max_tokens` new tokens.

    Everything but `hidden_states` is the real base's. The canvas generate() passes is its own
    working tensor, updated in place, so the tokens written so far can be read back after a stop.
    """

    def __init__(self, base, prompt_length: int, max_tokens: int, batch: int | None = None):
        self._base, self._p, self._max, self._batch = base, prompt_length, max_tokens, batch
        self.canvas, self.passes, self.rows = None, 0, 0

    def __getattr__(self, name):
        return getattr(self._base, name)

    def written(self) -> torch.Tensor:
        return (self.canvas[:, self._p:] != self._base.mask_id).sum(1)

    def _before_pass(self, input_ids):
        self.canvas = input_ids[:self._batch]  # the batch's canvases (a speculative pass appends drafted rows)
        if self._max and int(self.written().min()) >= self._max:
            raise _Stop
        self.passes += 1
        self.rows += input_ids.shape[0]

    def hidden_states(self, input_ids, attention_mask=None):
        self._before_pass(input_ids)
        return self._base.hidden_states(input_ids, attention_mask)

    def cache_pass(self, input_ids, attention_mask=None):  # a full pass that fills the key/value cache
        self._before_pass(input_ids)
        return self._base.cache_pass(input_ids, attention_mask)

    def span_hidden(self, input_ids, attention_mask, cache, start, end):  # a cached full pass
        self._before_pass(input_ids)
        return self._base.span_hidden(input_ids, attention_mask, cache, start, end)


def timed_generation(base, sampler, strategy, prompt: list[int], batch: int, gen_length: int, max_tokens: int,
                     seed: int, cache: str = "none", block_length: int | None = None, unroll: str = "full") -> dict:
    from adjust.decode import generate
    from adjust.eval.bench import time_call
    from adjust.sampling import SamplingConfig

    proxy = StopAfterTokens(base, len(prompt), max_tokens, batch)
    unrolls = [0]
    hook = sampler.register_forward_hook(lambda *a: unrolls.__setitem__(0, unrolls[0] + 1))
    span, rows_fn = sampler.forward_span, sampler.forward_rows

    def counted_span(*a, **kw):  # a cached unroll (block rows only) does not go through forward
        unrolls[0] += 1
        return span(*a, **kw)

    def counted_rows(*a, **kw):  # nor does a fast one (its kept rows only)
        unrolls[0] += 1
        return rows_fn(*a, **kw)

    sampler.forward_span, sampler.forward_rows = counted_span, counted_rows

    def run():
        try:
            generate(proxy, [prompt] * batch, strategy, SamplingConfig(), gen_length, block_length, seed=seed,
                     sample_indices=list(range(batch)), sampler=sampler, cache=cache, unroll=unroll)
        except _Stop:
            pass

    try:
        seconds = time_call(run, base.device)
    finally:
        hook.remove()
        del sampler.forward_span, sampler.forward_rows
    tokens = int(proxy.written().sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, "full_passes": proxy.passes,
            "base_rows": proxy.rows,
            "sampler_passes": unrolls[0]}


# --preset NAME: these settings unless given on the command line (docstring, "The issue-23 run")
PRESETS = {
    "issue23": dict(size="7b", native=True, dtype="bfloat16", prompt_length=256, gen_length=256, block_length=32,
                    max_tokens=64, batch_sizes="1,8", cache="none,dual", tokens_per_pass=4, tau=0.9,
                    unroll="full,fast", pass_rows="1,2,4,8,16", spec_depth=0, repeats=3, warmup=1, pass_repeats=20,
                    json="results/gpu_bench_7b_issue23.json"),
}


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, arguments); a --preset's settings are the defaults, every flag given overrides them."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a named configuration (issue23: the issue-23 run, see the docstring); flags given "
                    "override it")
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 for 7b, fp32 for tiny)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("-K", "--tokens-per-pass", type=int, default=4)
    ap.add_argument("--prompt-length", type=int, default=None, help="default 256 (7b) / 32 (tiny)")
    ap.add_argument("--gen-length", type=int, default=None, help="default 256 (7b) / 32 (tiny)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="time the first M tokens of each generation (0 = all; default 64 for 7b, 0 for tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pass-repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: none)")
    ap.add_argument("--cache", default="none", help="comma-separated key/value cache modes, e.g. none,prefix,dual "
                    "(prefix/dual need --block-length and use the native Dream)")
    ap.add_argument("--native", action="store_true", help="our native Dream instead of the transformers stand-in")
    ap.add_argument("--pass-rows", default="1,2,4,8,16", help="rows r of the pass-cost measurement")
    ap.add_argument("--spec-depth", type=int, default=4, help="depth D of the speculative runs (batch 1, both "
                    "drafters; 0: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--tau", type=float, default=0.9, help="tau of threshold and threshold-adjust (0: neither runs)")
    ap.add_argument("--unroll", default="full,fast", help="unroll modes of the sampler strategies (adjust.decode): "
                    "full, fast or both")
    ap.add_argument("--sampler-layers", type=int, default=1, help="blocks of the joint sampler (1: the method's; "
                    "2: the task model's), each of the base's MLP width")
    ap.add_argument("--json", default=None, help="write the report to this JSON file")
    preset = ap.parse_known_args(argv)[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])
    return ap, ap.parse_args(argv)


def main(argv=None) -> int:
    ap, args = parse_args(argv)

    from adjust.base import resolve_device, resolve_dtype
    from adjust.eval.bench import ideal_speedup, pass_vs_unroll
    from adjust.eval.costs import measure_pass_cost
    from adjust.io import write_json
    from adjust.provenance import code_version
    from adjust.strategies import make_strategy

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SIZES[args.size]
    device = resolve_device(args.device or "auto")
    dtype = resolve_dtype(args.dtype or spec["dtype"])
    P = spec["prompt_length"] if args.prompt_length is None else args.prompt_length
    G = spec["gen_length"] if args.gen_length is None else args.gen_length
    M = spec["max_tokens"] if args.max_tokens is None else args.max_tokens
    K = args.tokens_per_pass
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if M and M > G:
        ap.error(f"--max-tokens {M} exceeds --gen-length {G}")
    if M and M % K:
        ap.error(f"--max-tokens {M} must be a multiple of K={K} (equal tokens for every strategy)")
    caches = [c.strip() for c in args.cache.split(",") if c.strip()] or ["none"]
    if any(c not in ("none", "prefix", "dual") for c in caches):
        ap.error(f"--cache takes none, prefix and dual, got {args.cache!r}")
    if any(c != "none" for c in caches) and not args.block_length:
        ap.error("--cache prefix/dual needs --block-length")
    native = args.native or any(c != "none" for c in caches)
    try:
        pass_rows = sorted({int(r) for r in args.pass_rows.split(",") if r.strip()})
    except ValueError:
        ap.error(f"--pass-rows takes comma-separated integers, got {args.pass_rows!r}")
    if not pass_rows or pass_rows[0] < 1:
        ap.error(f"--pass-rows takes positive integers, got {args.pass_rows!r}")
    if args.spec_depth < 0:
        ap.error(f"--spec-depth must be at least 0, got {args.spec_depth}")
    unrolls = list(dict.fromkeys(u.strip() for u in args.unroll.split(",") if u.strip())) or ["full"]
    if any(u not in ("full", "fast") for u in unrolls):
        ap.error(f"--unroll takes full and fast, got {args.unroll!r}")
    tau = args.tau
    if not 0 <= tau <= 1:
        ap.error(f"--tau must be in (0, 1] (0: no threshold strategies), got {tau}")

    t0 = time.perf_counter()
    log(f"building a random {args.size} {'native Dream' if native else 'Qwen2 (Dream stand-in)'} on {device} in {dtype}")
    base, sampler = build(args.size, device, dtype, args.seed, native, args.sampler_layers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    n_base = sum(p.numel() for p in base.parameters())
    n_sampler = sum(p.numel() for p in sampler.parameters())
    log(f"built in {build_s:.1f} s: base {n_base / 1e9:.3f}B parameters, sampler {n_sampler / 1e9:.3f}B")

    g = torch.Generator().manual_seed(args.seed)
    banned = set(base.banned_ids) | {base.eos_id}
    usable = torch.tensor([i for i in range(base.vocab_size) if i not in banned])
    prompt = usable[torch.randint(len(usable), (P,), generator=g)].tolist()

    report = {"size": args.size, "code_version": code_version(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "model": {k: v for k, v in spec.items() if k not in ("prompt_length", "gen_length", "max_tokens", "dtype")},
              "base_params": n_base, "sampler_params": n_sampler, "sampler_layers": sampler.cfg.num_layers,
              "sampler_intermediate": sampler.cfg.intermediate_size,
              "build_seconds": round(build_s, 2), "prompt_length": P, "gen_length": G, "canvas": P + G, "k": K,
              "max_tokens": M, "repeats": args.repeats, "warmup": args.warmup, "pass_vs_unroll": {},
              "preset": args.preset, "unrolls": unrolls, "tau": tau or None,
              "base": "native Dream (adjust.base.dream)" if native else "transformers Qwen2 stand-in",
              "block_length": args.block_length, "caches": caches,
              "throughput": [], "adjust_vs_ideal": [], "pass_cost": {},
              "notes": ("random weights; tokens/s over the first max_tokens tokens of each sequence (0 = all), "
                        "timed with CUDA events on a GPU; ratio_to_exact = median over rounds of the paired ratio; "
                        "speculative (batch 1): drafts from random weights and an untrained sampler are rarely "
                        "accepted, so its tokens/s is the cost of its rows and unrolls, not a speedup; likewise "
                        "threshold and threshold-adjust: random weights are never confident, so they write one "
                        "token (threshold) or 2 (threshold-adjust: one unsure draw) per full pass, and the figure is the "
                        "cost of their passes; adaptive strategies may write past max_tokens in their last pass "
                        "(tokens counts what they wrote); +fast: --unroll fast; pass_cost: "
                        "a --pass-cost report (adjust bench / eval frontier), cost of one base pass of r rows "
                        "relative to one row: full = the whole canvas, refresh = the whole canvas keeping "
                        "keys/values, span = the active block after a cache_pass (native Dream only); "
                        "unroll_cost / unroll_cost_fast: one full / fast sampler unroll relative to a one-row full "
                        "pass, the fast one as --unroll fast runs it at this K (keys/values once per step shared "
                        "over K-1 unrolls of 2(K-1)+1 rows), no LM head on either side; --pass-cost reads c from "
                        "pass_vs_unroll at batch 1 instead (the loop's unrolls and full pass, LM heads included); "
                        "complete: false in a report written before the run ended (one is written after the pass "
                        "costs and after each batch size)"),
              "complete": False}

    def save():  # atomic: an interrupted write leaves the previous file; a cut-off run leaves what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, report)

    block = args.block_length or 32
    kinds = ("full", "refresh", "span") if native else ("full",)
    x1 = torch.tensor(prompt + [base.mask_id] * G)
    pc = measure_pass_cost(base, x1, (P, min(P + G, P + block)), pass_rows, repeats=args.pass_repeats, warmup=1,
                           kinds=kinds, sampler=sampler, unroll_k=K)
    report["pass_cost"][f"dream-7b-shape" if args.size == "7b" else args.size] = pc
    save()
    log("pass of r rows / one row: " + "; ".join(
        f"{k} " + " ".join(f"r={r}:{pc[k][str(r)]:.2f}" for r in pass_rows) for k in kinds)
        + f"; unroll {pc['unroll_cost']:.3f} (fast {pc['unroll_cost_fast']:.3f}) of a one-row full pass")

    def each_unroll(label, s):  # a sampler strategy in every unroll mode; "+fast" names the fast one
        return [(label if u == "full" else f"{label}+{u}", s, u) for u in unrolls]

    plain = [("exact", make_strategy("exact"), "full"),
             (f"parallel:{K}", make_strategy("parallel", tokens_per_pass=K), "full")]
    if tau:
        plain.append((f"threshold:{tau:g}", make_strategy("threshold", tau=tau), "full"))
    plain += each_unroll(f"adjust:{K}", make_strategy("adjust", tokens_per_pass=K))
    if tau:
        plain += each_unroll(f"threshold-adjust:{tau:g}:{K}",
                             make_strategy("threshold-adjust", tau=tau, tokens_per_pass=K))
    # every strategy with every cache mode; the label names the cache unless it is the only mode, "none"
    spec = ([(f"speculative:{args.spec_depth}:{d}", make_strategy("speculative", depth=args.spec_depth, drafter=d),
              "full") for d in ("self", "sampler")] if args.spec_depth else [])
    strategies_all = [(label if caches == ["none"] else f"{label} [{c}]", s, c, u) for label, s, u in plain + spec
                      for c in caches]
    ref = "exact" if caches == ["none"] else f"exact [{'none' if 'none' in caches else caches[0]}]"
    for B in batch_sizes:
        strategies = [t for t in strategies_all if B == 1 or t[1].name != "speculative"]  # speculative: batch 1
        x = torch.tensor(prompt + [base.mask_id] * G)[None].repeat(B, 1)
        c = pass_vs_unroll(base, sampler, x, repeats=args.pass_repeats, unrolls=unrolls, k=K)
        report["pass_vs_unroll"][str(B)] = c
        log(f"batch {B}: full pass {c['full_pass_ms']:.2f} ms, unroll " + ", ".join(
            f"{u} {m['unroll_ms']:.2f} ms (cost {m['unroll_cost']:.3f})" for u, m in c["modes"].items()))
        runs = {label: [] for label, *_ in strategies}
        for w in range(args.warmup):
            for label, s, cache, u in strategies:
                timed_generation(base, sampler, s, prompt, B, G, M, args.seed + 1000 + w, cache, args.block_length,
                                 u)
        for r in range(args.repeats):
            shift = r % len(strategies)
            for label, s, cache, u in strategies[shift:] + strategies[:shift]:
                runs[label].append(timed_generation(base, sampler, s, prompt, B, G, M, args.seed + r, cache,
                                                    args.block_length, u))
        exact = [run["tokens_per_second"] for run in runs[ref]]
        for label, s, cache, u in strategies:
            rs = runs[label]
            tps = [run["tokens_per_second"] for run in rs]
            row = {"strategy": label, "batch_size": B, "cache": cache, "unroll": u,
                   "tokens_per_second": round(statistics.median(tps), 2),
                   "ratio_to_exact": 1.0 if label == ref else
                   round(statistics.median(t / e for t, e in zip(tps, exact)), 4),
                   "tokens": rs[0]["tokens"], "full_passes": rs[0]["full_passes"],
                   "sampler_passes": rs[0]["sampler_passes"], "base_rows": rs[0]["base_rows"],
                   "seconds": [round(run["seconds"], 4) for run in rs]}
            if "none" in caches:
                same = [run["tokens_per_second"] for run in runs[label.replace(f"[{cache}]", "[none]")]]
                row["ratio_to_uncached"] = round(statistics.median(t / u for t, u in zip(tps, same)), 4)
            report["throughput"].append(row)
            log(f"batch {B}: {label:<34} {row['tokens_per_second']:10.1f} tokens/s  x{row['ratio_to_exact']:.3f} "
                f"({row['tokens']} tokens, {row['full_passes']} full passes, {row['sampler_passes']} unrolls)")
            if s.name == "adjust" and cache == "none":
                cu = c["modes"][u]["unroll_cost"]
                ideal = ideal_speedup(K, cu)
                report["adjust_vs_ideal"].append({"strategy": label, "batch_size": B, "k": K, "unroll": u,
                                                  "unroll_cost": cu,
                                                  "ideal_speedup": round(ideal, 4),
                                                  "achieved_speedup": row["ratio_to_exact"],
                                                  "fraction_of_ideal": round(row["ratio_to_exact"] / ideal, 4)})
        save()
    if device.type == "cuda":
        report["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    for v in report["adjust_vs_ideal"]:
        log(f"batch {v['batch_size']}: {v['strategy']} ideal {v['ideal_speedup']:.2f}x, achieved "
            f"{v['achieved_speedup']:.2f}x = {100 * v['fraction_of_ideal']:.0f}% of ideal")
    report["complete"] = True
    save()
    if args.json:
        log(f"wrote {args.json}")
    print(json.dumps(report))
    return 0 if all(math.isfinite(r["tokens_per_second"]) for r in report["throughput"]) else 1


if __name__ == "__main__":
    sys.exit(main())
