"""The lm-evaluation-harness model `adjust`: every base and strategy of this library behind lm-eval's LM API.

- generate_until: the one decoding loop (`adjust.decode.generate_texts`); the generation
  region is `gen_length` tokens (model arg) or else the request's `max_gen_toks` (else 256);
  the answer is cut at the first EOS, then at the first of the request's `until` strings, and
  kept to `max_gen_toks` tokens. Every sequence draws from its own generator seeded by
  (seed, prompt ids, sample index), so a prompt gets the same tokens here as in
  `adjust generate` / `adjust eval tasks` with the same seed, in any batch.
- loglikelihood: with `likelihood=bound` (the default) the masked-diffusion bound
  (`adjust.likelihood`, the routine training and validation use) over the continuation's tokens,
  averaged over `mc_num` Monte Carlo draws of the mask ratio, as LLaDA's evaluation does; with
  `likelihood=chain` the exact left-to-right chain rule (`likelihood.chain_logprobs`, what
  `adjust serve` returns for echo + logprobs). is_greedy from a greedy exact decode of the
  continuation's length (`check_greedy`).
- loglikelihood_rolling: lm-eval's rolling windows of the model's context, each scored by
  the same bound (the first window unconditionally: a diffusion model needs no BOS).
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import AdjustError
from ..strategies import INT_PARAMS, STRATEGY_PARAMS, sampler_need

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that set no max_gen_toks
DEFAULT_BATCH_SIZE = 16
# model_args and their defaults (None: the library's default / "not given").
MODEL_ARGS = {
    "base": None, "base_type": "auto", "sampler": None, "remote_code": False,
    "strategy": "exact", **dict.fromkeys(STRATEGY_PARAMS),
    "block_length": None, "gen_length": None,
    "temperature": None, "top_p": None, "top_k": None, "order": None,
    "cache": None, "cache_verify": 0, "unroll": None, "chat": False, "dtype": "float32", "device": "cpu",
    "batch_size": DEFAULT_BATCH_SIZE,
    "seed": 0, "mc_num": 128, "check_greedy": True, "likelihood": "bound",
}
LIKELIHOODS = ("bound", "chain")
# Request generation kwargs read (besides until and max_gen_toks); others are ignored with a warning.
GEN_KWARGS = ("do_sample", "temperature", "top_p", "top_k")
# Arguments lm-eval passes to every model whether or not they apply (`--max_batch_size`).
LM_EVAL_EXTRAS = ("max_batch_size",)


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", "none", ""):
        return False
    raise AdjustError(f"model arg {name}={value!r} is not true or false")


def _int(name: str, value, minimum: int | None = None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise AdjustError(f"model arg {name}={value!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise AdjustError(f"model arg {name} must be at least {minimum}, got {value}")
    return value


def _batch_size(value) -> int:
    """lm-eval's --batch_size is text: an integer, or "auto" (which we read as our default)."""
    if isinstance(value, str) and value.startswith("auto"):
        log.info("batch_size=%s: automatic batch sizes are not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    return _int("batch_size", value, 1)


def cut_at_stops(text: str, until) -> str:
    """`text` up to the earliest occurrence of any stop string (none given: unchanged)."""
    cut = len(text)
    for stop in until or []:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


@register_model("adjust")
class AdjustLM(LM):
    """lm-eval model `adjust`. model_args (comma-separated key=value):

    base, base_type, sampler, remote_code: what to load (`adjust.loader.ModelSpec`);
    strategy, tokens_per_pass, tau, gamma, factor, max_tokens_per_pass, group, spacing, ...: the decoding strategy
    (a parameter the strategy does not take is refused); block_length, gen_length: the
    generation region; temperature, top_p, top_k, order: override the request's sampling
    (requests with do_sample false, like GSM8K's, are greedy); chat: wrap each context as one
    user turn of the tokenizer's chat template; dtype, device, batch_size, seed; likelihood: bound
    (default) or chain, how loglikelihood scores (module docstring); mc_num: Monte Carlo draws of the
    likelihood bound; check_greedy: compute loglikelihood's
    is_greedy by a greedy decode (false: always False, as LLaDA's evaluation without it).
    cache: none | prefix | dual, the decoding loop's key/value cache (needs block_length; only bases
    that can take one: our tiny model, native Dream and LLaDA); cache_verify: positions each cached pass also
    recomputes (`--cache-verify`, default 0). unroll: full | fast, how ADJUST's sampler
    unrolls are computed (`--unroll`; docs/method.md section 3; default fast for a strategy with unrolls).
    """

    def __init__(self, **kwargs):
        super().__init__()
        from ..loader import ModelSpec, load_models
        from ..strategies import build_strategy

        for extra in LM_EVAL_EXTRAS:
            kwargs.pop(extra, None)
        unknown = sorted(set(kwargs) - set(MODEL_ARGS))
        if unknown:
            raise AdjustError(f"unknown model arg(s) {', '.join(unknown)} for --model adjust; it accepts: "
                              f"{', '.join(MODEL_ARGS)}")
        a = {**MODEL_ARGS, **{k: v for k, v in kwargs.items() if v is not None}}
        from ..decode import check_cache, resolve_unroll, unroll_plan

        self.cache = "none" if a["cache"] in (None, False, "", "None") else str(a["cache"])
        self.cache_verify = _int("cache_verify", a["cache_verify"], 0)
        unroll = None if a["unroll"] in (None, "", "None") else str(a["unroll"])
        unroll_plan(unroll or "full")  # a bad unroll mode fails before loading
        self.gen_length = _int("gen_length", a["gen_length"], 1)
        self.block_length = _int("block_length", a["block_length"], 1)
        self.batch_size = _batch_size(a["batch_size"])
        self.seed = _int("seed", a["seed"])
        self.mc_num = _int("mc_num", a["mc_num"], 1)
        self.likelihood = str(a["likelihood"])
        if self.likelihood not in LIKELIHOODS:
            raise AdjustError(f"model arg likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        self.check_greedy = _bool("check_greedy", a["check_greedy"])
        self.chat = _bool("chat", a["chat"])
        self.sampling_overrides = {k: a[k] for k in ("temperature", "top_p", "top_k", "order") if a[k] is not None}
        self._sampling({})  # a bad temperature/top_p/top_k/order fails before loading
        strategy_params = {k: _int(k, a[k], INT_PARAMS[k]) if k in INT_PARAMS else a[k] for k in STRATEGY_PARAMS}
        self.strategy = build_strategy(str(a["strategy"]), strategy_params,
                                       spell=lambda p: f"model arg {p}")  # refused before loading a model
        spec = ModelSpec(base=None if a["base"] is None else str(a["base"]), base_type=str(a["base_type"]),
                         dtype=str(a["dtype"]), device=str(a["device"]),
                         remote_code=_bool("remote_code", a["remote_code"]),
                         sampler=None if a["sampler"] is None else str(a["sampler"]))
        check_cache(None, self.cache, self.block_length, None, self.cache_verify)  # fails before loading
        self.base, self.sampler = load_models(spec, sampler_need(self.strategy))
        self.unroll = resolve_unroll(unroll, self.strategy, self.sampler)
        check_cache(self.base, self.cache, self.block_length, None, self.cache_verify)
        self._device = self.base.device
        if self.chat:
            self._template()  # no chat template: refused now, not after the first batch
        self.model_args = a

    # --- lm-eval plumbing ---------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm-eval's own --batch_size/--device (its CLI always passes batch_size 1)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's config defaults --device to cuda:0 whether or not there is a GPU
            log.warning("lm-eval's device %s is not available here; using cpu (set device= in model_args)",
                        extra.pop("device"))
        return cls(**arg_dict, **extra)

    @property
    def tokenizer_name(self) -> str:
        return str(self.base.name).replace("/", "__")

    def _template(self) -> str:
        template = getattr(self.base.tokenizer, "chat_template", None)
        if not template:
            raise AdjustError(f"{self.base.name} has no chat template in its tokenizer, so --apply_chat_template "
                              "and chat=true cannot be used with it; evaluate it on plain prompts")
        return template

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template() if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template (few-shot turns as lm-eval builds them)."""
        if self.chat:
            raise AdjustError("model arg chat=true already wraps every context in the chat template; "
                              "use it or --apply_chat_template, not both")
        return self._render(chat_history, add_generation_prompt)

    def _render(self, chat_history, add_generation_prompt: bool = True) -> str:
        self._template()
        return self.base.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"adjust_base": self.base.name, "adjust_strategy": self.strategy.describe()}

    # --- generation ---------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict):
        from ..sampling import SamplingConfig

        ignored = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if ignored:
            log.warning("adjust ignores the generation kwargs %s (it reads %s)", ignored, ", ".join(GEN_KWARGS))
        kw = {}
        if "do_sample" in gen_kwargs and not _bool("do_sample", gen_kwargs["do_sample"]):
            kw["temperature"] = 0.0
        elif gen_kwargs.get("temperature") is not None:
            kw["temperature"] = float(gen_kwargs["temperature"])
        for k in ("top_p", "top_k"):
            if gen_kwargs.get(k) is not None:
                kw[k] = gen_kwargs[k]
        kw.update(self.sampling_overrides)
        kw = {k: (int(v) if k == "top_k" else str(v) if k == "order" else float(v)) for k, v in kw.items()}
        return SamplingConfig(**kw)

    def _context(self, context: str) -> str:
        if not self.chat:
            return context
        return self._render([{"role": "user", "content": context}], add_generation_prompt=True)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..decode import check_request, generate_texts

        groups: dict[str, list] = {}  # one group per distinct gen_kwargs, in first-seen order
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_gen = _int("max_gen_toks", gen_kwargs.pop("max_gen_toks", None), 1)
            key = repr(sorted(gen_kwargs.items())) + repr(max_gen)
            groups.setdefault(key, []).append((n, self._context(context), until, max_gen, gen_kwargs))
        plans = []
        for items in groups.values():  # check every request before generating any
            max_gen, gen_kwargs = items[0][3], items[0][4]
            gen_length = self.gen_length or max_gen or DEFAULT_MAX_GEN_TOKS
            sampling = self._sampling(gen_kwargs)
            check_request(self.base, [self.base.encode(c) for _, c, *_ in items], gen_length, self.block_length)
            plans.append((items, gen_length, sampling))
        out: list[str | None] = [None] * len(requests)
        for items, gen_length, sampling in plans:
            # Repeats of one context get sample indices 0, 1, ... (lm-eval's `repeats`): distinct draws.
            by_count: dict[int, list[str]] = {}
            counts: dict[str, int] = {}
            for _, context, *_ in items:
                counts[context] = counts.get(context, 0) + 1
            for context, c in counts.items():
                by_count.setdefault(c, []).append(context)
            texts: dict[str, list] = {}
            for c, contexts in by_count.items():
                samples, _ = generate_texts(self.base, contexts, self.strategy, sampling, gen_length=gen_length,
                                            num_samples=c, batch_size=self.batch_size,
                                            block_length=self.block_length, seed=self.seed, sampler=self.sampler,
                                            progress=not disable_tqdm, cache=self.cache, unroll=self.unroll,
                                            cache_verify=self.cache_verify)
                for s in samples:
                    texts.setdefault(s["prompt"], []).append(s)
            taken: dict[str, int] = {}
            for n, context, until, max_gen, _ in items:
                i = taken.get(context, 0)
                taken[context] = i + 1
                s = texts[context][i]
                ids = s["token_ids"] if max_gen is None else s["token_ids"][:max_gen]
                text = cut_at_stops(self.base.decode(ids), until)
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    # --- likelihood ---------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split the way lm-eval's HF model does: trailing context
        spaces move to the continuation, and the pair is encoded whole, then cut after the context's
        length (so a merge across the seam is scored as part of the continuation)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.base.encode(context + continuation)
        n = len(self.base.encode(context))
        return whole[:n], whole[n:]

    def _bare(self, text: str) -> list[int]:
        """Ids of a text with no special tokens in front (a rolling document)."""
        return list(self.base.tokenizer.encode(text, add_special_tokens=False))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log p(continuation | context) per (context ids, continuation ids), each pair alone (so a score never
        depends on the other requests): the bound's `mc_num` draws batched `batch_size` at a time, or the chain
        rule's one row per continuation token, `batch_size` rows at a time."""
        from ..likelihood import chain_logprobs, estimate_logprob

        limit = self.base.max_length
        out = []
        for ctx, cont in pairs:
            if not cont:
                raise AdjustError("loglikelihood of an empty continuation")
            if len(cont) > limit:
                raise AdjustError(f"a continuation of {len(cont)} tokens exceeds the model's context of {limit}")
            ctx = ctx[max(0, len(ctx) + len(cont) - limit):]  # keep the context's end
            if self.likelihood == "chain":
                out.append(float(chain_logprobs(self.base, ctx + cont, len(ctx), batch_size=self.batch_size)[0]
                                 .double().sum()))
                continue
            ids = torch.tensor(ctx + cont, dtype=torch.long, device=self.base.device)
            eligible = torch.arange(len(ids), device=ids.device) >= len(ctx)
            out.append(estimate_logprob(self.base, ids, eligible, draws=self.mc_num, seed=self.seed,
                                        batch_size=self.batch_size))
        return out

    def _greedy(self, pairs) -> list[bool]:
        """Whether greedy exact decoding (K = 1, temperature 0) of the continuation's length gives it."""
        from ..decode import generate
        from ..sampling import SamplingConfig
        from ..strategies import make_strategy

        out = [False] * len(pairs)
        if not self.check_greedy:
            return out
        exact, greedy = make_strategy("exact"), SamplingConfig(temperature=0.0)
        by_len: dict[int, list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            by_len.setdefault(len(cont), []).append(i)
        for n, idx in by_len.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s: s + self.batch_size]
                ctxs = [pairs[i][0][max(0, len(pairs[i][0]) + n - self.base.max_length):] for i in chunk]
                gen = generate(self.base, ctxs, exact, greedy, gen_length=n, seed=self.seed)
                for b, i in enumerate(chunk):
                    out[i] = gen.tokens[b].tolist() == pairs[i][1]
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(self._context(c) if self.chat else c, x) for c, x in (r.args for r in requests)]
        scores = self._score(pairs)
        greedy = self._greedy(pairs)
        out = list(zip(scores, greedy))
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            ids = self._bare(text)
            if not ids:
                out.append(0.0)
                continue
            marker = -1  # stands for "no prefix": the first window is scored unconditionally
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=marker, max_seq_len=self.base.max_length, context_len=1)]
            pairs = [([t for t in ctx if t != marker], cont) for ctx, cont in windows]
            total = sum(self._score(pairs))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out
