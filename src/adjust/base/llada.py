"""LLaDA (GSAI-ML/LLaDA-8B-*) natively: the OLMo layout, bidirectional, no shift, padding honoured.

config.json (published names): model_type "llada", d_model, n_layers, n_heads, n_kv_heads,
mlp_hidden_size, vocab_size, embedding_size, rope_theta, rms_norm_eps, max_sequence_length,
weight_tying, include_qkv_bias, mask_token_id, eos_token_id, pad_token_id (and block_type
"llama", rope true, alibi false, no attention_layer_norm / clip_qkv / scale_logits, checked).
Weights: model.transformer.wte, model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,
ff_proj (the SwiGLU gate),up_proj,ff_out,attn_norm,ff_norm}, model.transformer.ln_f,
model.transformer.ff_out (absent when weight_tying).

The published LLaDA code ignores the attention mask, so left padding changes its outputs; here
padded keys are masked and positions start at each row's first real token, so a left-padded row
equals the same row alone.
"""

from __future__ import annotations

from ..errors import AdjustError
from .native import NativeBase, NativeConfig, config_id as _id, field, transformer_slots

# Options of the OLMo/LLaDA config this code implements: anything else is refused, not ignored.
REQUIRED = {"block_type": "llama", "rope": True, "alibi": False, "attention_layer_norm": False,
            "clip_qkv": None, "scale_logits": False, "input_emb_norm": False, "layer_norm_type": "rms",
            "activation_type": "silu", "multi_query_attention": None, "include_bias": False}

# Checkpoint names (without .weight) of each part of a block; ff_proj is the SwiGLU gate.
NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
         "down": "ff_out", "attn_norm": "attn_norm", "mlp_norm": "ff_norm"}


class LLaDANative(NativeBase):
    family = "llada"

    @classmethod
    def read_config(cls, raw: dict) -> NativeConfig:
        f = lambda name, kind=int, default=None: field(raw, name, kind, default, "LLaDA")  # noqa: E731
        for key, want in REQUIRED.items():
            if key in raw and raw[key] != want and not (want is None and raw[key] in (False, None)):
                raise AdjustError(f"LLaDA config.json sets {key}={raw[key]!r}; the native LLaDA code implements "
                                  f"only {key}={want!r}")
        heads = f("n_heads")
        vocab = f("embedding_size", int, 0) or f("vocab_size")
        if vocab < f("vocab_size"):
            raise AdjustError(f"LLaDA config.json: embedding_size {vocab} is smaller than vocab_size")
        return NativeConfig(vocab_size=vocab, hidden_size=f("d_model"), num_layers=f("n_layers"), num_heads=heads,
                            num_kv_heads=f("n_kv_heads", int, heads), intermediate_size=f("mlp_hidden_size"),
                            rope_theta=f("rope_theta", float, 10000.0), norm_eps=f("rms_norm_eps", float, 1e-5),
                            tie_embeddings=f("weight_tying", bool, False), qkv_bias=f("include_qkv_bias", bool, False),
                            max_length=f("max_sequence_length", int, 4096),
                            mask_id=_id(raw.get("mask_token_id")), eos_id=_id(raw.get("eos_token_id")),
                            pad_id=_id(raw.get("pad_token_id")))

    @classmethod
    def slots(cls, cfg: NativeConfig) -> dict:
        t = "model.transformer."
        return transformer_slots(cfg, {"embed": t + "wte.weight", "norm": t + "ln_f.weight", "head": t + "ff_out.weight"},
                                 t + "blocks.{n}.", NAMES)
