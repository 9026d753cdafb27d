"""Harness validity against `adjust eval tasks` on the same prompts and seed (issue 15's target).

    python -m adjust.harness.compare --base models/task-base --tasks list \\
        --strategies exact,adjust:4 --out results/harness_tasks.json

For each strategy: `evaluate_tasks` (what `adjust eval tasks` runs, its default batch size 64)
on the shipped prompts, and lm-eval's `simple_evaluate` with the model `adjust` on the task
`adjust_<task>` (lm-eval's default batch size 1); then validity of both and how many answers
are the same text (a sequence's tokens depend only on (seed, prompt ids, sample index)).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import AdjustError


def compare(base_dir: str, tasks: list[str], strategies: str, seed: int = 0, limit: int = 0,
            harness_batch_size: int = 1, unroll: str = "full") -> dict:
    """`unroll`: how ADJUST's unrolls are computed on both sides (the harness model's own default would be fast)."""
    import lm_eval

    from ..decode import generate_texts
    from ..eval.specs import build_strategy, parse_strategy_specs, spec_label
    from ..eval.tasks import DEFAULT_GEN_LENGTH, evaluate_tasks, read_task_prompts, select_records
    from ..loader import ModelSpec, load_models
    from ..sampling import SamplingConfig
    from . import TASKS_DIR, task_manager

    specs = parse_strategy_specs(strategies)
    built = [build_strategy(*s) for s in specs]
    records = select_records(read_task_prompts(TASKS_DIR / "eval_prompts.jsonl"), tasks, limit)
    base, sampler = load_models(ModelSpec(base=base_dir), "required" if any(s.uses_sampler for s in built) else "none")
    sampling = SamplingConfig()  # T = 1, entropy order: eval tasks' defaults and the tasks' YAML
    rows = []
    for (name, params), strategy in zip(specs, built):
        label = spec_label(name, params)
        ours = evaluate_tasks(base, sampler, records, [(name, params)], gen_length=DEFAULT_GEN_LENGTH, seed=seed,
                              sampling=sampling, unroll=unroll)
        model_args = {"base": base_dir, "strategy": name, "seed": seed, "batch_size": harness_batch_size,
                      **({"unroll": unroll} if strategy.uses_sampler else {}), **params}
        harness = lm_eval.simple_evaluate(model="adjust", model_args=model_args, tasks=[f"adjust_{t}" for t in tasks],
                                          task_manager=task_manager(), log_samples=True,
                                          limit=limit or None)
        for task in tasks:
            prompts = [r["prompt"] for r in records if r["task"] == task]
            samples, _ = generate_texts(base, prompts, strategy, sampling, gen_length=DEFAULT_GEN_LENGTH,
                                        batch_size=64, seed=seed, sampler=sampler, unroll=unroll)
            eval_answers = {s["prompt"]: s["text"].split("\n", 1)[0] for s in samples}
            logged = harness["samples"][f"adjust_{task}"]
            same = sum(eval_answers[s["doc"]["prompt"]] == s["filtered_resps"][0] for s in logged)
            rows.append({"task": task, "strategy": label,
                         "eval_tasks_valid": ours["validity"][task][label],
                         "harness_valid": round(harness["results"][f"adjust_{task}"]["validity,none"], 4),
                         "n": len(logged), "identical_answers": same})
    return {"base": base.name, "seed": seed, "gen_length": DEFAULT_GEN_LENGTH, "sampling": sampling.__dict__,
            "unroll": unroll,
            "harness_batch_size": harness_batch_size, "eval_tasks_batch_size": 64,
            "lm_eval_version": lm_eval.__version__, "rows": rows}


def _code_version() -> str:
    """The git commit this ran from ("+dirty" with uncommitted changes under src/), if known."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=here.parents[2], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adjust.harness.compare", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="models/task-base")
    p.add_argument("--tasks", default="list", help="comma-separated subset of list,shuffle,pick,reverse,either")
    p.add_argument("--strategies", default="exact,adjust:4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="at most this many prompts per task (0: all 200)")
    p.add_argument("--unroll", default="full", help="full | fast: ADJUST's unrolls on both sides (default full)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        from ..io import write_json

        version = _code_version()  # before the run: the code that ran, whatever changes meanwhile
        from ..decode import unroll_plan

        unroll_plan(args.unroll)
        result = compare(args.base, args.tasks.split(","), args.strategies, args.seed, args.limit, unroll=args.unroll)
        result["command"] = "python -m adjust.harness.compare " + " ".join(sys.argv[1:] if argv is None else argv)
        result["code_version"] = version
        text = json.dumps(result, indent=1)
        if args.out:
            write_json(args.out, result)
    except AdjustError as e:
        print(f"adjust: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
