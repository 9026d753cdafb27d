"""STAND-INS for tests and benchmarks (not part of the package): small randomly initialised models built
from real transformers classes, where the real checkpoint cannot exist here.

* Dream and LLaDA through the Hugging Face adapters (`adjust.base.hf.DreamBase`, `LLaDABase`, whose real
  path runs a checkpoint's remote code): a transformers Qwen2 (for Dream) or Llama (for LLaDA), made
  bidirectional, called through transformers' own class instead of remote code. `save_stand_in` writes
  one, `load_stand_in` loads it back, `stand_in_base` wraps one built in memory (benchmarks/gpu_bench.py).
  The package's loader never loads these: `adjust.base.load_base` sees a plain Qwen2/Llama.
* A masked LM: `save_random_bert` writes a real, untrained BertForMaskedLM in its real layout; the
  package's loader loads it as any masked LM.

Making a decoder bidirectional: `config.is_causal = False`, which transformers 5.x (checked on 5.24)
reads in `merge_with_config_defaults` to build the mask with `create_bidirectional_mask` (padding
only) and to pass `is_causal=False` to the attention kernels (sdpa, eager, flash); plus `is_causal =
False` on every attention module for code paths that read the module flag (on its own the module flag
is not enough in 5.24: the causal mask is still built). The adapters' load-time self-check fails
loudly if a transformers version ignores both.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from adjust.base import hf
from adjust.errors import AdjustError
from adjust.layers import positions_from_mask

CLASSES = {"dream": ("Qwen2Config", "Qwen2ForCausalLM"), "llada": ("LlamaConfig", "LlamaForCausalLM")}


class _StandIn:
    """Calls transformers' own decoder class (made bidirectional) instead of a checkpoint's remote code."""

    def _call_remote(self, input_ids, mask, **kw):
        pos = None if mask is None else positions_from_mask(mask, input_ids.shape, input_ids.device)
        return self.net(input_ids=input_ids, attention_mask=mask, position_ids=pos, **kw)


class DreamStandIn(_StandIn, hf.DreamBase):
    """A Qwen2 behind Dream's adapter (its one-place shift included)."""


class LLaDAStandIn(_StandIn, hf.LLaDABase):
    """A Llama behind LLaDA's adapter."""


ADAPTERS = {"dream": DreamStandIn, "llada": LLaDAStandIn}


def make_bidirectional(net) -> None:
    """Turn a transformers decoder (Qwen2, Llama) into a bidirectional encoder (see the module docstring)."""
    net.config.is_causal = False
    for module in net.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def stand_in_base(kind: str, net, tokenizer, name: str = "stand-in"):
    """Wrap an in-memory transformers Qwen2 (Dream) or Llama (LLaDA) as a stand-in base: made bidirectional,
    frozen and self-checked as the package's loader does a real one. `tokenizer` needs mask/eos/pad ids."""
    if kind not in ADAPTERS:
        raise AdjustError(f"unknown stand-in kind {kind!r}; choose dream or llada")
    make_bidirectional(net)
    base = ADAPTERS[kind](net, tokenizer, name)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    hf._self_check(base, str(base.dtype).replace("torch.", ""), base.device)
    return base


def save_stand_in(kind: str, out_dir, tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                  vocab_size: int | None = None, max_length: int = 128, seed: int = 0) -> Path:
    """Write a small random Qwen2 (kind "dream") or Llama ("llada") and `tokenizer` to `out_dir`.

    `tokenizer` must have a mask token; `vocab_size` defaults to len(tokenizer) rounded up to a multiple
    of 64 (the extra rows are banned). Load it back with `load_stand_in`."""
    import transformers

    if kind not in CLASSES:
        raise AdjustError(f"unknown stand-in kind {kind!r}; choose dream or llada")
    if tokenizer.mask_token_id is None:
        raise AdjustError("a stand-in needs a tokenizer with a mask token")
    cfg_name, model_name = CLASSES[kind]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab_size or -(-len(tokenizer) // 64) * 64, hidden_size=hidden_size,
        intermediate_size=int(16 * round(8 / 3 * hidden_size / 16)), num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False)
    if kind == "llada":  # released LLaDA keeps its mask id in the config; Dream's tokenizer has it
        cfg.mask_token_id = tokenizer.mask_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(transformers, model_name)(cfg)
    out = Path(out_dir)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_stand_in(kind: str, path, dtype: str = "float32", device: str = "cpu"):
    """A stand-in written by `save_stand_in`, behind the `kind` adapter, self-checked."""
    from transformers import AutoModelForCausalLM

    from adjust.base import resolve_device, resolve_dtype

    net = hf._from_pretrained(AutoModelForCausalLM, str(path), resolve_dtype(dtype), remote=False,
                              what=f"{kind} stand-in")
    net.to(resolve_device(device))
    return stand_in_base(kind, net, hf._tokenizer(str(path), remote=False), name=str(path))


def save_random_bert(out_dir, tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int | None = None, vocab_size: int | None = None, max_length: int = 128,
                     seed: int = 0) -> Path:
    """Write a small randomly initialised BertForMaskedLM (a real masked-LM class, untrained) to `out_dir`.

    A copy of `tokenizer` gains BERT's cls/unk tokens and uses its EOS as sep; `vocab_size` defaults to its
    length rounded up to 64."""
    import transformers

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"cls_token": "<|cls|>", "unk_token": "<|unk|>", "sep_token": tok.eos_token})
    cfg = transformers.BertConfig(vocab_size=vocab_size or -(-len(tok) // 64) * 64, hidden_size=hidden_size,
                                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                  intermediate_size=intermediate_size or 4 * hidden_size,
                                  max_position_embeddings=max_length, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = transformers.BertForMaskedLM(cfg)
    out = Path(out_dir)
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out
