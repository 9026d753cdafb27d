"""Random-weight checkpoints written in exactly the published Dream and LLaDA layouts, at a tiny size.

Same weight names, sharded `model.safetensors.index.json`, config.json with the published field
names and `auto_map` (naming remote classes that are NOT shipped: loading must not need them),
and the tokenizer files each family ships: Dream a Qwen2-style vocab.json + merges.txt + added
tokens in tokenizer_config.json (which names the remote class DreamTokenizer); LLaDA a
tokenizer.json (post-processor adding BOS) with tokenizer_config.json. Both with their chat
templates. Only sizes and ids are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adjust.base.checkpoint import write_checkpoint

DOCS = [f"the quick brown fox {i} jumps over the lazy dog, and the cat sat on the mat 12345." for i in range(40)]

# Dream's added tokens, in their published order (ids follow the BPE vocabulary); special flags as published.
DREAM_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
               ("<tool_call>", False), ("<|beginoftext|>", True), ("<|mask|>", True)]
DREAM_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLADA_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|reserved_special_token_0|>", "<|mdm_mask|>"]
LLADA_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
                  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                  "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _bpe(vocab_size: int, special: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(DOCS, trainer)
    if special:
        tok.add_special_tokens(special)
    return tok


def dream_config(n_vocab: int, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, **extra) -> dict:
    ids = {t: n_vocab + i for i, (t, _) in enumerate(DREAM_ADDED)}
    return {"architectures": ["DreamModel"],
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "model_type": "Dream", "attention_dropout": 0.0, "bos_token_id": ids["<|beginoftext|>"],
            "eos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
            "mask_token_id": ids["<|mask|>"], "hidden_act": "silu", "hidden_size": hidden,
            "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 256,
            "max_window_layers": layers, "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
            "vocab_size": -(-(n_vocab + len(DREAM_ADDED)) // 64) * 64, **extra}


def _llama_state(H, V, I, kv, layers, bias, seed, dtype) -> dict:
    """Random weights named as in Qwen2/Llama (= Dream's names); q/k/v biases when `bias`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    state = {"model.embed_tokens.weight": r(V, H, std=1.0)}
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, rows in (("q_proj", H), ("k_proj", kv), ("v_proj", kv)):
            state[p + f"self_attn.{name}.weight"] = r(rows, H)
            if bias:
                state[p + f"self_attn.{name}.bias"] = r(rows)
        state.update({p + "self_attn.o_proj.weight": r(H, H), p + "mlp.gate_proj.weight": r(I, H),
                      p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I),
                      p + "input_layernorm.weight": 1 + r(H), p + "post_attention_layernorm.weight": 1 + r(H)})
    state["model.norm.weight"] = 1 + r(H)
    state["lm_head.weight"] = r(V, H)
    return state


def dream_state(cfg: dict, seed=0, dtype=torch.float32) -> dict:
    H = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"])
    return _llama_state(H, cfg["vocab_size"], cfg["intermediate_size"], kv, cfg["num_hidden_layers"], True, seed, dtype)


def write_dream(out: Path, seed=0, shards=2, dtype=torch.float32, chat=True, **sizes) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _bpe(300)
    tok.model.save(str(out))  # vocab.json + merges.txt (with its "#version" header), as Qwen2/Dream ship them
    n = tok.get_vocab_size()
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": s} for i, (t, s) in enumerate(DREAM_ADDED)}
    conf = {"added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
            "bos_token": "<|beginoftext|>", "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
            "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 131072, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "DreamTokenizer", "unk_token": None}
    return _finish(out, conf, DREAM_TEMPLATE if chat else None, dream_config(n, **sizes), dream_state, seed, dtype,
                   shards)


def _finish(out, tok_conf, template, cfg, state_fn, seed, dtype, shards) -> Path:
    """tokenizer_config.json (with the chat template, if any), config.json and the sharded weights."""
    if template:
        tok_conf["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_conf, indent=2))
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_checkpoint(state_fn(cfg, seed, dtype), out, shards)
    return out


def llada_config(n_vocab: int, hidden=64, layers=2, heads=4, inter=96, **extra) -> dict:
    ids = {t: n_vocab + i for i, t in enumerate(LLADA_SPECIAL)}
    vocab = -(-(n_vocab + len(LLADA_SPECIAL)) // 64) * 64
    return {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": hidden,
            "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": ids["<|endoftext|>"],
            "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
            "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
            "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": ids["<|mdm_mask|>"],
            "max_sequence_length": 256, "mlp_hidden_size": inter, "mlp_ratio": 4, "model_type": "llada",
            "multi_query_attention": None, "n_heads": heads, "n_kv_heads": heads, "n_layers": layers,
            "pad_token_id": ids["<|endoftext|>"], "precision": "amp_bf16", "residual_dropout": 0.0,
            "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
            "scale_logits": False, "torch_dtype": "float32", "transformers_version": "4.46.3", "use_cache": False,
            "vocab_size": vocab, "weight_tying": False, **extra}


def llada_state(cfg: dict, seed=0, dtype=torch.float32) -> dict:
    H = cfg["d_model"]
    kv = cfg["n_kv_heads"] * (H // cfg["n_heads"])
    llama = _llama_state(H, cfg["embedding_size"], cfg["mlp_hidden_size"], kv, cfg["n_layers"], False, seed, dtype)
    back = {v: k for k, v in LLADA_TO_LLAMA.items()}
    out = {}
    for k, v in llama.items():
        if k.startswith("model.layers."):
            _, _, n, rest = k.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            out[f"model.transformer.blocks.{n}.{back[part]}.{kind}"] = v
        else:
            out["model.transformer." + {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
                                        "lm_head.weight": "ff_out.weight"}[k]] = v
    return out


def write_llada(out: Path, seed=0, shards=2, dtype=torch.float32, chat=True, **sizes) -> Path:
    from tokenizers.processors import TemplateProcessing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _bpe(300, LLADA_SPECIAL)
    n = tok.get_vocab_size() - len(LLADA_SPECIAL)
    bos = tok.token_to_id("<|startoftext|>")
    tok.post_processor = TemplateProcessing(single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    conf = {"bos_token": "<|startoftext|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast"}
    return _finish(out, conf, LLADA_TEMPLATE if chat else None, llada_config(n, **sizes), llada_state, seed, dtype,
                   shards)


# LLaDA name -> Llama name, for the reference model in the tests.
LLADA_TO_LLAMA = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                  "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}


def llada_as_llama(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.removeprefix("model.transformer.")
        if k == "wte.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "ln_f.weight":
            out["model.norm.weight"] = v
        elif k == "ff_out.weight":
            out["lm_head.weight"] = v
        else:
            _, n, name, kind = k.split(".")
            out[f"model.layers.{n}.{LLADA_TO_LLAMA[name]}.{kind}"] = v
    return out
