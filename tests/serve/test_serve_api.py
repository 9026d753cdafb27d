"""`adjust serve` against live servers: the official openai client for completions, chat, streaming,
n > 1 and seeds; the same tokens as the CLI and as a run alone; every bad request; auth; one
failing request; disconnects; a bounded load test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import CHAT_TEMPLATE, ROOT, SHIPPED

openai = pytest.importorskip("openai")

PROMPT = "ROMEO:"
ADJ = {"strategy": "adjust", "tokens_per_pass": 4}


def post(url, body, headers=None, raw: bytes | None = None):
    """(status, parsed JSON body) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse_events(resp):
    """The JSON payloads of a server-sent-events response, up to [DONE] (not included)."""
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[6:])
    raise AssertionError("stream ended without data: [DONE]")


def stream(url, body):
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


# ---------------------------------------------------------------------------------------------
# the openai client
# ---------------------------------------------------------------------------------------------
def test_health_and_models(server, client):
    h = server.health()
    assert h["status"] == "ok" and h["model"] == "shakespeare-base" and h["sampler"] is True
    models = client.models.list().data
    assert [m.id for m in models] == ["shakespeare-base"]
    assert models[0].model_extra["context_length"] == 128


def test_completion_with_openai_client_reports_usage_and_adjust_stats(client):
    r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=16, seed=1, extra_body=ADJ)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert isinstance(c.text, str) and c.text and c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 5 and 0 < r.usage.completion_tokens <= 16  # "ROMEO:" is 5 tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    st = r.model_extra["adjust_stats"]
    assert st["strategy"] == "adjust(K=4)"
    assert st["full_passes"] == 4 and st["tokens_per_full_pass"] == 4.0  # 16 tokens, K = 4
    assert st["sampler_passes"] == 4 * 3  # K - 1 unrolls per full pass


def test_seed_reproducible_n_choices_differ_unseeded_differ(client):
    kw = dict(model="shakespeare-base", prompt=PROMPT, max_tokens=16, n=3, extra_body={"strategy": "parallel"})
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3  # samples 0, 1, 2 have their own generators
    c = client.completions.create(**kw)
    d = client.completions.create(**kw)
    assert [x.text for x in c.choices] != [x.text for x in d.choices]


def test_server_gives_the_cli_tokens(client, capsys):
    """`adjust generate --seed 3 --num-samples 2` and the server with seed 3, n 2: the same texts."""
    from adjust.cli import main

    capsys.readouterr()
    assert main(["generate", "--base", str(SHIPPED), "--prompt", PROMPT, "--seed", "3", "--num-samples", "2",
                 "--gen-length", "16", "--strategy", "adjust", "-K", "4", "--temperature", "0.8", "--json"]) == 0
    cli = [s["text"] for s in json.loads(capsys.readouterr().out)["samples"]]
    r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=16, seed=3, n=2,
                                  temperature=0.8, extra_body=ADJ)
    assert [c.text for c in r.choices] == cli


def test_speculative_request_gives_exact_tokens_in_fewer_passes(client):
    """strategy "speculative" (its depth and drafter as fields): exact's texts for the same seed, fewer passes."""
    kw = dict(model="shakespeare-base", prompt=PROMPT, max_tokens=24, seed=5, n=2, temperature=1.0)
    ex = client.completions.create(**kw, extra_body={"strategy": "exact"})
    for drafter in ("sampler", "self"):
        sp = client.completions.create(**kw, extra_body={"strategy": "speculative", "depth": 4, "drafter": drafter})
        assert [c.text for c in sp.choices] == [c.text for c in ex.choices]
        st = sp.model_extra["adjust_stats"]
        assert st["strategy"] == f"speculative(D=4,drafter={drafter})"
        assert st["full_passes"] < ex.model_extra["adjust_stats"]["full_passes"]
    with pytest.raises(openai.BadRequestError, match="drafter"):
        client.completions.create(**kw, extra_body={"strategy": "speculative", "drafter": 3})


