"""`adjust serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the one decoding loop.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and
the playground page at / (static files in adjust/serve/static, no build step). Requests are
read within the limits (`requests.Limits`), parsed and tokenized off the event loop, checked in
`requests.py`, decoded by `batching.Batcher` (one worker thread, continuous batching), and
answered in OpenAI's shapes plus `adjust_stats`; `stream: true` sends server-sent events.

Every byte is treated as hostile: bodies only as application/json and within the size and time
limits, the Host header checked on a loopback bind (DNS rebinding), no cross-origin requests
unless `cors_origins` names the origin, every client error a 4xx with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdjustError
from .batching import Batcher, Job, ScoreJob
from .errors import ApiError, shutting_down
from .limits import Limits
from .requests import ChoiceText, check_chars, check_fields, get_bool, parse_messages, parse_prompts, parse_request

log = logging.getLogger("adjust.serve")
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def create_app(base, sampler=None, *, model_name: str | None = None, api_key: str | None = None,
               max_batch_size: int = 16, batch_wait_ms: float = 20.0, mixed_lengths: bool = False,
               chat_template: str | None = None, default_strategy: str = "exact",
               default_tokens_per_pass: int | None = None, server_seed: int | None = None,
               limits: Limits = Limits(), lenient: bool = False, allowed_hosts: list[str] = (),
               cors_origins: list[str] = ()):
    """The ASGI app. The batcher's worker thread starts and stops with the app (lifespan).

    `allowed_hosts`: Host header values accepted besides the loopback names of a loopback bind (there
    the Host is always checked; on another bind only when this is given). `cors_origins`: origins whose
    browsers may call the API (CORS); any other cross-origin request is refused with a 403."""
    name = model_name or Path(str(base.name).rstrip("/")).name or str(base.name)  # a directory's own name
    batcher = Batcher(base, sampler, max_batch_size, batch_wait_ms, mixed_lengths, limits.max_queued_rows)
    defaults = {"strategy": default_strategy, "tokens_per_pass": default_tokens_per_pass}
    # Unseeded requests share this seed and get fresh random sample indices, so they can batch together.
    server_seed = secrets.randbits(62) if server_seed is None else server_seed
    created = int(time.time())
    piece_cache: dict[int, str] = {}
    # JSON parsing and tokenizing run here, off the event loop; two workers, so a flood of big bodies queues
    parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adjust-serve-parse")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()
        parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="adjust serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.limits = batcher, limits
    app.add_middleware(Guard, allowed_hosts=[h.lower() for h in allowed_hosts],
                       cors_origins=[o.lower().rstrip("/") for o in cors_origins])
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(ApiError(what.get(e.status_code, str(e.detail)), None, code, e.status_code))

    def key_ok(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return not api_key or hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    def check_key(request: Request) -> None:
        if not key_ok(request):
            raise ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", 401)

    def api(route):
        """An /v1 route: the key checked first; a bad request is its 4xx, a bug in it its 500 (logged)."""
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
                return error(ApiError(f"internal error: {type(e).__name__}", None, "internal_error", 500,
                                      "server_error"))

        return wrapped

    @app.get("/health")
    async def health(request: Request):
        """Liveness for anyone; the model and queue statistics only with the key (when there is one)."""
        status = "draining" if batcher.draining else "ok"
        if not key_ok(request):
            return {"status": status}
        return {"status": status, "model": name, "sampler": sampler is not None, **batcher.stats.to_dict()}

    def model_card() -> dict:
        from ..strategies import strategy_names

        return {"id": name, "object": "model", "created": created, "owned_by": "adjust",
                "context_length": base.max_length, "max_model_len": base.max_length,
                "max_tokens_cap": limits.max_tokens, "sampler": sampler is not None, "strategies": strategy_names(),
                "chat_template": bool(chat_template or getattr(base.tokenizer, "chat_template", None))}

    @app.get("/v1/models")
    @api
    async def models(request: Request):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    @api
    async def model(request: Request):
        got = request.path_params["model_id"]
        if got != name:
            raise ApiError(f"model {got!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found", 404)
        return model_card()

    # --- tokenizer endpoints, in vLLM's shapes (lm-eval's remote tokenizer uses them) ------------------------
    def special(attr: str) -> str | None:
        tok = getattr(base.tokenizer, attr, None)
        return tok if isinstance(tok, str) else None

    @app.get("/tokenizer_info")
    @api
    async def tokenizer_info(request: Request):
        return {"tokenizer_class": type(base.tokenizer).__name__, "eos_token": special("eos_token"),
                "bos_token": special("bos_token"), "pad_token": special("pad_token"),
                "mask_token": special("mask_token"), "model_max_length": base.max_length,
                "chat_template": chat_template or getattr(base.tokenizer, "chat_template", None)}

    def tokenize(body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object", None, "invalid_body")
        special_tokens = get_bool(body, "add_special_tokens", True)
        if "messages" in body:
            ids = parse_messages(body, base, chat_template)
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise ApiError("'prompt' must be a string", "prompt", "invalid_type")
            check_chars(text, base, "prompt")
            ids = base.encode(text) if special_tokens else list(base.tokenizer.encode(text, add_special_tokens=False))
        return {"count": len(ids), "max_model_len": base.max_length, "tokens": ids, "token_strs": None}

    def detokenize(body: dict) -> dict:
        ids = body.get("tokens") if isinstance(body, dict) else None
        vocab = base.vocab_size
        if not isinstance(ids, list) or len(ids) > 4 * base.max_length or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ApiError(f"'tokens' must be a list of at most {4 * base.max_length} token ids in [0, {vocab})",
                           "tokens", "invalid_value")
        return {"prompt": base.tokenizer.decode(ids)}

    @app.post("/tokenize")
    @api
    async def tokenize_route(request: Request):
        raw = await read_body(request)
        return await asyncio.get_running_loop().run_in_executor(parser, lambda: tokenize(load_json(raw)))

    @app.post("/detokenize")
    @api
    async def detokenize_route(request: Request):
        raw = await read_body(request)
        return await asyncio.get_running_loop().run_in_executor(parser, lambda: detokenize(load_json(raw)))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{file}")
    async def static(file: str):
        allowed = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if file not in allowed:
            return error(ApiError(f"no static file {file!r}", None, "not_found", 404))
        media = {"js": "text/javascript", "css": "text/css", "html": "text/html"}.get(file.rsplit(".", 1)[-1])
        return FileResponse(allowed[file], media_type=media)

    async def read_body(request: Request) -> bytes:
        """The raw body: application/json only, refused beyond max_body_bytes before it is read (413), and
        within read_timeout (408)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(f"the body must be sent as 'Content-Type: application/json' (got {ctype or 'none'!r})",
                           None, "unsupported_media_type", 415)
        def too_large(size: str) -> ApiError:
            return ApiError(f"the request body ({size}) is over this server's limit of {limits.max_body_bytes} bytes "
                            "(--max-body-bytes)", None, "body_too_large", 413)

        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise too_large(f"{declared} bytes")

        async def gather() -> bytes:
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limits.max_body_bytes:
                    raise too_large(f"{len(buf)} bytes so far")
            return bytes(buf)

        try:
            return await asyncio.wait_for(gather(), limits.read_timeout)
        except asyncio.TimeoutError:
            raise ApiError(f"the request body did not arrive within {limits.read_timeout:g} s (--read-timeout)",
                           None, "request_timeout", 408) from None

    def prepare(raw: bytes, chat: bool):
        """JSON -> checked request with its prompts tokenized (in the parser thread; raises ApiError)."""
        body = load_json(raw)
        model = body.get("model")
        if model is not None and model != name:
            raise ApiError(f"model {model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found", 404)
        check_fields(body, chat, lenient)
        prompts, texts = ([parse_messages(body, base, chat_template)], None) if chat else \
            parse_prompts(body, base, limits)
        req = parse_request(body, base, sampler, prompts, defaults, server_seed, limits, chat)
        req.texts = texts
        return req

    def load_json(raw: bytes) -> dict:
        """A JSON object of text (no lone surrogates), or an ApiError."""
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError("the request body is nested too deeply", None, "invalid_json") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object", None, "invalid_body")
        try:  # a lone surrogate ("\ud800") is valid JSON but not text
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(f"the request body has a string that is not valid Unicode text (a lone surrogate "
                           f"{e.object[e.start:e.end]!r})", None, "invalid_text") from None
        except RecursionError:
            raise ApiError("the request body is nested too deeply", None, "invalid_json") from None
        return body

    async def watch_disconnect(request: Request, jobs: list[Job]) -> None:
        """Cancel the jobs as soon as the client goes away (the body has been read: the next message is that)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    batcher.cancel(job)
                return

    def piece(tok: int) -> str:
        if tok not in piece_cache:
            piece_cache[tok] = base.tokenizer.decode([tok])
        return piece_cache[tok]

    def prompt_text(req, index: int) -> str:
        text = req.texts[index] if req.texts else None
        return text if text is not None else base.tokenizer.decode(req.prompts[index])

    def logprobs_object(req, prompt: int, scored, choice: ChoiceText, drawn) -> dict:
        """OpenAI's completions `logprobs`: the echoed prompt's tokens by the chain rule (`scored`), then the
        generated ones, each with the log-probability it was drawn with (`drawn`), up to the end of the text
        (and its stop token, if one ended it)."""
        ids, lps, tops = [], [], []
        if req.echo:
            ids += req.prompts[prompt]
            if scored is not None:
                lps += scored[0].tolist()
                tops += [list(zip(t.tolist(), v.tolist())) for t, v in zip(scored[1], scored[2])]
            else:
                lps += [None] * len(req.prompts[prompt])
                tops += [[]] * len(req.prompts[prompt])
        if drawn is not None:
            gen = [t for t in choice.tokens if t is not None]
            n = choice.completion_tokens()
            if n == base.answer_end(gen) < len(gen):  # the stop token that ended the text
                n += 1
            for k in range(n):
                ids.append(gen[k])
                lp = float(drawn[0][k])
                lps.append(None if lp != lp else lp)
                tops.append([(t, v) for t, v in zip(drawn[1][k].tolist(), drawn[2][k].tolist()) if v == v])
        tokens = [piece(t) for t in ids]
        top_dicts = []
        for alts in tops:
            d: dict[str, float] = {}
            for t, v in alts[: req.logprobs]:
                d[piece(t)] = max(v, d.get(piece(t), float("-inf")))
            top_dicts.append(d if req.logprobs else None)
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}

    async def handle(request: Request, chat: bool):
        if batcher.draining:
            raise shutting_down()
        raw = await read_body(request)
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(parser, prepare, raw, chat)
        events: asyncio.Queue = asyncio.Queue()
        rows = []
        for ids in req.prompts:
            for i in range(req.n):
                rows.append((ids, i if req.seeded else secrets.randbits(62)))
        post = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        generating = req.settings.gen_length > 0
        job = Job(rows if generating else [], req.settings, post, timeout=limits.request_timeout)
        scoring = ScoreJob(req.prompts, req.logprobs, post, limits.request_timeout) \
            if req.echo and req.logprobs is not None else None
        choices = [ChoiceText(base, req.settings.gen_length, req.stops) for _ in rows]
        stats, token_lp, scored = [None] * len(rows), [None] * len(rows), [None] * len(req.prompts)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        t0 = int(time.time())
        if scoring is not None:
            batcher.submit(scoring)
        if generating:
            try:
                batcher.submit(job)
            except ApiError:
                if scoring is not None:
                    batcher.cancel(scoring)
                raise

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
            _, index, tokens, st, lp = ev
            choices[index].finish(tokens)
            stats[index], token_lp[index] = st, lp

        if not req.stream:
            jobs = [j for j in (job if generating else None, scoring) if j is not None]
            watcher = asyncio.ensure_future(watch_disconnect(request, jobs))
            remaining = (len(rows) if generating else 0) + (len(req.prompts) if scoring is not None else 0)
            try:
                while remaining:
                    ev = await events.get()
                    if ev[0] == "error":
                        return error(_as_api_error(ev[1]))
                    if ev[0] == "done":
                        on_done(ev)
                        remaining -= 1
                    elif ev[0] == "scored":
                        scored[ev[1]] = ev[2]
                        remaining -= 1
            finally:  # the client went away (or the server stops): its rows leave the batch at the next pass
                watcher.cancel()
                if remaining:
                    for j in jobs:
                        batcher.cancel(j)
            out = []
            for i, c in enumerate(choices):
                text = c.advance(final=True) if generating else ""
                if not generating:
                    c.finish_reason = "length"
                prompt = i // req.n
                if req.echo:
                    text = prompt_text(req, prompt) + text
                item = {"index": i, "logprobs": None, "finish_reason": c.finish_reason}
                if req.logprobs is not None:
                    item["logprobs"] = logprobs_object(req, prompt, scored[prompt], c, token_lp[i])
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
                                        "choices": [], "index": index, "step": ev[2],
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
            finally:  # also when the client went away (Starlette cancels the stream): its rows leave the batch
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


class Guard:
    """ASGI middleware before every route: the Host header (DNS rebinding) and the Origin (cross-site requests).

    Host: on a loopback bind (the connection's local address), only the loopback names with the bound port and
    `allowed_hosts` are served; on another bind, `allowed_hosts` when given. Origin: a request that carries
    one (browsers do on cross-origin requests) is served only for its own origin or one of `cors_origins`."""

    def __init__(self, app, allowed_hosts: list[str], cors_origins: list[str]):
        self.app, self.allowed_hosts, self.cors_origins = app, set(allowed_hosts), set(cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k: v for k, v in scope["headers"] if k in (b"host", b"origin")}
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if not self.host_ok(host, scope.get("server")):
            return await _reject(send, ApiError(f"Host {host!r} is not this server's (DNS rebinding protection); "
                                                "start the server with --allowed-host NAME to accept it", None,
                                                "host_not_allowed", 403))
        origin = headers.get(b"origin")
        if origin is not None:
            o = origin.decode("latin-1").lower().rstrip("/")
            if o != f"{scope.get('scheme', 'http')}://{host}" and o not in self.cors_origins:
                return await _reject(send, ApiError(f"cross-origin request from {o!r} refused; start the server "
                                                    "with --cors-origin ORIGIN to allow it", None,
                                                    "origin_not_allowed", 403))
        return await self.app(scope, receive, send)

    def host_ok(self, host: str, server) -> bool:
        if host in self.allowed_hosts:
            return True
        loopback = False
        if server:
            try:
                loopback = ipaddress.ip_address(server[0]).is_loopback
            except ValueError:
                loopback = False
        if not loopback:
            return not self.allowed_hosts
        port = server[1]
        return host in {f"{n}:{port}" for n in LOOPBACK_NAMES} or (port == 80 and host in LOOPBACK_NAMES)


async def _reject(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, AdjustError):
        return ApiError(str(e), None, "invalid_value")
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return ApiError("the device ran out of memory for this request; ask for fewer rows or tokens", None,
                        "out_of_memory", 503, "server_error", {"Retry-After": "5"})
    return ApiError(f"internal error while generating: {type(e).__name__}: {e}", None, "internal_error", 500,
                    "server_error")
