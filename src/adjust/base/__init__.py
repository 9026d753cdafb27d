"""Frozen denoisers behind one small interface (docs/method.md section 7).

Every family (our tiny model, Dream, LLaDA, any masked LM) is wrapped by a `BaseModel`
subclass that returns *aligned* outputs: position i's hidden state and logits predict
token i. Model-specific facts (the Dream shift, mask ids) live in the adapter and nowhere
else; decoding strategies never see a literal token id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdjustError


@dataclass
class BaseOutput:
    logits: torch.Tensor  # (B, L, V), aligned: logits[:, i] predicts token i
    hidden: torch.Tensor  # (B, L, H), final post-norm hidden states, aligned the same way


class BaseModel(nn.Module):
    """The interface the decoding loop, the sampler and distillation rely on.

    Subclasses set: name, tokenizer, mask_id, eos_id, pad_id, vocab_size, hidden_size,
    max_length, and implement `hidden_states`, `embed` and `lm_head`.
    """

    name: str
    mask_id: int
    eos_id: int | None
    pad_id: int
    vocab_size: int
    hidden_size: int
    max_length: int
    # Token ids the model must never generate (mask, pad, vocabulary padding); set by subclasses.
    banned_ids: tuple[int, ...] = ()
    # Whether prompts get the special tokens the model was trained with (a masked LM's [CLS]); --no-specials.
    prompt_specials: bool = True
    # Tokens that also end an answer besides eos_id (e.g. a tokenizer EOS other than the config's).
    extra_stop_ids: tuple[int, ...] = ()
    # Prompts are user messages in the tokenizer's chat template (set by `use_chat_template`, --chat).
    chat: bool = False

    # --- what each adapter implements ---------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned final hidden states (B, L, H) for one full forward pass."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen input token embedding (B, L) -> (B, L, H)."""
        raise NotImplementedError

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen output head (..., H) -> (..., V), without banning anything."""
        raise NotImplementedError

    # --- key/value cache (decode.generate --cache prefix|dual) ------------------------------
    # True where the adapter implements `cache_pass` and `span_hidden` (our tiny model, native Dream and
    # LLaDA: all `layers.Transformer`); a base without (transformers masked LMs, remote code)
    # makes generate refuse --cache rather than run uncached.
    supports_cache: bool = False

    def cache_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """One full pass that also returns its keys/values: (aligned hidden (B, L, H), cache).

        The hidden states are those `hidden_states` returns (the same computation)."""
        raise AdjustError(f"{self.name} cannot take a key/value cache")

    def span_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache, start: int,
                    end: int, verify: int = 0) -> torch.Tensor:
        """Aligned hidden states (B, end - start, H) of positions start .. end-1 only, computed afresh while every
        other position is seen through `cache` (from `cache_pass` on an earlier canvas). `verify` > 0: also
        recompute, and refresh in `cache`, that many other positions per sequence, those whose keys/values moved
        most (`layers.Transformer.forward_span`)."""
        raise AdjustError(f"{self.name} cannot take a key/value cache")

    # --- shared behaviour ---------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head in float32 with never-generated tokens (the mask itself, padding) at -inf."""
        logits = self.lm_head(hidden).float()
        if self.banned_ids:  # out of place: lm_head may return a view of `hidden`
            banned = torch.tensor(self.banned_ids, device=logits.device)
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseOutput:
        hidden = self.hidden_states(input_ids, attention_mask)
        return BaseOutput(self.logits(hidden), hidden)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def identity(self) -> dict:
        """What a sampler records about the base it was trained on, to refuse any other."""
        return {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "fingerprint": embedding_fingerprint(self),
        }

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: EOS, the chat template's end-of-turn token, extra_stop_ids."""
        cached = self.__dict__.get("_stop_ids")
        if cached is None:
            ids = {*self.extra_stop_ids, *end_of_turn_ids(getattr(self, "tokenizer", None))}
            if self.eos_id is not None:
                ids.add(self.eos_id)
            cached = self.__dict__["_stop_ids"] = tuple(sorted(ids))
        return cached

    def use_chat_template(self) -> None:
        """Encode prompts as a user message in the tokenizer's chat template (--chat); one clear error without one."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise AdjustError(f"--chat: the tokenizer of {self.name} has no chat template (no chat_template in "
                              "tokenizer_config.json or chat_template.jinja); this is not an instruct model")
        self.chat = True

    def prompt_prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (`tokenizer(text)`'s front): BERT's [CLS], RoBERTa's
        <s>, ESM's <cls>, LLaDA's BOS; none for Dream and our models. The one place a prompt's leading specials
        are decided. The closing ones ([SEP], </s>, <eos>) never go in a prompt: generation continues after it."""
        cached = self.__dict__.get("_prompt_prefix")
        if cached is None:
            tok = self.tokenizer
            plain = list(tok.encode("a", add_special_tokens=False))
            full = list(tok.encode("a", add_special_tokens=True))
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
            special = set(tok.all_special_ids)
            front = full[:at] if at is not None else []
            cached = self.__dict__["_prompt_prefix"] = [t for t in front if t in special]
        return list(cached)

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids: `prompt_prefix()` (unless --no-specials), then the text ("" = unconditional:
        the prefix alone). Plain text, or with --chat the user message in the chat template followed by the
        assistant's generation prompt (the template's special tokens kept); a prefix the text already starts
        with (a template's BOS) is not doubled."""
        from ..data import check_text

        tok = self.tokenizer
        if text:
            text = check_text(text)
            if self.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        ids = list(tok.encode(text, add_special_tokens=False)) if text else []
        prefix = self.prompt_prefix() if self.prompt_specials else []
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def answer_end(self, ids) -> int:
        """The position of the first stop token in `ids` (EOS or end-of-turn: the answer ends there), or len(ids)."""
        stops = set(self.stop_ids)
        return next((n for n, i in enumerate(ids) if int(i) in stops), len(ids))

    def decode(self, ids) -> str:
        """Text of a generation, cut at the first stop token (EOS or end-of-turn; later positions are padding)."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids[: self.answer_end(ids)] if i not in self.banned_ids]
        return self.tokenizer.decode(ids)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token a chat template puts right after an assistant's message (its end of turn), if any."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    marker = "ADJUSTENDMARKER"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn token known
        return []
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in added else []


def embedding_fingerprint(base: BaseModel) -> str:
    """A short hash of a fixed slice of the embedding matrix: cheap, and different for any other model."""
    with torch.no_grad():
        probe = torch.arange(min(64, base.vocab_size), device=base.device)[None]
        rows = base.embed(probe).to(torch.bfloat16).cpu()  # bf16: the same hash whichever --dtype loaded it
    return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


BASE_TYPES = ("auto", "tiny", "dream", "llada", "masked-lm")

DEFAULT_MODEL = "shakespeare-base"  # the shipped model used when no --base is given


def shipped_models_dir() -> Path:
    """The shipped models: adjust/shipped_models in an installed package (`pip install .`), models/ in a
    checkout (editable installs, or src/ on the path)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "shipped_models"
    return installed if installed.is_dir() else package.parents[1] / "models"


def default_base_path() -> Path:
    """The shipped default model (shipped_models_dir() / DEFAULT_MODEL), or ADJUST_BASE when set."""
    import os

    return Path(os.environ.get("ADJUST_BASE") or shipped_models_dir() / DEFAULT_MODEL)


def load_base(path: str | Path | None = None, base_type: str = "auto", dtype: str = "float32",
              device: str = "cpu", remote_code: bool = False, chat: bool = False) -> BaseModel:
    """Load a base model from a directory (or hub id) and return it frozen, in eval mode.

    Dream and LLaDA checkpoints run on our own code (base/native.py) unless `remote_code` is set:
    then the code shipped in the model directory runs (transformers' `trust_remote_code`, the
    `--remote-code` flag), as before."""
    from .tiny import TinyBase

    if base_type not in BASE_TYPES:
        raise AdjustError(f"unknown --base-type {base_type!r}; choose one of {', '.join(BASE_TYPES)}")
    path = default_base_path() if path is None else path
    if base_type == "auto":
        base_type = detect_base_type(path)
    if base_type == "tiny":
        base = TinyBase.load(path)
        base = base.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
    elif base_type in ("dream", "llada") and not remote_code:
        from .dream import DreamNative
        from .llada import LLaDANative

        base = {"dream": DreamNative, "llada": LLaDANative}[base_type].load(path, dtype=dtype, device=device)
    else:
        from . import hf

        base = hf.load_hf_base(path, base_type, dtype=dtype, device=device, remote_code=remote_code)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    if chat:
        base.use_chat_template()
    return base


def detect_base_type(path) -> str:
    from ..io import read_json

    p = Path(path)
    if not p.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")):
            raise AdjustError(f"base model {path!r} is not a local directory and downloads are not "
                              "possible here; pass a local copy of the model directory")
        raise AdjustError(f"base model directory not found: {path}")
    if not p.is_dir():
        raise AdjustError(f"base model path is not a directory: {path}")
    cfg = read_json(p / "config.json", "model config.json")
    model_type = str(cfg.get("model_type", "")).lower()
    archs = " ".join(cfg.get("architectures") or []).lower()
    if model_type == "adjust-tiny":
        return "tiny"
    if model_type == "dream" or "dream" in archs:
        return "dream"
    if model_type == "llada" or "llada" in archs:
        return "llada"
    if "maskedlm" in archs or model_type in ("bert", "roberta", "modernbert", "distilbert", "deberta-v2", "electra"):
        return "masked-lm"
    raise AdjustError(f"{path} holds a {model_type or 'unknown'!s} model ({archs or 'no architectures'}), "
                      "which is not a masked diffusion or masked LM; pass --base-type to force one")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdjustError(f"--device {device} asked for, but no CUDA device is available here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AdjustError(f"unknown --device {device!r}; use cpu, cuda or auto") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise AdjustError(f"unknown --dtype {dtype!r}; choose float32, bfloat16 or float16")
    return table[dtype]
