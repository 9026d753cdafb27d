"""Parsing and checking of OpenAI-style request bodies, and the text of a choice as it becomes final.

Every problem with a request is an `ApiError` with the HTTP status and the OpenAI error body
({"error": {"message", "type", "param", "code"}}); nothing here runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decode import check_cache, resolve_unroll, unroll_plan
from ..errors import AdjustError
from ..sampling import SamplingConfig
from ..strategies import INT_PARAMS, STR_PARAMS, STRATEGY_PARAMS, make_strategy, strategy_names, unused_setting
from .batching import DecodeSettings
from .errors import ApiError
from .limits import Limits

MAX_STOPS = 16  # OpenAI takes 4; lm-eval's own tasks send up to 5 (vLLM has no limit)
MAX_LOGPROBS = 20  # most likely tokens returned per position (OpenAI's completions: 5)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; a diffusion canvas needs a length
STRATEGY_FIELDS = STRATEGY_PARAMS


# The request fields, by what the server does with them (docs/serve.md has the table).
OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                 "stream", "stream_options", "stop", "seed", "user"}
EXTENSION_FIELDS = {"strategy", "block_length", "order", "top_k", "cache", "cache_verify", "unroll", *STRATEGY_FIELDS}
# OpenAI fields accepted only at a value that asks for nothing; anything else is a 400 naming the field
# (completions implement logprobs and echo: see COMPLETIONS_ONLY)
NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
           "function_call": (None, "none"), "parallel_tool_calls": (None, False),
           "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
           "best_of": (None,)}  # best_of: also when equal to n (see check_fields)
STREAM_OPTIONS = {"include_usage", "include_steps"}
COMPLETIONS_ONLY = {"logprobs", "echo"}  # implemented for /v1/completions (chat's logprobs are not)


def check_fields(body: dict, chat: bool, lenient: bool) -> None:
    """Unsupported OpenAI fields (at a value that asks for something) are a 400 naming the field; so are
    unknown fields, unless `lenient`."""
    for name, value in body.items():
        if name in NEUTRAL and not (name in COMPLETIONS_ONLY and not chat):
            if name == "best_of" and _is_int(value) and value == body.get("n", 1):
                continue
            if not any(value is v or (type(value) is type(v) and value == v) for v in NEUTRAL[name]):
                raise ApiError(f"'{name}' is not supported by adjust serve (got {_short(value)}); leave it out",
                               name, "unsupported_parameter")
        elif name in ("prompt", "messages") and name != ("messages" if chat else "prompt"):
            raise ApiError(f"'{name}' belongs to /v1/{'completions' if chat else 'chat/completions'}, not here",
                           name, "unsupported_parameter")
        elif name not in OPENAI_FIELDS | COMPLETIONS_ONLY and name not in EXTENSION_FIELDS and not lenient:
            raise ApiError(f"unknown field '{name}'; docs/serve.md lists the supported ones (start the server "
                           "with --lenient to ignore unknown fields)", name, "unknown_parameter")
    opts = body.get("stream_options")
    if isinstance(opts, dict) and not lenient:
        for name in opts:
            if name not in STREAM_OPTIONS:
                raise ApiError(f"unknown field 'stream_options.{name}'; supported: "
                               f"{', '.join(sorted(STREAM_OPTIONS))}", "stream_options", "unknown_parameter")


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:40] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v


def _get(body: dict, name: str, default, ok, what: str):
    v = body.get(name)
    if v is None:
        return default
    if not ok(v):
        raise ApiError(f"'{name}' must be {what}, got {v!r}", name, "invalid_type")
    return v


def get_int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None):
    v = _get(body, name, default, _is_int, "an integer")
    if v is not None and lo is not None and v < lo:
        raise ApiError(f"'{name}' must be at least {lo}, got {v}", name, "invalid_value")
    if v is not None and hi is not None and v > hi:
        raise ApiError(f"'{name}' must be at most {hi}, got {v}", name, "invalid_value")
    return v


def get_number(body: dict, name: str, default=None):
    v = _get(body, name, default, _is_number, "a number")
    return None if v is None else float(v)


def get_str(body: dict, name: str, default=None):
    return _get(body, name, default, lambda v: isinstance(v, str), "a string")


def get_bool(body: dict, name: str, default=False):
    return _get(body, name, default, lambda v: isinstance(v, bool), "true or false")


@dataclass
class Parsed:
    """A checked request: the rows to decode, how, and how to answer."""

    prompts: list[list[int]]  # token ids per prompt
    n: int
    settings: DecodeSettings
    seeded: bool
    stops: list[str]
    stream: bool
    include_usage: bool
    include_steps: bool
    echo: bool = False  # completions: the prompt comes back in front of the text
    logprobs: int | None = None  # completions: token log-probabilities and the N most likely, per token
    texts: list[str | None] | None = None  # the prompts as sent (None: sent as token ids)


def parse_stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop", "invalid_value")
    return stops


def max_prompt_chars(base) -> int | None:
    """The most characters a prompt that fits the context can have: context x the longest token's text (None:
    unknown). Longer text is refused before it is tokenized."""
    cached = base.__dict__.get("_max_prompt_chars", False)
    if cached is False:
        vocab = getattr(base.tokenizer, "get_vocab", lambda: None)()
        cached = base.max_length * max(len(t) for t in vocab) if vocab else None
        base.__dict__["_max_prompt_chars"] = cached
    return cached


def check_chars(text: str, base, param: str) -> None:
    bound = max_prompt_chars(base)
    if bound is not None and len(text) > bound:
        raise ApiError(f"the prompt has {len(text)} characters; no text over {bound} characters fits the model's "
                       f"context of {base.max_length} tokens", param, "context_length_exceeded")


def _encode(base, text: str, param: str) -> list[int]:
    check_chars(text, base, param)
    try:
        return base.encode(text)
    except AdjustError as e:
        raise ApiError(str(e), param, "invalid_value") from None


def parse_prompts(body: dict, base, limits: Limits = Limits()) -> tuple[list[list[int]], list[str | None]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of such lists. Returns each
    prompt's token ids, and its text as sent (None for token ids: what `echo` gives back)."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError("'prompt' is required (use \"\" for an unconditional sample)", "prompt", "missing")
    p = body["prompt"]
    vocab = getattr(base, "vocab_size", None)

    def ids_ok(ids):
        return isinstance(ids, list) and all(_is_int(t) and 0 <= t < (vocab or 1 << 62) for t in ids)

    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        items = p
    else:
        raise ApiError("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt", "invalid_type")
    if len(items) > limits.max_prompts:
        raise ApiError(f"'prompt' has {len(items)} prompts; this server takes at most {limits.max_prompts} per "
                       "request (--max-prompts)", "prompt", "too_many_prompts")
    out = []
    for item in items:
        if isinstance(item, list) and len(item) > base.max_length:
            raise ApiError(f"a prompt of {len(item)} token ids is beyond the model's context of {base.max_length} "
                           "tokens", "prompt", "context_length_exceeded")
        if isinstance(item, str):
            out.append(_encode(base, item, "prompt") if item else [])
        elif ids_ok(item):
            out.append(list(item))
        else:
            raise ApiError(f"token ids in 'prompt' must be integers in [0, {vocab})", "prompt", "invalid_value")
    return out, [item if isinstance(item, str) else None for item in items]


def parse_messages(body: dict, base, chat_template: str | None) -> list[int]:
    """The chat prompt: the tokenizer's chat template (or the server's) applied to `messages`."""
    template = chat_template or getattr(base.tokenizer, "chat_template", None)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", "messages",
                       "missing" if msgs is None else "invalid_type")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(f"messages[{i}] needs a role of system, developer, user or assistant", "messages",
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(f"messages[{i}].content: only text parts are supported", "messages", "invalid_value")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", "messages", "invalid_type")
        clean.append({"role": m["role"], "content": content})
    check_chars("".join(m["content"] for m in clean), base, "messages")
    if template is None:
        raise ApiError(f"model {base.name!r} has no chat template, so /v1/chat/completions cannot format "
                       "messages; use /v1/completions with a plain prompt, or start the server with "
                       "--chat-template FILE", "messages", "chat_template_missing")
    try:
        text = base.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True,
                                                  chat_template=template)
    except Exception as e:  # a template error is about this request's messages or the template itself
        raise ApiError(f"the chat template failed on these messages: {e}", "messages", "chat_template_error")
    return _encode(base, text, "messages")


def parse_request(body: dict, base, sampler, prompts: list[list[int]], defaults: dict, server_seed: int,
                  limits: Limits = Limits(), chat: bool = False) -> Parsed:
    """Check the fields shared by completions and chat; `prompts` are already encoded. Chat stops at its first
    stop token (EOS, end of turn) and, without max_tokens, may use the rest of the context up to the cap."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None, "invalid_body")
    get_str(body, "model")
    get_str(body, "user")
    context = base.max_length
    longest = max(len(p) for p in prompts)
    echo = False if chat else get_bool(body, "echo")
    logprobs = None if chat else get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    max_tokens = get_int(body, "max_completion_tokens", None)
    max_tokens = get_int(body, "max_tokens", max_tokens)
    if max_tokens is None:
        max_tokens = max(1, min(limits.max_tokens, context - longest)) if chat else DEFAULT_MAX_TOKENS
    if max_tokens < (0 if echo else 1):
        raise ApiError(f"'max_tokens' must be at least 1 (0 only with 'echo': scoring the prompt alone), got "
                       f"{max_tokens}", "max_tokens", "invalid_value")
    if echo and logprobs is not None:
        scored = sum(len(p) for p in prompts)
        if scored > limits.max_scored_tokens:
            raise ApiError(f"'echo' with 'logprobs' scores every prompt token: {scored} here, beyond this server's "
                           f"{limits.max_scored_tokens} per request (--max-scored-tokens)", "prompt",
                           "too_many_tokens")
    if (echo or logprobs is not None) and get_bool(body, "stream"):
        raise ApiError("'echo' and 'logprobs' are not supported with 'stream'", "stream", "unsupported_parameter")
    if max_tokens > limits.max_tokens:
        raise ApiError(f"'max_tokens' ({max_tokens}) is above this server's cap of {limits.max_tokens} "
                       "(--max-tokens-cap)", "max_tokens", "invalid_value")
    if max_tokens >= context:
        raise ApiError(f"'max_tokens' ({max_tokens}) is beyond the model's context of {context} tokens "
                       "(the prompt needs room too)", "max_tokens", "context_length_exceeded")
    if longest + min(1, max_tokens) > context:
        raise ApiError(f"the prompt is too long: {longest} tokens leave no room in the model's context of "
                       f"{context} tokens", "prompt", "context_length_exceeded")
    if longest + max_tokens > context:
        raise ApiError(f"the prompt ({longest} tokens) + 'max_tokens' ({max_tokens}) exceed the model's context "
                       f"of {context} tokens; shorten either", "max_tokens", "context_length_exceeded")
    if any(base.mask_id in p for p in prompts):
        raise ApiError("the prompt contains the mask token; prompts must be plain text", "prompt", "invalid_value")
    n = get_int(body, "n", 1)
    if n < 1 or n > limits.max_rows:
        raise ApiError(f"'n' must be between 1 and {limits.max_rows}, got {n}", "n", "invalid_value")
    if n * len(prompts) > limits.max_rows:
        raise ApiError(f"{len(prompts)} prompts x n={n} is {n * len(prompts)} sequences; this server decodes at most "
                       f"{limits.max_rows} per request (--max-rows)", "n", "too_many_rows")
    temperature, top_p = get_number(body, "temperature", 1.0), get_number(body, "top_p", 1.0)
    top_k, order = get_int(body, "top_k", 0, lo=0), get_str(body, "order", "entropy")
    try:  # SamplingConfig holds the one rule for these, as for the CLI's flags
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, order=order)
    except AdjustError as e:
        param = next((f for f, flag in SAMPLING_FLAGS.items() if flag in str(e)), None)
        flag = SAMPLING_FLAGS.get(param, "")
        raise ApiError(str(e).replace(flag, f"'{param}'") if flag.startswith("--") else str(e), param,
                       "invalid_value")
    block_length = get_int(body, "block_length", None, lo=1)
    cache = get_str(body, "cache", "none")
    cache_verify = get_int(body, "cache_verify", 0, lo=0)
    try:
        check_cache(base, cache, block_length, None, cache_verify)
    except AdjustError as e:
        field = "cache_verify" if "--cache-verify" in str(e) else "cache"
        raise ApiError(str(e).replace("--block-length", "'block_length'").replace("--cache-verify", "'cache_verify'")
                       .replace("--cache", "'cache'"), field, "invalid_value")
    unroll = get_str(body, "unroll", None)
    try:
        unroll_plan(unroll or "full")
    except AdjustError as e:
        raise ApiError(str(e).replace("--unroll", "'unroll'"), "unroll", "invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(f"'seed' must be an integer, got {seed!r}", "seed", "invalid_type")
    name = get_str(body, "strategy", defaults.get("strategy", "exact"))
    if name not in strategy_names():
        raise ApiError(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())}", "strategy",
                       "invalid_value")
    params = {}
    for f in STRATEGY_FIELDS:
        v = get_int(body, f) if f in INT_PARAMS else get_str(body, f) if f in STR_PARAMS else get_number(body, f)
        if v is not None:
            params[f] = v
    if "tokens_per_pass" not in params and defaults.get("tokens_per_pass") and name != "exact":
        params["tokens_per_pass"] = defaults["tokens_per_pass"]
    try:
        strategy = make_strategy(name, **params)
    except AdjustError as e:
        raise ApiError(str(e).replace("--tokens-per-pass", "'tokens_per_pass'"), _param_of(str(e)), "invalid_value")
    except (TypeError, ValueError) as e:
        raise ApiError(f"bad parameters for strategy {name!r}: {e}", "strategy", "invalid_value")
    params = {k: v for k, v in params.items() if k in _accepted(strategy)}
    unused = unused_setting(strategy, lambda p: f"'{p}'", order=body.get("order") is not None, unroll=unroll)
    if unused:
        raise ApiError(unused[1], unused[0], "unused_parameter")
    unroll = resolve_unroll(unroll, strategy, sampler)
    if not strategy.adaptive and strategy.k > max_tokens and max_tokens:
        raise ApiError(f"'tokens_per_pass' ({strategy.k}) is larger than 'max_tokens' ({max_tokens})",
                       "tokens_per_pass", "invalid_value")
    if strategy.uses_sampler and sampler is None:
        raise ApiError(f"strategy {name!r} needs a joint sampler, and this server has none (start it with "
                       "--sampler DIR)", "strategy", "sampler_required")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", "stream_options", "invalid_type")
    opts = opts or {}
    settings = DecodeSettings(name, tuple(sorted(params.items())), sampling, max_tokens, block_length,
                              server_seed if seed is None else seed, cache, unroll, early_exit=chat, logprobs=logprobs,
                              cache_verify=cache_verify)
    return Parsed(prompts, n, settings, seed is not None, parse_stops(body), get_bool(body, "stream"),
                  get_bool(opts, "include_usage"), get_bool(opts, "include_steps"), echo, logprobs)


