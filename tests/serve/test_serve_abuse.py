"""`adjust serve` under hostile and careless clients: limits, cross-site and Host checks, every client
error a 4xx naming what is wrong, cancellation within one pass, continuous batching with the tokens a
request gets alone, round-robin between requests, and the drain on SIGTERM (a real process)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from adjust.serve.limits import Limits

from .conftest import ROOT
from .test_serve_api import post, sse_events, stream

PROMPT = "ROMEO:"


def raw_post(server, body: bytes, headers: dict) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST sent as given (no Content-Type added)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else {}), dict(r.getheaders())


@pytest.fixture(scope="module")
def limited(make_server):
    return make_server(max_batch_size=4, limits=Limits(max_body_bytes=4096, max_prompts=3, max_rows=6,
                                                       max_queued_rows=8, max_tokens=64, read_timeout=1.0))


# ---------------------------------------------------------------------------------------------
# limits and malformed input: a 4xx with OpenAI's body naming the field, never a 500
# ---------------------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_before_it_is_read(limited):
    big = json.dumps({"prompt": "a" * 10_000}).encode()
    status, body, _ = raw_post(limited, big, {"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert "--max-body-bytes" in body["error"]["message"]
    # chunked, no Content-Length: refused as it crosses the limit
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([big[:3000], big[3000:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies(server, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    status, body, _ = raw_post(server, json.dumps({"prompt": PROMPT}).encode(), headers)
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("raw, code", [
    (b'{"prompt": "\\ud800"}', "invalid_text"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
])
def test_surrogates_and_deep_nesting_are_400(server, raw, code):
    status, body = post(server.url + "/v1/completions", None, raw=raw)
    assert status == 400 and body["error"]["code"] == code


@pytest.mark.parametrize("extra, param, code", [
    ({"best_of": 2}, "best_of", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_parameter"),
    ({"logprobs": 21}, "logprobs", "invalid_value"),
    ({"logprobs": 0, "stream": True}, "stream", "unsupported_parameter"),
    ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ({"suffix": "THE END"}, "suffix", "unsupported_parameter"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "unsupported_parameter"),
    ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"stream_options": {"include_everything": True}}, "stream_options", "unknown_parameter"),
    ({"temperature": 1e39}, "temperature", "invalid_value"),
    ({"temperature": -1}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"max_tokens": 65}, "max_tokens", "invalid_value"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompt", "too_many_prompts"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n", "too_many_rows"),
    ({"prompt": "x" * 3000}, "prompt", "context_length_exceeded"),
])
def test_bad_fields_are_400_naming_the_field(limited, extra, param, code):
    status, body = post(limited.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [{"best_of": 1}, {"presence_penalty": 0}, {"logprobs": None}, {"echo": False},
                                   {"logit_bias": {}}, {"top_p": 1e-300}, {"temperature": 1e6}])
def test_neutral_values_of_unsupported_fields_are_served(limited, extra):
    status, body = post(limited.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, **extra})
    assert status == 200, body


def test_lenient_ignores_unknown_fields_only(make_server):
    s = make_server(lenient=True)
    assert post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "frobnicate": 1})[0] == 200
    status, body = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "best_of": 3})
    assert status == 400 and body["error"]["param"] == "best_of"


def test_unknown_routes_and_methods_are_openai_errors(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/nothing", timeout=10)
    assert e.value.code == 404 and json.loads(e.value.read())["error"]["code"] == "not_found"
    req = urllib.request.Request(server.url + "/v1/completions", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405 and json.loads(e.value.read())["error"]["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------------------------
# slow clients
# ---------------------------------------------------------------------------------------------
def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def test_slow_headers_and_slow_bodies_are_timed_out(limited):
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
    assert s.recv(100).startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
    s.close()
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\"" % limited.port)  # body never finished
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout" in reply and time.monotonic() - t0 < 3
    s.close()
    assert limited.health()["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# cross-site requests, Host, /health
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, ok", [("127.0.0.1:{port}", True), ("localhost:{port}", True),
                                      ("evil.example:{port}", False), ("127.0.0.1:1", False), ("", False)])
def test_host_header_checked_on_loopback(server, host, ok):
    status, body, _ = raw_post(server, json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
                               {"Content-Type": "application/json", "Host": host.format(port=server.port)})
    assert (status == 200) if ok else (status == 403 and body["error"]["code"] == "host_not_allowed")


def test_allowed_host_and_cors_origin(make_server):
    s = make_server(allowed_hosts=["adjust.internal"], cors_origins=["https://app.example"])
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    assert raw_post(s, body, {"Content-Type": "application/json", "Host": "adjust.internal"})[0] == 200
    status, _, headers = raw_post(s, body, {"Content-Type": "application/json", "Origin": "https://app.example"})
    assert status == 200 and headers.get("access-control-allow-origin") == "https://app.example"
    status, out, _ = raw_post(s, body, {"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert status == 403 and out["error"]["code"] == "origin_not_allowed"


def test_cross_origin_refused_and_no_cors_by_default(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    status, out, headers = raw_post(server, body, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403 and out["error"]["code"] == "origin_not_allowed"
    same = f"http://127.0.0.1:{server.port}"  # the playground's own page
    status, _, headers = raw_post(server, body, {"Content-Type": "application/json", "Origin": same})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_health_tells_only_liveness_without_the_key(make_server):
    s = make_server(api_key="sekret")
    assert s.health() == {"status": "ok"}
    full = s.health({"Authorization": "Bearer sekret"})
    assert full["status"] == "ok" and "queued_rows" in full and full["model"] == "shakespeare-base"


# ---------------------------------------------------------------------------------------------
# queue depth, time limit
# ---------------------------------------------------------------------------------------------
def test_full_queue_is_429_with_retry_after(limited):
    limited.batcher.pause()
    conns = []
    try:
        for _ in range(2):  # 2 x 4 rows fill the queue of 8
            c = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=60)
            c.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 2, "n": 4}),
                      headers={"Content-Type": "application/json"})
            conns.append(c)
        limited.wait_for(lambda h: h["queued_rows"] == 8, "8 rows queued")
        status, body, headers = raw_post(limited, json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 429 and body["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
    finally:
        limited.batcher.resume()
    assert [c.getresponse().status for c in conns] == [200, 200]


def test_request_past_its_time_limit_is_504(make_server):
    s = make_server(limits=Limits(request_timeout=0.5))
    s.batcher.pause()
    try:
        status, body = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    finally:
        s.batcher.resume()
    assert status == 504 and body["error"]["code"] == "timeout" and "--request-timeout" in body["error"]["message"]
    assert post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})[0] == 200


# ---------------------------------------------------------------------------------------------
# cancellation, continuous batching, round-robin
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_disconnected_client_frees_its_rows_within_one_pass(make_server, streaming):
    s = make_server(max_batch_size=8)
    body = {"prompt": PROMPT, "max_tokens": 120, "n": 2, "strategy": "exact", "stream": streaming}
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    s.wait_for(lambda h: h["running_rows"] == 2 and h["passes"] >= 3, "the rows run")
    passes = s.health()["passes"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    h = s.wait_for(lambda h: h["running_rows"] == 0, "the rows freed")
    assert h["passes"] - passes <= 2  # the pass under way when it left, at most one more
    assert h["rows_done"] == 0 and h["aborted_batches"] == 1


def test_rows_join_a_running_batch_and_get_their_tokens_alone(make_server, shipped):
    base, _ = shipped
    s = make_server(max_batch_size=8)
    first, second = [p for p in ("ROMEO:", "JULIET:", "KING:", "LEAR:", "HAMLET:", "GLOUCESTER:", "MENENIUS:")
                     if len(base.encode(p)) == len(base.encode("JULIET:"))][:2]
    bodies = [{"prompt": p, "max_tokens": 60, "strategy": "adjust", "tokens_per_pass": 2, "seed": 3}
              for p in (first, second)]
    done = {}

    def send(i):
        done[i] = post(s.url + "/v1/completions", bodies[i])

    threads = [threading.Thread(target=send, args=(0,))]
    threads[0].start()
    h0 = s.wait_for(lambda h: h["running_rows"] == 1 and h["passes"] >= 5, "the first request runs")
    threads.append(threading.Thread(target=send, args=(1,)))
    threads[1].start()
    s.wait_for(lambda h: h["running_rows"] == 2, "the second request joins the running batch")
    for t in threads:
        t.join()
    h = s.health()
    assert h["joined_rows"] == h0["joined_rows"] + 1 and h["batches"] == h0["batches"]
    assert [done[i][0] for i in (0, 1)] == [200, 200]
    assert done[1][1]["adjust_stats"]["batch_size"] == 2
    for i in (0, 1):
        alone = post(s.url + "/v1/completions", bodies[i])[1]
        assert alone["adjust_stats"]["batch_size"] == 1
        assert done[i][1]["choices"][0]["text"] == alone["choices"][0]["text"]


def test_round_robin_small_request_is_not_starved(make_server):
    s = make_server(max_batch_size=2)
    big = {"prompt": PROMPT, "max_tokens": 24, "n": 12, "strategy": "exact"}
    order = []
    tb = threading.Thread(target=lambda: order.append(("big", post(s.url + "/v1/completions", big)[0])))
    tb.start()
    s.wait_for(lambda h: h["running_rows"] == 2, "the big request runs")
    status, _ = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "strategy": "exact"})
    order.append(("small", status))
    h = s.health()
    tb.join()
    assert order == [("small", 200), ("big", 200)]
    assert h["queued_rows"] >= 6  # most of the big request was still waiting when the small one was served


# ---------------------------------------------------------------------------------------------
# chat stops at its stop token
# ---------------------------------------------------------------------------------------------
def test_chat_stops_at_end_of_answer_as_generate_chat():
    """Chat ends a row at its first stop token (early exit, as `adjust generate --chat`): the same tokens as the
    decoding loop with early_exit, finish_reason "stop", and no passes after it. The shipped model rarely writes
    EOS, so this base (a fresh load) also stops at a newline, as an end-of-turn token would."""
    from adjust.decode import generate
    from adjust.loader import ModelSpec, load_models
    from adjust.sampling import SamplingConfig
    from adjust.serve.app import create_app
    from adjust.strategies import make_strategy

    from .conftest import CHAT_TEMPLATE, SHIPPED, LiveServer

    base, _ = load_models(ModelSpec(base=str(SHIPPED)), "none")
    newline = base.encode("a\nb")[1]
    base.extra_stop_ids = (newline,)
    assert newline in base.stop_ids
    s = LiveServer(create_app(base, None, chat_template=CHAT_TEMPLATE, batch_wait_ms=5))
    try:
        body = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 60, "n": 4, "seed": 5,
                "strategy": "parallel", "tokens_per_pass": 2}
        status, out = post(s.url + "/v1/chat/completions", body)
    finally:
        s.stop()
    assert status == 200
    ids = base.encode(base.tokenizer.apply_chat_template([{"role": "user", "content": "Speak"}], tokenize=False,
                                                         add_generation_prompt=True, chat_template=CHAT_TEMPLATE))
    ref = generate(base, [ids] * 4, make_strategy("parallel", tokens_per_pass=2), SamplingConfig(), 60, seed=5,
                   sample_indices=list(range(4)), early_exit=True)
    stopped = 0
    for c, toks in zip(out["choices"], ref.tokens.tolist()):
        assert c["message"]["content"] == base.decode(toks)
        ends = any(t in base.stop_ids for t in toks)
        stopped += ends
        assert c["finish_reason"] == ("stop" if ends else "length")
    assert stopped > 0  # the early exit was exercised
    assert out["adjust_stats"]["full_passes"] == ref.stats.row_passes < 4 * 30  # stopped rows took no more passes


# ---------------------------------------------------------------------------------------------
# drain on SIGTERM (the real command)
# ---------------------------------------------------------------------------------------------
def _start(extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "adjust.cli", "serve", "--port", "0", *extra],
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    assert line.startswith("adjust serve: listening on "), line + p.stderr.read()
    return p, int(line.split()[4].rsplit(":", 1)[1].split("/")[0])


def _fire(port: int, n_stream: int, n_plain: int, max_tokens: int):
    """Start requests in threads; returns (threads, results) with results[i] = (kind, status, events or body)."""
    results = []
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "strategy": "exact"}

    def one_stream():
        try:
            resp = stream(url, body)
            results.append(("stream", resp.status, list(sse_events(resp))))
        except AssertionError as e:  # no [DONE]
            results.append(("stream", "cut", str(e)))

    def one_plain():
        results.append(("plain",) + post(url, body))

    threads = [threading.Thread(target=one_stream) for _ in range(n_stream)]
    threads += [threading.Thread(target=one_plain) for _ in range(n_plain)]
    for t in threads:
        t.start()
    return threads, results


def _wait_running(port: int, rows: int) -> None:
    for _ in range(600):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            h = json.loads(r.read())
        if h["running_rows"] + h["queued_rows"] >= rows and h["passes"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"requests never arrived: {h}")


def _sigterm(drain: str, batch: str, each: int, max_tokens: int) -> tuple[int, list]:
    """A real server given `each` streaming and `each` plain requests, then SIGTERM: (exit code, results)."""
    p, port = _start(["--drain-timeout", drain, "--max-batch-size", batch])
    threads, results = _fire(port, each, each, max_tokens)
    _wait_running(port, 2 * each)
    p.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    return p.wait(timeout=60), results


def test_sigterm_drains_in_flight_requests():
    code, results = _sigterm("60", "8", 4, 12)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert sorted(r[1] for r in results) == [200] * 8, results  # every one finished
    for kind, _, out in results:
        if kind == "stream":
            assert out[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_sigterm_past_the_drain_timeout_ends_every_request_cleanly():
    _, results = _sigterm("0.5", "2", 3, 120)
    assert len(results) == 6
    for kind, status, out in results:
        if kind == "stream":  # an error event, then [DONE]
            assert status == 200 and out[-1]["error"]["code"] == "shutting_down", out[-1]
        else:
            assert status == 503 and out["error"]["code"] == "shutting_down"
