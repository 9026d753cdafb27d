"""Two log-likelihoods of a masked diffusion LM on one multiple-choice task: accuracy and time.

- `bound`: the in-process lm-eval model `adjust` with likelihood=bound (the masked-diffusion bound, --mc-num
  Monte Carlo draws per choice, as LLaDA's evaluation does);
- `chain`: the same model with likelihood=chain (the exact left-to-right chain rule, one row per token);
- `chain, served`: lm-eval's own `local-completions` against `adjust serve` (echo + logprobs: the chain rule
  computed by the server), with only base_url and model.

Task: adjust_reverse_mc (the task model's `reverse` prompts, the reversed words against three wrong orders).

    python benchmarks/likelihood_mc.py --json results/likelihood_mc.json --md results/likelihood_mc.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import code_version, write  # noqa: E402

TASK = "adjust_reverse_mc"


def evaluate(model: str, model_args: str, limit: int | None) -> tuple[float, float]:
    import lm_eval

    import adjust.harness

    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=limit,
                                  task_manager=adjust.harness.task_manager())
    return out["results"][TASK]["acc,none"], time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(ROOT / "models" / "task-base"))
    ap.add_argument("--limit", type=int, default=None, help="documents (default: all 200)")
    ap.add_argument("--mc-num", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    version = code_version()
    rows = {}
    for name, likelihood in (("bound", "bound"), ("chain", "chain")):
        acc, secs = evaluate("adjust", f"base={args.base},likelihood={likelihood},mc_num={args.mc_num},"
                             "check_greedy=false", args.limit)
        rows[name] = {"acc": round(acc, 4), "seconds": round(secs, 1)}
        print(name, rows[name], file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "adjust.cli", "serve", "--port", "0", "--base", args.base],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        if not line.startswith("adjust serve: listening on "):
            raise SystemExit(f"server did not start: {line}{server.stderr.read()}")
        url = line.split()[4]
        name = Path(args.base).name
        acc, secs = evaluate("local-completions", f"base_url={url}/v1/completions,model={name}", args.limit)
        rows["chain, served"] = {"acc": round(acc, 4), "seconds": round(secs, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = {"benchmark": "likelihood_mc", "code_version": version, "task": TASK, "base": Path(args.base).name,
              "limit": args.limit, "mc_num": args.mc_num, "threads": args.threads,
              "command": "python benchmarks/likelihood_mc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    lines = [f"{TASK} on {report['base']} ({args.limit or 'all'} documents, 4 choices each), {args.threads} torch "
             f"thread(s), code {version}", "", "| log-likelihood | accuracy | seconds |", "|---|---:|---:|"]
    labels = {"bound": f"bound, {args.mc_num} Monte Carlo draws (in process)", "chain": "chain rule (in process)",
              "chain, served": "chain rule through `adjust serve` (lm-eval local-completions)"}
    lines += [f"| {labels[k]} | {v['acc']} | {v['seconds']} |" for k, v in rows.items()]
    write(args, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