def _accepted(strategy) -> set:
    import inspect

    return set(inspect.signature(type(strategy).__init__).parameters)


# the sampling fields and how SamplingConfig's messages name them
SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "order": "order rule"}


def _param_of(message: str) -> str:
    """The strategy field a message names first ("strategy" if none)."""
    found = [(min(i for i in (message.find(f.replace("_", "-")), message.find(f)) if i >= 0), f)
             for f in STRATEGY_FIELDS if f.replace("_", "-") in message or f in message]
    return min(found)[1] if found else "strategy"


class ChoiceText:
    """The tokens of one choice as passes unmask them, and its text as far as it is final.

    Text is final up to the longest unmasked prefix (a diffusion model fills positions in any
    order; a token never changes once unmasked), cut at EOS or at the first stop sequence.
    While more may come, a tail that could begin a stop sequence, an incomplete UTF-8
    character or trailing spaces are held back, so a delta is never taken back.
    """

    def __init__(self, base, gen_length: int, stops: list[str]):
        self.base, self.stops = base, stops
        self.tokens: list[int | None] = [None] * gen_length
        self.emitted = ""
        self.finish_reason: str | None = None
        self.text = ""

    def unmask(self, cols, toks) -> list[tuple[int, int]]:
        """Record a step's tokens; returns the (position, token) pairs that were new (a rerun repeats none)."""
        new = []
        for c, t in zip(cols, toks):
            if self.tokens[c] is None:
                self.tokens[c] = t
                new.append((c, t))
        return new

    def finish(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)

    def advance(self, final: bool = False) -> str:
        """The new final text since the last call ('' if none); sets finish_reason when complete."""
        if self.finish_reason is not None:
            return ""
        prefix = []
        for t in self.tokens:
            if t is None:
                break
            prefix.append(t)
        stopped = self.base.answer_end(prefix) < len(prefix)
        complete = final or len(prefix) == len(self.tokens) or stopped
        text = self.base.decode(prefix)  # cut at the first stop token
        reason = ("stop" if stopped else "length") if complete else None
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, complete, reason = text[:cut], True, "stop"
        if not complete:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
            text = text.rstrip("\ufffd").rstrip()
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        if complete:
            self.finish_reason, self.text = reason, self.emitted
        return delta

    def completion_tokens(self) -> int:
        """Tokens of the returned text: up to EOS, or the re-encoded text when a stop sequence cut it."""
        if self.stops and self.finish_reason == "stop" and self.text != self.base.decode(self.tokens):
            return len(self.base.encode(self.text)) if self.text else 0
        ids = [t for t in self.tokens if t is not None]
        ids = ids[: self.base.answer_end(ids)]
        return sum(1 for t in ids if t not in getattr(self.base, "banned_ids", ()))
