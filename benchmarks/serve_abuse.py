"""`adjust serve` against a hostile client: each attack of the abuse issue, against the real command.

The server is `adjust serve --port 0 --api-key KEY` (every limit at its default) in its own process, on
the shipped model. For each attack the report gives the statuses the attack got, the time to the last
answer, the server's RSS growth (psutil), the slowest /health answer while the attack ran (a client
polls it every 50 ms, with the key), and the time of a normal request sent right after.
Then SIGTERM with 64 requests in flight (32 streaming, 32 not), on a fresh server: how each ended.

Targets (the issue's "done when"): every attack gets a 4xx within 3 s, /health answers within 1 s
throughout and RSS grows by less than 300 MB, and a normal request is served within 5 s right after.

    python benchmarks/serve_abuse.py --json results/serve_abuse.json --md results/serve_abuse.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import code_version  # noqa: E402

KEY = "abuse-bench-key"


def start(extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "adjust.cli", "serve", "--port", "0", "--api-key", KEY, *extra],
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    if not line.startswith("adjust serve: listening on "):
        p.kill()
        raise SystemExit(f"server did not start: {line}{p.stderr.read()}")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, int(line.split()[4].rsplit(":", 1)[1].split("/")[0])


def http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         timeout: float = 60.0, send_all: bool = True) -> tuple[int | None, bytes]:
    """(status, body) of one request over a raw socket; with send_all=False only the first MiB of the body is
    sent before the answer is read (a server that answers early need not read the rest)."""
    h = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {KEY}", "Content-Length": str(len(body)),
         "Connection": "close", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v is not None) + "\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head.encode("latin-1"))
        try:
            s.sendall(body if send_all else body[: 1 << 20])
        except OSError:
            pass  # the server answered and closed before taking the rest
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def post(port: int, obj, **kw) -> tuple[int | None, bytes]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return http(port, "POST", "/v1/completions", raw, {"Content-Type": "application/json", **kw.pop("headers", {})},
                **kw)


class HealthWatch:
    """Polls /health every 50 ms; `slowest` is the slowest answer (or the time it has waited, if unanswered)."""

    def __init__(self, port: int):
        self.port, self.slowest, self.failures = port, 0.0, 0
        self._stop = threading.Event()
        self._pending: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            t = self._pending = time.perf_counter()
            status, _ = http(self.port, "GET", "/health", timeout=30)
            self._pending = None
            self.slowest = max(self.slowest, time.perf_counter() - t)
            self.failures += status != 200
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join(timeout=35)
        if self._pending is not None:
            self.slowest = max(self.slowest, time.perf_counter() - self._pending)
        return self.slowest


def slow_connections(port: int, n: int, partial_body: bool) -> list[tuple[int | None, float]]:
    """n connections that send part of their headers (or all headers and part of the body), then nothing:
    (status, seconds from its last byte sent to the answer) for each, read as the answers arrive."""
    import selectors

    sel = selectors.DefaultSelector()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if partial_body:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"".encode())
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [time.perf_counter(), b"", None])
    out = []
    deadline = time.monotonic() + 60
    while len(sel.get_map()) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            state = key.data
            try:
                chunk = key.fileobj.recv(4096)
            except OSError:
                chunk = b""
            if state[2] is None and chunk:
                state[2] = time.perf_counter() - state[0]
            state[1] += chunk
            if not chunk:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                data = state[1]
                out.append((int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None,
                            state[2] if state[2] is not None else time.perf_counter() - state[0]))
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        out.append((None, time.perf_counter() - key.data[0]))
    return out


def disconnect_big(port: int) -> list[tuple[int | None, float]]:
    """A request for as many rows as allowed, abandoned after 1 s: (499, seconds until its rows left the batch)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"prompt": ["ROMEO:"] * 64, "n": 2, "max_tokens": 120, "strategy": "exact"}).encode()
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.0)
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the rows must leave the batch within a pass or so
        _, raw = http(port, "GET", "/health")
        if json.loads(raw)["running_rows"] == 0:
            return [(499, time.monotonic() - (deadline - 10))]  # nginx's "client closed request": rows freed
        time.sleep(0.02)
    return [(None, 10.0)]


def timed(fn) -> tuple[int | str | None, float]:
    """(fn(), seconds it took): the clock starts once the body is built (the caller builds it first)."""
    t = time.perf_counter()
    return fn(), time.perf_counter() - t


def attacks(port: int) -> list[tuple[str, callable]]:
    """(name, attack) pairs; an attack returns (status, seconds to its answer) per request it made."""
    def one(body, **kw):
        return lambda: [timed(lambda: post(port, body() if callable(body) else body, **kw)[0])]

    def big(mb):
        return lambda: b'{"prompt": "' + b"a" * (mb << 20) + b'"}'

    def health_without_key():
        status, raw = http(port, "GET", "/health", headers={"Authorization": None})
        return "200 liveness only" if status == 200 and json.loads(raw) == {"status": "ok"} else status

    return [
        ("10 MB prompt", one(big(10), send_all=False)),
        ("20 MB prompt", one(big(20), send_all=False)),
        ("105 MB prompt", one(big(105), send_all=False)),
        ("1 MB body, one 1 M-character prompt", one(b'{"prompt": "' + b"a " * 500_000 + b'"}')),
        ("1000 prompts x n=128 (4 KB)", one({"prompt": ["ROMEO:"] * 1000, "n": 128})),
        ("text/plain POST (a cross-site form)", one({"prompt": "a"}, headers={"Content-Type": "text/plain"})),
        ("Host: evil.example (DNS rebinding)", one({"prompt": "a"}, headers={"Host": f"evil.example:{port}"})),
        ("Origin: http://evil.example", one({"prompt": "a"}, headers={"Origin": "http://evil.example"})),
        ("/health without the key", lambda: [timed(health_without_key)]),
        ("lone surrogate in the prompt", one(b'{"prompt": "\\ud800"}')),
        ("JSON nested 100,000 deep", one(b"[" * 100_000 + b"]" * 100_000)),
        ("best_of: 4", one({"prompt": "a", "best_of": 4})),
        ("presence_penalty: 1", one({"prompt": "a", "presence_penalty": 1})),
        ("logprobs: 99", one({"prompt": "a", "logprobs": 99})),
        ("unknown field", one({"prompt": "a", "frobnicate": True})),
        ("temperature: 1e39", one({"prompt": "a", "temperature": 1e39})),
        ("top_p: 1e-300 (valid: served)", one({"prompt": "a", "top_p": 1e-300, "max_tokens": 4})),
        ("max_tokens: 131071", one({"prompt": "a", "max_tokens": 131071})),
        ("1000 slow uploads (partial bodies)", lambda: slow_connections(port, 1000, True)),
        ("1000 slow headers", lambda: slow_connections(port, 1000, False)),
        ("128-row request, client leaves after 1 s", lambda: disconnect_big(port)),
    ]


