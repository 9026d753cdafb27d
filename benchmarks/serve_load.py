"""Load on `adjust serve` (issue 14, item 7): aggregate tokens/s and p50 / p95 latency at 1, 4 and 16
concurrent clients on the shipped model.

The server is the real command, `adjust serve --port 0 ...`, in its own process; each client is a
thread that sends non-streaming /v1/completions requests back to back (the next as soon as the last
answered) until the level's request count is reached. Prompts cycle through a fixed list of
Shakespeare openings of several token lengths, so with the default server (equal-length
batching, exact) only some requests can share a batch; it is measured again with the server's
`--mixed-lengths` (padding across lengths). The decoding loop alone at batch 1 and at the largest
batch (no HTTP) gives the ceiling that batching can reach on this machine.

Tokens/s counts the decoded positions (max_tokens per request), as `adjust bench` does; latency is
per request, send to full answer. The batch sizes are read from the server's /health. Levels run
interleaved in rounds (each round: the ceiling, then every level of each server) and tokens/s is
the median over the rounds, so that other load on the machine falls on every level alike.

    python benchmarks/serve_load.py --threads 1 --json results/serve_load.json --md results/serve_load.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:", "KING HENRY:", "To be, or not to be", "Now is the winter", "O Romeo, Romeo!",
           "Friends, Romans, countrymen,", "All the world's a stage,"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_server(args, mixed: bool) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "adjust.cli", "serve", "--port", "0", "--max-batch-size", str(args.max_batch_size),
           "--batch-wait-ms", str(args.batch_wait_ms)] + (["--mixed-lengths"] if mixed else []) \
        + (["--base", args.base] if args.base else [])
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    if not line.startswith("adjust serve: listening on "):
        p.kill()
        raise SystemExit(f"server did not start: {line}{p.stderr.read()}")
    threading.Thread(target=lambda: [log("server: " + ln.rstrip()) for ln in p.stderr], daemon=True).start()
    return p, line.split()[4]


def call(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        return json.loads(r.read())


def run_level(url: str, clients: int, requests: int, body: dict) -> dict:
    latencies, failures, next_i = [], [], [0]
    lock = threading.Lock()
    before = health(url)

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= requests:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            try:
                out = call(url, {**body, "prompt": PROMPTS[i % len(PROMPTS)]})
                assert out["choices"][0]["finish_reason"] in ("length", "stop")
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    after = health(url)
    return {"seconds": seconds, "latencies": latencies, "failures": failures,
            "tokens_per_second": len(latencies) * body["max_tokens"] / seconds,
            "batches": after["batches"] - before["batches"], "rows": after["rows_done"] - before["rows_done"]}


def summarize(clients: int, rounds: list[dict]) -> dict:
    """One level over the rounds: median tokens/s of the rounds, latency percentiles over all requests."""
    lat = sorted(x for r in rounds for x in r["latencies"])
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    failures = [f for r in rounds for f in r["failures"]]
    batches = sum(r["batches"] for r in rounds)
    return {"clients": clients, "requests": len(lat) + len(failures), "failed": len(failures),
            "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in rounds), 1),
            "tokens_per_second_rounds": [round(r["tokens_per_second"], 1) for r in rounds],
            "latency_p50_s": round(statistics.median(lat), 3), "latency_p95_s": round(q[18], 3),
            "batches": batches, "mean_batch_size": round(sum(r["rows"] for r in rounds) / max(1, batches), 2),
            "failures": failures[:5]}


def write(args, report: dict, text: str) -> None:
    print(text)
    for path, content in ((args.json, json.dumps(report, indent=2) + "\n"), (args.md, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(content)
            os.replace(tmp, path)
            log(f"wrote {path}")


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict) -> str:
    c, ceil = report["config"], report["decode_ceiling"]
    lines = [f"`adjust serve` under load: {c['strategy']} K={c['tokens_per_pass']}, {c['max_tokens']} tokens per "
             f"request, {len(c['prompts'])} prompts of {len(set(c['prompt_tokens']))} token lengths, max batch "
             f"{c['max_batch_size']}, batch wait {c['batch_wait_ms']} ms, {report['threads']} torch thread(s), "
             f"code {report['code_version']}", "",
             "| batching | clients | requests | failed | tokens/s | vs 1 client | p50 latency (s) | p95 latency (s) "
             "| mean batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        mode = "any lengths (padded)" if run["mixed_lengths"] else "equal lengths (exact)"
        one = run["levels"][0]["tokens_per_second"]
        for r in run["levels"]:
            lines.append(f"| {mode} | {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens_per_second']} | "
                         f"{r['tokens_per_second'] / one:.2f}x | {r['latency_p50_s']} | {r['latency_p95_s']} | "
                         f"{r['mean_batch_size']} |")
    lines += ["", f"Decoding loop alone, no server (`decode.generate`, one prompt repeated, median of the rounds): "
              f"batch 1 {ceil['batch_1_tokens_per_second']} tokens/s, batch {ceil['batch_size']} "
              f"{ceil['batch_n_tokens_per_second']} tokens/s ({ceil['speedup']}x): what batching itself gains on this "
              "machine (a CPU pass costs about in proportion to the tokens in it).",
              "", f"tokens/s is the median of {report['rounds']} rounds, run interleaved (every level of both servers "
              "in each round) so that the machine's other load falls on all of them alike; latencies pool the "
              "rounds."]
    return "\n".join(lines) + "\n"


class DecodeCeiling:
    """tokens/s of the decoding loop itself at batch 1 and at --max-batch-size (same settings, no HTTP)."""

    def __init__(self, args, prompt: str):
        import torch

        from adjust.loader import ModelSpec, load_models
        from adjust.strategies import make_strategy

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.base, self.sampler = load_models(ModelSpec(base=args.base), "optional")
        self.strategy = make_strategy(args.strategy, tokens_per_pass=args.tokens_per_pass)
        self.ids = self.base.encode(prompt)
        self.rounds = {1: [], args.max_batch_size: []}
        self.measure(1, 0)  # warm-up

    def measure(self, B: int, seed: int) -> float:
        from adjust.decode import generate
        from adjust.sampling import SamplingConfig

        t = time.perf_counter()
        generate(self.base, [self.ids] * B, self.strategy, SamplingConfig(), self.args.max_tokens, seed=seed,
                 sampler=self.sampler)
        return B * self.args.max_tokens / (time.perf_counter() - t)

    def round(self, r: int) -> None:
        """Batch 1 three times (it is short), then the full batch once; tokens/s of each."""
        one = [self.measure(1, 3 * r + i) for i in range(3)]
        self.rounds[1].append(3 / sum(1 / x for x in one))
        self.rounds[self.args.max_batch_size].append(self.measure(self.args.max_batch_size, r))

    def summary(self) -> dict:
        one = statistics.median(self.rounds[1])
        n = statistics.median(self.rounds[self.args.max_batch_size])
        return {"batch_size": self.args.max_batch_size, "batch_1_tokens_per_second": round(one, 1),
                "batch_n_tokens_per_second": round(n, 1), "speedup": round(n / one, 2)}


def small_beside_large(args) -> dict:
    """p50 / p95 latency of small requests (1 row) alone, and while one large request (--large-rows rows of
    the same settings) runs: small ones that can join its batch (same prompt length), and ones that cannot
    (another prompt length: they wait for the batch to drain, then go first by the round-robin)."""
    proc, url = start_server(args, False)
    body = {"max_tokens": args.max_tokens, "strategy": args.strategy, "tokens_per_pass": args.tokens_per_pass,
            "seed": 1}
    from adjust.base import load_base

    tok = load_base(args.base)
    same, other = PROMPTS[0], next(p for p in PROMPTS if len(tok.encode(p)) != len(tok.encode(PROMPTS[0])))
    prompts = max(1, args.large_rows // 2)
    large = {**body, "prompt": [same] * prompts, "n": max(1, args.large_rows // prompts)}

    def smalls(prompt: str, until) -> list[float]:
        out = []
        while not until() or len(out) < 3:
            t = time.perf_counter()
            call(url, {**body, "prompt": prompt})
            out.append(time.perf_counter() - t)
            if len(out) >= 200:
                break
        return out

    def pct(xs: list[float]) -> dict:
        q = statistics.quantiles(xs, n=20, method="inclusive") if len(xs) > 1 else xs * 19
        return {"requests": len(xs), "p50_s": round(statistics.median(xs), 3), "p95_s": round(q[18], 3)}

    try:
        call(url, {**body, "prompt": same})  # warm-up
        rows = {"alone": pct(smalls(same, lambda: True) + smalls(same, lambda: True))}
        for name, prompt in (("beside large, can join", same), ("beside large, other prompt length", other)):
            done, t_large = threading.Event(), {}

            def run_large():
                t = time.perf_counter()
                call(url, large)
                t_large["s"] = time.perf_counter() - t
                done.set()

            th = threading.Thread(target=run_large)
            th.start()
            time.sleep(0.5)  # the large request is running
            rows[name] = pct(smalls(prompt, done.is_set)) | {"large_request_s": None}
            th.join()
            rows[name]["large_request_s"] = round(t_large["s"], 2)
            log(f"{name}: {rows[name]}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"large_rows": prompts * large["n"], "rows": rows}


def small_markdown(report: dict) -> str:
    c, r = report["config"], report["small_beside_large"]
    lines = [f"Small requests (1 row) beside one large request ({r['large_rows']} rows), {c['strategy']} "
             f"K={c['tokens_per_pass']}, {c['max_tokens']} tokens each, max batch {c['max_batch_size']}, "
             f"{report['threads']} torch thread(s), code {report['code_version']}", "",
             "| small requests | requests | p50 latency (s) | p95 latency (s) | large request (s) |",
             "|---|---:|---:|---:|---:|"]
    for name, x in r["rows"].items():
        lines.append(f"| {name} | {x['requests']} | {x['p50_s']} | {x['p95_s']} | {x.get('large_request_s') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="model directory (default: the shipped models/shakespeare-base)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests per level and round = this x "
                    "clients (at least --min-requests)")
    ap.add_argument("--min-requests", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all levels (median tokens/s)")
    ap.add_argument("--strategy", default="adjust")
    ap.add_argument("--tokens-per-pass", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    ap.add_argument("--batching", default="equal,mixed", help="server modes to measure: equal (default "
                    "server: equal-length prompts batch, exact) and/or mixed (--mixed-lengths: padded)")
    ap.add_argument("--threads", type=int, default=0, help="server's torch threads (OMP_NUM_THREADS; 0 = default)")
    ap.add_argument("--json", default=None, help="write the report here (and --md the table)")
    ap.add_argument("--md", default=None)
    ap.add_argument("--small-beside-large", action="store_true", help="instead: latency of small requests alone "
                    "and beside one large request (continuous batching, round-robin)")
    ap.add_argument("--large-rows", type=int, default=128, help="rows of the large request (--small-beside-large)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    body = {"max_tokens": args.max_tokens, "strategy": args.strategy, "tokens_per_pass": args.tokens_per_pass}
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    if not modes or set(modes) - {"equal", "mixed"}:
        ap.error("--batching takes equal and/or mixed")
    import torch

    from adjust.base import load_base

    tok = load_base(args.base)
    if args.small_beside_large:
        report = {"benchmark": "serve_small_beside_large", "code_version": code_version(), "torch": torch.__version__,
                  "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
                  "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "config": {k: getattr(args, k) for k in ("strategy", "tokens_per_pass", "max_tokens",
                                                           "max_batch_size")},
                  "small_beside_large": small_beside_large(args)}
        write(args, report, small_markdown(report))
        return 0
    ceiling = DecodeCeiling(args, PROMPTS[0])
    servers = {}
    try:
        for mode in modes:
            servers[mode] = start_server(args, mode == "mixed")
            call(servers[mode][1], {**body, "prompt": PROMPTS[0]})  # warm-up
        raw = {(m, n): [] for m in modes for n in levels}
        for r in range(args.rounds):
            ceiling.round(r)
            for mode in modes:
                for n in levels:
                    x = run_level(servers[mode][1], n, max(args.min_requests, n * args.requests_per_client), body)
                    raw[(mode, n)].append(x)
                    log(f"round {r}: {mode}: {n:3d} clients: {x['tokens_per_second']:8.1f} tokens/s, "
                        f"mean batch {x['rows'] / max(1, x['batches']):.2f}, failed {len(x['failures'])}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    runs = []
    for mode in modes:
        results = [summarize(n, raw[(mode, n)]) for n in levels]
        runs.append({"mixed_lengths": mode == "mixed", "levels": results,
                     "speedup_max_vs_1_client": round(results[-1]["tokens_per_second"]
                                                      / results[0]["tokens_per_second"], 2)})
    ceiling = ceiling.summary()
    report = {"benchmark": "serve_load", "code_version": code_version(), "torch": torch.__version__,
              "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
              "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: getattr(args, k) for k in ("strategy", "tokens_per_pass", "max_tokens", "max_batch_size",
                                                       "batch_wait_ms")}
              | {"prompts": PROMPTS, "prompt_tokens": [len(tok.encode(p)) for p in PROMPTS]},
              "rounds": args.rounds, "decode_ceiling": ceiling, "runs": runs}
    write(args, report, markdown(report))
    return 1 if any(r["failed"] for run in runs for r in run["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
