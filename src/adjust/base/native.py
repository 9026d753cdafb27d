"""Dream and LLaDA run by our own code: no Python from the model directory, any transformers.

Both are `layers.Transformer` (RMSNorm, rotary positions, SwiGLU, bidirectional SDPA attention,
grouped-query for Dream), built on the meta device and filled from the published sharded
safetensors (base/checkpoint.py). Per family (base/dream.py, base/llada.py): how config.json
names the sizes, how the checkpoint names the weights, and whether outputs are shifted
(Dream: yes, undone by `hf.dream_align`, the one place the shift lives).

Tokenizers are built with transformers' own classes from the files the checkpoints ship
(`tokenizer.json`, or Qwen2-style `vocab.json` + `merges.txt` + the added tokens listed in
`tokenizer_config.json`), never with a tokenizer class named by the directory.

Never sampled (`banned_ids`): the mask token, every added token of the tokenizer (reserved,
role, tool and image tokens, BOS) except the stop tokens, pad unless it is EOS, and the rows of
the embedding beyond the tokenizer. Stop tokens (`stop_ids`): EOS and the chat template's
end-of-turn token (Dream's <|im_end|>, LLaDA's <|eot_id|>), which end an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdjustError
from ..layers import Transformer
from . import BaseModel, resolve_device, resolve_dtype
from .hf import _first_id


@dataclass
class NativeConfig:
    """The sizes of one Dream/LLaDA network, read from config.json by the family's `read_config`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    max_length: int
    mask_id: int | None
    eos_id: int | None
    pad_id: int | None

    def build(self) -> Transformer:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads or (self.hidden_size // self.num_heads) % 2:
            raise AdjustError(f"config.json: hidden size {self.hidden_size} with {self.num_heads} heads and "
                              f"{self.num_kv_heads} key/value heads is not a valid attention layout")
        return Transformer(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                           self.norm_eps, self.rope_theta, self.tie_embeddings, self.num_kv_heads, self.qkv_bias,
                           init_embedding=False)


def field(raw: dict, name: str, kind=int, default=None, family: str = ""):
    """One config.json field, by its published name, with its type checked."""
    value = raw.get(name, default)
    if value is None:
        if default is None and kind is not None:
            raise AdjustError(f"{family} config.json lacks the field {name!r}")
        return None
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        out = kind(value)
        if kind is int and out != value:
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise AdjustError(f"{family} config.json field {name!r} = {value!r} is not a valid {kind.__name__}") from None


def config_id(value) -> int | None:
    """A token id field of config.json (an int, or a list whose first entry is the main one)."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdjustError(f"config.json token id {value!r} is not an integer")
    return value


class NativeBase(BaseModel):
    """A Dream or LLaDA network behind the base interface. Subclasses: family, read_config, slots, _align."""

    family = ""

    def __init__(self, cfg: NativeConfig, net: Transformer, tokenizer, name: str):
        super().__init__()
        self.cfg, self.model, self.tokenizer, self.name = cfg, net, tokenizer, name
        self.vocab_size, self.hidden_size, self.max_length = cfg.vocab_size, cfg.hidden_size, cfg.max_length
        self.num_heads, self.rope_theta = cfg.num_heads, cfg.rope_theta
        self.mask_id = _mask_id(tokenizer, cfg, name)
        self.eos_id = _first_id(cfg.eos_id, tokenizer.eos_token_id)
        if self.eos_id is None:
            raise AdjustError(f"{name}: no EOS token (neither config.json eos_token_id nor the tokenizer's)")
        self.pad_id = _first_id(cfg.pad_id, tokenizer.pad_token_id, self.eos_id)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != self.eos_id:
            self.extra_stop_ids = (int(tokenizer.eos_token_id),)  # LLaDA-Instruct: <|eot_id|> beside <|endoftext|>
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        banned = {self.mask_id, *added, *range(min(len(tokenizer), self.vocab_size), self.vocab_size)}
        if self.pad_id not in self.stop_ids:
            banned.add(self.pad_id)
        self.banned_ids = tuple(sorted(i for i in banned - set(self.stop_ids) if 0 <= i < self.vocab_size))

    # --- per family -------------------------------------------------------------------------
    @classmethod
    def read_config(cls, raw: dict) -> NativeConfig:
        raise NotImplementedError

    @classmethod
    def slots(cls, cfg: NativeConfig) -> dict[str, tuple[str, int, int]]:
        """checkpoint tensor name -> (our parameter name, first row, last row)."""
        raise NotImplementedError

    def _align(self, h, attention_mask):
        return h

    # How many positions to the left `_align` reads (Dream: its one-place shift); a span of aligned hidden
    # states needs the network's outputs from that many positions before it.
    align_reach = 0
    supports_cache = True

    # --- the interface ----------------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask=None):
        attention_mask = _needed(attention_mask)
        return self._align(self.model(input_ids, attention_mask), attention_mask)

    def cache_pass(self, input_ids, attention_mask=None):
        attention_mask, kv = _needed(attention_mask), []
        return self._align(self.model(input_ids, attention_mask, keep=kv), attention_mask), kv

    def span_hidden(self, input_ids, attention_mask, cache, start, end, verify=0):
        """Aligned states of start .. end-1: the network runs on start - align_reach .. end-1 (Dream: the aligned
        state of the span's first position is the output of the position just left of it), then `_align` on
        that window (a row whose first real token lies inside the window keeps that token's own state)."""
        attention_mask = _needed(attention_mask)
        s = max(start - self.align_reach, 0)
        h = self.model.forward_span(input_ids, attention_mask, cache, s, end, verify)
        return self._align(h, None if attention_mask is None else attention_mask[:, s:end])[:, start - s:]

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def lm_head(self, hidden):
        return self.model.output(hidden)

    @classmethod
    def load(cls, path, dtype: str = "float32", device: str = "cpu") -> "NativeBase":
        from .checkpoint import fill_from_checkpoint
        from .hf import FAMILY_NAMES, _read_config

        src, raw = _read_config(path)  # a local directory, or a hub id already in the local cache
        path = Path(src) if Path(src).is_dir() else _cached_dir(src)
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        fam = FAMILY_NAMES[cls.family]
        if str(raw.get("model_type", "")).lower() != cls.family:
            raise AdjustError(f"{src} holds a {raw.get('model_type') or 'unknown'} model, not a {fam} checkpoint "
                              f"(config.json model_type {cls.family!r})")
        cfg = cls.read_config(raw)
        tokenizer = load_tokenizer(path)
        with torch.device("meta"):
            net = cfg.build()
        fill_from_checkpoint(net, path, cls.slots(cfg), torch_dtype, dev)
        base = cls(cfg, net, tokenizer, str(path))
        _probe(base, dtype, dev)
        return base


def _needed(attention_mask):
    """None when nothing is masked: the fastest attention kernel and the cached rotary table."""
    if attention_mask is not None and bool(attention_mask.bool().all()):
        return None
    return attention_mask


def _cached_dir(hub_id: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    return Path(try_to_load_from_cache(hub_id, "config.json")).parent


def transformer_slots(cfg: NativeConfig, top: dict[str, str], layer: str, names: dict[str, str]) -> dict:
    """checkpoint tensor name -> (our parameter, first row, last row) for one family's naming.

    `top`: checkpoint names of "embed", "norm" and "head" (the head is skipped when tied); `layer`: the
    prefix of layer N with "{n}"; `names`: checkpoint names (without ".weight") of q, k, v, o, gate, up,
    down, attn_norm, mlp_norm. q, k, v fill row ranges of the fused `qkv` (biases too when the config
    has them), gate and up those of `gate_up`."""
    hd = cfg.hidden_size // cfg.num_heads
    q, kv, inter, H = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size, cfg.hidden_size
    out = {top["embed"]: ("embed.weight", 0, cfg.vocab_size), top["norm"]: ("norm.weight", 0, H)}
    if not cfg.tie_embeddings:
        out[top["head"]] = ("head.weight", 0, cfg.vocab_size)
    rows = {"q": ("attn.qkv", 0, q), "k": ("attn.qkv", q, q + kv), "v": ("attn.qkv", q + kv, q + 2 * kv),
            "o": ("attn.out", 0, H), "gate": ("mlp.gate_up", 0, inter), "up": ("mlp.gate_up", inter, 2 * inter),
            "down": ("mlp.down", 0, H), "attn_norm": ("attn_norm", 0, H), "mlp_norm": ("mlp_norm", 0, H)}
    for n in range(cfg.num_layers):
        src = layer.format(n=n)
        for role, (param, lo, hi) in rows.items():
            kinds = ("weight", "bias") if cfg.qkv_bias and role in ("q", "k", "v") else ("weight",)
            for kind in kinds:
                out[f"{src}{names[role]}.{kind}"] = (f"blocks.{n}.{param}.{kind}", lo, hi)
    return out


def _mask_id(tokenizer, cfg: NativeConfig, name: str) -> int:
    from_tok, from_cfg = tokenizer.mask_token_id, cfg.mask_id
    if from_tok is not None and from_cfg is not None and int(from_tok) != int(from_cfg):
        raise AdjustError(f"{name}: the tokenizer's mask token ({from_tok}) and config.json mask_token_id "
                          f"({from_cfg}) disagree")
    mask = _first_id(from_cfg, from_tok)
    if mask is None:
        raise AdjustError(f"{name}: no mask token (neither config.json mask_token_id nor the tokenizer's)")
    if not 0 <= mask < cfg.vocab_size:
        raise AdjustError(f"{name}: mask token id {mask} is outside the vocabulary of {cfg.vocab_size}")
    return mask


@torch.no_grad()
def _probe(base: NativeBase, dtype: str, device) -> None:
    """One tiny forward pass, so a dtype the device cannot run fails here as one clear error."""
    try:
        h = base.hidden_states(torch.full((1, 2), base.mask_id, device=device))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdjustError(f"{base.name} does not run with --dtype {dtype} on {device}: {msg}") from None
    if not torch.isfinite(h).all():
        raise AdjustError(f"{base.name} produces non-finite hidden states with --dtype {dtype} on {device}")


# --- tokenizers ------------------------------------------------------------------------------------
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer with transformers' own classes (no code from the directory).

    tokenizer.json if present (LLaDA), else a Qwen2 byte-level BPE from vocab.json + merges.txt with the
    added tokens of tokenizer_config.json at their ids (Dream). Special tokens and the chat template come
    from tokenizer_config.json (and special_tokens_map.json / chat_template.jinja when present)."""
    from ..io import read_json

    conf = read_json(path / "tokenizer_config.json", "tokenizer config") if (path / "tokenizer_config.json").is_file() else {}
    if (path / "special_tokens_map.json").is_file():
        conf = {**read_json(path / "special_tokens_map.json", "special tokens map"), **conf}
    try:
        if (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = _qwen2_bpe(path, conf)
        else:
            raise AdjustError(f"no tokenizer in {path}: neither tokenizer.json nor vocab.json + merges.txt")
    except AdjustError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions on corrupt files
        raise AdjustError(f"could not build the tokenizer of {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    specials = {}
    for key in SPECIAL_KEYS:
        value = conf.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            if tok.convert_tokens_to_ids(value) is None or value not in tok.get_vocab():
                raise AdjustError(f"tokenizer of {path}: {key} {value!r} is not in its vocabulary")
            specials[key] = value
    if specials:
        tok.add_special_tokens(specials)  # already in the vocabulary: sets the roles, adds no id
    template = conf.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        tok.chat_template = template
    tok.model_max_length = int(1e30)  # the model's context is config.json's, checked by the decoding loop
    return tok


def _qwen2_bpe(path: Path, conf: dict):
    """Qwen2's byte-level BPE (its pre-tokenizer regex, NFC, byte-level decoding) from Dream's files."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    with open(path / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(path / "merges.txt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#version"):
                parts = line.split(" ")
                if len(parts) != 2:
                    raise AdjustError(f"{path / 'merges.txt'}: bad merge line {line!r}")
                merges.append(tuple(parts))
    if not isinstance(vocab, dict):
        raise AdjustError(f"{path / 'vocab.json'} is not a JSON object of token -> id")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=None, pad_token=None, bos_token=None)
    added = conf.get("added_tokens_decoder") or {}
    for i in sorted(added, key=int):
        info = added[i]
        content = info["content"]
        if vocab.get(content) == int(i):
            continue  # already an ordinary vocabulary entry at that id
        tok.add_tokens([AddedToken(content, special=bool(info.get("special", True)), lstrip=info.get("lstrip", False),
                                   rstrip=info.get("rstrip", False), normalized=info.get("normalized", False),
                                   single_word=info.get("single_word", False))],
                       special_tokens=bool(info.get("special", True)))
        got = tok.convert_tokens_to_ids(content)
        if got != int(i):
            raise AdjustError(f"tokenizer of {path}: added token {content!r} lands at id {got}, but "
                              f"tokenizer_config.json puts it at {i} (the ids must follow vocab.json without gaps)")
    return tok
