"""Dream (Dream-org/Dream-v0-*-7B) natively: the Qwen2 layout, bidirectional, outputs shifted one place.

config.json (published names): model_type "Dream", vocab_size, hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, rope_theta, rms_norm_eps,
tie_word_embeddings, max_position_embeddings, mask_token_id, eos_token_id, pad_token_id.
Weights: model.embed_tokens, model.layers.N.self_attn.{q,k,v}_proj (with bias), o_proj (no bias),
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head.
"""

from __future__ import annotations

from ..errors import AdjustError
from .hf import dream_align
from .native import NativeBase, NativeConfig, config_id as _id, field


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
        hd = cfg.hidden_size // cfg.num_heads
        q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
        out = {"model.embed_tokens.weight": ("embed.weight", 0, cfg.vocab_size),
               "model.norm.weight": ("norm.weight", 0, cfg.hidden_size)}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = ("head.weight", 0, cfg.vocab_size)
        for n in range(cfg.num_layers):
            src, dst = f"model.layers.{n}.", f"blocks.{n}."
            for kind in ("weight", "bias"):
                out[src + f"self_attn.q_proj.{kind}"] = (dst + f"attn.qkv.{kind}", 0, q)
                out[src + f"self_attn.k_proj.{kind}"] = (dst + f"attn.qkv.{kind}", q, q + kv)
                out[src + f"self_attn.v_proj.{kind}"] = (dst + f"attn.qkv.{kind}", q + kv, q + 2 * kv)
            out[src + "self_attn.o_proj.weight"] = (dst + "attn.out.weight", 0, cfg.hidden_size)
            out[src + "mlp.gate_proj.weight"] = (dst + "mlp.gate_up.weight", 0, inter)
            out[src + "mlp.up_proj.weight"] = (dst + "mlp.gate_up.weight", inter, 2 * inter)
            out[src + "mlp.down_proj.weight"] = (dst + "mlp.down.weight", 0, cfg.hidden_size)
            out[src + "input_layernorm.weight"] = (dst + "attn_norm.weight", 0, cfg.hidden_size)
            out[src + "post_attention_layernorm.weight"] = (dst + "mlp_norm.weight", 0, cfg.hidden_size)
        return out

    def _align(self, h, attention_mask):
        return dream_align(h, attention_mask)  # the one place Dream's shift is undone

