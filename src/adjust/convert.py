"""Convert a pickled BERT-style masked LM (a `pytorch_model.bin` + config.json + vocab.txt, as
AntiBERTy ships) into a Hugging Face `BertForMaskedLM` directory in safetensors with a fast
tokenizer, so it loads with `--base-type masked-lm` and no code from the original package.

The pickle is read with `torch.load(..., weights_only=True)`: tensors and plain containers only,
never arbitrary objects. Only the encoder and the masked-LM head are kept (`bert.embeddings`,
`bert.encoder`, `cls.predictions`); anything else (a pooler, extra classification heads) is
dropped and listed in the result. The written model is reloaded and checked: its logits equal
those of the source weights, and the tokenizer maps every vocabulary entry to its own id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import AdjustError
from .io import atomic_dir, read_json

KEEP_PREFIXES = ("bert.embeddings.", "bert.encoder.", "cls.predictions.")
BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")  # recomputed by transformers
CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                 "position_embedding_type")
# BERT's special tokens by their conventional names in a vocab.txt
SPECIAL = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}


def read_pickled_state(path) -> dict[str, torch.Tensor]:
    """A state dict from a pickled checkpoint, loaded weights-only (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for non-tensor objects, RuntimeError for a damaged zip
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdjustError(f"{path} is not a weights-only PyTorch checkpoint: {msg}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdjustError(f"{path} does not hold a state dict of tensors")
    return state


def read_vocab(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise AdjustError(f"vocabulary file not found: {path}")
    try:
        vocab = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise AdjustError(f"vocabulary file is not UTF-8 text: {path}") from None
    vocab = [v for v in vocab if v]
    missing = [tok for tok in SPECIAL.values() if tok not in vocab]
    if missing:
        raise AdjustError(f"{path} lacks BERT's special tokens {', '.join(missing)}")
    if len(set(vocab)) != len(vocab):
        raise AdjustError(f"{path} lists a token twice")
    return vocab


def build_tokenizer(vocab: list[str], max_length: int):
    """A WordPiece fast tokenizer: whitespace/punctuation split, no lower-casing, [CLS] x [SEP] template.

    Built from the `tokenizers` objects directly: in transformers 5.x `BertTokenizerFast(vocab_file=...)`
    silently ignores the file and yields a 5-token vocabulary.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(WordPiece(ids, unk_token=SPECIAL["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                                lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = SPECIAL["cls_token"], SPECIAL["sep_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                                                       special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL)


def convert_bert(weights, config, vocab, out, name: str | None = None) -> dict:
    """Write a safetensors BertForMaskedLM + tokenizer to `out`; returns what was kept and dropped."""
    import transformers

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdjustError(f"--out {out} exists and is not an empty directory")
    raw = read_json(config, "model config.json")
    if str(raw.get("model_type", "")).lower() != "bert":
        raise AdjustError(f"{config} describes a {raw.get('model_type') or 'unknown'} model, not a BERT")
    words = read_vocab(vocab)
    state = read_pickled_state(weights)
    kept = {k: v for k, v in state.items() if k.startswith(KEEP_PREFIXES) and k not in BUFFERS}
    dropped = sorted(k for k in state if k not in kept)
    fields = {k: raw[k] for k in CONFIG_FIELDS if k in raw}
    if fields.get("vocab_size") != len(words):
        raise AdjustError(f"config.json vocab_size {fields.get('vocab_size')} != {len(words)} tokens in {vocab}")
    emb, dec = kept.get("bert.embeddings.word_embeddings.weight"), kept.get("cls.predictions.decoder.weight")
    tied = emb is not None and dec is not None and torch.equal(emb, dec)
    cfg = transformers.BertConfig(**fields, tie_word_embeddings=tied, architectures=["BertForMaskedLM"])
    with torch.random.fork_rng(devices=[]):
        net = transformers.BertForMaskedLM(cfg)
    result = net.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "cls.predictions.decoder.weight")]
    if missing or result.unexpected_keys:
        raise AdjustError(f"{weights} does not fit a BertForMaskedLM of its config: missing "
                          f"{', '.join(missing[:5]) or 'none'}; unexpected {', '.join(result.unexpected_keys[:5]) or 'none'}")
    for key, tensor in kept.items():  # load_state_dict would accept nothing less, but say it outright
        if net.state_dict()[key].shape != tensor.shape:
            raise AdjustError(f"{key} has shape {tuple(tensor.shape)} in {weights}, the config says otherwise")
    net.eval()
    tokenizer = build_tokenizer(words, int(fields.get("max_position_embeddings", 512)))
    _check_tokenizer(tokenizer, words)
    with atomic_dir(out) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_reload(tmp, net, tokenizer)
    return {"out": str(out), "name": name or out.name, "tensors_kept": len(kept), "dropped": dropped,
            "tied_embeddings": tied, "vocab_size": len(words)}


def _check_tokenizer(tokenizer, words: list[str]) -> None:
    for i, word in enumerate(words):
        if tokenizer.convert_tokens_to_ids(word) != i:
            raise AdjustError(f"the converted tokenizer maps {word!r} to {tokenizer.convert_tokens_to_ids(word)}, "
                              f"not {i}")
    plain = [w for w in words if w not in SPECIAL.values()][:8]
    if plain and tokenizer.encode(" ".join(plain), add_special_tokens=False) != [words.index(w) for w in plain]:
        raise AdjustError("the converted tokenizer does not encode space-separated tokens to their ids")


@torch.no_grad()
def _check_reload(path, net, tokenizer) -> None:
    """The written directory reloads to the same logits as the converted weights."""
    import transformers

    again = transformers.BertForMaskedLM.from_pretrained(path, local_files_only=True).eval()
    probe = torch.tensor([list(range(min(16, net.config.vocab_size)))])
    if not torch.allclose(again(input_ids=probe).logits, net(input_ids=probe).logits, atol=1e-5, rtol=1e-5):
        raise AdjustError("the converted model does not reproduce the source weights' logits")
