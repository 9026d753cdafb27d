"""`adjust train-base`: a byte-level BPE tokenizer and our small masked diffusion LM on any text.

The loop: batches of token sequences, the masked-diffusion objective of `adjust.likelihood`,
AdamW with warm-up and cosine decay, gradient clipping, periodic validation, atomic
checkpoints and resume after interruption.

Two ways to cut the data into sequences (`--packing`):
- "stream" (default, for running text): documents joined by EOS into one token stream,
  random windows of `seq_len` tokens.
- "documents" (for prompt/answer data such as the verifiable tasks): every sequence starts
  at the start of one document, which is followed by EOS padding up to the batch's length.
  Each batch draws one length L (from the first document's length + 1 up to `seq_len`) and
  holds only documents that fit it, so the model sees exactly what generation gives it:
  a prompt at position 0, the text after it, and EOS to the end of the sequence, whatever
  the generation length. Records {"prompt", "completion"} train as LLaDA's SFT does: the
  prompt is never masked nor scored, only the completion and its EOS padding are.
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
from .data import read_examples
from .errors import AdjustError
from .io import changed_settings, check_output_dir, load_state, load_state_file, save_state
from .lock import output_lock
from .likelihood import estimate_nll, masked_diffusion_nll

STATE_FILE = "trainer_state.pt"
# settings a resumed run may change: they decide how long it trains and how often it checkpoints
RESUMABLE = ("steps", "eval_every")


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
    packing: str = "stream"  # "stream" or "documents" (see the module docstring)


PACKINGS = ("stream", "documents")


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


def schedule(cfg, schedule_steps: int):
    """The config whose --steps shapes the learning-rate schedule (and distill's unroll curriculum): that of
    the run's first start. A run extended with a larger --steps keeps it, so its first steps are exactly those
    of the shorter run, and the steps past it run at the schedule's final value."""
    from dataclasses import replace

    return replace(cfg, steps=schedule_steps)


def check_steps(steps: int, saved_step: int, schedule_steps: int, out) -> None:
    """Refuse a --steps that would hand back a later checkpoint (below the saved step) or change the
    schedule of the steps still to come (below the --steps the run started with)."""
    if steps < saved_step:
        raise AdjustError(f"{out} holds a run at step {saved_step}; --steps {steps} is below it: ask for at "
                          f"least {saved_step}, or use a new --out")
    if steps < schedule_steps:
        raise AdjustError(f"{out} holds a run started with --steps {schedule_steps}; --steps {steps} would cut "
                          f"its schedule short: ask for at least {schedule_steps} (more extends the run at the "
                          "schedule's final value), or use a new --out")


def windows(stream: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=g)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


class DocumentBatches:
    """Batches of whole documents, each followed by EOS padding to the batch's one length.

    Calling it returns (ids, eligible): eligible marks the tokens after each document's prompt.
    """

    def __init__(self, docs: list[list[int]], prompt_lengths: list[int], seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.docs = docs
        self.prompt_lengths = prompt_lengths
        self.lengths = torch.tensor([len(d) for d in docs])
        # documents sorted by length: those fitting a length L are a prefix of this order
        self.order = torch.argsort(self.lengths, stable=True)
        self.sorted_lengths = self.lengths[self.order]

    def __call__(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        first = int(torch.randint(0, len(self.docs), (1,), generator=g))
        lo = int(self.lengths[first]) + 1  # at least one EOS after every document
        length = int(torch.randint(lo, self.seq_len + 1, (1,), generator=g))
        fits = int(torch.searchsorted(self.sorted_lengths, length - 1, right=True))  # docs of <= length-1 tokens
        picks = self.order[torch.randint(0, fits, (batch,), generator=g)]
        out = torch.full((batch, length), self.eos_id, dtype=torch.long)
        eligible = torch.ones((batch, length), dtype=torch.bool)
        for row, i in enumerate(picks.tolist()):
            out[row, :len(self.docs[i])] = torch.tensor(self.docs[i])
            eligible[row, :self.prompt_lengths[i]] = False
        return out, eligible


def document_batches(examples: list[tuple[str, str]], tokenizer, eos_id: int, seq_len: int,
                     data) -> DocumentBatches:
    """Tokenize (prompt, completion) pairs separately, as generation sees a prompt, and check their lengths."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    prompts = [encode(p) for p, _ in examples]
    docs = [pr + encode(c) for pr, (_, c) in zip(prompts, examples)]
    longest = max(range(len(docs)), key=lambda i: len(docs[i]))
    if len(docs[longest]) >= seq_len:
        raise AdjustError(f"document {longest + 1} of {data} has {len(docs[longest])} tokens; --packing "
                          f"documents needs every document shorter than --seq-len {seq_len} (room for an EOS)")
    return DocumentBatches(docs, [len(p) for p in prompts], seq_len, eos_id)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train_base(data: str | Path, out: str | Path, cfg: TrainConfig, model_cfg: TinyConfig | None = None,
               tokenizer_dir: str | Path | None = None, name: str | None = None, progress: bool = True,
               save_dtype: torch.dtype = torch.float32) -> dict:
    """Train (or resume training) a base model into `out`. Returns the final metrics.

    The resume state (trainer_state.pt: weights, optimizer, step, history, settings) is read with
    torch.load(weights_only=True); a resume with other settings (any but --steps and --eval-every,
    the model configuration, the data file) is refused, naming them. --steps may be raised to extend
    a run (see `schedule`), never lowered below the saved step.

    One process at a time writes `out` (`adjust.lock.output_lock`)."""
    out = check_output_dir(out)
    with output_lock(out):
        return _train_base(data, out, cfg, model_cfg, tokenizer_dir, name, progress, save_dtype)


def _train_base(data, out: Path, cfg: TrainConfig, model_cfg, tokenizer_dir, name, progress, save_dtype) -> dict:
    examples = read_examples(data)
    docs = [prompt + completion for prompt, completion in examples]
    torch.manual_seed(cfg.seed)
    state_path = out / STATE_FILE
    resume = state_path.is_file()
    if resume and not (out / "tokenizer.json").is_file():
        # a kill inside the first checkpoint, after the state and before the tokenizer: nothing to resume
        print(f"{state_path} has no tokenizer beside it (a first checkpoint cut short); starting over",
              file=sys.stderr)
        resume = False
    requested_vocab = (model_cfg or TinyConfig()).tokenizer_size
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

    if cfg.packing not in PACKINGS:
        raise AdjustError(f"unknown --packing {cfg.packing!r}; choose from {', '.join(PACKINGS)}")
    if cfg.packing == "stream":
        stream = token_stream(docs, tokenizer, ids["eos_id"])
        n_val = max(cfg.seq_len + 1, int(len(stream) * cfg.val_fraction))
        if len(stream) < n_val + 2 * cfg.seq_len:
            raise AdjustError(f"data file {data} is too small: {len(stream)} tokens, need at least "
                              f"{n_val + 2 * cfg.seq_len} for windows of {cfg.seq_len} plus a validation split")
        train_ids, val_ids = stream[:-n_val], stream[-n_val:]
        train_batch = lambda b, g: (windows(train_ids, b, cfg.seq_len, g), None)  # noqa: E731
        val_gen = torch.Generator().manual_seed(cfg.seed + 1)
        val_batches = [(windows(val_ids, cfg.eval_batches * 8, cfg.seq_len, val_gen), None)]
        n_train_tokens, n_val_tokens = len(train_ids), len(val_ids)
    else:
        n_val = max(1, int(len(examples) * cfg.val_fraction))
        if len(examples) < n_val + 1:
            raise AdjustError(f"data file {data} is too small: {len(examples)} documents, need at least 2 "
                              "(training plus a validation split)")
        train_docs = document_batches(examples[:-n_val], tokenizer, ids["eos_id"], cfg.seq_len, data)
        val_docs = document_batches(examples[-n_val:], tokenizer, ids["eos_id"], cfg.seq_len, data)
        train_batch = train_docs
        val_gen = torch.Generator().manual_seed(cfg.seed + 1)  # one length per batch: several batches
        val_batches = [val_docs(8, val_gen) for _ in range(cfg.eval_batches)]
        n_train_tokens = int(train_docs.lengths.sum()) + len(train_docs.docs)
        n_val_tokens = int(val_docs.lengths.sum()) + len(val_docs.docs)

    base = TinyBase(model_cfg, tokenizer, name=name or out.name)
    opt = torch.optim.AdamW(base.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    step, elapsed, history, loss_ema = 0, 0.0, [], None
    data_sha = _sha256(Path(data))
    settings = {**asdict(cfg), "data_sha256": data_sha, "schedule_steps": cfg.steps,
                "vocab_size": None if tokenizer_dir is not None else requested_vocab}
    if resume:
        state = load_state_file(state_path, "trainer state", ("model", "optimizer", "step", "elapsed", "history",
                                                              "model_config", "settings"))
        # settings recorded since: a state without them is compared on what it has
        saved = {"vocab_size": settings["vocab_size"], "schedule_steps": state["settings"].get("steps"),
                 **state["settings"]}
        check_steps(cfg.steps, state["step"], saved["schedule_steps"], out)
        settings["schedule_steps"] = saved["schedule_steps"]
        if saved["vocab_size"] != settings["vocab_size"]:
            raise AdjustError(f"{out} holds a train-base run with another vocabulary: --vocab-size was "
                              f"{saved['vocab_size'] or 'that of --tokenizer'}, now "
                              f"{settings['vocab_size'] or 'that of --tokenizer'}; rerun with the same settings "
                              "or use a new --out")
        if state["model_config"] != asdict(model_cfg):
            raise AdjustError(f"{state_path} was written for another model configuration; use a new --out")
        changed = changed_settings(saved, settings, ignore=RESUMABLE)
        if changed:
            said = "; ".join("--data (another file)" if k == "data_sha256" else
                             f"--{k.replace('_', '-')} was {state['settings'].get(k)}, now {settings.get(k)}"
                             for k in changed)
            raise AdjustError(f"{out} holds a train-base run with other settings: {said}; rerun with the same "
                              "settings or use a new --out")
        load_state(base.model, state["model"], state_path, "model weights")
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        loss_ema = state.get("loss_ema")  # the logged train_loss goes on as in an uninterrupted run
        print(f"resuming from step {step} in {out}", file=sys.stderr)

    val_g_seed = cfg.seed + 1

    def validate() -> float:
        """Mean NLL bound per token over the fixed validation batches (equal weight per sequence)."""
        base.eval()
        nll = torch.cat([estimate_nll(base, b, eligible, draws=4, seed=val_g_seed)
                         for b, eligible in val_batches]).mean().item()
        base.train()
        return nll

    def checkpoint(val_loss: float | None):
        # the resume state first (the truth); a resume rewrites the model files from it (`export`)
        save_state(state_path, {"model": base.model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "elapsed": elapsed, "history": history, "model_config": asdict(model_cfg),
                                "settings": settings, "loss_ema": loss_ema})
        export(val_loss)

    def export(val_loss: float | None):
        extra = {"training": {"step": step, "val_loss": val_loss, "data_sha256": data_sha}}
        base.save(out, extra=extra, dtype=save_dtype)  # trainer_state.pt keeps float32 for resuming

    if resume:
        export(history[-1]["val_loss"] if history else None)  # repairs a checkpoint cut between its files

    base.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-base", disable=not progress, dynamic_ncols=True)
    t0 = time.time() - elapsed
    plan = schedule(cfg, settings["schedule_steps"])
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resume replays the same batches
        batch, eligible = train_batch(cfg.batch_size, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan)
        loss = masked_diffusion_nll(base, batch, eligible, generator=g).mean()
        if not torch.isfinite(loss):
            raise AdjustError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step, plan):.2e}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validate()
            elapsed = time.time() - t0
            history.append({"step": step, "train_loss": round(loss_ema, 4), "val_loss": round(val, 4),
                            "elapsed_s": round(elapsed, 1)})
            bar.write(json.dumps(history[-1]), file=sys.stderr)
            checkpoint(history[-1]["val_loss"])  # rounded, as a resume re-exports it
    bar.close()
    final = history[-1] if history else {"step": step}
    return {**final, "params": sum(p.numel() for p in base.parameters()), "train_tokens": n_train_tokens,
            "val_tokens": n_val_tokens}
