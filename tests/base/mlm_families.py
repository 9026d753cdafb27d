"""Tiny randomly initialised masked LMs of every family with an MLM head, each with its family's own tokenizer
class (built from an in-memory vocabulary, so the family's own special-token template applies), saved as
`save_pretrained` writes them. Test fixtures: nothing here is trained.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "cat", "sat", "on", "mat", "a", "red",
         "hat", "and", "blue", "cup"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TEXT = "the quick brown fox"  # every family's vocabulary holds these words
FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta-v2", "modernbert", "esm"]
PROTEIN = "M K T A Y I A K Q R"  # ESM's text: residues


def _wordpiece_vocab() -> dict:
    return {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + LETTERS)}


def _unigram(specials: list[str]) -> list[tuple[str, float]]:
    return [(s, 0.0) for s in specials] + [("\u2581" + w, -2.0) for w in WORDS] + \
        [("\u2581", -3.0)] + [(c, -4.0) for c in LETTERS]


def _bytelevel_bpe(specials: list[str]):
    """A byte-level BPE vocabulary (letters and the space marker, merges into the words)."""
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in LETTERS + ["\u0120"]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for w in WORDS:
        piece = "\u0120" + w[0]
        if piece not in vocab:
            merges.append(("\u0120", w[0]))
            vocab[piece] = len(vocab)
        for ch in w[1:]:
            nxt = piece + ch
            if nxt not in vocab:
                merges.append((piece, ch))
                vocab[nxt] = len(vocab)
            piece = nxt
    return vocab, merges


def write(family: str, out: Path, seed: int = 0) -> Path:
    """A tiny `family` masked LM and its tokenizer in `out` (save_pretrained layout); returns `out`."""
    import torch
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("bert", "electra", "distilbert"):
        tok_cls = {"bert": tf.BertTokenizer, "electra": tf.ElectraTokenizer, "distilbert": tf.DistilBertTokenizer}
        tok = tok_cls[family](vocab=_wordpiece_vocab())
        V = len(tok)
        if family == "bert":
            model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, max_position_embeddings=64, **SIZES))
        elif family == "electra":
            model = tf.ElectraForMaskedLM(tf.ElectraConfig(vocab_size=V, embedding_size=16, max_position_embeddings=64,
                                                           **SIZES))
        else:
            model = tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                                                 hidden_dim=64, max_position_embeddings=64))
    elif family == "roberta":
        vocab, merges = _bytelevel_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tok = tf.RobertaTokenizer(vocab=vocab, merges=merges)
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1,
                                                       bos_token_id=0, eos_token_id=2, **SIZES))
    elif family == "xlm-roberta":
        tok = tf.XLMRobertaTokenizer(vocab=_unigram(["<s>", "<pad>", "</s>", "<unk>"]) + [("<mask>", 0.0)])
        model = tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=66,
                                                             pad_token_id=1, bos_token_id=0, eos_token_id=2, **SIZES))
    elif family == "albert":
        tok = tf.AlbertTokenizer(vocab=_unigram(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]))
        model = tf.AlbertForMaskedLM(tf.AlbertConfig(vocab_size=len(tok), embedding_size=16, max_position_embeddings=64,
                                                     pad_token_id=0, **SIZES))
    elif family == "deberta-v2":
        tok = tf.DebertaV2Tokenizer(vocab=_unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]))
        model = tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(vocab_size=len(tok), max_position_embeddings=64,
                                                           pad_token_id=0, **SIZES))
    elif family == "modernbert":
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors

        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        vocab, merges = _bytelevel_bpe(specials)
        bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        bpe.decoder = decoders.ByteLevel()
        bpe.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]",
                                         sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
        model = tf.ModernBertForMaskedLM(tf.ModernBertConfig(
            vocab_size=len(tok), max_position_embeddings=64, pad_token_id=3, cls_token_id=1, sep_token_id=2,
            bos_token_id=1, eos_token_id=2, global_attn_every_n_layers=1, local_attention=16, **SIZES))
    elif family == "esm":
        vocab = ["<cls>", "<pad>", "<eos>", "<unk>"] + list("LAGVSERTIDPKQNFYMHWCXBUZO") + [".", "-", "<null_1>",
                                                                                              "<mask>"]
        (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = tf.EsmTokenizer(str(out / "vocab.txt"))
        model = tf.EsmForMaskedLM(tf.EsmConfig(vocab_size=len(vocab), max_position_embeddings=66, pad_token_id=1,
                                               mask_token_id=vocab.index("<mask>"), position_embedding_type="rotary",
                                               **SIZES))
    else:
        raise ValueError(family)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def text_for(family: str) -> str:
    return PROTEIN if family == "esm" else TEXT
