"""Hugging Face bases behind `BaseModel`: Dream and LLaDA through their remote code (--remote-code),
and any masked LM (BERT, RoBERTa, ModernBERT, ...).

Real Dream and LLaDA checkpoints load natively by default (base/dream.py, base/llada.py); this
module's path for them runs only with `--remote-code`.

Each adapter returns *aligned* final hidden states (position i predicts token i) and the
frozen embedding / output head, so the decoding loop and the joint sampler treat every
family alike. What differs per family lives here and nowhere else:

* Dream predicts token i from position i-1 (its logits are shifted one place right).
  `dream_align` undoes that; it is the only place the shift is applied.
* LLaDA has no shift. Both Dream and LLaDA attend bidirectionally (their released remote
  code is non-causal).
* A masked LM's hidden state is the input of its MLM head (for BERT `cls.predictions`,
  transform included), so `lm_head(hidden)` reproduces the model's logits exactly.

Mask, EOS and pad ids come from the tokenizer or the config, never from literals.

With `--remote-code`, released Dream and LLaDA checkpoints run their own remote code
(`trust_remote_code=True`), written against transformers 4.x. Loading them with a transformers outside
`TRANSFORMERS_RANGE` is refused unless the environment variable ADJUST_ALLOW_TRANSFORMERS=1
is set (then it is tried, with a warning).

Test stand-ins (small transformers Qwen2/Llama models wrapped as Dream/LLaDA) live in the tests
(tests/stand_ins.py), not here: nothing in a model directory's config routes the loader to them.

Every load ends with a short self-check on a probe sequence: the captured hidden states must
reproduce the model's own (aligned) logits, and changing the last token must change the
first position's hidden state (bidirectional attention). A dtype the device cannot run
fails there, as one clear error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import AdjustError
from ..layers import positions_from_mask
from . import BaseModel, resolve_device, resolve_dtype

# Versions upstream pins for the remote code:
#   Dream: github.com/HKUNLP/Dream requirements.txt pins transformers==4.46.2 (with torch==2.5.1).
#   LLaDA: github.com/ML-GSAI/LLaDA README: "Please first install `transformers==4.38.2`".
KNOWN_GOOD_TRANSFORMERS = {"dream": "4.46.2", "llada": "4.38.2"}
# Accepted without the override: the pinned version up to (excluding) transformers 5, whose
# breaking API changes the 4.x remote code was never written for.
TRANSFORMERS_RANGE = {family: (pinned, "5.0.0") for family, pinned in KNOWN_GOOD_TRANSFORMERS.items()}
ALLOW_TRANSFORMERS_ENV = "ADJUST_ALLOW_TRANSFORMERS"

FAMILY_NAMES = {"dream": "Dream", "llada": "LLaDA", "masked-lm": "masked LM"}


# --- entry point -------------------------------------------------------------------------------
def load_hf_base(path, base_type: str, dtype: str = "float32", device: str = "cpu",
                 remote_code: bool = False) -> BaseModel:
    """Load a Dream, LLaDA or masked-LM base from a local directory (or the local HF cache).

    Code shipped in the model directory runs only with `remote_code=True` (`--remote-code`)."""
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    src, raw = _read_config(path)
    adapters = {"dream": DreamBase, "llada": LLaDABase, "masked-lm": MaskedLMBase}
    if base_type not in adapters:
        raise AdjustError(f"base type {base_type!r} is not a Hugging Face base ({', '.join(adapters)})")
    base = adapters[base_type].load(src, raw, torch_dtype, remote_code)
    base.net.to(dev)
    base.eval()
    _self_check(base, dtype, dev)
    return base


# --- the Dream shift: the one place it is applied ---------------------------------------------------
DREAM_SHIFT = 1  # Dream's output at position i predicts token i + DREAM_SHIFT (undone by dream_align)


def dream_align(h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Undo Dream's shift: aligned[:, i] = h[:, i-1], and a row's first real position keeps its own state.

    Dream's outputs at position i predict token i+1 (its generate() shifts logits the same way).
    The first position has no left neighbour, so it uses its own output (aligned[:, 0] = h[:, 0]);
    with left padding the same holds at each row's first real token, so a padded row is
    aligned exactly like the same row without padding. Works on hidden states and logits alike.
    """
    aligned = torch.cat([h[:, :1], h[:, :-1]], dim=1)
    if attention_mask is not None:
        rows = torch.arange(h.shape[0], device=h.device)
        first = attention_mask.long().argmax(dim=1)  # first real position per row (0 without padding)
        aligned[rows, first] = h[rows, first]
    return aligned


