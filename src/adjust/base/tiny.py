"""Our own small masked diffusion LM: a bidirectional LLaMA/Qwen-style transformer.

RMSNorm, rotary positions, SwiGLU, tied input/output embedding (or a separate LM head,
`tie_embeddings=False`, as the task model uses). Trained with the masked
diffusion objective (see `adjust.likelihood`). Saved as config.json + model.safetensors +
tokenizer.json, like a Hugging Face model, so the directory alone rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdjustError
from ..io import atomic_path, config_from_json, load_state, load_weights, read_json, readable_file, write_json
from ..layers import Transformer
from . import BaseModel

MODEL_TYPE = "adjust-tiny"
# Special tokens of our tokenizers; their ids are read back from the tokenizer, never hard-coded.
PAD, MASK, EOS = "<|pad|>", "<|mask|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, MASK, EOS]


@dataclass
class TinyConfig:
    vocab_size: int = 4096  # tokenizer size rounded up to a multiple of 64 (faster matmuls)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688  # ~8/3 * hidden, as in LLaMA's SwiGLU, rounded to 16
    max_length: int = 128  # context length the model was trained on
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    mask_id: int = 1
    pad_id: int = 0
    eos_id: int = 2
    tokenizer_size: int = 4096  # real tokens; ids from here to vocab_size are padding
    tie_embeddings: bool = True  # LM head = input embedding (configs written before this field were tied)

    # Fields a config.json may lack: added after models were saved, their default is what those meant.
    OPTIONAL_FIELDS = ("tie_embeddings",)

    @classmethod
    def from_dict(cls, d: dict, path="config.json") -> "TinyConfig":
        """The config a saved model's config.json describes; a missing field (other than the optional
        ones) is an error naming it, never a silent code default."""
        return config_from_json(cls, d, path, "model config.json")


class TinyMDLM(Transformer):
    """The network: embed -> blocks -> final RMSNorm -> LM head (tied to embed unless tie_embeddings=False)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
                         cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings)
        self.cfg = cfg
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)


class TinyBase(BaseModel):
    """Our model behind the base interface. No shift: position i predicts token i."""

    def __init__(self, cfg: TinyConfig, tokenizer=None, name: str = "adjust-tiny"):
        super().__init__()
        self.cfg = cfg
        self.model = TinyMDLM(cfg)
        self.tokenizer = tokenizer
        self.name = name
        self.mask_id, self.pad_id, self.eos_id = cfg.mask_id, cfg.pad_id, cfg.eos_id
        self.vocab_size, self.hidden_size, self.max_length = cfg.vocab_size, cfg.hidden_size, cfg.max_length
        self.banned_ids = (cfg.mask_id, cfg.pad_id, *range(cfg.tokenizer_size, cfg.vocab_size))

    supports_cache = True

    def hidden_states(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask)

    def cache_pass(self, input_ids, attention_mask=None):
        kv = []
        return self.model(input_ids, attention_mask, keep=kv), kv

    def span_hidden(self, input_ids, attention_mask, cache, start, end, verify=0):
        return self.model.forward_span(input_ids, attention_mask, cache, start, end, verify)

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def lm_head(self, hidden):
        return self.model.output(hidden)

    # --- persistence ---------------------------------------------------------------------
    def save(self, out_dir: str | Path, extra: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
        """Write config.json, model.safetensors and tokenizer.json, each atomically.

        `dtype` is the storage type (float16 halves a shipped model); loading always gives float32
        unless --dtype says otherwise.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        if self.tokenizer is not None:
            with atomic_path(out / "tokenizer.json") as tmp:
                self.tokenizer.backend_tokenizer.save(str(tmp))
            write_tokenizer_config(out, self.max_length)
        write_json(out / "config.json", {"model_type": MODEL_TYPE, "architectures": ["TinyMDLM"], "name": self.name,
                                         "torch_dtype": str(dtype).removeprefix("torch."), **asdict(self.cfg),
                                         **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "TinyBase":
        path = Path(path)
        if not path.is_dir():
            raise AdjustError(f"base model directory not found: {path}")
        raw = read_json(path / "config.json", "model config.json")
        if raw.get("model_type") != MODEL_TYPE:
            raise AdjustError(f"{path} is not an adjust-tiny model (model_type={raw.get('model_type')!r})")
        cfg = TinyConfig.from_dict(raw, path / "config.json")
        base = cls(cfg, load_tokenizer(path), name=raw.get("name", path.name))
        weights = path / "model.safetensors"
        load_state(base.model, load_weights(weights, "model weights"), path, "model weights")
        return base


def write_tokenizer_config(out: str | Path, max_length: int) -> None:
    """tokenizer_config.json beside tokenizer.json, so that transformers' AutoTokenizer (lm-eval, vLLM-style
    clients) gives the special tokens the project uses."""
    write_json(Path(out) / "tokenizer_config.json",
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD, "mask_token": MASK,
                "model_max_length": max_length, "clean_up_tokenization_spaces": False})


def load_tokenizer(path: str | Path):
    """Our byte-level BPE tokenizer as a transformers fast tokenizer (one API for all bases)."""
    from transformers import PreTrainedTokenizerFast

    file = readable_file(Path(path) / "tokenizer.json", "tokenizer")
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token=PAD, mask_token=MASK, eos_token=EOS)
    except Exception as e:  # tokenizers raises plain Exceptions on corrupt JSON
        raise AdjustError(f"corrupt tokenizer file {file}: {str(e).splitlines()[0]}") from None


def token_ids(tokenizer) -> dict:
    """The special-token ids of one of our tokenizers: the single place they are looked up."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad_id", PAD), ("mask_id", MASK), ("eos_id", EOS))}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise AdjustError("tokenizer lacks the special tokens " + ", ".join(SPECIAL_TOKENS))
    return ids