def test_cache_reaches_the_decoding_loop(client, capsys):
    """The request field cache (with block_length) decodes as `adjust generate --cache` does."""
    from adjust.cli import main

    capsys.readouterr()
    assert main(["generate", "--base", str(SHIPPED), "--prompt", PROMPT, "--seed", "4", "--gen-length", "16",
                 "--block-length", "8", "--cache", "dual", "--strategy", "adjust", "-K", "4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["samples"][0]["text"]
    r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=16, seed=4,
                                  extra_body={**ADJ, "block_length": 8, "cache": "dual"})
    assert r.choices[0].text == cli
    capsys.readouterr()  # and cache_verify as --cache-verify
    assert main(["generate", "--base", str(SHIPPED), "--prompt", PROMPT, "--seed", "4", "--gen-length", "16",
                 "--block-length", "8", "--cache", "dual", "--cache-verify", "3", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["samples"][0]["text"]
    r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=16, seed=4,
                                  extra_body={"block_length": 8, "cache": "dual", "cache_verify": 3})
    assert r.choices[0].text == cli


def test_unroll_reaches_the_decoding_loop(client, capsys):
    """The request field unroll decodes as `adjust generate --unroll` does (fast differs from full here)."""
    from adjust.cli import main

    texts = {}
    for mode in ("full", "fast"):
        capsys.readouterr()
        assert main(["generate", "--base", str(SHIPPED), "--prompt", PROMPT, "--seed", "4", "--gen-length", "32",
                     "--unroll", mode, "--strategy", "adjust", "-K", "8", "--json"]) == 0
        texts[mode] = json.loads(capsys.readouterr().out)["samples"][0]["text"]
        r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=32, seed=4,
                                      extra_body={"strategy": "adjust", "tokens_per_pass": 8, "unroll": mode})
        assert r.choices[0].text == texts[mode]
    assert texts["full"] != texts["fast"]
    # not given: the fast unroll (decode.DEFAULT_UNROLL), on the command line and in a request
    capsys.readouterr()
    assert main(["generate", "--base", str(SHIPPED), "--prompt", PROMPT, "--seed", "4", "--gen-length", "32",
                 "--strategy", "adjust", "-K", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"][0]["text"] == texts["fast"] and out["stats"]["unroll"] == "fast"
    r = client.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=32, seed=4,
                                  extra_body={"strategy": "adjust", "tokens_per_pass": 8})
    assert r.choices[0].text == texts["fast"]


def test_list_of_prompts_and_token_ids(server, client):
    kw = dict(model="shakespeare-base", max_tokens=8, seed=2, n=2)
    both = client.completions.create(prompt=[PROMPT, "KING:"], **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt by prompt, n each
    one = client.completions.create(prompt="KING:", **kw)
    assert [c.text for c in both.choices[2:]] == [c.text for c in one.choices]
    by_ids = client.completions.create(prompt=server.batcher.base.encode("KING:"), **kw)
    assert [c.text for c in by_ids.choices] == [c.text for c in one.choices]
    assert both.usage.prompt_tokens == len(server.batcher.base.encode(PROMPT)) + one.usage.prompt_tokens


def test_streaming_with_openai_client_matches_non_streaming(client):
    kw = dict(model="shakespeare-base", prompt=PROMPT, max_tokens=16, seed=5, extra_body=ADJ)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].model_extra["adjust_stats"]["full_passes"] == 4
    # n = 2: each choice's deltas add up to its non-streamed text
    two = client.completions.create(**{**kw, "n": 2}).choices
    chunks = list(client.completions.create(stream=True, **{**kw, "n": 2}))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == two[i].text


@pytest.mark.parametrize("stream_it", [False, True], ids=["whole", "streamed"])
def test_stop_sequences_cut_the_text(client, stream_it):
    kw = dict(model="shakespeare-base", prompt=PROMPT, max_tokens=32, seed=6, extra_body={"strategy": "parallel"})
    full = client.completions.create(**kw).choices[0].text
    stop = next(ch for ch in full[3:] if ch.isalpha())  # a letter the text contains after its start
    if stream_it:
        chunks = list(client.completions.create(stop=[stop, "zzzz"], stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(stop=[stop, "zzzz"], **kw)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[: full.index(stop)] and reason == "stop"


def test_stream_steps_cover_every_position_and_text_is_final_block_by_block(server):
    """Step events list each position once; with blocks of 4, text arrives before the last step."""
    body = {"prompt": PROMPT, "max_tokens": 16, "seed": 4, "strategy": "exact", "block_length": 4,
            "stream_options": {"include_steps": True}}
    events = list(sse_events(stream(server.url + "/v1/completions", body)))
    steps = [e for e in events if e["object"] == "adjust.step"]
    assert [e["step"] for e in steps] == list(range(16))  # exact: one token per pass
    positions = [p for e in steps for p, _, _ in e["unmasked"]]
    assert sorted(positions) == list(range(16))
    assert all(max(p for p, *_ in e["unmasked"]) < 4 * (e["step"] // 4 + 1) for e in steps)  # block by block
    order = [e["object"] for e in events]
    first_text = next(i for i, e in enumerate(events) if e["object"] == "text_completion" and e["choices"][0]["text"])
    assert first_text < order.index("adjust.step") + 15  # before the 16th step: the first block was final
    streamed = "".join(e["choices"][0]["text"] for e in events if e["object"] == "text_completion")
    status, whole = post(server.url + "/v1/completions", body)
    assert streamed == whole["choices"][0]["text"]


def test_chat_with_template(make_server):
    s = make_server(chat_template=CHAT_TEMPLATE)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    r = c.chat.completions.create(model="shakespeare-base", messages=msgs, max_tokens=16, seed=9)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    # the same tokens as a completion of the templated prompt
    prompt = "SYSTEM: Speak as a king.\nUSER: Who goes there?\nASSISTANT:"
    assert r.usage.prompt_tokens == len(s.app.state.batcher.base.encode(prompt))
    comp = c.completions.create(model="shakespeare-base", prompt=prompt, max_tokens=16, seed=9)
    assert r.choices[0].message.content == comp.choices[0].text
    chunks = list(c.chat.completions.create(model="shakespeare-base", messages=msgs, max_tokens=16, seed=9,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def test_chat_without_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="shakespeare-base", messages=[{"role": "user", "content": "hi"}])
    err = e.value.body
    assert err["code"] == "chat_template_missing" and "chat template" in err["message"]


# ---------------------------------------------------------------------------------------------
# bad requests: 400 with OpenAI's error body
# ---------------------------------------------------------------------------------------------
BAD = [
    ("unknown strategy", {"prompt": PROMPT, "strategy": "nope"}, "strategy"),
    ("max_tokens beyond the context", {"prompt": PROMPT, "max_tokens": 500}, "max_tokens"),
    ("prompt + max_tokens beyond the context", {"prompt": PROMPT, "max_tokens": 126}, "max_tokens"),
    ("n < 1", {"prompt": PROMPT, "n": 0}, "n"),
    ("temperature < 0", {"prompt": PROMPT, "temperature": -0.5}, "temperature"),
    ("temperature too small", {"prompt": PROMPT, "temperature": 1e-300}, "temperature"),
    ("top_p = 0", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("top_p > 1", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("prompt too long", {"prompt": "To be or not to be, " * 60}, "prompt"),
    ("no prompt", {"max_tokens": 4}, "prompt"),
    ("K > max_tokens", {"prompt": PROMPT, "max_tokens": 2, "strategy": "parallel", "tokens_per_pass": 4},
     "tokens_per_pass"),
    ("bad K", {"prompt": PROMPT, "strategy": "parallel", "tokens_per_pass": 0}, "tokens_per_pass"),
    ("bad order", {"prompt": PROMPT, "order": "sideways"}, "order"),
    ("group > K", {"prompt": PROMPT, "strategy": "adjust", "tokens_per_pass": 2, "group": 3}, "group"),
    ("group not an integer", {"prompt": PROMPT, "strategy": "adjust", "group": 1.5}, "group"),
    ("group for parallel", {"prompt": PROMPT, "strategy": "parallel", "group": 2}, "group"),
    ("negative spacing", {"prompt": PROMPT, "strategy": "threshold-adjust", "spacing": -1}, "spacing"),
    ("spacing not an integer", {"prompt": PROMPT, "strategy": "threshold-adjust", "spacing": 1.5}, "spacing"),
    ("wrong type", {"prompt": PROMPT, "max_tokens": "16"}, "max_tokens"),
    ("mask token in prompt", {"prompt": [5, 1, 7]}, "prompt"),
    ("cache without blocks", {"prompt": PROMPT, "cache": "dual"}, "cache"),
    ("unknown cache", {"prompt": PROMPT, "cache": "disk", "block_length": 8}, "cache"),
    ("cache_verify without a cache", {"prompt": PROMPT, "cache_verify": 2}, "cache_verify"),
    ("negative cache_verify", {"prompt": PROMPT, "cache": "dual", "block_length": 8, "cache_verify": -1},
     "cache_verify"),
    ("unknown unroll", {"prompt": PROMPT, "unroll": "faster"}, "unroll"),
    ("unroll not a string", {"prompt": PROMPT, "unroll": 1}, "unroll"),
]


@pytest.mark.parametrize("body,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_400_with_openai_error(server, body, param):
    status, out = post(server.url + "/v1/completions", body)
    assert status == 400, out
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
    assert out["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": "x", ', b"[1, 2]", b"\xff\xfe"], ids=["truncated", "not-object", "bytes"])
def test_malformed_json_is_400(server, raw):
    status, out = post(server.url + "/v1/completions", None, raw=raw)
    assert status == 400 and out["error"]["code"] in ("invalid_json", "invalid_body")


def test_sampler_strategy_without_sampler_is_400(make_server):
    s = make_server(sampler=False)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=8, extra_body=ADJ)
    assert e.value.body["param"] == "strategy" and e.value.body["code"] == "sampler_required"
    ok = c.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=8,
                              extra_body={"strategy": "parallel"})
    assert ok.choices[0].finish_reason


def test_api_key(make_server):
    s = make_server(api_key="s3cret")
    status, out = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="shakespeare-base", prompt=PROMPT, max_tokens=4).choices[0].text is not None
    assert s.health()["status"] == "ok"  # /health needs no key


# ---------------------------------------------------------------------------------------------
# batching, failures, disconnects
# ---------------------------------------------------------------------------------------------
def _together(server, bodies):
    """POST all bodies while the batcher is paused, so they queue and decode as batches; then resume."""
    rows = sum(b.get("n", 1) for b in bodies)
    done0 = server.health()["rows_done"]
    server.batcher.pause()
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(post, server.url + "/v1/completions", b) for b in bodies]
            server.wait_for(lambda h: h["queued_rows"] == rows, f"{rows} rows queued")
            server.batcher.resume()
            out = [f.result() for f in futures]
    finally:
        server.batcher.resume()
    assert server.health()["rows_done"] >= done0
    return out


def test_batched_requests_get_the_tokens_they_get_alone(server):
    prompts = ["ROMEO:", "KING:", "To be, or not", "Good morrow", "JULIET:"]
    bodies = [{"prompt": p, "max_tokens": 16, "seed": 11, **ADJ, "n": 2 if i == 0 else 1}
              for i, p in enumerate(prompts)]
    batched = _together(server, bodies)
    assert all(s == 200 for s, _ in batched)
    assert max(o["adjust_stats"]["batch_size"] for _, o in batched) > 1  # some really shared a batch
    for body, (_, out) in zip(bodies, batched):
        _, alone = post(server.url + "/v1/completions", body)
        assert alone["adjust_stats"]["batch_size"] == body.get("n", 1)
        assert [c["text"] for c in out["choices"]] == [c["text"] for c in alone["choices"]]


def test_mixed_lengths_batch_together_with_padding(make_server):
    s = make_server(mixed_lengths=True)
    bodies = [{"prompt": p, "max_tokens": 8, "seed": 1, "strategy": "parallel"} for p in ("KING:", "To be, or not")]
    out = _together(s, bodies)
    assert [o["adjust_stats"]["batch_size"] for _, o in out] == [2, 2]


def test_one_failing_request_is_a_500_and_the_server_keeps_serving(server, monkeypatch):
    """A fault injected into the base's forward pass for one prompt's tokens: that request alone fails
    (its batch is rerun request by request), its companion and later requests succeed."""
    base = server.batcher.base
    poison = base.encode("POISON PILL")
    good_prompt = next(p for p in ("KING: hi", "ROMEO: go", "To be, or not", "By my troth")
                       if len(base.encode(p)) == len(poison))
    real = base.hidden_states

    def faulty(x, attention_mask=None):
        import torch

        if any(torch.equal(row[: len(poison)], torch.tensor(poison)) for row in x):
            raise RuntimeError("injected fault")
        return real(x, attention_mask)

    _, alone = post(server.url + "/v1/completions", {"prompt": good_prompt, "max_tokens": 8, "seed": 2})
    monkeypatch.setattr(base, "hidden_states", faulty)
    out = _together(server, [{"prompt": p, "max_tokens": 8, "seed": 2} for p in ("POISON PILL", good_prompt)])
    (s_bad, bad), (s_good, good) = out
    assert s_bad == 500 and bad["error"]["type"] == "server_error" and "injected fault" in bad["error"]["message"]
    assert s_good == 200 and good["choices"][0]["text"] == alone["choices"][0]["text"]
    monkeypatch.undo()
    s_after, _ = post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert s_after == 200


def test_disconnecting_stream_frees_its_slot(server):
    """A client that goes away mid-stream: its batch stops (nobody left to serve), the next request runs."""
    h0 = server.health()
    resp = stream(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 120, "strategy": "exact",
                                                   "stream_options": {"include_steps": True}})
    first = next(sse_events(resp))
    assert first["object"] == "adjust.step"
    resp.close()
    h = server.wait_for(lambda h: h["aborted_batches"] > h0["aborted_batches"] and h["running_rows"] == 0,
                        "the abandoned batch stopped")
    assert h["cancelled_jobs"] > h0["cancelled_jobs"] and h["rows_done"] == h0["rows_done"]
    status, out = post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert status == 200


def test_disconnecting_queued_request_leaves_the_queue(server):
    import http.client

    h0 = server.health()
    server.batcher.pause()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 8}),
                     headers={"Content-Type": "application/json"})
        server.wait_for(lambda h: h["queued_rows"] == 1, "the request queued")
        conn.close()  # the client goes away before its turn
        server.wait_for(lambda h: h["cancelled_jobs"] > h0["cancelled_jobs"] and h["queued_rows"] == 0,
                        "the queued request cancelled")
    finally:
        server.batcher.resume()
    status, _ = post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert status == 200
    assert server.health()["rows_done"] == h0["rows_done"] + 1  # the abandoned one was never decoded


def test_load_200_requests_16_clients_no_failures(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    prompts = ["ROMEO:", "KING:", "To be, or not", "JULIET:", "Good morrow"]
    h0 = server.health()

    def one(i):
        r = c.completions.create(model="shakespeare-base", prompt=prompts[i % len(prompts)], max_tokens=16,
                                 extra_body={"strategy": "parallel", "tokens_per_pass": 4})
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(200)))
    assert len(reasons) == 200 and all(r in ("length", "stop") for r in reasons)
    h = server.health()
    assert h["rows_done"] - h0["rows_done"] == 200 and h["failed_batches"] == h0["failed_batches"]
    assert h["batches"] - h0["batches"] < 200  # requests shared batches


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def test_adjust_serve_command_starts_serves_and_stops(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "adjust.cli", "serve", "--port", "0", "--max-batch-size", "4"],
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = p.stderr.readline()
        assert line.startswith("adjust serve: listening on http://127.0.0.1:"), line
        url = line.split()[4]
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert json.loads(r.read())["model"] == "shakespeare-base"
        status, out = post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert status == 200 and out["choices"][0]["text"] is not None
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)


@pytest.mark.parametrize("argv,msg", [
    (["--port", "70000"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--strategy", "nope"], "unknown strategy"),
    (["--chat"], "chat template"),
])
def test_adjust_serve_bad_arguments(capsys, argv, msg):
    from adjust.cli import main

    capsys.readouterr()
    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adjust: error:") and msg in err


def test_adjust_serve_busy_port_fails_before_loading(capsys):
    from adjust.cli import main
    from adjust.serve import bind

    sock = bind("127.0.0.1", 0)
    try:
        capsys.readouterr()
        assert main(["serve", "--base", "/nonexistent", "--port", str(sock.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert "cannot listen" in err and err.count("\n") == 1
    finally:
        sock.close()
