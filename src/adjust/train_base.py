"""`adjust train-base`: a byte-level BPE tokenizer and our small masked diffusion LM on any text.

The loop: random windows of the token stream, the masked-diffusion objective of
`adjust.likelihood`, AdamW with warm-up and cosine decay, gradient clipping, periodic
validation, atomic checkpoints and resume after interruption.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base.tiny import EOS, MASK, PAD, SPECIAL_TOKENS, TinyBase, TinyConfig, load_tokenizer, token_ids
from .data import read_documents
from .errors import AdjustError
from .io import atomic_path
from .likelihood import estimate_nll, masked_diffusion_nll

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    val_fraction: float = 0.02
    seed: int = 0


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) with our special tokens first: ids 0, 1, 2 = pad, mask, eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, mask_token=MASK, eos_token=EOS)


def token_stream(docs: list[str], tokenizer, eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(stream: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=g)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_base(data: str | Path, out: str | Path, cfg: TrainConfig, model_cfg: TinyConfig | None = None,
               tokenizer_dir: str | Path | None = None, name: str | None = None, progress: bool = True,
               save_dtype: torch.dtype = torch.float32) -> dict:
    """Train (or resume training) a base model into `out`. Returns the final metrics."""
    out = Path(out)
    docs = read_documents(data)
    torch.manual_seed(cfg.seed)
    state_path = out / STATE_FILE
    resume = state_path.is_file()
    if resume:
        tokenizer = load_tokenizer(out)
    elif tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(docs, (model_cfg or TinyConfig()).tokenizer_size)
    ids = token_ids(tokenizer)
    model_cfg = model_cfg or TinyConfig()
    model_cfg.tokenizer_size = len(tokenizer)
    model_cfg.vocab_size = 64 * math.ceil(len(tokenizer) / 64)
    model_cfg.max_length = max(model_cfg.max_length, cfg.seq_len)
    for k, v in ids.items():
        setattr(model_cfg, k, v)

    stream = token_stream(docs, tokenizer, ids["eos_id"])
    n_val = max(cfg.seq_len + 1, int(len(stream) * cfg.val_fraction))
    if len(stream) < n_val + 2 * cfg.seq_len:
        raise AdjustError(f"data file {data} is too small: {len(stream)} tokens, need at least "
                          f"{n_val + 2 * cfg.seq_len} for windows of {cfg.seq_len} plus a validation split")
    train_ids, val_ids = stream[:-n_val], stream[-n_val:]

    base = TinyBase(model_cfg, tokenizer, name=name or out.name)
    opt = torch.optim.AdamW(base.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    step, elapsed, history = 0, 0.0, []
    if resume:
        state = torch.load(state_path, weights_only=False)
        if state["model_config"] != asdict(model_cfg):
            raise AdjustError(f"{state_path} was written for another model configuration; use a new --out")
        base.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resuming from step {step} in {out}", file=sys.stderr)

    val_g_seed = cfg.seed + 1
    val_batch = windows(val_ids, cfg.eval_batches * 8, cfg.seq_len, torch.Generator().manual_seed(val_g_seed))

    def validate() -> float:
        base.eval()
        nll = estimate_nll(base, val_batch, draws=4, seed=val_g_seed).mean().item()
        base.train()
        return nll

    def checkpoint(val_loss: float | None):
        extra = {"training": {"step": step, "val_loss": val_loss, "data_sha256": _sha256(Path(data))}}
        base.save(out, extra=extra, dtype=save_dtype)  # trainer_state.pt keeps float32 for resuming
        with atomic_path(state_path) as tmp:
            torch.save({"model": base.model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed": elapsed, "history": history, "model_config": asdict(model_cfg),
                        "train_config": asdict(cfg)}, tmp)

    base.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-base", disable=not progress, dynamic_ncols=True)
    loss_ema = None
    t0 = time.time() - elapsed
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resume replays the same batches
        batch = windows(train_ids, cfg.batch_size, cfg.seq_len, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = masked_diffusion_nll(base, batch, generator=g).mean()
        if not torch.isfinite(loss):
            raise AdjustError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step, cfg):.2e}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validate()
            elapsed = time.time() - t0
            history.append({"step": step, "train_loss": round(loss_ema, 4), "val_loss": round(val, 4),
                            "elapsed_s": round(elapsed, 1)})
            bar.write(json.dumps(history[-1]), file=sys.stderr)
            checkpoint(val)
    bar.close()
    final = history[-1] if history else {"step": step}
    return {**final, "params": sum(p.numel() for p in base.parameters()), "train_tokens": len(train_ids),
            "val_tokens": len(val_ids)}
