"""Speculative ADJUST: exact decoding's tokens (or distribution), several per full pass (docs/speculative.md).

The target is `exact` (one token per pass, the order rule, temperature, top-p/top-k, blocks) or `threshold`.
Each full pass computes, as extra rows of one batch, the current canvas and up to `depth` drafted successor
canvases; the target then walks them, with its own draws, and keeps a drafted row's output wherever its new
canvas is the drafted one.
"""

from __future__ import annotations

import torch

from ..batching import per_row_table
from ..decode import choose_best
from ..errors import AdjustError
from ..sampling import log_probs, order_scores, sample_tokens
from . import Strategy, register
from .adaptive import Threshold

DRAFTERS = ("sampler", "self")
RULES = ("coupled", "sampling")
TARGETS = ("exact", "threshold")


class _Consumed:
    """The sequences' own generators seen through the drafted sequences' indices: draws are consumed (rule
    "sampling": the drafts' randomness is the sequence's own, drawn before the target's)."""

    def __init__(self, rng, rows: list[int]):
        self.rng, self.rows = rng, rows

    def uniform(self, i: int, n: int) -> torch.Tensor:
        return self.rng.uniform(self.rows[i], n)

    def gumbel(self, i: int, shape) -> torch.Tensor:
        return self.rng.gumbel(self.rows[i], shape)


