"""The one decoding loop (docs/method.md sections 2-3).

A canvas holds [left padding | prompt | generation]. The generation region is split into
blocks (one block unless `block_length` is set, semi-autoregressive otherwise). While the
current block has masks: one full pass of the base model, then the strategy commits tokens
through a `StepContext`. Strategies decide *which* and *how many* positions; the context
owns sampling, randomness, the sampler's unrolls and the statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .batching import group_by_length, per_row_table
from .errors import AdjustError
from .sampling import RowRNG, SamplingConfig, log_probs, order_scores, row_seed, sample_tokens


@dataclass
class Stats:
    full_passes: int = 0  # calls of the base model
    row_passes: int = 0  # full passes summed over the sequences that still had masks in them
    sampler_passes: int = 0  # calls of the joint sampler (unrolls)
    new_tokens: int = 0  # per sequence
    sequences: int = 0
    seconds: float = 0.0
    eos_filled: int = 0  # positions set to EOS by the early-exit rule, not decoded (summed over sequences)

    @property
    def decoded_tokens(self) -> float:
        """Tokens actually decoded, over all sequences (positions filled with EOS by early exit excluded)."""
        return self.new_tokens * self.sequences - self.eos_filled

    @property
    def tokens_per_full_pass(self) -> float:
        """Tokens a sequence decoded per full pass it took part in (the achieved K)."""
        return self.decoded_tokens / max(1, self.row_passes)

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second (positions filled with EOS by early exit are not counted)."""
        return self.decoded_tokens / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: "Stats") -> "Stats":
        """Stats of two runs one after the other (per-sequence counts averaged by sequences)."""
        n = self.sequences + other.sequences
        avg = lambda a, b: (a * self.sequences + b * other.sequences) / max(1, n)  # noqa: E731
        return Stats(self.full_passes + other.full_passes, self.row_passes + other.row_passes,
                     self.sampler_passes + other.sampler_passes, avg(self.new_tokens, other.new_tokens), n,
                     self.seconds + other.seconds, self.eos_filled + other.eos_filled)

    def to_dict(self) -> dict:
        return {"full_passes": self.full_passes, "sampler_passes": self.sampler_passes,
                "new_tokens": int(self.new_tokens) if float(self.new_tokens).is_integer() else self.new_tokens,
                "sequences": self.sequences,
                "tokens_per_full_pass": round(self.tokens_per_full_pass, 4),
                "seconds": round(self.seconds, 4), "tokens_per_second": round(self.tokens_per_second, 2),
                "eos_filled": self.eos_filled}


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, gen_length) generated ids
    stats: Stats
    history: list | None = None  # per sequence: list of steps, each a list of (position, token, unroll)


