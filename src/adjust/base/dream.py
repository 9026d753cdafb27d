"""Dream (Dream-org/Dream-v0-*-7B) natively: the Qwen2 layout, bidirectional, outputs shifted one place.

config.json (published names): model_type "Dream", vocab_size, hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, rope_theta, rms_norm_eps,
tie_word_embeddings, max_position_embeddings, mask_token_id, eos_token_id, pad_token_id.
Weights: model.embed_tokens, model.layers.N.self_attn.{q,k,v}_proj (with bias), o_proj (no bias),
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head.
"""

from __future__ import annotations

from ..errors import AdjustError
from .hf import DREAM_SHIFT, dream_align
from .native import NativeBase, NativeConfig, config_id as _id, field, transformer_slots

# Checkpoint names (without .weight) of each part of a layer.
NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "mlp_norm": "post_attention_layernorm"}


class DreamNative(NativeBase):
    family = "dream"

    @classmethod
    def read_config(cls, raw: dict) -> NativeConfig:
        f = lambda name, kind=int, default=None: field(raw, name, kind, default, "Dream")  # noqa: E731
        heads = f("num_attention_heads")
        for key in ("rope_scaling", "use_sliding_window"):
            if raw.get(key):
                raise AdjustError(f"Dream config.json sets {key}={raw[key]!r}, which the native Dream code does not "
                                  "implement")
        return NativeConfig(vocab_size=f("vocab_size"), hidden_size=f("hidden_size"),
                            num_layers=f("num_hidden_layers"), num_heads=heads,
                            num_kv_heads=f("num_key_value_heads", int, heads),
                            intermediate_size=f("intermediate_size"), rope_theta=f("rope_theta", float, 10000.0),
                            norm_eps=f("rms_norm_eps", float, 1e-6),
                            tie_embeddings=f("tie_word_embeddings", bool, False), qkv_bias=True,
                            max_length=f("max_position_embeddings", int, 32768),
                            mask_id=_id(raw.get("mask_token_id")),
                            eos_id=_id(raw.get("eos_token_id")), pad_id=_id(raw.get("pad_token_id")))

    @classmethod
    def slots(cls, cfg: NativeConfig) -> dict:
        return transformer_slots(cfg, {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
                                       "head": "lm_head.weight"}, "model.layers.{n}.", NAMES)

    align_reach = DREAM_SHIFT

    def _align(self, h, attention_mask):
        return dream_align(h, attention_mask)  # the one place Dream's shift is undone