@register("speculative")
class Speculative(Strategy):
    """Lossless: the tokens `exact` writes with the same seed, between 1 and depth + 1 per full pass.

    Rule (coupled draws). A sequence's state is its canvas. After a step, its canvas s0 is not yet computed by the
    base; the drafter proposes the writes w1..wD that the target would make from s0, s1 = s0 + w1, ...: the
    `sampler` drafter by D unrolls of the joint sampler (the first from the base's hidden states of the state the
    last write was drawn at, as ADJUST's unrolls), the `self` drafter from those base marginals alone (the peer's
    parallel drafts). Each draft takes its position by the order rule on the drafter's distributions and its token
    by Gumbel-max with the very noise the target will draw at that write (read from a copy of the sequence's
    generator, which is left untouched). The step's one base call computes s0 and the drafted s1..sD as rows of
    one batch (a row's output does not depend on the batch). Then the target decodes as `exact` does: at s0 it
    picks its position and draws its token from the base's output there; if the write equals w1 the row of s1 is
    the base's output of the true next state and serves the next write without a new pass, and so on; the first
    write that differs (or the write after wD) ends the step. Every write is the target's own, from the base's
    output of the true state, with its own draws in its own order: the same tokens as `exact`, at any temperature.

    Rule "sampling" (speculative sampling; at temperature 0 it is the rule above). The drafter draws its tokens
    t ~ q from its own distributions with the sequence's own generator (consumed, before the target's draws; its
    positions too, under --order random). At a state, the target picks its position by its own rule from the
    base's output p; if that is the drafted position, it keeps t with probability min(1, p(t) / q(t)) and
    otherwise draws from max(0, p - q) normalised; at any other position it draws from p. Each write is then
    distributed as the target's (p(t) = q(t) min(1, p/q) + (1 - sum min(p, q)) (p - q)+(t) / sum (p - q)+), so
    the output distribution is exact's, but not its tokens for a seed. The step goes on at a drafted row while
    the write equals the draft.

    Target "threshold" (`tau`, default 0.9; rule "coupled"): the decoding wrapped is `threshold` at that tau
    instead of `exact`. A write is then a set: every masked position of the block whose confidence is >= tau (at
    least the most confident one), each token drawn from its own distribution in position order. The drafter
    applies the same rule to its own distributions, with the target's coupled noise for each drafted set; the
    target writes its own set at each true state, and the step goes on at a drafted row while the canvas equals
    the drafted one. The same tokens as `threshold` at that tau, several of its passes per full pass.

    `depth` D: drafts per sequence and step (rows per pass up to D + 1 per sequence). `branch` A (default 0): A
    alternative first drafts per sequence, each one more row: the drafter's next-best positions by the order rule,
    with their tokens from the same coupled noise; when the target's first write equals one, that row serves the
    next write (and the step ends after it). `drafter`: "sampler" (needs a joint sampler), "self", or None: the
    sampler when one is given, else self. The first step of a sequence has no draft (no base output to draft from
    yet). With a key/value cache (prefix or dual) the drafted rows take their sequence's cache and are computed on
    the span the canvas is; a pass that refreshes the cache (each block's first) carries no draft.
    """

    adaptive = True  # the tokens per pass vary with the drafts accepted
    takes_sampler = True

    def __init__(self, depth: int = 4, drafter: str | None = None, branch: int = 0, rule: str = "coupled",
                 target: str = "exact", tau: float | None = None):
        super().__init__(1)
        if rule not in RULES:
            raise AdjustError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
        if target not in TARGETS:
            raise AdjustError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
        if target == "exact" and tau is not None:
            raise AdjustError("--tau is threshold's: speculative takes it with --target threshold")
        if target == "threshold" and (rule != "coupled" or branch):
            raise AdjustError("--target threshold takes the coupled rule and no --branch")
        self.target = target
        self.threshold = Threshold(0.9 if tau is None else tau) if target == "threshold" else None
        self.uses_order = target == "exact"  # threshold ranks positions by confidence
        if rule == "sampling" and branch:
            raise AdjustError("--branch needs --rule coupled (alternative drafts share the target's noise)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise AdjustError(f"--depth must be a positive integer, got {depth!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise AdjustError(f"--branch must be an integer >= 0, got {branch!r}")
        if drafter is not None and drafter not in DRAFTERS:
            raise AdjustError(f"unknown --drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")
        self.depth, self.drafter, self.branch, self.rule = depth, drafter, branch, rule
        self.uses_sampler = drafter == "sampler"

    def describe(self) -> str:
        return (f"{self.name}(D={self.depth},drafter={self.drafter or 'auto'}"
                + (f",branch={self.branch}" if self.branch else "") + (f",rule={self.rule}" if self.rule != "coupled"
                                                                       else "")
                + (f",target=threshold,tau={self.threshold.tau})" if self.threshold else ")"))

    def _sampling_rule(self, loop) -> bool:
        """Whether rule "sampling" decides this decoding's writes (at temperature 0 both rules are one)."""
        return self.rule == "sampling" and loop.sampling.temperature > 0

    def _drafter(self, loop) -> str:
        return self.drafter or ("sampler" if loop.sampler is not None else "self")

    # --- the step's pass: the canvas and the drafted canvases -------------------------------------------------
    def full_pass(self, loop):
        if loop.cache_refresh is not None:
            raise AdjustError("strategy 'speculative' refreshes the key/value cache only at block starts (exact's "
                              "refreshes every N passes fall elsewhere in fewer passes); drop --cache-refresh")
        canvases, owners, drafts, qs = self._draft(loop)
        hidden, more = loop.full_pass_with(canvases, owners)
        loop.stats.base_rows += len(owners)
        loop.stats.drafts_proposed += len(owners)
        loop.drafted = (more, drafts, qs, canvases)
        return hidden

    def _draft(self, loop):
        """(canvases (n, L), owners (n,), (positions, tokens, rows) (B, D + A) each, -1 where none, qs): the drafted
        canvases s1..sj of each sequence with a base output to draft from (then its alternative first drafts), its
        drafted writes (columns D.. : the alternatives to the first), and with rule "sampling" the drafter's
        log-probabilities (n, V) at each drafted canvas's write (else None)."""
        x, base, sampling, D = loop.x, loop.base, loop.sampling, self.depth
        B, L = x.shape
        pos = torch.full((B, D + self.branch), -1, dtype=torch.long, device=x.device)
        tok, at = pos.clone(), pos.clone()
        prior, has = loop.kept.get("spec_prior"), loop.kept.get("spec_has")
        busy = torch.bincount(loop.candidates()[0], minlength=B) > 0
        sub = (busy & has).nonzero(as_tuple=True)[0] if has is not None else busy[:0].nonzero(as_tuple=True)[0]
        empty = (x.new_zeros((0, L)), sub[:0], (pos, tok, at), None)
        if len(sub) == 0 or loop.refreshes_next():  # a refresh pass: the cache is of this canvas, none to draft on
            return empty
        use_sampler = self._drafter(loop) == "sampler"
        if use_sampler and loop.sampler is None:
            raise AdjustError("--drafter sampler needs a joint sampler; pass --sampler DIR or use --drafter self")
        xs, hs = x[sub].clone(), prior[sub]
        mask = None if loop.attention_mask is None else loop.attention_mask[sub]
        lo, hi = (t[sub] for t in loop.bounds())
        region = (torch.arange(L, device=x.device)[None] >= lo[:, None]) & (torch.arange(L, device=x.device)[None]
                                                                           < hi[:, None])
        draws = sampling.order == "random" or sampling.temperature > 0
        if self._sampling_rule(loop):  # the drafts' own draws, consumed from the sequences' generators
            noise = _Consumed(loop.rng, sub.tolist())
        else:  # the target's next draws, not consumed here
            noise = loop.rng.fork(sub.tolist()) if draws else None
        alive = torch.ones(len(sub), dtype=torch.bool, device=x.device)
        canvases, owners, qs = [], [], []
        for j in range(D):
            cand = (xs == base.mask_id) & region & alive[:, None]
            alive = cand.any(1)
            if not alive.any():
                break
            if use_sampler:
                hs = loop.sampler(base, xs, hs, mask)
                loop.stats.sampler_passes += 1
                loop.stats.sampler_positions += L
            rows, cols = cand.nonzero(as_tuple=True)
            logp = log_probs(base.logits(hs[rows, cols]), sampling)
            if self.threshold is not None:  # the target's write is a set: threshold's rule on the drafter's q
                n = self.threshold.counts(logp, rows, len(sub)).clamp(min=1) * alive.long()
                pick = choose_best(self.threshold.score(None, logp, rows), rows, n).sort().values
                r, c, lp = rows[pick], cols[pick], logp[pick]
                t = lp.argmax(-1)
                if sampling.temperature > 0:  # per sequence, one Gumbel vector per write in position order
                    for i in r.unique().tolist():
                        k = (r == i).nonzero(as_tuple=True)[0]
                        t[k] = (lp[k].double() + noise.gumbel(i, (len(k), lp.shape[-1]))).argmax(-1)
                if loop.stops is not None:  # a stop token fills the canvas after it: the chain ends before it
                    stop = r[torch.isin(t, loop.stops)].unique()
                    alive[stop] = False
                    keep = ~torch.isin(r, stop)
                    r, c, t = r[keep], c[keep], t[keep]
                if len(r) == 0:
                    break
                xs[r, c] = t
                wrote = r.unique()
                at[sub[wrote], j] = torch.arange(len(wrote), device=x.device) + sum(len(o) for o in owners)
                canvases.append(xs[wrote].clone())
                owners.append(sub[wrote])
                continue
            u = None
            if sampling.order == "random":
                u = torch.empty(len(rows), dtype=torch.float64, device=x.device)
                for r in rows.unique().tolist():
                    u[rows == r] = noise.uniform(r, int((rows == r).sum()))
            table, starts, _ = per_row_table(order_scores(logp, sampling.order, u), rows, len(sub), float("-inf"))
            ranked = table.sort(dim=1, descending=True, stable=True)  # the first of the best: the target's tie rule
            pick = (starts + ranked.indices[:, 0])[alive]
            r, c, lp = rows[pick], cols[pick], logp[pick]
            g = None
            if sampling.temperature == 0:
                t = lp.argmax(-1)
            else:
                g = torch.zeros((len(sub), lp.shape[-1]), dtype=torch.float64, device=x.device)
                for i in r.tolist():
                    g[i] = noise.gumbel(i, (1, lp.shape[-1]))[0]
                t = (lp.double() + g[r]).argmax(-1)
            if j == 0:
                for a in range(1, min(1 + self.branch, ranked.indices.shape[1])):  # alternatives to the first draft
                    ok = alive & torch.isfinite(ranked.values[:, a])
                    k = (starts + ranked.indices[:, a])[ok]
                    ra, ca, lpa = rows[k], cols[k], logp[k]
                    ta = lpa.argmax(-1) if g is None else (lpa.double() + g[ra]).argmax(-1)
                    if loop.stops is not None:
                        keep = ~torch.isin(ta, loop.stops)
                        ra, ca, ta = ra[keep], ca[keep], ta[keep]
                    alt = x[sub[ra]].clone()
                    alt[torch.arange(len(ra), device=x.device), ca] = ta
                    owner = sub[ra]
                    pos[owner, D + a - 1], tok[owner, D + a - 1] = ca, ta
                    at[owner, D + a - 1] = torch.arange(len(ra), device=x.device) + sum(len(o) for o in owners)
                    canvases.append(alt)
                    owners.append(owner)
            if loop.stops is not None:  # a stop token fills the canvas after it: the chain ends before it
                ok = ~torch.isin(t, loop.stops)
                alive[r[~ok]] = False
                r, c, t, lp = r[ok], c[ok], t[ok], lp[ok]
                if len(r) == 0:
                    break
            qs.append(lp)
            xs[r, c] = t
            owner = sub[r]
            pos[owner, j], tok[owner, j] = c, t
            at[owner, j] = torch.arange(len(r), device=x.device) + sum(len(o) for o in owners)
            canvases.append(xs[r].clone())
            owners.append(owner)
        if not owners:
            return empty
        q = torch.cat(qs) if self._sampling_rule(loop) else None  # no alternatives under rule "sampling"
        return torch.cat(canvases), torch.cat(owners), (pos, tok, at), q

    # --- the target's walk -------------------------------------------------------------------------------------
    def step(self, ctx) -> None:
        loop, base = ctx.loop, ctx.loop.base
        drafted, (pos, tok, at), qs, canvases = loop.__dict__.pop("drafted")
        B = ctx.x.shape[0]
        state = ctx.hidden.clone()  # per sequence: the base's output of its current (true) state
        last = state.clone()  # the state each sequence's last write was drawn at
        walking = torch.ones(B, dtype=torch.bool, device=ctx.x.device)
        branched = torch.zeros_like(walking)  # on an alternative first draft: no deeper draft
        D = self.depth
        for j in range(self.depth + 1):
            rows, cols = ctx.candidates()
            sel = walking[rows]
            rows, cols = rows[sel], cols[sel]
            if len(rows) == 0:
                break
            ctx.unroll = j  # history: the write came from the j-th drafted row of the step
            logp = log_probs(base.logits(state[rows, cols]), ctx.sampling)
            if self.threshold is not None:  # threshold's write: the confident set, at least the most confident
                n = self.threshold.counts(logp, rows, B).clamp(min=1) * walking.long()
                entries = ctx.choose(self.threshold.score(ctx, logp, rows), rows, n).sort().values
            else:
                entries = ctx.choose(ctx.scores(logp, rows), rows, walking.long()).sort().values
            wr, wc = rows[entries], cols[entries]
            drawn = None
            if qs is not None and j < D:  # rule "sampling": the drafted token where the position is the draft's
                drawn = self._accept(loop, logp[entries], wr, (at[wr, j] >= 0) & (pos[wr, j] == wc), tok[wr, j],
                                     qs, at[wr, j])
            tokens = ctx.commit(entries, rows, cols, logp, tokens=drawn)
            wrote = wr.unique()  # the sequences that wrote (threshold: several writes each)
            last[wrote] = state[wrote]
            walking = torch.zeros_like(walking)
            if j < D:  # on at a drafted row where the new canvas is the drafted one
                on = wrote[(at[wrote, j] >= 0) & ~branched[wrote]]
                walking[on[(ctx.x[on] == canvases[at[on, j]]).all(-1)]] = True
                state[walking] = drafted[at[walking, j]]
            if j == 0 and self.branch:  # the first write equal to an alternative first draft
                hit = ((pos[wr, D:] == wc[:, None]) & (tok[wr, D:] == tokens[:, None]) & (at[wr, D:] >= 0)
                       & ~walking[wr, None])
                on = hit.any(1)
                if on.any():
                    hr = wr[on]
                    state[hr] = drafted[at[hr, D + hit[on].long().argmax(1)]]
                    walking[hr] = branched[hr] = True
            if not walking.any():
                break
            loop.stats.drafts_accepted += int(walking.sum())
        loop.kept["spec_prior"] = last
        loop.kept["spec_has"] = torch.ones(B, dtype=torch.bool, device=ctx.x.device)

    @staticmethod
    def _accept(loop, logp, rows, drafted, tokens, qs, at) -> torch.Tensor:
        """Rule "sampling": one write per entry (row `rows[i]`, target distribution `logp[i]`). Where `drafted[i]`,
        keep the drafted token with probability min(1, p/q), else draw from max(0, p - q) normalised; elsewhere
        draw from p as the target does. The uniforms and Gumbel draws are the rows' own."""
        out = torch.empty(len(rows), dtype=torch.long, device=logp.device)
        plain = (~drafted).nonzero(as_tuple=True)[0]
        if len(plain):
            out[plain] = sample_tokens(logp[plain], rows[plain], loop.rng, False)
        for i in drafted.nonzero(as_tuple=True)[0].tolist():
            r, t = int(rows[i]), int(tokens[i])
            p, q = logp[i].double(), qs[int(at[i])].double()
            if torch.log(loop.rng.uniform(r, 1))[0] < p[t] - q[t]:
                out[i] = t
                continue
            rest = (p.exp() - q.exp()).clamp(min=0)
            target = rest.log() if rest.sum() > 0 else p  # p = q: never rejected; kept for safety
            out[i] = (target + loop.rng.gumbel(r, (1, p.shape[-1]))[0]).argmax()
        return out
