"""The one decoding loop (docs/method.md sections 2-3).

A canvas holds [left padding | prompt | generation]. The generation region is split into
blocks (one block unless `block_length` is set, semi-autoregressive otherwise). While the
current block has masks: one full pass of the base model, then the strategy commits tokens
through a `StepContext`. Strategies decide *which* and *how many* positions; the context
owns sampling, randomness, the sampler's unrolls and the statistics.

Key/value cache (`cache`, needs blocks; Fast-dLLM's prefix and dual caches, inside this one loop):
"none" runs the base on the whole canvas every pass. "prefix": at each block start (and every
`cache_refresh` passes) one pass over the whole canvas stores every layer's keys/values; the
passes in between run the base only on the block and what lies right of it, attending to the
stored keys/values left of it. "dual": those passes run only on the block, with the stored
keys/values on both sides. Hidden states of positions not recomputed keep their last values.
`cache_verify` N > 0 (a refresh rule after dLLM-Cache's V-verify): each cached pass also recomputes, with the
block, the N positions per sequence whose first-layer attention output moved most since their keys/values were
cached (a probe of the first layer's queries and attention on the canvas), refreshing their keys/values
(`layers.Transformer.forward_span`); their hidden states keep their last values, as elsewhere outside the block.
With a cache, ADJUST's sampler computes its own keys/values of the whole canvas once per step
(from the step's full pass) and each unroll runs only the block's rows against them; a sampler of
several blocks (`--sampler-layers`) unrolls on every row instead, as without a cache.

Unrolls (`unroll`, the sampler's passes inside a step): "full" runs the sampler on every row and the
LM head at every masked position of the block after each unroll. "fast" (`FastUnroll`) fixes, at
the step's first unroll, the few masked positions the rest of the step may pick (the best by the
full pass's order scores); the sampler's queries run only there and at the positions written in
the step, against its keys/values of the other positions computed once per step (as with a cache),
and the LM head only there. An approximation: docs/method.md section 3.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .batching import group_by_length, per_row_table
from .errors import AdjustError
from .sampling import RowRNG, SamplingConfig, log_probs, order_scores, row_seed, sample_tokens


CACHE_MODES = ("none", "prefix", "dual")
UNROLL_MODES = ("full", "fast")
# "fast": per sequence, the positions a step's unrolls may still pick, per token the step has left to write
FAST_PICKS_PER_TOKEN = 2
# What `adjust generate`, the server and the harness use for a strategy with sampler unrolls unless told: the
# fast unroll, the frontier's fastest at no measured quality cost (docs/results.md, "Defaults"). The library's
# `generate` and the evaluation commands keep "full", the reference computation, unless told.
DEFAULT_UNROLL = "fast"


def resolve_unroll(unroll: str | None, strategy, sampler=None) -> str:
    """The unroll mode given, or (None) DEFAULT_UNROLL for a strategy that unrolls the sampler with a one-block
    sampler, "full" otherwise. A sampler of several blocks (`--sampler-layers`) defaults to "full": the fast
    unroll keeps, in every block, the other positions' keys/values of the step's first unroll, and what later
    blocks learned from the tokens written since is lost (the task model's `pick`: 0.988 full, 0.578 fast at
    K = 4, docs/results.md "Cheaper unrolls")."""
    if unroll is not None:
        return unroll
    return DEFAULT_UNROLL if strategy.uses_sampler and not (sampler is not None and sampler.deep) else "full"


@dataclass(frozen=True)
class FastUnroll:
    """How a cheap unroll is computed (`unroll="fast"` is `FastUnroll()`; docs/method.md section 3).

    At a step's first unroll (after the tokens written from the full pass) each sequence keeps `picks` of its
    masked positions, the best by the full pass's order scores (None: FAST_PICKS_PER_TOKEN x (K - 1)); the
    step's unrolls score, and the strategy picks, only among those. The sampler's queries run at those
    positions and at the ones written in the step (`all_rows`: at every position), attending to its
    keys/values of the other positions computed once per step from the full pass. With `all_rows` and
    `picks` at least every masked position, this is the full unroll up to floating-point rounding.
    """

    picks: int | None = None
    all_rows: bool = False

    def __post_init__(self):
        if self.picks is not None and (not isinstance(self.picks, int) or self.picks < 1):
            raise AdjustError(f"fast unroll picks must be a positive integer, got {self.picks!r}")

    @property
    def name(self) -> str:
        return "fast" if self == FastUnroll() else f"fast(picks={self.picks},all_rows={self.all_rows})"

    def count(self, k: int) -> int:
        """Positions kept per sequence for a step of a strategy writing up to `k` tokens per full pass."""
        return self.picks if self.picks is not None else FAST_PICKS_PER_TOKEN * max(1, k - 1)


def unroll_plan(unroll) -> FastUnroll | None:
    """None for "full", `FastUnroll()` for "fast", a given `FastUnroll` itself; AdjustError for anything else."""
    if isinstance(unroll, FastUnroll):
        return unroll
    if unroll == "full":
        return None
    if unroll == "fast":
        return FastUnroll()
    raise AdjustError(f"unknown --unroll {unroll!r}; choose one of {', '.join(UNROLL_MODES)}")


@dataclass
class Stats:
    full_passes: int = 0  # calls of the base model
    row_passes: int = 0  # full passes summed over the sequences that still had masks in them
    sampler_passes: int = 0  # calls of the joint sampler (unrolls)
    new_tokens: int = 0  # per sequence
    sequences: int = 0
    seconds: float = 0.0
    eos_filled: int = 0  # positions set to EOS by the early-exit rule, not decoded (summed over sequences)
    cache: str = "none"  # key/value cache mode (CACHE_MODES)
    refresh_passes: int = 0  # full passes that ran the base on the whole canvas (all of them without a cache)
    positions: int = 0  # canvas positions the base computed, summed over full passes (per sequence)
    sampler_positions: int = 0  # canvas positions the sampler computed, summed over unrolls (per sequence)
    refresh_seconds: float = 0.0  # time in whole-canvas base passes
    span_seconds: float = 0.0  # time in cached base passes (block, or block and right of it)
    unroll_seconds: float = 0.0  # time in sampler unrolls (with a cache or fast: the step's sampler keys/values included)
    unroll: str = "full"  # how unrolls were computed: "full", "fast" (or a FastUnroll's name)
    base_rows: int = 0  # canvases (batch rows) the base computed, summed over full passes (with drafted ones)
    drafts_proposed: int = 0  # speculative: drafted writes the base verified (summed over sequences)
    drafts_accepted: int = 0  # speculative: of those, the ones equal to the target's own write
    # the shape of every full pass, for the pass-equivalent cost (adjust.eval.costs): "kind canvases rows" ->
    # decoding sequences summed over such passes; kind "full" (the whole canvas) or "span" (cached: the block)
    pass_shapes: dict = field(default_factory=dict)
    row_unrolls: int = 0  # sampler unrolls summed over the sequences decoding at each step (per sequence)

    @property
    def decoded_tokens(self) -> float:
        """Tokens actually decoded, over all sequences (positions filled with EOS by early exit excluded)."""
        return self.new_tokens * self.sequences - self.eos_filled

    @property
    def tokens_per_full_pass(self) -> float:
        """Tokens a sequence decoded per full pass it took part in (the achieved K)."""
        return self.decoded_tokens / max(1, self.row_passes)

    @property
    def tokens_per_full_pass_with_eos(self) -> float:
        """As `tokens_per_full_pass`, counting the positions early exit filled with EOS as written."""
        return self.new_tokens * self.sequences / max(1, self.row_passes)

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second (positions filled with EOS by early exit are not counted)."""
        return self.decoded_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def positions_per_full_pass(self) -> float:
        """Canvas positions the base computed per full pass (the canvas length without a cache)."""
        return self.positions / max(1, self.full_passes)

    @property
    def positions_per_unroll(self) -> float:
        """Canvas positions the sampler computed per unroll (the canvas length without a cache, the block with)."""
        return self.sampler_positions / max(1, self.sampler_passes)

    @property
    def unroll_cost(self) -> float | None:
        """Mean time of one unroll over that of one cached full pass (of a whole-canvas pass without a cache)."""
        spans = self.full_passes - self.refresh_passes
        per_pass = (self.span_seconds / spans) if spans else (self.refresh_seconds / max(1, self.refresh_passes))
        if not self.sampler_passes or per_pass <= 0:
            return None
        return self.unroll_seconds / self.sampler_passes / per_pass

    def merge(self, other: "Stats") -> "Stats":
        """Stats of two runs one after the other (per-sequence counts averaged by sequences)."""
        n = self.sequences + other.sequences
        avg = lambda a, b: (a * self.sequences + b * other.sequences) / max(1, n)  # noqa: E731
        add = lambda name: getattr(self, name) + getattr(other, name)  # noqa: E731
        return Stats(add("full_passes"), add("row_passes"), add("sampler_passes"), avg(self.new_tokens, other.new_tokens),
                     n, add("seconds"), add("eos_filled"), self.cache, add("refresh_passes"), add("positions"),
                     add("sampler_positions"), add("refresh_seconds"), add("span_seconds"), add("unroll_seconds"),
                     self.unroll, add("base_rows"), add("drafts_proposed"), add("drafts_accepted"),
                     {k: self.pass_shapes.get(k, 0) + other.pass_shapes.get(k, 0)
                      for k in {**self.pass_shapes, **other.pass_shapes}}, add("row_unrolls"))

    def to_dict(self) -> dict:
        cost = self.unroll_cost
        return {"full_passes": self.full_passes, "sampler_passes": self.sampler_passes,
                "new_tokens": int(self.new_tokens) if float(self.new_tokens).is_integer() else self.new_tokens,
                "sequences": self.sequences,
                "tokens_per_full_pass": round(self.tokens_per_full_pass, 4),
                "seconds": round(self.seconds, 4), "tokens_per_second": round(self.tokens_per_second, 2),
                "eos_filled": self.eos_filled, "cache": self.cache, "unroll": self.unroll,
                "refresh_passes": self.refresh_passes,
                "positions_per_full_pass": round(self.positions_per_full_pass, 2),
                "positions_per_unroll": round(self.positions_per_unroll, 2),
                "unroll_cost": None if cost is None else round(cost, 4),
                "base_rows": self.base_rows, "rows_per_full_pass": round(self.base_rows / max(1, self.full_passes), 2),
                "tokens_per_full_pass_with_eos": round(self.tokens_per_full_pass_with_eos, 4),
                "drafts_proposed": self.drafts_proposed, "drafts_accepted": self.drafts_accepted,
                "pass_shapes": dict(sorted(self.pass_shapes.items())), "row_unrolls": self.row_unrolls}

    def count_pass(self, kind: str, canvases: int, rows: int, sequences: int) -> None:
        """Record one full pass: `kind` "full" or "span", `canvases` the batch's canvases, `rows` all the rows
        the base computed (drafted ones included), `sequences` those of the canvases still decoding."""
        key = f"{kind} {canvases} {rows}"
        self.pass_shapes[key] = self.pass_shapes.get(key, 0) + sequences