@dataclass
class StepContext:
    """What a strategy sees in one step: the full pass, and the means to commit tokens."""

    loop: "_Loop"
    hidden: torch.Tensor  # (B, L, H) aligned hidden states of this step's full pass
    step: int
    unroll: int = 0  # 0 = the full pass's distributions, j = after j sampler unrolls
    _full_logits: tuple | None = field(default=None, repr=False)  # (candidates, logits) of the full pass

    @property
    def x(self) -> torch.Tensor:
        return self.loop.x

    @property
    def sampling(self) -> SamplingConfig:
        return self.loop.sampling

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the masked positions in the current block, row-major."""
        return self.loop.candidates()

    def remaining(self) -> torch.Tensor:
        """(B,) masked positions left in the current block, per sequence."""
        rows, _ = self.candidates()
        return torch.bincount(rows, minlength=self.x.shape[0])

    def distributions(self, hidden: torch.Tensor | None = None):
        """(rows, cols, logp): filtered log-probs at the candidates, from `hidden` (default: the full pass)."""
        rows, cols = self.candidates()
        if hidden is None or hidden is self.hidden:
            if self._full_logits is None or self._full_logits[0] is not self.loop._cand:
                self._full_logits = (self.loop._cand, self.loop.base.logits(self.hidden[rows, cols]))
            logits = self._full_logits[1]
        else:
            logits = self.loop.base.logits(hidden[rows, cols])
        return rows, cols, log_probs(logits, self.sampling)

    def scores(self, logp: torch.Tensor, rows: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """(N,) order-rule scores (higher = sooner) for the entries of `logp`."""
        order = order or self.sampling.order
        noise = None
        if order == "random":
            noise = torch.empty(len(rows), dtype=torch.float64, device=logp.device)
            for r in rows.unique().tolist():
                sel = (rows == r).nonzero(as_tuple=True)[0]
                noise[sel] = self.loop.rng.uniform(r, len(sel))
        return order_scores(logp, order, noise)

    def choose(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Indices of the entries to unmask: the counts[b] best-scored entries of each row b."""
        table, starts, per_row = per_row_table(scores, rows, self.x.shape[0], float("-inf"))
        counts = torch.minimum(counts, per_row)
        if counts.max() <= 0:
            return torch.empty(0, dtype=torch.long, device=rows.device)
        # stable sort: among equal scores the lower position goes first (a deterministic, documented tie rule)
        top = table.sort(dim=1, descending=True, stable=True).indices[:, : int(counts.max())]  # (B, kmax)
        keep = torch.arange(top.shape[1], device=rows.device)[None] < counts[:, None]
        return (starts[:, None] + top)[keep]

    def commit(self, entries: torch.Tensor, rows, cols, logp) -> torch.Tensor:
        """Sample tokens for the chosen entries and write them into the canvas; returns the tokens."""
        entries = entries.sort().values  # row-major: each row draws in position order
        tokens = sample_tokens(logp[entries], rows[entries], self.loop.rng, self.sampling.temperature == 0)
        self.loop.write(rows[entries], cols[entries], tokens, self.step, self.unroll)
        return tokens

    def unroll_sampler(self, prior: torch.Tensor) -> torch.Tensor:
        """One pass of the joint sampler on the current canvas; returns its hidden states (B, L, H)."""
        sampler = self.loop.sampler
        if sampler is None:
            raise AdjustError("this strategy needs a joint sampler (--sampler)")
        self.loop.stats.sampler_passes += 1
        self.unroll += 1
        return sampler(self.loop.base, self.x, prior, self.loop.attention_mask)


class _Loop:
    """State of one batched generation: canvas, current block, randomness, stats, history.

    Early exit (`stops`: the base's stop token ids, or None for off): when a stop token (EOS or
    the chat template's end-of-turn) is committed at position p of a sequence, every position after
    p still masked in that sequence, in this block and the later ones, is set to EOS at once and
    is never decoded: the answer has ended, and text is cut at its first stop token anyway.
    Those positions are counted in `Stats.eos_filled`; a sequence with no masks left takes no part
    in later passes (`row_passes`), and the loop ends when no sequence has any.
    """

    def __init__(self, base, x, attention_mask, gen_start, sampling, rng, sampler, record_history, stops=None):
        self.base, self.x, self.attention_mask = base, x, attention_mask
        self.gen_start, self.sampling, self.rng, self.sampler = gen_start, sampling, rng, sampler
        self.stats = Stats(sequences=x.shape[0])
        self.block = (gen_start, x.shape[1])
        self.history = [[] for _ in range(x.shape[0])] if record_history else None
        self._cand = None
        self.stops = None if stops is None else torch.tensor(stops, dtype=torch.long, device=x.device)

    def candidates(self):
        if self._cand is None:
            lo, hi = self.block
            region = torch.zeros_like(self.x, dtype=torch.bool)
            region[:, lo:hi] = True
            self._cand = ((self.x == self.base.mask_id) & region).nonzero(as_tuple=True)
        return self._cand

    def write(self, rows, cols, tokens, step, unroll):
        if (self.x[rows, cols] != self.base.mask_id).any():
            raise RuntimeError("a strategy tried to overwrite an unmasked token")
        self.x[rows, cols] = tokens
        self._cand = None
        if self.stops is not None:
            self._fill_after_stops(rows, cols, tokens)
        if self.history is not None:
            for r, c, t in zip(rows.tolist(), cols.tolist(), tokens.tolist()):
                h = self.history[r]
                if not h or h[-1]["step"] != step:
                    h.append({"step": step, "unmasked": []})
                h[-1]["unmasked"].append([c - self.gen_start, t, unroll])


    def _fill_after_stops(self, rows, cols, tokens):
        hit = torch.isin(tokens, self.stops)
        if not hit.any():
            return
        first = torch.full((self.x.shape[0],), self.x.shape[1], dtype=torch.long, device=self.x.device)
        first = first.scatter_reduce(0, rows[hit], cols[hit], reduce="amin")  # earliest stop per row, this write
        later = torch.arange(self.x.shape[1], device=self.x.device)[None] > first[:, None]
        fill = later & (self.x == self.base.mask_id)
        self.x[fill] = self.base.eos_id
        self.stats.eos_filled += int(fill.sum())