# --- adapters --------------------------------------------------------------------------------------
class _HeadReached(Exception):
    """Raised by a forward pre-hook on the output head: the hidden state is captured, stop the pass."""


class _HFBase(BaseModel):
    """Shared by the adapters: `net` is the transformers model; `_head` = (entry, fn): entry is the module
    whose input is the final hidden state (captured with a pre-hook, so the logits over the vocabulary are
    never computed; None: read the returned hidden states), fn maps hidden states to logits. A plain tuple,
    so these modules (already inside `net`) are not registered twice."""

    family = ""
    _head: tuple = (None, None)

    def __init__(self, net: nn.Module, tokenizer, name: str):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.name = name

    def _call(self, input_ids, attention_mask, **kw):  # run the model on this family's inputs
        raise NotImplementedError

    def _raw_hidden(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Final post-norm hidden states exactly as the model feeds them to its head (not yet aligned)."""
        entry = self._head[0]
        if entry is None:  # head not a separate module (tied LLaDA): use the returned states
            return self._call(input_ids, attention_mask, output_hidden_states=True).hidden_states[-1]
        box = {}

        def grab(module, args):
            box["h"] = args[0]
            raise _HeadReached

        handle = entry.register_forward_pre_hook(grab)
        try:
            self._call(input_ids, attention_mask)
        except _HeadReached:
            pass
        finally:
            handle.remove()
        if "h" not in box:
            raise AdjustError(f"{self.name}: the model's forward pass never reached its output head; "
                              "this model layout is not supported")
        return box["h"]

    def _raw_logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The model's own logits, unaligned (used only by the load-time self-check and the tests)."""
        return self._call(input_ids, attention_mask).logits

    def embed(self, input_ids):
        return self.net.get_input_embeddings()(input_ids)

    @staticmethod
    def _padding(attention_mask):
        """None when there is nothing to mask (lets attention use its fastest kernel)."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        return attention_mask


class HFDecoderBase(_HFBase):
    """Dream or LLaDA through its remote code: a bidirectional decoder-style transformer."""

    family = ""

    def __init__(self, net, tokenizer, name: str):
        super().__init__(net, tokenizer, name)
        fam = FAMILY_NAMES[self.family]
        cfg = net.config
        out, inp = net.get_output_embeddings(), net.get_input_embeddings()
        if out is None or inp is None:
            raise AdjustError(f"{name}: the model has no input/output embedding; not a {fam} model")
        # A tied LLaDA returns its input embedding as the "output embedding" and applies it with F.linear.
        self._tied = out is inp or isinstance(out, nn.Embedding)
        self._head = (None if self._tied else out, None)
        self.mask_id = _mask_id(self.family, tokenizer, cfg, name)
        self.eos_id = _first_id(tokenizer.eos_token_id, getattr(cfg, "eos_token_id", None))
        self.pad_id = _first_id(tokenizer.pad_token_id, getattr(cfg, "pad_token_id", None), self.eos_id, self.mask_id)
        self.vocab_size = int(out.weight.shape[0])
        self.hidden_size = int(inp.weight.shape[1])
        self.max_length = _first_id(getattr(cfg, "max_position_embeddings", None),
                                    getattr(cfg, "max_sequence_length", None), 2048)
        self.num_heads = _first_id(getattr(cfg, "num_attention_heads", None), getattr(cfg, "n_heads", None),
                                   max(1, self.hidden_size // 64))
        theta = _rope_theta(cfg)
        if theta is not None:
            self.rope_theta = theta
        self._logit_scale = (1.0 / self.hidden_size ** 0.5) if getattr(cfg, "scale_logits", False) else None
        self.banned_ids = _banned(self.mask_id, self.pad_id, self.eos_id, len(tokenizer), self.vocab_size)

    @classmethod
    def load(cls, src: str, raw: dict, torch_dtype, remote_code: bool = False) -> "HFDecoderBase":
        fam = FAMILY_NAMES[cls.family]
        auto_map = raw.get("auto_map") or {}
        if not auto_map:
            raise AdjustError(f"{src} holds a {raw.get('model_type') or 'unknown'} model without {fam}'s remote "
                              f"code (no auto_map in config.json), so it is not a {fam} checkpoint")
        if not remote_code:
            raise AdjustError(f"{src} is a {fam} checkpoint whose model class is Python code shipped in the "
                              "directory (auto_map in config.json); it runs only if you pass --remote-code")
        check_transformers_version(cls.family)
        net = _from_pretrained(_auto_class(auto_map), src, torch_dtype, remote=True, what=fam)
        return cls(net, _tokenizer(src, remote=True), src)

    def _call(self, input_ids, attention_mask, **kw):
        return self._call_remote(input_ids, self._padding(attention_mask), **kw)

    def _call_remote(self, input_ids, mask, **kw):
        raise NotImplementedError

    def _align(self, t: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return t

    def hidden_states(self, input_ids, attention_mask=None):
        return self._align(self._raw_hidden(input_ids, attention_mask), self._padding(attention_mask))

    def lm_head(self, hidden):
        out = self.net.get_output_embeddings()
        hidden = hidden.to(out.weight.dtype)
        logits = nn.functional.linear(hidden, out.weight, getattr(out, "bias", None)) if self._tied else out(hidden)
        return logits * self._logit_scale if self._logit_scale is not None else logits

    def aligned_model_logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The model's own logits, aligned like `hidden_states` (self-check and tests)."""
        return self._align(self._raw_logits(input_ids, attention_mask), self._padding(attention_mask))


class DreamBase(HFDecoderBase):
    """Dream. Outputs are shifted one place; `dream_align` realigns them."""

    family = "dream"

    def _align(self, t, attention_mask=None):
        return dream_align(t, attention_mask)

    def _call_remote(self, input_ids, mask, **kw):
        # Dream's remote code takes "full" or a 4D boolean mask plus position ids, positionally, as its own
        # generate() passes them. Only keys are masked, so pad rows still see real keys (no all-masked rows).
        if mask is None:
            return self.net(input_ids, "full", None, **kw)
        B, L = input_ids.shape
        keys = mask.bool()[:, None, None, :].expand(B, 1, L, L)
        return self.net(input_ids, keys, positions_from_mask(mask, input_ids.shape, input_ids.device), **kw)


class LLaDABase(HFDecoderBase):
    """LLaDA. No shift."""

    family = "llada"

    def _call_remote(self, input_ids, mask, **kw):
        return self.net(input_ids=input_ids, attention_mask=mask, **kw)  # 2D padding mask


class MaskedLMBase(_HFBase):
    """Any `AutoModelForMaskedLM` (BERT, RoBERTa, ModernBERT, DistilBERT, ...): no shift, bidirectional.

    hidden = the final hidden states fed to the MLM head; lm_head = that whole head (for BERT
    `cls.predictions`, transform included), so lm_head(hidden) equals the model's logits.
    EOS is the separator token; the other special tokens (cls, pad, mask, unk, ...) are banned.
    """

    family = "masked-lm"

    def __init__(self, net, tokenizer, name: str):
        super().__init__(net, tokenizer, name)
        cfg = net.config
        self._head = _mlm_head(net, name)
        if tokenizer.mask_token_id is None:
            raise AdjustError(f"{name}: the tokenizer has no mask token, so this is not a masked LM")
        self.mask_id = int(tokenizer.mask_token_id)
        self.eos_id = _first_id(tokenizer.sep_token_id, tokenizer.eos_token_id)
        self.pad_id = _first_id(tokenizer.pad_token_id, getattr(cfg, "pad_token_id", None), self.eos_id, self.mask_id)
        self.vocab_size = int(net.get_output_embeddings().weight.shape[0])
        self.hidden_size = int(cfg.hidden_size)
        self.embed_size = int(net.get_input_embeddings().weight.shape[1])  # < hidden_size in ALBERT, ELECTRA
        self.max_length = _mlm_max_length(net, tokenizer)
        self.num_heads = int(getattr(cfg, "num_attention_heads", None) or max(1, self.hidden_size // 64))
        theta = _rope_theta(cfg)
        if theta is not None:
            self.rope_theta = theta
        special = [i for i in tokenizer.all_special_ids if i is not None and i != self.eos_id]
        self.banned_ids = tuple(sorted(set(special) | set(_banned(self.mask_id, self.pad_id, self.eos_id,
                                                                  len(tokenizer), self.vocab_size))))

    @classmethod
    def load(cls, src: str, raw: dict, torch_dtype, remote_code: bool = False) -> "MaskedLMBase":
        from transformers import AutoModelForMaskedLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        model_type = str(raw.get("model_type", "") or "")
        if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            archs = ", ".join(raw.get("architectures") or []) or "no architectures"
            raise AdjustError(f"{src} holds a {model_type or 'unknown'} model ({archs}) with no masked-LM head "
                              "(a causal, left-to-right LM has no mask token); it cannot be used as a masked LM")
        net = _from_pretrained(AutoModelForMaskedLM, src, torch_dtype, remote=False, what="masked LM")
        return cls(net, _tokenizer(src, remote=False), src)

    def _call(self, input_ids, attention_mask, **kw):
        return self.net(input_ids=input_ids, attention_mask=self._padding(attention_mask), **kw)

    def encode(self, text: str) -> list[int]:
        """`Base.encode` (the tokenizer's leading specials, [CLS] or <s>, once; off with --no-specials), checked:
        a piece the tokenizer does not know ([UNK]) or a special token written in the text ([SEP], </s>, ...)
        is refused, never passed on silently.

        The end token ([SEP], </s>) is this base's EOS: generation writes it."""
        ids = super().encode(text)
        tok = self.tokenizer
        body = ids[len(self.prompt_prefix()):] if self.prompt_specials else ids
        unk = tok.unk_token_id
        if unk is not None and unk in body:
            raise AdjustError(f"the prompt {text[:40]!r} holds text {self.name}'s tokenizer does not know "
                              f"({tok.unk_token}); {unknown_text_hint(tok, text)}")
        special = set(tok.all_special_ids) - {unk}
        inside = [t for t in body if t in special]
        if inside:
            names = ", ".join(dict.fromkeys(tok.convert_ids_to_tokens(inside)))
            raise AdjustError(f"the prompt {text[:40]!r} contains the special token(s) {names}; a prompt is plain "
                              "text (the leading special tokens are added for you, the closing ones never)")
        return ids

    def hidden_states(self, input_ids, attention_mask=None):
        return self._raw_hidden(input_ids, attention_mask)

    def lm_head(self, hidden):
        return self._head[1](hidden.to(self.net.get_output_embeddings().weight.dtype))

    def aligned_model_logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self._raw_logits(input_ids, attention_mask)


def unknown_text_hint(tok, text: str) -> str:
    """What a prompt with unknown pieces should change: the vocabulary's case, spaces between single letters."""
    special = set(tok.all_special_ids)
    sample = [t for t in tok.convert_ids_to_tokens([i for i in range(min(len(tok), 64)) if i not in special])
              if isinstance(t, str)]
    letters = [t for t in sample if len(t) == 1 and t.isalpha()]
    hints = []
    if letters and all(t.isupper() for t in letters) and any(c.islower() for c in text):
        hints.append("its letters are capitals: write the text in upper case")
    if letters and len(letters) >= len(sample) // 2 and " " not in text.strip() and len(text.strip()) > 1:
        hints.append("its tokens are single letters: separate them with spaces")
    shown = " ".join(sample[:25])
    return ("; ".join(hints) + f" (its tokens look like: {shown})") if hints else f"its tokens look like: {shown}"


def _mlm_head(net, name):
    """(entry module whose input is the hidden state, callable hidden -> logits) for known MLM layouts."""
    if isinstance(getattr(net, "cls", None), nn.Module):  # BERT and relatives: cls.predictions(transform + decoder)
        return net.cls, net.cls
    if isinstance(getattr(net, "lm_head", None), nn.Module):  # RoBERTa, XLM-R, CamemBERT, ...
        return net.lm_head, net.lm_head
    if isinstance(getattr(net, "head", None), nn.Module) and isinstance(getattr(net, "decoder", None), nn.Module):
        return net.head, lambda h: net.decoder(net.head(h))  # ModernBERT
    if isinstance(getattr(net, "predictions", None), nn.Module):  # ALBERT
        return net.predictions, net.predictions
    if isinstance(getattr(net, "generator_predictions", None), nn.Module):  # ELECTRA's generator
        return net.generator_predictions, lambda h: net.generator_lm_head(net.generator_predictions(h))
    if isinstance(getattr(net, "lm_predictions", None), nn.Module):  # DeBERTa-v2/v3 (non-legacy head)
        return net.lm_predictions, lambda h: net.lm_predictions(h, net.deberta.embeddings.word_embeddings)
    if isinstance(getattr(net, "vocab_transform", None), nn.Module):  # DistilBERT
        return net.vocab_transform, lambda h: net.vocab_projector(
            net.vocab_layer_norm(net.activation(net.vocab_transform(h))))
    raise AdjustError(f"{name}: unsupported masked-LM head layout ({type(net).__name__}); supported: BERT-like "
                      "(cls), RoBERTa-like (lm_head: XLM-R, ESM), ModernBERT, DistilBERT, ALBERT, ELECTRA, DeBERTa-v2")


# --- checks ----------------------------------------------------------------------------------------
def check_transformers_version(family: str) -> None:
    """Refuse remote code with an untested transformers, unless ADJUST_ALLOW_TRANSFORMERS=1."""
    from packaging.version import Version

    lo, hi = TRANSFORMERS_RANGE[family]
    installed = installed_transformers()
    if Version(lo) <= Version(installed) < Version(hi):
        return
    fam = FAMILY_NAMES[family]
    if os.environ.get(ALLOW_TRANSFORMERS_ENV) == "1":
        warnings.warn(f"{fam} remote code is known to work with transformers=={KNOWN_GOOD_TRANSFORMERS[family]}; "
                      f"trying transformers {installed} because {ALLOW_TRANSFORMERS_ENV}=1", stacklevel=3)
        return
    pinned = KNOWN_GOOD_TRANSFORMERS[family]
    raise AdjustError(f"{fam}'s remote code is known to work with transformers=={pinned} (accepted: >={lo},<{hi}), "
                      f"but transformers {installed} is installed; install transformers=={pinned} "
                      f"or set {ALLOW_TRANSFORMERS_ENV}=1 to try anyway")


@torch.no_grad()
def _self_check(base: _HFBase, dtype: str, device) -> None:
    """Probe once: hidden states reproduce the model's logits, attention is bidirectional, dtype runs."""
    skip = {*base.banned_ids, base.eos_id}
    usable = [i for i in range(min(len(base.tokenizer), base.vocab_size)) if i not in skip]
    if len(usable) < 2:
        raise AdjustError(f"{base.name}: the tokenizer has too few ordinary tokens")
    L = min(8, base.max_length)
    ids = torch.tensor([usable[(7 * j) % len(usable)] for j in range(L)], device=device)[None]
    ids[0, L // 2] = base.mask_id
    other = ids.clone()
    other[0, -1] = usable[0] if ids[0, -1] != usable[0] else usable[1]
    try:
        hidden = base.hidden_states(ids)
        logits = base.aligned_model_logits(ids)
        hidden_other = base.hidden_states(other)
        mine = base.lm_head(hidden).float()
    except RuntimeError as e:  # e.g. a half-precision kernel missing on this device
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdjustError(f"{base.name} does not run with --dtype {dtype} on {device}: {msg}") from None
    ref = logits.float()
    tol = 1e-4 if base.dtype == torch.float32 else 2e-2
    if mine.shape != ref.shape or not torch.allclose(mine, ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol):
        raise AdjustError(f"{base.name}: its hidden states do not reproduce the model's logits; "
                          f"this {type(base.net).__name__} layout is not supported")
    if not torch.isfinite(hidden).all():
        raise AdjustError(f"{base.name} produces non-finite hidden states with --dtype {dtype} on {device}")
    if torch.allclose(hidden[0, 0].float(), hidden_other[0, 0].float(), atol=0, rtol=0):
        raise AdjustError(f"{base.name}: attention is causal after loading (position 0 ignores later tokens); "
                          "masked diffusion needs bidirectional attention, which this transformers version "
                          "did not give for this model")


# --- helpers ---------------------------------------------------------------------------------------
def _read_config(path) -> tuple[str, dict]:
    """(source for from_pretrained, raw config dict); a local directory, or a hub id in the local cache."""
    from ..io import read_json

    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise AdjustError(f"base model path is not a directory: {path}")
        try:
            has_config = (p / "config.json").is_file()
        except OSError as e:  # e.g. a directory this user may not enter
            raise AdjustError(f"cannot read base model directory {path}: {e.strerror or e}") from None
        if not has_config:
            raise AdjustError(f"{path} is not a model directory (no config.json)")
        return str(p), read_json(p / "config.json", "model config.json")
    cached = None
    if "/" in str(path) and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), "config.json")
        except Exception:
            cached = None
    if not isinstance(cached, str):
        raise AdjustError(f"base model {str(path)!r} is neither a local directory nor in the local Hugging Face "
                          "cache, and downloads are not possible here; pass a local copy of the model directory")
    return str(path), read_json(cached, "model config.json")


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def _dtype_kwarg(torch_dtype) -> dict:
    from packaging.version import Version

    return {"dtype" if Version(installed_transformers()) >= Version("4.56") else "torch_dtype": torch_dtype}


def _from_pretrained(auto, src: str, torch_dtype, remote: bool, what: str):
    try:
        return auto.from_pretrained(src, trust_remote_code=remote, local_files_only=True, **_dtype_kwarg(torch_dtype))
    except AdjustError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/ImportError/KeyError on bad checkpoints
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise AdjustError(f"could not load {what} from {src}: {msg}") from None


def _tokenizer(src: str, remote: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=remote, local_files_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise AdjustError(f"could not load the tokenizer of {src}: {msg}") from None


def _auto_class(auto_map: dict):
    import transformers

    for name in ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM"):
        if name in auto_map:
            return getattr(transformers, name)
    raise AdjustError(f"config.json auto_map names no model class ({', '.join(auto_map)})")


def _first_id(*values):
    for v in values:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return None


def _mask_id(family: str, tokenizer, cfg, name: str) -> int:
    """Dream: tokenizer's mask token, else config.mask_token_id; LLaDA: config first. They must agree."""
    from_tok, from_cfg = tokenizer.mask_token_id, getattr(cfg, "mask_token_id", None)
    if from_tok is not None and from_cfg is not None and int(from_tok) != int(from_cfg):
        raise AdjustError(f"{name}: the tokenizer's mask token ({from_tok}) and config.mask_token_id ({from_cfg}) "
                          "disagree")
    order = (from_tok, from_cfg) if family == "dream" else (from_cfg, from_tok)
    mask = _first_id(*order)
    if mask is None:
        raise AdjustError(f"{name}: no mask token (neither tokenizer.mask_token nor config.mask_token_id); "
                          f"not a {FAMILY_NAMES[family]} model")
    return mask


def _banned(mask_id, pad_id, eos_id, tokenizer_len: int, vocab_size: int) -> tuple[int, ...]:
    """Mask, pad (unless it doubles as EOS, as in Dream and LLaDA) and the vocabulary's padding rows."""
    banned = {mask_id, *range(min(tokenizer_len, vocab_size), vocab_size)}
    if pad_id is not None and pad_id != eos_id:
        banned.add(pad_id)
    return tuple(sorted(i for i in banned if 0 <= i < vocab_size))


def _rope_theta(cfg):
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
        if theta is None:  # per-layer-type parameters (e.g. ModernBERT): take full attention's
            inner = params.get("full_attention")
            theta = inner.get("rope_theta") if isinstance(inner, dict) else None
    return float(theta) if theta is not None else None


def _mlm_max_length(net, tokenizer) -> int:
    cfg = net.config
    n = int(getattr(cfg, "max_position_embeddings", None) or 512)
    emb = getattr(getattr(net, "base_model", None), "embeddings", None)
    pad_idx = getattr(emb, "padding_idx", None)  # RoBERTa-style positions start after the pad index
    if pad_idx is not None and hasattr(emb, "position_embeddings"):
        n -= int(pad_idx) + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max)
    return n
