"""Per-position distributions, order rules and float64 categorical sampling (docs/method.md section 2).

Every random draw comes from a per-sequence generator whose seed depends only on the run
seed, the sequence's prompt and its sample index: a sequence gets the same tokens whether it
runs alone or in a batch, on any batch size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import AdjustError

ORDERS = ("entropy", "confidence", "margin", "random")
# Smallest positive temperature: logits / T stays finite in float32 for any finite logits of a model
# (|logit| < 1e32); below it T would round to 0 in float32 and turn logits into inf/NaN. 0 = greedy.
MIN_TEMPERATURE = 1e-6
# Largest temperature: above it every distribution is uniform to float32 precision for any logits a model gives,
# and logits / T would reach 0 / inf (NaN where a banned token's logit is -inf).
MAX_TEMPERATURE = 1e6


@dataclass(frozen=True)
class SamplingConfig:
    """How one token is drawn and which position goes next; part of what "the true joint" means."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k filter
    order: str = "entropy"  # lowest entropy first, as in the paper

    def __post_init__(self):
        if self.order not in ORDERS:
            raise AdjustError(f"unknown order rule {self.order!r}; choose one of {', '.join(ORDERS)}")
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # also refuses NaN
            raise AdjustError(f"--temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                              f"{MAX_TEMPERATURE:g}], got {t}")
        if not (0 < self.top_p <= 1):
            raise AdjustError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise AdjustError(f"--top-k must be >= 0, got {self.top_k}")


def log_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(N, V) logits -> (N, V) float32 log-probabilities after temperature, top-k and top-p.

    Filtered tokens get -inf. At temperature 0 the distribution is the untempered one (the
    order rules need it); `sample_tokens` then takes its argmax.
    """
    logits = logits.float()
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_lp, idx = logp.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of strictly better tokens
        drop_sorted = mass_before >= cfg.top_p  # keeps the smallest prefix reaching top_p
        drop_sorted[..., 0] = False  # never the top token (top_p below float32's range compares as 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    if torch.isnan(logp).any():
        raise AdjustError("the model produced NaN logits; check the weights and --dtype")
    return logp


def order_scores(logp: torch.Tensor, order: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) log-probs -> (N,) scores, higher = unmask sooner.

    entropy: -H(p) (lowest entropy first; Dream alg="entropy", the paper's rule)
    confidence: max_v p(v) (LLaDA low-confidence remasking, Dream maskgit_plus)
    margin: p(top1) - p(top2) (Dream topk_margin)
    random: uniform noise (LLaDA/Dream random remasking); `noise` supplies it
    """
    if order == "random":
        return noise
    p = logp.exp()
    if order == "entropy":  # -H = sum p log p; filtered tokens (log p = -inf, p = 0) add 0
        return (p * logp.nan_to_num(neginf=0.0)).sum(-1)
    top = p.topk(min(2, p.shape[-1]), dim=-1).values
    if order == "confidence":
        return top[:, 0]
    if order == "margin":
        return top[:, 0] - top[:, 1]
    raise AdjustError(f"unknown order rule {order!r}")


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -order_scores(logp, "entropy")


def row_seed(seed: int, prompt_ids, sample_index: int) -> int:
    """Seed of one sequence's generator: a function of the run seed, its prompt and sample index."""
    h = hashlib.sha256(f"{seed}|{sample_index}|{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class RowRNG:
    """One torch.Generator per sequence of the batch."""

    def __init__(self, seeds: list[int], device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.device = device

    def add(self, seeds: list[int]) -> None:
        """Generators for sequences that join the batch (after the current ones)."""
        self.gens += [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def keep(self, rows: list[int]) -> None:
        """Keep only the generators of `rows`, in that order (the others' sequences left the batch)."""
        self.gens = [self.gens[r] for r in rows]

    def fork(self, rows: list[int]) -> "RowRNG":
        """Copies of the generators of `rows` (in that order) at their current state: drawing from the copy gives the
        draws the originals will give next, and leaves the originals as they are (speculative drafts peek at them)."""
        out = RowRNG([], self.device)
        for r in rows:
            g = torch.Generator(device=self.device)
            g.set_state(self.gens[r].get_state())
            out.gens.append(g)
        return out

    def uniform(self, row: int, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.gens[row], device=self.device, dtype=torch.float64)

    def gumbel(self, row: int, shape) -> torch.Tensor:
        u = torch.rand(shape, generator=self.gens[row], device=self.device, dtype=torch.float64)
        u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - 1e-16)
        return -torch.log(-torch.log(u))


def sample_tokens(logp: torch.Tensor, rows: torch.Tensor, rng: RowRNG, greedy: bool) -> torch.Tensor:
    """Draw one token per entry of (N, V) log-probs; entry n uses the generator of rows[n].

    Gumbel-max in float64 (float32 categorical sampling lowers the effective temperature,
    Zheng et al. 2409.02908). Draws are made row by row, in entry order, so a row consumes
    its generator identically in any batch.
    """
    if greedy:
        return logp.argmax(-1)
    out = torch.empty(logp.shape[0], dtype=torch.long, device=logp.device)
    for r in rows.unique().tolist():
        sel = (rows == r).nonzero(as_tuple=True)[0]
        g = rng.gumbel(r, (len(sel), logp.shape[-1]))
        out[sel] = (logp[sel].double() + g).argmax(-1)
    return out