def build_canvas(prompts: list[list[int]], gen_length: int, base):
    """Left-padded canvas (B, P + gen_length), attention mask (None if no padding), and P."""
    P = max((len(p) for p in prompts), default=0)
    B = len(prompts)
    x = torch.full((B, P + gen_length), base.mask_id, dtype=torch.long)
    pad = torch.zeros((B, P + gen_length), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)] = base.pad_id
        pad[b, : P - len(p)] = True
        if p:
            x[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
    mask = None if not pad.any() else (~pad).long()
    return x, mask, P


def check_request(base, prompts: list[list[int]], gen_length: int, block_length: int | None) -> None:
    if gen_length < 1:
        raise AdjustError(f"--gen-length must be at least 1, got {gen_length}")
    if block_length is not None and block_length < 1:
        raise AdjustError(f"--block-length must be at least 1, got {block_length}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + gen_length > base.max_length:
        raise AdjustError(f"prompt ({longest} tokens) + --gen-length ({gen_length}) exceeds the model's context "
                          f"of {base.max_length} tokens; shorten the prompt or the generation")
    for p in prompts:
        if base.mask_id in p:
            raise AdjustError("a prompt contains the mask token; prompts must be plain text")


@torch.inference_mode()
def generate(base, prompts: list[list[int]], strategy, sampling: SamplingConfig = SamplingConfig(),
             gen_length: int = 64, block_length: int | None = None, seed: int = 0,
             sample_indices: list[int] | None = None, sampler=None, record_history: bool = False,
             early_exit: bool = False, on_step=None) -> Generation:
    """Generate `gen_length` tokens after each prompt (an empty prompt = unconditional).

    Each sequence b uses its own generator seeded by (seed, prompts[b], sample_indices[b]),
    so results do not depend on batching. `early_exit`: a sequence ends at its first stop token,
    the positions after it are set to EOS, not decoded (see `_Loop`). Off (the default, and always for
    rollouts, which must unmask every position), every position is decoded as in the plain loop.
    `on_step(step, rows, cols, tokens)`, if given, is called after each full pass with the (CPU) rows,
    generation-relative columns and tokens it unmasked; an exception it raises stops the generation
    (the server streams and cancels this way). It only observes: the tokens are the same with or
    without it.
    """
    check_request(base, prompts, gen_length, block_length)
    if not strategy.adaptive and strategy.k > gen_length:
        raise AdjustError(f"--tokens-per-pass {strategy.k} is larger than --gen-length {gen_length}")
    if strategy.uses_sampler and sampler is None:
        raise AdjustError(f"strategy {strategy.name!r} needs a joint sampler; pass --sampler DIR")
    if strategy.uses_sampler:
        sampler.check_base(base)
        sampler.check_decoding(sampling, block_length if block_length and block_length < gen_length else None)
    device = base.device
    x, attention_mask, P = build_canvas(prompts, gen_length, base)
    x = x.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    sample_indices = sample_indices or [0] * len(prompts)
    rng = RowRNG([row_seed(seed, p, i) for p, i in zip(prompts, sample_indices)], device)
    stops = tuple(base.stop_ids) if early_exit and base.eos_id is not None and base.stop_ids else None
    loop = _Loop(base, x, attention_mask, P, sampling, rng, sampler, record_history, stops)
    block_length = block_length or gen_length
    t0 = time.perf_counter()
    step = 0
    for lo in range(P, P + gen_length, block_length):
        loop.block = (lo, min(lo + block_length, P + gen_length))
        loop._cand = None
        while len(loop.candidates()[0]):
            rows_before = torch.bincount(loop.candidates()[0], minlength=x.shape[0])
            before = loop.x.clone() if on_step is not None else None
            hidden = base.hidden_states(loop.x, attention_mask)
            loop.stats.full_passes += 1
            loop.stats.row_passes += int((rows_before > 0).sum())
            strategy.step(StepContext(loop, hidden, step))
            rows_after = torch.bincount(loop.candidates()[0], minlength=x.shape[0])
            stalled = (rows_before > 0) & (rows_after == rows_before)
            if stalled.any():
                raise RuntimeError(f"strategy {strategy.name!r} committed no token in a step")
            if on_step is not None:
                r, c = (loop.x != before).nonzero(as_tuple=True)
                on_step(step, r.cpu(), (c - P).cpu(), loop.x[r, c].cpu())
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop.stats.seconds = time.perf_counter() - t0
    loop.stats.new_tokens = gen_length
    return Generation(loop.x[:, P:].cpu(), loop.stats, loop.history)


def full_passes_needed(gen_length: int, k: int, block_length: int | None = None) -> int:
    """ceil(N / K) per block, summed: the full-pass count of a fixed-K strategy."""
    block_length = block_length or gen_length
    sizes = [min(block_length, gen_length - lo) for lo in range(0, gen_length, block_length)]
    return sum(math.ceil(s / k) for s in sizes)


def generate_texts(base, prompts: list[str], strategy, sampling: SamplingConfig = SamplingConfig(),
                   gen_length: int = 64, num_samples: int = 1, batch_size: int = 16,
                   block_length: int | None = None, seed: int = 0, sampler=None, record_history: bool = False,
                   progress: bool = False, early_exit: bool | None = None) -> tuple[list[dict], Stats]:
    """Text in, samples out: `num_samples` generations per prompt ("" = unconditional), batched.

    Returns ([{"prompt", "text", "token_ids", "sample_index", ("history")}], merged Stats).
    `early_exit` (see `generate`): None = on for chat prompts (`base.chat`, --chat), off otherwise.
    """
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise AdjustError(f"--num-samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise AdjustError(f"--batch-size must be at least 1, got {batch_size}")
    if early_exit is None:
        early_exit = bool(getattr(base, "chat", False))
    encoded = [base.encode(p) for p in prompts]
    check_request(base, encoded, gen_length, block_length)
    jobs = [(n, text, ids, i) for n, (text, ids) in enumerate(zip(prompts, encoded)) for i in range(num_samples)]
    # Batch prompts of equal length only: no padding, so a sequence gets bit-identical
    # logits (hence tokens) in any batch, and no compute is spent on pad tokens.
    batches = [group[s:s + batch_size] for group in group_by_length(jobs, lambda job: len(job[2]))
               for s in range(0, len(group), batch_size)]
    results, stats = {}, None
    bar = tqdm(total=len(jobs), desc=f"generate {strategy.describe()}", disable=not progress, leave=False)
    for chunk in batches:
        out = generate(base, [ids for _, _, ids, _ in chunk], strategy, sampling, gen_length, block_length, seed,
                       [i for *_, i in chunk], sampler, record_history, early_exit)
        stats = out.stats if stats is None else stats.merge(out.stats)
        for b, (n, text, _, i) in enumerate(chunk):
            ids = out.tokens[b].tolist()
            s = {"prompt": text, "text": base.decode(ids), "token_ids": ids, "sample_index": i}
            if out.history is not None:
                s["history"] = out.history[b]
            results[(n, i)] = s
        bar.update(len(chunk))
    bar.close()
    return [results[(n, i)] for n, _, _, i in jobs], stats
