"""The random kill sweep of issue 28 (docs/pipeline.md): train-base, rollouts and distill with tiny
settings, each killed at random moments with SIGKILL, SIGTERM or SIGINT and rerun with the same
command until it finishes; every output must equal an uninterrupted run's byte for byte, no
temporary file may be left, and every interrupted run must end with exit 0 (done), 130, 143 or
-9 and no traceback.

    python scripts/fault_sweep.py --kills 100      # the sweep (minutes to an hour on a laptop)
    python scripts/fault_sweep.py --kills 3        # a smoke run

Not part of the default test run (tests/test_scripts.py runs a smoke of it under -m slow).
Prints one JSON line per stage and a summary; exit 1 if anything differed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def corpus(n: int = 48, seed: int = 0) -> str:
    """A small made-up text (no download): sentences of common words from a seeded draw."""
    words = ("the a river house market dog cat bird sun rain wind hill man woman child bread milk song "
             "walks sleeps sings runs looks buys sees finds holds over under by in to and with at").split()
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(12, 24))).capitalize() + "."
                     for _ in range(n))


SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
EXPECTED_RC = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}
# files a resumed run may legitimately write differently (timings), compared without their volatile fields
VOLATILE = {"elapsed", "elapsed_s"}


def stages(work: Path) -> list[tuple[str, list[str]]]:
    data = work / "data.txt"
    return [
        ("train-base", ["train-base", "--data", str(data), "--out", "{out}/base", "--steps", "40", "--eval-every", "4",
                        "--vocab-size", "300", "--hidden-size", "32", "--layers", "1", "--heads", "2",
                        "--intermediate-size", "64", "--seq-len", "32", "--batch-size", "8", "--warmup", "4",
                        "--quiet"]),
        ("rollouts", ["rollouts", "--base", "{ref}/base", "--out", "{out}/rollouts", "--num-samples", "96",
                      "--gen-length", "12", "--shard-size", "4", "--batch-size", "4", "--seed", "1", "--quiet"]),
        ("distill", ["distill", "--base", "{ref}/base", "--rollouts", "{ref}/rollouts", "--out", "{out}/sampler",
                     "--steps", "40", "--batch-size", "4", "--warmup", "2", "--max-unrolls", "2", "--eval-every", "4",
                     "--quiet"]),
    ]


def run(argv: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adjust.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def normalized(path: Path) -> bytes:
    """A file's bytes; for a torch state, its content without the wall-clock fields; for a safetensors file,
    its tensors and metadata."""
    if path.suffix == ".pt":
        import torch

        state = torch.load(path, weights_only=True)

        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k not in VOLATILE and k != "adjust_sha256"}
            if isinstance(x, list):
                return [strip(v) for v in x]
            return x

        from adjust.io import content_digest

        return content_digest(strip(state)).encode()
    if path.suffix == ".safetensors":  # tensors and metadata (safetensors orders several metadata keys at random)
        from safetensors import safe_open
        from safetensors.torch import load_file

        from adjust.io import content_digest

        with safe_open(str(path), "pt") as f:
            meta = dict(sorted((f.metadata() or {}).items()))
        return content_digest({"tensors": load_file(str(path)), "metadata": meta}).encode()
    if path.name == "config.json":
        raw = json.loads(path.read_text())
        raw.get("training", {}).pop("elapsed_s", None)
        return json.dumps(raw, sort_keys=True).encode()
    return path.read_bytes()


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(normalized(p)).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".adjust.lock"}


def interrupted(argv: list[str], env: dict, rng: random.Random, max_delay: float, signals: list[str]) -> dict:
    """Start `argv`, send a random one of `signals` after a random delay; returns what happened."""
    name = rng.choice(signals)
    delay = rng.uniform(0.2, max_delay)  # (a signal before Python has started is Python's, not ours)
    proc = subprocess.Popen([sys.executable, "-m", "adjust.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(SIGNALS[name])
    out, err = proc.communicate(timeout=300)
    # a signal that lands after the command finished its work (during the interpreter's shutdown, which
    # restores the default handlers) kills it silently: fine, its output is complete
    finished = proc.returncode == -SIGNALS[name] and bool(out.strip())
    ok = (proc.returncode in (0, EXPECTED_RC[SIGNALS[name]]) or finished) and "Traceback" not in err
    return {"signal": name, "after_s": round(delay, 2), "rc": proc.returncode, "ok": ok,
            **({} if ok else {"stderr": err[-1500:]})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30, help="interruptions per stage (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    p.add_argument("--stages", default="train-base,rollouts,distill")
    p.add_argument("--signals", default="kill,term,int", help="the signals to draw from (default kill,term,int)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "data.txt").write_text(corpus())
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    ref, failures = work / "ref", 0
    wanted = args.stages.split(",")
    for stage, template in stages(work):
        fill = lambda out: [a.format(out=out, ref=ref) for a in template]  # noqa: E731
        t0 = time.time()
        done = run(fill(ref), env)  # the uninterrupted run (later stages read the reference's outputs)
        if done.returncode != 0:
            print(json.dumps({"stage": stage, "error": "the uninterrupted run failed", "stderr": done.stderr[-2000:]}))
            return 1
        if stage not in wanted:
            continue
        straight = time.time() - t0
        target = Path(fill(ref)[fill(ref).index("--out") + 1]).name
        events, reruns = [], 0
        out = work / "runs" / stage
        for _ in range(args.kills):
            events.append(interrupted(fill(out), env, rng, max_delay=straight * 1.1, signals=args.signals.split(",")))
        while True:  # the same command until it finishes
            reruns += 1
            final = run(fill(out), env)
            if final.returncode == 0 or reruns > 3:
                break
        a, b = tree(out / target), tree(ref / target)
        same = final.returncode == 0 and a == b
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        left = [str(p) for p in (out / target).rglob("*.tmp")] if (out / target).exists() else []
        bad = [e for e in events if not e["ok"]]
        failures += (not same) + bool(left) + len(bad)
        print(json.dumps({"stage": stage, "kills": len(events), "uninterrupted_s": round(straight, 1),
                          "identical": same, "differ": differ, "temporaries_left": left, "bad_interruptions": bad[:5],
                          "final_rc": final.returncode, **({} if final.returncode == 0 else
                                                           {"stderr": final.stderr[-1500:]}),
                          "signals": {s: sum(e["signal"] == s for e in events) for s in SIGNALS},
                          "exit_codes": {str(rc): sum(e["rc"] == rc for e in events)
                                         for rc in sorted({e["rc"] for e in events})}}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"failures": failures}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