def run_attacks(proc: psutil.Process, port: int) -> list[dict]:
    rows = []
    for name, attack in attacks(port):
        rss0 = proc.memory_info().rss
        watch = HealthWatch(port)
        t0 = time.perf_counter()
        results = attack()
        seconds = time.perf_counter() - t0
        statuses = [st for st, _ in results]
        slowest = watch.stop()
        rss = proc.memory_info().rss
        t1 = time.perf_counter()
        status, _ = post(port, {"prompt": "ROMEO:", "max_tokens": 16})
        normal = time.perf_counter() - t1
        counts = {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)}
        rows.append({"attack": name, "statuses": counts, "seconds": round(seconds, 3),
                     "slowest_answer_s": round(max(t for _, t in results), 3),
                     "rss_growth_mb": round((rss - rss0) / 2**20, 1), "slowest_health_s": round(slowest, 3),
                     "health_failures": watch.failures, "normal_request_status": status,
                     "normal_request_s": round(normal, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def sigterm_in_flight(n: int = 64) -> dict:
    """SIGTERM with n requests in flight (half streaming): how each ended (finished, error + [DONE], 503)."""
    p, port = start(["--max-batch-size", "16"])
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(streaming: bool):
        body = {"prompt": "ROMEO:", "max_tokens": 64, "strategy": "exact", "stream": streaming}
        status, raw = post(port, body, timeout=120)
        if status is None:
            kind = "no response"
        elif streaming:
            text = raw.decode("utf-8", "replace")
            done = "data: [DONE]" in text
            kind = ("stream: error event + [DONE]" if '"error"' in text and done else
                    "stream: finished + [DONE]" if done else "stream: cut without [DONE]")
        else:
            kind = f"plain: {status}"
        with lock:
            outcomes.append(kind)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=300)
    code = p.wait(timeout=120)
    return {"requests": n, "exit_code": code, "seconds_to_exit": round(time.perf_counter() - t0, 2),
            "outcomes": {k: outcomes.count(k) for k in sorted(set(outcomes))}}


def markdown(report: dict) -> str:
    lines = [f"`adjust serve` under attack: every limit at its default, shipped model, code {report['code_version']}",
             "", "| attack | statuses | slowest answer (s) | attack (s) | RSS growth (MB) | slowest /health (s) "
             "| normal request after (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["attacks"]:
        st = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in r["statuses"].items())
        lines.append(f"| {r['attack']} | {st} | {r['slowest_answer_s']} | {r['seconds']} | {r['rss_growth_mb']} "
                     f"| {r['slowest_health_s']} "
                     f"| {r['normal_request_s']} ({r['normal_request_status']}) |")
    s = report["sigterm"]
    lines += ["", f"SIGTERM with {s['requests']} requests in flight (half streaming, drain timeout at its default): "
              + ", ".join(f"{k}: {v}" for k, v in s["outcomes"].items())
              + f"; the server exited ({s['exit_code']}) {s['seconds_to_exit']} s after the signal.", "",
              "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    for out in (args.json, args.md):
        if out and not Path(out).parent.is_dir():
            raise SystemExit(f"serve_abuse: error: no directory for {out}")
    p, port = start([])
    try:
        rows = run_attacks(psutil.Process(p.pid), port)
    finally:
        p.terminate()
        p.wait(timeout=60)
    sigterm = sigterm_in_flight()
    refused = [r for r in rows if not r["attack"].startswith(("128-row", "/health", "top_p"))]
    targets = {
        "every attack a 4xx within 3 s": all(all(k.isdigit() and 400 <= int(k) < 500 for k in r["statuses"])
                                             and r["slowest_answer_s"] < 3 for r in refused),
        "a client that leaves frees its rows within 3 s": rows[-1]["statuses"] == {"499": 1}
                                                           and rows[-1]["slowest_answer_s"] < 3,
        "/health within 1 s throughout": all(r["slowest_health_s"] < 1 and not r["health_failures"] for r in rows),
        "RSS growth under 300 MB": all(r["rss_growth_mb"] < 300 for r in rows),
        "a normal request within 5 s after": all(r["normal_request_status"] == 200 and r["normal_request_s"] < 5
                                                 for r in rows),
        "no request lost on SIGTERM": not any(k in ("no response", "stream: cut without [DONE]")
                                              for k in sigterm["outcomes"]),
    }
    report = {"code_version": code_version(), "attacks": rows, "sigterm": sigterm, "targets": targets}
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
