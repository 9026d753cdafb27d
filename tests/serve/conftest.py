"""Live `adjust serve` servers on 127.0.0.1 (the command's uvicorn server in a thread, a free port) over the shipped
models/shakespeare-base and its sampler, for the openai-client, load and browser tests."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from adjust.loader import ModelSpec, load_models

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "shakespeare-base"
# A minimal Jinja chat template (our shipped tokenizers have none): the test sets it on the server.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


class LiveServer:
    """create_app(...) served by uvicorn on a socket bound to 127.0.0.1:0, in a daemon thread."""

    def __init__(self, app):
        from adjust.serve import bind, server

        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server(app, log_level="error")  # the command's: its protocol (header timeout) and drain
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(400):
            if self.server.started:
                break
            time.sleep(0.025)
        assert self.server.started, "server did not start"

    @property
    def batcher(self):
        return self.app.state.batcher

    def health(self, headers: dict | None = None) -> dict:
        with urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers or {}),
                                    timeout=10) as r:
            return json.loads(r.read())

    def wait_for(self, pred, what: str, timeout: float = 60.0) -> dict:
        """Poll /health until pred(health) holds (a bound so a broken server fails, not a timing test)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.health()
            if pred(h):
                return h
            time.sleep(0.02)
        raise AssertionError(f"server never reached: {what}; last /health: {h}")

    def stop(self):
        self.server.should_exit = self.server.force_exit = True  # tests' idle keep-alive clients need no drain
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="session")
def shipped():
    """(base, sampler) of models/shakespeare-base."""
    return load_models(ModelSpec(base=str(SHIPPED)), "required")


@pytest.fixture(scope="session")
def make_server(shipped):
    """Factory: make_server(**create_app kwargs) -> LiveServer, stopped at the end of the session."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from adjust.serve.app import create_app

    servers = []

    def make(sampler=True, **kw) -> LiveServer:
        base, samp = shipped
        kw.setdefault("batch_wait_ms", 5)
        s = LiveServer(create_app(base, samp if sampler else None, **kw))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(make_server) -> LiveServer:
    return make_server(max_batch_size=16)


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
