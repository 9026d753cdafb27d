"""`adjust serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the one decoding loop.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and
the playground page at / (static files in adjust/serve/static, no build step). Requests are
checked in `requests.py`, decoded in batches by `batching.Batcher` (one worker thread), and
answered in OpenAI's shapes plus `adjust_stats`; `stream: true` sends server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from .batching import Batcher, Job
from .requests import ApiError, ChoiceText, parse_messages, parse_prompts, parse_request

log = logging.getLogger("adjust.serve")
STATIC = Path(__file__).parent / "static"
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def create_app(base, sampler=None, *, model_name: str | None = None, api_key: str | None = None,
               max_batch_size: int = 16, batch_wait_ms: float = 20.0, mixed_lengths: bool = False,
               chat_template: str | None = None, default_strategy: str = "exact",
               default_tokens_per_pass: int | None = None, server_seed: int | None = None):
    """The ASGI app. The batcher's worker thread starts and stops with the app (lifespan)."""
    name = model_name or base.name
    batcher = Batcher(base, sampler, max_batch_size, batch_wait_ms, mixed_lengths)
    defaults = {"strategy": default_strategy, "tokens_per_pass": default_tokens_per_pass}
    # Unseeded requests share this seed and get fresh random sample indices, so they can batch together.
    server_seed = secrets.randbits(62) if server_seed is None else server_seed
    created = int(time.time())
    piece_cache: dict[int, str] = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="adjust serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if api_key:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                raise ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key", 401)

    def api(route):
        """An /v1 route: the key checked first; a bad request is its 400, a bug in it its 500 (logged)."""
        import functools

        @functools.wraps(route)
        async def wrapped(request: Request):
            try:
                check_key(request)
                return await route(request)
            except ApiError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001 - this request fails, the server keeps serving
                log.exception("request failed")
                return error(ApiError(f"internal error: {type(e).__name__}: {e}", None, "internal_error", 500,
                                      "server_error"))

        return wrapped

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "sampler": sampler is not None, **batcher.stats.to_dict()}

    @app.get("/v1/models")
    @api
    async def models(request: Request):
        from ..strategies import strategy_names

        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "adjust",
            "context_length": base.max_length, "sampler": sampler is not None,
            "strategies": strategy_names(), "chat_template": bool(chat_template or
                                                                   getattr(base.tokenizer, "chat_template", None)),
        }]}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{file}")
    async def static(file: str):
        allowed = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if file not in allowed:
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        media = {"js": "text/javascript", "css": "text/css", "html": "text/html"}.get(file.rsplit(".", 1)[-1])
        return FileResponse(allowed[file], media_type=media)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", None, "invalid_json")
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object", None, "invalid_body")
        model = body.get("model")
        if model is not None and model != name:
            raise ApiError(f"model {model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found", 404)
        return body

    async def handle(request: Request, chat: bool):
        body = await read_body(request)
        prompts = [parse_messages(body, base, chat_template)] if chat else parse_prompts(body, base)
        req = parse_request(body, base, sampler, prompts, defaults, server_seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = []
        for ids in req.prompts:
            for i in range(req.n):
                rows.append((ids, i if req.seeded else secrets.randbits(62)))
        job = Job(rows, req.settings, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        choices = [ChoiceText(base, req.settings.gen_length, req.stops) for _ in rows]
        stats = [None] * len(rows)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        t0 = int(time.time())
        batcher.submit(job)

        def usage() -> dict:
            prompt_tokens = sum(len(p) for p in req.prompts)
            completion = sum(c.completion_tokens() for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def adjust_stats() -> dict:
            done = [s for s in stats if s is not None]
            full = sum(s["full_passes"] for s in done)
            return {"strategy": req.settings.make_strategy().describe(), "full_passes": full,
                    "sampler_passes": sum(s["sampler_passes"] for s in done),
                    "tokens_per_full_pass": round(req.settings.gen_length * len(done) / max(1, full), 4),
                    "batch_size": max((s["batch_size"] for s in done), default=0)}

        def on_done(ev) -> None:
            _, index, tokens, st = ev
            choices[index].finish(tokens)
            stats[index] = st

        if not req.stream:
            try:
                remaining = len(rows)
                while remaining:
                    try:
                        ev = await asyncio.wait_for(events.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return JSONResponse({}, status_code=499)
                        continue
                    if ev[0] == "error":
                        return error(_as_api_error(ev[1]))
                    if ev[0] == "done":
                        on_done(ev)
                        remaining -= 1
            finally:  # the client went away (or the server stops): its rows leave the queue
                if remaining:
                    batcher.cancel(job)
            out = []
            for i, c in enumerate(choices):
                text = c.advance(final=True)
                item = {"index": i, "logprobs": None, "finish_reason": c.finish_reason}
                item.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                out.append(item)
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": t0,
                    "model": name, "system_fingerprint": None, "choices": out, "usage": usage(),
                    "adjust_stats": adjust_stats()}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": t0, "model": name, "system_fingerprint": None,
                         "choices": [c]})

        def piece(tok: int) -> str:
            if tok not in piece_cache:
                piece_cache[tok] = base.tokenizer.decode([tok])
            return piece_cache[tok]

        async def stream():
            remaining = len(rows)
            try:
                if chat:
                    for i in range(len(rows)):
                        yield chunk(i, None, None, first=True)
                while remaining:
                    ev = await events.get()
                    if ev[0] == "error":
                        yield _sse(_as_api_error(ev[1]).body())
                        break
                    index = ev[1]
                    c = choices[index]
                    if ev[0] == "step":
                        new = c.unmask(ev[3], ev[4])
                        if req.include_steps and new:
                            yield _sse({"id": rid, "object": "adjust.step", "created": t0, "model": name,
                                        "index": index, "step": ev[2],
                                        "unmasked": [[p, t, piece(t)] for p, t in new]})
                        delta = c.advance()
                    else:
                        on_done(ev)
                        remaining -= 1
                        delta = c.advance(final=True)
                    if delta:
                        yield chunk(index, delta, None)
                    if ev[0] == "done":
                        yield chunk(index, None if chat else "", c.finish_reason)
                if not remaining and req.include_usage:
                    yield _sse({"id": rid, "object": obj, "created": t0, "model": name, "system_fingerprint": None,
                                "choices": [], "usage": usage(), "adjust_stats": adjust_stats()})
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: its rows leave the queue, its batch may stop
                if remaining:
                    batcher.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    @api
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    @api
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _as_api_error(e: Exception) -> ApiError:
    from ..errors import AdjustError

    if isinstance(e, ApiError):
        return e
    if isinstance(e, AdjustError):
        return ApiError(str(e), None, "invalid_value")
    return ApiError(f"internal error while generating: {type(e).__name__}: {e}", None, "internal_error", 500,
                    "server_error")