def choose_best(scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Indices of the counts[b] best-scored of the row-major entries (`rows`) of each row b, (B,) = counts."""
    table, starts, per_row = per_row_table(scores, rows, counts.shape[0], float("-inf"))
    counts = torch.minimum(counts, per_row)
    if counts.max() <= 0:
        return torch.empty(0, dtype=torch.long, device=rows.device)
    # stable sort: among equal scores the lower position goes first (a deterministic, documented tie rule)
    top = table.sort(dim=1, descending=True, stable=True).indices[:, : int(counts.max())]  # (B, kmax)
    keep = torch.arange(top.shape[1], device=rows.device)[None] < counts[:, None]
    return (starts[:, None] + top)[keep]


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
    _full: tuple | None = field(default=None, repr=False)  # (candidates, logp, scores or None) of the full pass
    _sampler_kv: tuple | None = field(default=None, repr=False)  # with a cache or fast: the sampler's (k, v) this step
    _fast: tuple | None = field(default=None, repr=False)  # fast: (rows, cols, positions (B, n)) of the unrolls

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
        """(B,) positions the step can still pick, per sequence: the block's masked ones (after a fast unroll, those
        of them kept for the step's unrolls)."""
        rows, _ = self.unroll_candidates()
        return torch.bincount(rows, minlength=self.x.shape[0])

    def distributions(self, hidden: torch.Tensor | None = None):
        """(rows, cols, logp): filtered log-probs at the candidates, from `hidden` (default: the full pass).

        After a fast unroll (`FastUnroll`) the candidates are only the masked positions kept for the step's unrolls."""
        if hidden is None or hidden is self.hidden:
            cand = self.candidates()
            if self._full is None or self._full[0] is not cand:
                rows, cols = cand
                self._full = (cand, log_probs(self.loop.base.logits(self.hidden[rows, cols]), self.sampling), None)
            return (*cand, self._full[1])
        rows, cols = self.unroll_candidates()
        return rows, cols, log_probs(self.loop.base.logits(hidden[rows, cols]), self.sampling)

    def unroll_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) where an unroll's distributions are computed: every candidate, or after a fast unroll the
        masked positions kept for the step's unrolls."""
        if self._fast is None:
            return self.candidates()
        rows, cols, _ = self._fast
        still = self.x[rows, cols] == self.loop.base.mask_id
        return rows[still], cols[still]

    def scores(self, logp: torch.Tensor, rows: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """(N,) order-rule scores (higher = sooner) for the entries of `logp`."""
        order = order or self.sampling.order
        full = self._full is not None and logp is self._full[1] and order == self.sampling.order
        if full and self._full[2] is not None:
            return self._full[2]
        noise = None
        if order == "random":
            noise = torch.empty(len(rows), dtype=torch.float64, device=logp.device)
            for r in rows.unique().tolist():
                sel = (rows == r).nonzero(as_tuple=True)[0]
                noise[sel] = self.loop.rng.uniform(r, len(sel))
        out = order_scores(logp, order, noise)
        if full:  # kept: a fast unroll ranks the step's remaining positions by them
            self._full = (*self._full[:2], out)
        return out

    def choose(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Indices of the entries to unmask: the counts[b] best-scored entries of each row b."""
        return choose_best(scores, rows, counts)

    def commit(self, entries: torch.Tensor, rows, cols, logp, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Sample tokens for the chosen entries and write them into the canvas; returns the tokens. `tokens`, if
        given, are the strategy's own draws, one per entry of `entries`, written instead of sampling."""
        order = entries.argsort()
        entries = entries[order]  # row-major: each row draws in position order
        if self.loop.forced is not None:  # teacher forcing: the path's next positions and tokens instead
            entries, tokens = self.loop.forced_writes(entries, rows, cols)
        elif tokens is not None:
            tokens = tokens[order]
        else:
            tokens = sample_tokens(logp[entries], rows[entries], self.loop.rng, self.sampling.temperature == 0)
        if self.loop.logprobs is not None:
            self.loop.record(rows[entries], cols[entries], tokens, logp[entries])
        self.loop.write(rows[entries], cols[entries], tokens, self.step, self.unroll)
        return tokens

    def unroll_sampler(self, prior: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
        """One pass of the joint sampler on the current canvas; returns its hidden states (B, L, H).

        Full: every row. With a cache: the block's rows (a sampler of several blocks: every row); fast: the
        step's kept and written positions (all rows with `all_rows`); both against the sampler's keys/values of
        the other positions, computed once per step from the step's full pass (nothing outside those rows changes
        within a step). Rows not computed keep `prior`. `eligible` (B, L) bool, read at a fast step's first
        unroll only: the positions the strategy may pick this step, the only masked ones a fast unroll keeps
        (default: every one)."""
        loop, sampler = self.loop, self.loop.sampler
        if sampler is None:
            raise AdjustError("this strategy needs a joint sampler (--sampler)")
        loop.stats.sampler_passes += 1
        self.unroll += 1
        t0 = loop.timer.start()
        if loop.unroll is None and (loop.cache == "none" or sampler.deep):
            # a deep sampler unrolls on every row under a cache too (`JointSampler.deep`; the task model's `pick`,
            # docs/results.md "A refresh rule")
            out = sampler(loop.base, self.x, prior, loop.attention_mask)
            loop.stats.sampler_positions += self.x.shape[1]
        else:
            if self._sampler_kv is None:
                self._sampler_kv = sampler.keys_values(loop.base, self.x, self.hidden, loop.attention_mask)
            out = prior.clone()
            if loop.unroll is None:
                lo, hi = loop.block
                out[:, lo:hi] = sampler.forward_span(loop.base, self.x, prior, loop.attention_mask, self._sampler_kv,
                                                     lo, hi)
                loop.stats.sampler_positions += hi - lo
            else:
                if self._fast is None:
                    self._fast = self._fast_rows(eligible)
                at = self._fast[2]
                new = sampler.forward_rows(loop.base, self.x, prior, loop.attention_mask, self._sampler_kv, at)
                out.scatter_(1, at[..., None].expand(-1, -1, out.shape[-1]), new)
                loop.stats.sampler_positions += at.shape[1]
        loop.timer.stop("unroll_seconds", t0)
        return out

    def _fast_rows(self, eligible: torch.Tensor | None = None) -> tuple:
        """(rows, cols, positions) of a fast step's unrolls: each sequence's masked positions kept for them (the
        best `picks` by the full pass's order scores, among the `eligible` ones if given) and those it wrote since
        the full pass, row-major; positions (B, n) are the sampler's query rows (those, padded per sequence by
        repeating one; every position with `all_rows`)."""
        loop, x, mask_id = self.loop, self.x, self.loop.base.mask_id
        if self._full is None:
            self.distributions()
        (rows, cols), logp, scores = self._full
        scores = self.scores(logp, rows) if scores is None else scores
        if loop.forced is not None:  # teacher forcing: the path's remaining positions are kept first
            scores = torch.where(loop.on_forced_path(rows, cols), torch.inf, scores)
        open_ = x[rows, cols] == mask_id
        keep = ~open_  # written in this step (the full pass's candidates were all masked)
        still = (open_ if eligible is None else open_ & eligible[rows, cols]).nonzero(as_tuple=True)[0]
        counts = torch.full((x.shape[0],), loop.unroll.count(loop.k), device=x.device)
        keep[still[self.choose(scores[still], rows[still], counts)]] = True
        rows, cols = rows[keep], cols[keep]
        B, L = x.shape
        if loop.unroll.all_rows:
            return rows, cols, torch.arange(L, device=x.device).expand(B, L)
        table, _, per_row = per_row_table(cols, rows, B, -1.0)
        table = table.long()
        # pad each sequence with its first kept position (a sequence with none: the generation start, output unused)
        first = torch.where(per_row > 0, table[:, 0], loop.gen_start)
        return rows, cols, torch.where(table >= 0, table, first[:, None])


class _Loop:
    """State of one batched generation: canvas, each sequence's current block, randomness, stats, history.

    Blocks: each sequence moves to its next block as soon as its current one has no masks left
    (its tokens depend only on its own canvas and generator, so this changes no token); with a
    key/value cache (`lockstep`) all sequences share the block, as the cache does, and move on
    together. Sequences may join (`add_rows`, without a cache) and leave (`keep_rows`) between passes.

    Early exit (`stops`: the base's stop token ids, or None for off): when a stop token (EOS or
    the chat template's end-of-turn) is committed at position p of a sequence, every position after
    p still masked in that sequence, in this block and the later ones, is set to EOS at once and
    is never decoded: the answer has ended, and text is cut at its first stop token anyway.
    Those positions are counted in `Stats.eos_filled`; a sequence with no masks left takes no part
    in later passes (`row_passes`), and the loop ends when no sequence has any.
    """

    def __init__(self, base, x, attention_mask, gen_start, sampling, rng, sampler, record_history, stops=None,
                 cache: str = "none", cache_refresh: int | None = None, unroll: FastUnroll | None = None, k: int = 1,
                 block_length: int | None = None, logprobs: int | None = None, cache_verify: int = 0):
        self.base, self.x, self.attention_mask = base, x, attention_mask
        self.gen_start, self.sampling, self.rng, self.sampler = gen_start, sampling, rng, sampler
        self.unroll, self.k = unroll, k  # how unrolls are computed (None: full), the strategy's tokens per pass
        self.stats = Stats(sequences=x.shape[0], cache=cache, unroll="full" if unroll is None else unroll.name)
        self.timer = _PhaseTimer(self.stats, x.device)
        self.block_length = max(1, block_length or (x.shape[1] - gen_start))
        self.n_blocks = math.ceil((x.shape[1] - gen_start) / self.block_length)
        self.block_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # per sequence
        self.lockstep = cache != "none"
        self.history = [[] for _ in range(x.shape[0])] if record_history else None
        self._cand = None
        self.stops = None if stops is None else torch.tensor(stops, dtype=torch.long, device=x.device)
        self.cache, self.cache_refresh, self.cache_verify = cache, cache_refresh, cache_verify
        self._kv, self._hidden, self._since = None, None, 0  # the base's cache, its hidden states, passes since
        self.forced = None  # teacher forcing (Decoding.force): (columns (B, n), tokens (B, n), next index (B,))
        # per-sequence tensors (batch first) a strategy keeps from one step to the next; joining rows get zeros
        self.kept: dict[str, torch.Tensor] = {}
        # logprobs (None: off; N >= 0): each written token's log-probability in the distribution it was drawn from
        # (the full pass's or, for ADJUST, the sampler's), and the N most likely tokens there with theirs
        self.logprobs = logprobs
        if logprobs is not None:
            B, L = x.shape
            self.token_logp = torch.full((B, L), float("nan"), device=x.device)
            self.top_ids = torch.zeros((B, L, logprobs), dtype=torch.long, device=x.device)
            self.top_logp = torch.full((B, L, logprobs), float("nan"), device=x.device)

    def record(self, rows, cols, tokens, logp) -> None:
        """Keep the log-probabilities of tokens drawn at (rows, cols) from `logp` (N, V) (`logprobs` on)."""
        self.token_logp[rows, cols] = logp.gather(1, tokens[:, None])[:, 0].float()
        if self.logprobs:
            top = logp.topk(min(self.logprobs, logp.shape[-1]), dim=-1)
            self.top_ids[rows, cols, : top.indices.shape[1]] = top.indices
            self.top_logp[rows, cols, : top.values.shape[1]] = top.values.float()

    def forced_writes(self, entries, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: as many writes per row as the strategy chose (`entries` into (rows, cols)), at the
        row's next path positions, with the path's tokens; (entries, tokens)."""
        path, tokens, nxt = self.forced
        chosen = torch.bincount(rows[entries], minlength=self.x.shape[0]).tolist()
        out_entries, out_tokens = [], []
        for b, n in enumerate(chosen):
            for j in range(int(nxt[b]), int(nxt[b]) + n):
                hit = ((rows == b) & (cols == path[b, j])).nonzero(as_tuple=True)[0] if j < path.shape[1] else []
                if len(hit) == 0:
                    raise RuntimeError(f"row {b}: write {j + 1} of the forced path is not a position the step "
                                       "can pick (past the path, or outside the block)")
                out_entries.append(hit[0])
                out_tokens.append(tokens[b, j])
            nxt[b] += n
        if not out_entries:
            return entries, tokens.new_zeros(0)
        return torch.stack(out_entries), torch.stack(out_tokens)

    def on_forced_path(self, rows, cols) -> torch.Tensor:
        """(N,) bool: whether (rows, cols) is among its row's path positions not yet written (teacher forcing)."""
        path, _, nxt = self.forced
        ahead = torch.arange(path.shape[1], device=path.device)[None] >= nxt[:, None]
        return ((path[rows] == cols[:, None]) & ahead[rows] & (path[rows] >= 0)).any(-1)

    def _per_row(self) -> list[str]:
        """Names of the per-sequence tensors (batch first) that rows carry when they join or leave."""
        return ["x", "block_index"] + (["token_logp", "top_ids", "top_logp"] if self.logprobs is not None else [])

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of each sequence's current block, (B,) each; a finished sequence has lo = hi = L."""
        L = self.x.shape[1]
        lo = (self.gen_start + self.block_index * self.block_length).clamp(max=L)
        return lo, (lo + self.block_length).clamp(max=L)

    @property
    def block(self) -> tuple[int, int]:
        """The shared block (lockstep: with a cache) as (lo, hi)."""
        lo, hi = self.bounds()
        return int(lo[0]), int(hi[0])

    def advance(self) -> bool:
        """Move sequences whose block has no masks left to their next block (lockstep: all of them, once none has
        any; the cache is refreshed there); returns whether any sequence has masks left."""
        while True:
            rows, _ = self.candidates()
            busy = torch.bincount(rows, minlength=self.x.shape[0]) > 0
            move = (self.block_index < self.n_blocks) & ~busy
            if self.lockstep:
                move = move if not busy.any() else torch.zeros_like(move)
            if not move.any():
                return bool(busy.any())
            self.block_index = self.block_index + move.long()
            self._cand = None
            if self.lockstep:
                self._kv = None  # a cache is refreshed at every block start

    def finished(self) -> torch.Tensor:
        """(B,) bool: sequences with no block left (after `advance`)."""
        return self.block_index >= self.n_blocks

    def add_rows(self, x: torch.Tensor, seeds: list[int]) -> None:
        """Sequences join at their first block: canvases `x` (n, L) of the same prompt length, no padding."""
        if self.lockstep:
            raise AdjustError("sequences can join a running generation only without a key/value cache")
        if self.attention_mask is not None or x.shape[1] != self.x.shape[1]:
            raise AdjustError("sequences joining a running generation need its canvas length and no padding")
        n = x.shape[0]
        fresh = {"x": x.to(self.x.device), "block_index": self.block_index.new_zeros(n)}
        if self.logprobs is not None:
            fresh |= {"token_logp": self.token_logp.new_full((n, x.shape[1]), float("nan")),
                      "top_ids": self.top_ids.new_zeros((n, *self.top_ids.shape[1:])),
                      "top_logp": self.top_logp.new_full((n, *self.top_logp.shape[1:]), float("nan"))}
        for name in self._per_row():
            setattr(self, name, torch.cat([getattr(self, name), fresh[name]]))
        self.kept = {k: torch.cat([v, v.new_zeros((n, *v.shape[1:]))]) for k, v in self.kept.items()}
        self.rng.add(seeds)
        if self.history is not None:
            self.history += [[] for _ in range(x.shape[0])]
        self.stats.sequences += x.shape[0]
        self._cand = None

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the sequences where `keep` (B,) is true (the others leave between passes)."""
        idx = keep.nonzero(as_tuple=True)[0]
        for name in self._per_row():
            setattr(self, name, getattr(self, name)[idx])
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[idx]
        self.rng.keep(idx.tolist())
        if self.history is not None:
            self.history = [self.history[i] for i in idx.tolist()]
        self._kv, self._hidden = _rows_of(self._kv, idx), _rows_of(self._hidden, idx)
        self.forced = _rows_of(self.forced, idx)
        self.kept = {k: v[idx] for k, v in self.kept.items()}
        self._cand = None

    def full_pass(self) -> torch.Tensor:
        """The base's aligned hidden states (B, L, H) of the canvas: all computed now without a cache; with one,
        a whole-canvas pass that refreshes it (block start, every `cache_refresh` passes) or only the block
        (dual) or the block and its right (prefix), the other positions keeping their last states."""
        x, mask, L, stats = self.x, self.attention_mask, self.x.shape[1], self.stats
        t0 = self.timer.start()
        if self.cache == "none":
            hidden = self.base.hidden_states(x, mask)
        elif self.refreshes_next():
            self._hidden, self._kv = self.base.cache_pass(x, mask)
            hidden, self._since = self._hidden, 0
        else:
            lo, hi = self.block
            end = hi if self.cache == "dual" else L
            self._hidden[:, lo:end] = self._span(x, mask, self._kv, lo, end)
            hidden = self._hidden
            stats.positions += self._span_positions(lo, end)
            self.timer.stop("span_seconds", t0)
            self._since += 1
            return hidden
        self._since += 1
        stats.refresh_passes += 1
        stats.positions += L
        self.timer.stop("refresh_seconds", t0)
        return hidden

    def _span(self, x, mask, kv, lo: int, end: int) -> torch.Tensor:
        """A cached pass: the base on lo .. end-1 against `kv` (`cache_verify`: also the positions that moved most)."""
        if self.cache_verify:
            return self.base.span_hidden(x, mask, kv, lo, end, verify=self.cache_verify)
        return self.base.span_hidden(x, mask, kv, lo, end)

    def _span_positions(self, lo: int, end: int) -> int:
        """Positions a cached pass computes in every layer: the span, and with `cache_verify` the verified ones."""
        return end - lo + min(self.cache_verify, self.x.shape[1] - (end - lo))

    def refreshes_next(self) -> bool:
        """Whether the next `full_pass` runs the whole canvas to refresh the key/value cache (False without one)."""
        return self.cache != "none" and (self._kv is None or (self.cache_refresh is not None
                                                              and self._since >= self.cache_refresh))

    def full_pass_with(self, extra: torch.Tensor, owners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`full_pass`, computing in the same base call the canvases `extra` (n, L) as more batch rows, row i a
        variant of sequence owners[i]'s canvas (it takes that sequence's attention mask and, with a cache, its
        keys/values): (the canvas's hidden states (B, L, H), theirs (n, L, H)). A row's output does not depend on
        the batch, so each equals a pass on that canvas alone. With a cache, not on a pass that refreshes it
        (`refreshes_next`): the extra rows are computed on the same span, keeping their sequence's hidden states
        elsewhere, as `full_pass` does."""
        if not len(owners):
            hidden = self.full_pass()
            return hidden, hidden[:0]
        x, mask, L, stats = self.x, self.attention_mask, self.x.shape[1], self.stats
        B = x.shape[0]
        rows_mask = None if mask is None else torch.cat([mask, mask[owners]])
        t0 = self.timer.start()
        if self.cache == "none":
            out = self.base.hidden_states(torch.cat([x, extra]), rows_mask)
            self._since += 1
            stats.refresh_passes += 1
            stats.positions += L
            self.timer.stop("refresh_seconds", t0)
            return out[:B], out[B:]
        if self.refreshes_next():
            raise RuntimeError("extra rows cannot be computed on a pass that refreshes the key/value cache")
        lo, hi = self.block
        end = hi if self.cache == "dual" else L
        idx = torch.cat([torch.arange(B, device=owners.device), owners])
        span = self._span(torch.cat([x, extra]), rows_mask, _rows_of(self._kv, idx), lo, end)
        self._hidden[:, lo:end] = span[:B]
        more = self._hidden[owners].clone()
        more[:, lo:end] = span[B:]
        stats.positions += self._span_positions(lo, end)
        self.timer.stop("span_seconds", t0)
        self._since += 1
        return self._hidden, more

    def candidates(self):
        if self._cand is None:
            lo, hi = self.bounds()
            at = torch.arange(self.x.shape[1], device=self.x.device)[None]
            region = (at >= lo[:, None]) & (at < hi[:, None])
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


def _rows_of(obj, idx: torch.Tensor):
    """`obj` (a tensor, or lists/tuples of them, batch first; None) restricted to the batch rows `idx`."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj[idx.to(obj.device)]
    return type(obj)(_rows_of(o, idx) for o in obj)


class _PhaseTimer:
    """Time per phase of the loop (Stats' refresh_seconds, span_seconds, unroll_seconds) without a device sync
    per pass: on CUDA each interval is a pair of events, read when `settle` is called (at the end of
    `generate`, and every SETTLE_EVERY intervals so a long-running decoding keeps few); elsewhere wall-clock."""

    SETTLE_EVERY = 512

    def __init__(self, stats: Stats, device):
        self.stats, self.cuda, self.pending = stats, device.type == "cuda", []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, phase: str, t0) -> None:
        if not self.cuda:
            setattr(self.stats, phase, getattr(self.stats, phase) + time.perf_counter() - t0)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((phase, t0, end))
        if len(self.pending) >= self.SETTLE_EVERY:
            self.settle()

    def settle(self) -> None:
        """Add the recorded intervals to the stats (waits for the last one to finish on the device)."""
        if self.pending:
            self.pending[-1][2].synchronize()
        for phase, t0, end in self.pending:
            setattr(self.stats, phase, getattr(self.stats, phase) + t0.elapsed_time(end) / 1000)
        self.pending.clear()


def current_block(x: torch.Tensor, gen_start: int, mask_id: int, block_length: int) -> torch.Tensor:
    """(B,) the block (of `block_length` generated positions) holding each row's leftmost masked generated
    position: where decoding from that canvas stands; the number of blocks for a row with no mask left."""
    masked = x[:, gen_start:] == mask_id
    n_blocks = math.ceil(masked.shape[1] / block_length)
    return torch.where(masked.any(1), masked.long().argmax(1) // block_length, n_blocks)


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


def check_cache(base, cache: str, block_length: int | None, cache_refresh: int | None, cache_verify: int = 0) -> None:
    """Refuse a cache mode the request or the base cannot have (before any work; base None: the arguments only)."""
    if cache not in CACHE_MODES:
        raise AdjustError(f"unknown --cache {cache!r}; choose one of {', '.join(CACHE_MODES)}")
    if cache_refresh is not None and cache_refresh < 1:
        raise AdjustError(f"--cache-refresh must be at least 1, got {cache_refresh}")
    if isinstance(cache_verify, bool) or not isinstance(cache_verify, int) or cache_verify < 0:
        raise AdjustError(f"--cache-verify must be a whole number >= 0, got {cache_verify!r}")
    if cache == "none":
        if cache_verify:
            raise AdjustError("--cache-verify recomputes positions of a key/value cache; "
                              "there is none with --cache none")
        return
    if block_length is None:
        raise AdjustError(f"--cache {cache} needs --block-length: the cache is refreshed at each block start")
    if base is not None and not getattr(base, "supports_cache", False):
        raise AdjustError(f"--cache {cache}: the base {base.name} ({type(base).__name__}) cannot take a key/value "
                          "cache (only our tiny model and the native Dream and LLaDA can); use --cache none")


class Decoding:
    """The one decoding loop, one full pass at a time (`step`), over sequences that can join between passes
    (`add`, without a key/value cache) and leave (`remove`, `finished`).

    `generate` runs it to the end on a fixed batch; the server's batcher steps it, adding rows as they
    arrive and taking them out when done or cancelled (continuous batching). A sequence gets the same
    tokens either way: its draws come from its own generator, and without padding its hidden states do
    not depend on the other rows. Arguments as `generate`'s; rows are addressed by their position in the
    batch (`size` rows, in the order added, less those removed).
    """

    def __init__(self, base, strategy, sampling: SamplingConfig = SamplingConfig(), gen_length: int = 64,
                 block_length: int | None = None, seed: int = 0, sampler=None, record_history: bool = False,
                 early_exit: bool = False, cache: str = "none", cache_refresh: int | None = None,
                 unroll: str | FastUnroll = "full", logprobs: int | None = None, cache_verify: int = 0):
        check_request(base, [], gen_length, block_length)
        check_cache(base, cache, block_length, cache_refresh, cache_verify)
        self.plan = unroll_plan(unroll)
        if not strategy.adaptive and strategy.k > gen_length:
            raise AdjustError(f"--tokens-per-pass {strategy.k} is larger than --gen-length {gen_length}")
        if strategy.uses_sampler and sampler is None:
            raise AdjustError(f"strategy {strategy.name!r} needs a joint sampler; pass --sampler DIR")
        if strategy.uses_sampler or (strategy.takes_sampler and sampler is not None):
            sampler.check_base(base)
            sampler.check_decoding(sampling, block_length if block_length and block_length < gen_length else None)
        self.base, self.strategy, self.sampling, self.sampler = base, strategy, sampling, sampler
        self.gen_length, self.block_length, self.seed = gen_length, block_length, seed
        self.record_history, self.cache, self.cache_refresh = record_history, cache, cache_refresh
        self.cache_verify = cache_verify
        self.logprobs = logprobs  # see _Loop: None (off) or the number of most likely tokens kept per position
        self.stops = tuple(base.stop_ids) if early_exit and base.eos_id is not None and base.stop_ids else None
        self.loop: _Loop | None = None
        self.steps = 0
        self.active = torch.zeros(0, dtype=torch.bool)  # (B,) rows that took part in the last step
        self.last_unrolls = 0  # sampler passes of the last step

    @property
    def size(self) -> int:
        return 0 if self.loop is None else self.loop.x.shape[0]

    @property
    def joinable(self) -> bool:
        """Whether rows can join now: without a cache and padding; an empty decoding takes any rows."""
        return self.size == 0 or (self.cache == "none" and self.loop.attention_mask is None)

    @property
    def prompt_length(self) -> int | None:
        return None if self.loop is None else self.loop.gen_start

    def add(self, prompts: list[list[int]], sample_indices: list[int] | None = None) -> None:
        """Rows join at the next pass (their first block); a non-empty decoding needs prompts of its prompt length."""
        check_request(self.base, prompts, self.gen_length, self.block_length)
        sample_indices = sample_indices or [0] * len(prompts)
        seeds = [row_seed(self.seed, p, i) for p, i in zip(prompts, sample_indices)]
        x, attention_mask, P = build_canvas(prompts, self.gen_length, self.base)
        device = self.base.device
        if self.size == 0:
            self.loop = _Loop(self.base, x.to(device), None if attention_mask is None else attention_mask.to(device),
                              P, self.sampling, RowRNG(seeds, device), self.sampler, self.record_history, self.stops,
                              self.cache, self.cache_refresh, self.plan, self.strategy.k, self.block_length,
                              self.logprobs, self.cache_verify)
            return
        if not self.joinable or attention_mask is not None or P != self.loop.gen_start:
            raise AdjustError("rows can join a running generation only without a cache, with prompts of its length")
        self.loop.add_rows(x, seeds)

    def start_from(self, x: torch.Tensor, gen_start: int, seeds: list[int]) -> None:
        """Start from partly decoded canvases `x` (n, L), unpadded, their generation region from `gen_start`: each
        row at the block holding its leftmost masked position (with a key/value cache, the same block for all).
        For evaluations that step from held-out states (`adjust.eval.joint_kl`); the decoding must be empty."""
        if self.size:
            raise AdjustError("start_from needs a decoding with no rows")
        if x.shape[1] - gen_start != self.gen_length or x.shape[1] > self.base.max_length:
            raise AdjustError(f"states of {x.shape[1] - gen_start} generated positions do not fit a decoding of "
                              f"--gen-length {self.gen_length} on a context of {self.base.max_length}")
        device = self.base.device
        self.loop = _Loop(self.base, x.to(device).clone(), None, gen_start, self.sampling, RowRNG(seeds, device),
                          self.sampler, self.record_history, self.stops, self.cache, self.cache_refresh, self.plan,
                          self.strategy.k, self.block_length, self.logprobs, self.cache_verify)
        self.loop.block_index = current_block(self.loop.x, gen_start, self.base.mask_id, self.loop.block_length)
        if self.loop.lockstep and len(self.loop.block_index.unique()) > 1:
            raise AdjustError("with a key/value cache, states must share their current block")

    def force(self, cols: torch.Tensor, tokens: torch.Tensor) -> None:
        """Teacher forcing: from now on row b writes the path cols[b] (generation-relative; -1 pads a short path)
        with tokens[b], in order, instead of what it would draw; the strategy still decides how many positions
        each step writes, and with `logprobs` each write's log-probability in the distribution it would have been
        drawn from is recorded. Lets `adjust.eval.joint_kl` score a given path under any strategy."""
        loop = self.loop
        device = loop.x.device
        cols, tokens = cols.to(device), tokens.to(device)
        loop.forced = (torch.where(cols >= 0, cols + loop.gen_start, -1), tokens,
                       torch.zeros(cols.shape[0], dtype=torch.long, device=device))

    def remove(self, rows: list[int]) -> None:
        """Rows leave now (between passes)."""
        keep = torch.ones(self.size, dtype=torch.bool, device=self.loop.x.device)
        keep[rows] = False
        self.loop.keep_rows(keep)
        self.active = self.active[keep.cpu()] if len(self.active) == len(keep) else self.active

    def finished(self) -> list[int]:
        """Rows with every position decoded."""
        if self.size == 0:
            return []
        self.loop.advance()
        return self.loop.finished().nonzero(as_tuple=True)[0].tolist()

    def tokens(self, rows: list[int]) -> torch.Tensor:
        """(len(rows), gen_length) the rows' generated ids so far (masks where not yet decoded)."""
        return self.loop.x[rows, self.loop.gen_start:].cpu()

    def token_logprobs(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With `logprobs` on: (token log-probs (n, gen_length), top ids and top log-probs (n, gen_length, N)) of
        the rows' generated positions; NaN where a position was not drawn (not yet, or filled by early exit)."""
        loop, P = self.loop, self.loop.gen_start
        return loop.token_logp[rows, P:].cpu(), loop.top_ids[rows, P:].cpu(), loop.top_logp[rows, P:].cpu()

    def step(self, on_step=None) -> bool:
        """One full pass and the strategy's writes; False (and nothing done) when no row has masks left."""
        loop = self.loop
        if loop is None or not loop.advance():
            return False
        B = loop.x.shape[0]
        rows_before = torch.bincount(loop.candidates()[0], minlength=B)
        before = loop.x.clone() if on_step is not None else None
        unrolls, rows0, refreshes = loop.stats.sampler_passes, loop.stats.base_rows, loop.stats.refresh_passes
        hidden = self.strategy.full_pass(loop)  # loop.full_pass() but for a strategy that adds rows to the pass
        loop.stats.full_passes += 1
        loop.stats.base_rows += B
        decoding = int((rows_before > 0).sum())
        loop.stats.row_passes += decoding
        loop.stats.count_pass("full" if loop.stats.refresh_passes > refreshes else "span", B,
                              loop.stats.base_rows - rows0, decoding)
        self.strategy.step(StepContext(loop, hidden, self.steps))
        loop.stats.row_unrolls += (loop.stats.sampler_passes - unrolls) * decoding
        rows_after = torch.bincount(loop.candidates()[0], minlength=B)
        stalled = (rows_before > 0) & (rows_after == rows_before)
        if stalled.any():
            raise RuntimeError(f"strategy {self.strategy.name!r} committed no token in a step")
        self.active, self.last_unrolls = (rows_before > 0).cpu(), loop.stats.sampler_passes - unrolls
        if on_step is not None:
            r, c = (loop.x != before).nonzero(as_tuple=True)
            on_step(self.steps, r.cpu(), (c - loop.gen_start).cpu(), loop.x[r, c].cpu())
        self.steps += 1
        return True


@torch.inference_mode()
def generate(base, prompts: list[list[int]], strategy, sampling: SamplingConfig = SamplingConfig(),
             gen_length: int = 64, block_length: int | None = None, seed: int = 0,
             sample_indices: list[int] | None = None, sampler=None, record_history: bool = False,
             early_exit: bool = False, on_step=None, cache: str = "none",
             cache_refresh: int | None = None, unroll: str | FastUnroll = "full", cache_verify: int = 0) -> Generation:
    """Generate `gen_length` tokens after each prompt (an empty prompt = unconditional).

    Each sequence b uses its own generator seeded by (seed, prompts[b], sample_indices[b]),
    so results do not depend on batching. `early_exit`: a sequence ends at its first stop token,
    the positions after it are set to EOS, not decoded (see `_Loop`). Off (the default, and always for
    rollouts, which must unmask every position), every position is decoded as in the plain loop.
    `on_step(step, rows, cols, tokens)`, if given, is called after each full pass with the (CPU) rows,
    generation-relative columns and tokens it unmasked; an exception it raises stops the generation.
    It only observes: the tokens are the same with or without it.
    `cache` ("none", "prefix", "dual"; needs `block_length`) and `cache_refresh` (refresh it every N full
    passes too, not only at block starts) and `cache_verify` (recompute that many moved positions per cached
    pass): the key/value cache, see the module's docstring.
    `unroll` ("full", "fast" or a `FastUnroll`): how the sampler's unrolls are computed, see the module's docstring.
    """
    check_request(base, prompts, gen_length, block_length)
    run = Decoding(base, strategy, sampling, gen_length, block_length, seed, sampler, record_history, early_exit,
                   cache, cache_refresh, unroll, cache_verify=cache_verify)
    run.add(prompts, sample_indices)
    device = base.device
    t0 = time.perf_counter()
    while run.step(on_step):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop = run.loop
    loop.stats.seconds = time.perf_counter() - t0
    loop.timer.settle()
    loop.stats.new_tokens = gen_length
    return Generation(loop.x[:, loop.gen_start:].cpu(), loop.stats, loop.history)


def full_passes_needed(gen_length: int, k: int, block_length: int | None = None) -> int:
    """ceil(N / K) per block, summed: the full-pass count of a fixed-K strategy."""
    block_length = block_length or gen_length
    sizes = [min(block_length, gen_length - lo) for lo in range(0, gen_length, block_length)]
    return sum(math.ceil(s / k) for s in sizes)


def generate_texts(base, prompts: list[str], strategy, sampling: SamplingConfig = SamplingConfig(),
                   gen_length: int = 64, num_samples: int = 1, batch_size: int = 16,
                   block_length: int | None = None, seed: int = 0, sampler=None, record_history: bool = False,
                   progress: bool = False, early_exit: bool | None = None, cache: str = "none",
                   cache_refresh: int | None = None, unroll: str | FastUnroll = "full",
                   cache_verify: int = 0) -> tuple[list[dict], Stats]:
    """Text in, samples out: `num_samples` generations per prompt ("" = unconditional), batched.

    Returns ([{"prompt", "text", "token_ids", "sample_index", ("history")}], merged Stats); with early exit,
    token_ids end at the first stop token (included).
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
    check_cache(base, cache, block_length, cache_refresh, cache_verify)
    unroll_plan(unroll)
    jobs = [(n, text, ids, i) for n, (text, ids) in enumerate(zip(prompts, encoded)) for i in range(num_samples)]
    # Batch prompts of equal length only: no padding, so a sequence gets bit-identical
    # logits (hence tokens) in any batch, and no compute is spent on pad tokens.
    batches = [group[s:s + batch_size] for group in group_by_length(jobs, lambda job: len(job[2]))
               for s in range(0, len(group), batch_size)]
    results, stats = {}, None
    bar = tqdm(total=len(jobs), desc=f"generate {strategy.describe()}", disable=not progress, leave=False)
    for chunk in batches:
        out = generate(base, [ids for _, _, ids, _ in chunk], strategy, sampling, gen_length, block_length, seed,
                       [i for *_, i in chunk], sampler, record_history, early_exit=early_exit, cache=cache,
                       cache_refresh=cache_refresh, unroll=unroll, cache_verify=cache_verify)
        stats = out.stats if stats is None else stats.merge(out.stats)
        for b, (n, text, _, i) in enumerate(chunk):
            ids = out.tokens[b].tolist()
            if early_exit:  # the answer ended at its first stop token: what lies after it is not part of it
                ids = ids[: base.answer_end(ids) + 1]
            s = {"prompt": text, "text": base.decode(ids), "token_ids": ids, "sample_index": i}
            if out.history is not None:
                s["history"] = out.history[b]
            results[(n, i)] = s
        bar.update(len(chunk))
    bar.close()
    return [results[(n, i)] for n, _, _, i in jobs], stats
