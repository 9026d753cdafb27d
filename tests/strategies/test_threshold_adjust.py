"""`threshold-adjust`: the confident positions from the full pass, one sampler draw, then confident ones only.

Exact positions on the dummy base (a stand-in whose logits at each position are a hand-made table,
tests/conftest.py) with real JointSamplers whose weights are set by hand; equivalences with
`threshold` and `adjust` on our tiny random base and on the shipped task model (real modules).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adjust.base import load_base
from adjust.cli import main
from adjust.decode import generate
from adjust.eval import tasks as T
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig, log_probs, order_scores
from adjust.strategies import make_strategy

from conftest import random_sampler
from test_adaptive import CONF, identity_sampler, table

TASK_BASE = Path(__file__).resolve().parents[2] / "models" / "task-base"


def run(base, strategy, sampler=None, order="entropy", gen_length=None, **kw):
    return generate(base, [[]], strategy, SamplingConfig(order=order), gen_length=gen_length or base.max_length,
                    record_history=True, sampler=sampler, **kw)


def unrolls_of(step) -> list[int]:
    return [u for _pos, _tok, u in step["unmasked"]]


# --------------------------------------------------------------------------------------------
# the rule, on hand-made logits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.55, 0.9, 0.93, 0.96, 0.985])
@pytest.mark.parametrize("k", [1, 3])
def test_full_pass_commits_exactly_the_positions_at_or_above_tau(dummy_base, tau, k):
    base = dummy_base(table())
    out = run(base, make_strategy("threshold-adjust", tau=tau, tokens_per_pass=k), identity_sampler(base))
    first = out.history[0][0]["unmasked"]
    assert {p for p, _t, u in first if u == 0} == {i for i, c in enumerate(CONF) if c >= tau}


def two_orders_table() -> torch.Tensor:
    """Position 0 is the most confident (0.6) but not the lowest-entropy one: position 1 (0.55 / 0.45).
    Four positions: the dummy base's hidden size is its length, and a sampler needs an even one."""
    p0 = [1e-9, 1e-9, 0.6] + [0.08] * 5
    p1 = [1e-9, 1e-9, 0.55, 0.45, 1e-9, 1e-9, 1e-9, 1e-9]
    rest = [1e-9, 1e-9] + [1 / 6] * 6
    return torch.tensor([p0, p1, rest, rest]).log()


@pytest.mark.parametrize("order,expected", [("entropy", 1), ("confidence", 0)])
def test_no_confident_position_commits_the_order_rules_best(dummy_base, order, expected):
    base = dummy_base(two_orders_table())
    out = run(base, make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=1), identity_sampler(base), order)
    assert [len(s["unmasked"]) for s in out.history[0]] == [1, 1, 1, 1]  # at least one, no more, per full pass
    assert out.history[0][0]["unmasked"][0][0] == expected


@pytest.mark.parametrize("tau", [0.55, 0.9, 0.985])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_one_unsure_draw_per_pass_then_confident_ones(dummy_base, tau, k):
    """The identity sampler's distributions are the full pass's, so after step 1 commits every position >= tau
    none is left that confident: each pass takes its one unsure draw and no more (a test can tell: K - 1 draws
    would write up to 5 tokens a pass here)."""
    base = dummy_base(table())
    out = run(base, make_strategy("threshold-adjust", tau=tau, tokens_per_pass=k, spacing=0), identity_sampler(base))
    left, unrolls = len(CONF), 0
    for step in out.history[0]:
        u = unrolls_of(step)
        batch = u.count(0)
        assert batch >= 1
        draws = min(1 if k > 1 else 0, left - batch)
        assert sorted(u) == [0] * batch + list(range(1, draws + 1))
        left -= len(u)
        unrolls += draws + (draws and k > 2 and left > 0)  # the unroll whose best is unsure writes nothing
    assert left == 0
    assert out.stats.sampler_passes == unrolls


def permuting_sampler(base, perm: list[int], gain: float) -> JointSampler:
    """A real JointSampler set by hand for the dummy base (hidden = one-hot of the position): the tokens are
    ignored, the block is the identity, and the output at position i is prior + gain * (the normalised prior
    of position perm[i]), so the sampler's distribution at i leans on the table's row perm[i]."""
    H = base.hidden_size
    s = JointSampler(SamplerConfig(H, 1, 16, base=base.identity()))
    with torch.no_grad():
        for p in s.block.parameters():
            if p.dim() == 2:
                p.zero_()
        s.proj.weight.zero_()
        s.proj.weight[:, H:] = torch.eye(H)[perm]  # z = permuted prior_norm(prior); embed(x) half unused
        s.out_norm.weight.fill_(gain / H ** 0.5)
    return s.eval()


def test_each_unroll_commits_the_best_position_of_the_samplers_distributions(dummy_base):
    base = dummy_base(table())
    sampler = permuting_sampler(base, perm=[5, 4, 3, 2, 1, 0], gain=2.0)
    out = run(base, make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=4, spacing=0), sampler)
    step = out.history[0][0]["unmasked"]
    assert len(out.history[0]) == 1 and unrolls_of(out.history[0][0]) == [0, 0, 0, 1, 2, 3]

    # replay: the sampler's hidden states after each unroll, its distributions at the positions left
    x = torch.full((1, len(CONF)), base.mask_id)
    for pos, tok, u in step:
        if u == 0:
            x[0, pos] = tok
    prior = base.hidden_states(x)
    full = order_scores(log_probs(base.logits(prior[0]), SamplingConfig()), "entropy")
    picks, left = [], [i for i in range(len(CONF)) if x[0, i] == base.mask_id]
    with torch.no_grad():
        for j in (1, 2, 3):
            prior = sampler(base, x, prior)
            logp = log_probs(base.logits(prior[0]), SamplingConfig())
            scores = order_scores(logp, "entropy")
            best = max(left, key=lambda i: scores[i])
            assert j == 1 or logp[best].exp().max() >= 0.9  # the later draws are confident ones
            tok = next(t for p, t, u in step if u == j)
            picks.append(best)
            x[0, best] = tok
            left.remove(best)
    assert [p for p, _t, u in step if u > 0] == picks
    # the test can tell: the full pass would have picked the positions left in another order
    assert picks != sorted(picks, key=lambda i: -full[i])


def test_describe_names_tau_k_and_spacing():
    s = make_strategy("threshold-adjust", tau=0.8, tokens_per_pass=3, spacing=1)
    assert s.describe() == "threshold-adjust(tau=0.8,K=3,spacing=1)"
    assert s.uses_sampler and s.adaptive
    d = make_strategy("threshold-adjust")
    assert (d.tau, d.k, d.spacing) == (0.9, 2, 2)  # the frontiers' best K (docs/results.md)


# --------------------------------------------------------------------------------------------
# spacing: no sampler draw within `spacing` positions of a token written in the same step
# --------------------------------------------------------------------------------------------

SPACED = [0.95, 0.6, 0.3, 0.5, 0.4, 0.2, 0.45, 0.35]  # tau 0.9: only position 0 is sure


def spaced_table() -> torch.Tensor:
    return torch.stack([torch.tensor([1e-9, 1e-9, c] + [(1 - c) / 5] * 5).log() for c in SPACED])


@pytest.mark.parametrize("unroll", ["full", "fast"])
@pytest.mark.parametrize("spacing,drawn", [(0, 1), (1, 3), (2, 3), (3, 6), (7, None)])
def test_the_unsure_draw_is_the_best_position_beyond_the_spacing(dummy_base, unroll, spacing, drawn):
    """The full pass writes position 0; the sampler (identity: its distributions are the full pass's, entropy
    order) draws the best position more than `spacing` away: 1 (0.6), else 3 (0.5), else 6 (0.45); none left
    within 7: no unroll at all. The fast unroll keeps its 2 positions among those allowed (keeping the best two
    overall, 1 and 3, would leave nothing to draw at spacing 3)."""
    base = dummy_base(spaced_table())
    out = run(base, make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=2, spacing=spacing),
              identity_sampler(base), unroll=unroll)
    first = out.history[0][0]["unmasked"]
    assert [(p, u) for p, _t, u in first] == [(0, 0)] + ([] if drawn is None else [(drawn, 1)])
    if drawn is None:  # nothing is ever more than 7 away on 8 positions: threshold's steps, no unroll run
        assert out.stats.sampler_passes == 0 and all(u == 0 for s in out.history[0] for _p, _t, u in s["unmasked"])


def test_no_later_draw_lands_near_any_write_of_the_step(task_model):
    """On the task model (real modules), every step of K = 4: each sampler draw is more than `spacing` away from
    every other token written in the same step, and spacing 0 does write next to them (the test can tell)."""
    base, sampler = task_model
    prompts = task_prompts(base, n=6)

    def min_gap(spacing):
        out = generate(base, prompts, make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=4, spacing=spacing),
                       gen_length=16, seed=3, sampler=sampler, record_history=True)
        gaps = [abs(p - q) for h in out.history for s in h for p, _t, u in s["unmasked"] if u > 0
                for q, _t2, _u in s["unmasked"] if q != p]
        return min(gaps)

    assert min_gap(2) > 2
    assert min_gap(0) == 1


# --------------------------------------------------------------------------------------------
# its two ends: threshold (K = 1) and adjust (tau = 1.0)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_model():
    base = load_base(TASK_BASE)
    return base, JointSampler.load(TASK_BASE / "sampler", base)


def task_prompts(base, n=3):
    """Held-out prompts of every task, padded into one batch (rows of several lengths)."""
    return [base.encode(e.prompt) for task in T.TASKS for e in T.examples(task, n, seed=1, split="eval")]


@pytest.fixture(scope="module")
def tiny_sampler(tiny_base):
    """A random JointSampler for the tiny base, weights x10 so unrolls move the distributions."""
    return random_sampler(tiny_base)


def test_k1_is_threshold_on_hand_made_logits(dummy_base):
    base = dummy_base(table())
    for tau in (0.55, 0.9, 0.985):
        a = run(base, make_strategy("threshold-adjust", tau=tau, tokens_per_pass=1), identity_sampler(base),
                "confidence", seed=4)
        b = run(base, make_strategy("threshold", tau=tau), order="confidence", seed=4)
        assert a.history == b.history and torch.equal(a.tokens, b.tokens)


def test_k1_is_threshold_on_the_task_model(task_model):
    """Token for token; the fallback is the order rule here, the most confident position in `threshold`:
    the same rule with --order confidence."""
    base, sampler = task_model
    prompts = task_prompts(base)
    kw = dict(sampling=SamplingConfig(order="confidence"), gen_length=16, seed=7, record_history=True)
    a = generate(base, prompts, make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=1), sampler=sampler, **kw)
    b = generate(base, prompts, make_strategy("threshold", tau=0.9), **kw)
    assert torch.equal(a.tokens, b.tokens) and a.history == b.history
    sizes = [len(s["unmasked"]) for h in a.history for s in h]
    assert max(sizes) > 1 and sizes.count(1) > 0  # both branches of the rule were taken
    assert a.stats.sampler_passes == 0


@pytest.mark.parametrize("k,order", [(2, "entropy"), (2, "random"), (4, "entropy")])
def test_tau_1_is_adjust_on_the_tiny_model(tiny_base, tiny_sampler, k, order):
    """With spacing 0: K = 2 is `adjust` at K = 2, any order rule. At K = 4 no later draw is sure: the same tokens
    as `adjust` at K = 2, plus one unroll per pass whose best is below tau (with --order random its scores draw
    position noise, so the tokens differ from there on)."""
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    kw = dict(sampling=SamplingConfig(order=order), gen_length=14, seed=2, sampler=tiny_sampler, record_history=True)
    a = generate(tiny_base, prompts, make_strategy("threshold-adjust", tau=1.0, tokens_per_pass=k, spacing=0), **kw)
    b = generate(tiny_base, prompts, make_strategy("adjust", tokens_per_pass=2), **kw)
    assert torch.equal(a.tokens, b.tokens) and a.history == b.history
    if k == 2:
        assert a.stats.sampler_passes == b.stats.sampler_passes > 0
    else:  # the unsure unroll runs in every pass with masks left after its draw
        assert b.stats.sampler_passes < a.stats.sampler_passes <= 2 * b.stats.sampler_passes


@pytest.mark.parametrize("k", [2, 4])
def test_tau_1_is_adjust_on_the_shipped_model(k):
    """With spacing 0, on a trained model whose probabilities stay below 1 (the shipped model on free text). The
    task model is not one: it gives the EOS after a `list` answer probability 1.0 exactly in float32 at some
    positions, so threshold-adjust at tau 1 commits those from the full pass and differs from adjust."""
    shipped = TASK_BASE.parent / "shakespeare-base"
    base = load_base(shipped)
    sampler = JointSampler.load(shipped / "sampler", base)
    prompts = [base.encode(p) for p in ("KING HENRY.", "To be", "ROMEO:\nO")]
    kw = dict(gen_length=16, seed=7, sampler=sampler, record_history=True)
    a = generate(base, prompts, make_strategy("threshold-adjust", tau=1.0, tokens_per_pass=k, spacing=0), **kw)
    b = generate(base, prompts, make_strategy("adjust", tokens_per_pass=2), **kw)  # K = min(K, 2): no draw is sure
    assert torch.equal(a.tokens, b.tokens) and a.history == b.history


# --------------------------------------------------------------------------------------------
# batches and the reported tokens per full pass
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("early_exit", [False, True])
def test_alone_equals_in_a_batch(task_model, early_exit):
    """Rows run out of masks at different passes (early exit fills after EOS); each row's tokens are its own."""
    base, sampler = task_model
    prompts = task_prompts(base, n=8)
    by_len: dict = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    group = max(by_len.values(), key=len)  # equal lengths: no padding, bit-identical logits in any batch
    assert len(group) >= 3
    strategy = make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=3)
    kw = dict(gen_length=16, seed=5, sampler=sampler, early_exit=early_exit, record_history=True)
    batch = generate(base, group, strategy, sample_indices=list(range(len(group))), **kw)
    steps = [len(h) for h in batch.history]
    if early_exit:
        assert len(set(steps)) > 1  # rows finished at different passes
    for b, p in enumerate(group):
        alone = generate(base, [p], strategy, sample_indices=[b], **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[b])
        assert alone.history[0] == batch.history[b]


def test_reported_tokens_per_full_pass_match_the_committed_counts(task_model):
    base, sampler = task_model
    out = generate(base, task_prompts(base), make_strategy("threshold-adjust", tau=0.9, tokens_per_pass=3, spacing=0),
                   gen_length=16, seed=3, sampler=sampler, early_exit=True, record_history=True)
    committed = sum(len(s["unmasked"]) for h in out.history for s in h)
    passes = sum(len(h) for h in out.history)
    assert out.stats.row_passes == passes
    assert out.stats.decoded_tokens == committed
    assert out.stats.tokens_per_full_pass == pytest.approx(committed / passes)
    assert out.stats.full_passes == max(len(h) for h in out.history)
    # one batched unroll per unroll index any row reached in that pass: its last draw's, and one more where the
    # row drew (index 1 .. K - 2) and kept masks for a later pass (that unroll's pick was unsure: nothing written;
    # spacing 0: with a spacing the unroll is skipped where no position is far enough)
    def ran(h, i):
        m = max(unrolls_of(h[i]))
        return m + (1 <= m < 2 and i + 1 < len(h))  # K = 3: unrolls 1 and 2

    unrolls = [max((ran(h, i) for h in out.history if i < len(h)), default=0) for i in range(out.stats.full_passes)]
    assert out.stats.sampler_passes == sum(unrolls)


# --------------------------------------------------------------------------------------------
# bad parameters: one line, exit 2
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--tau", "0"], ["--tau must be in (0, 1]"]),
    (["--tau", "1.5"], ["--tau must be in (0, 1]"]),
    (["-K", "0"], ["--tokens-per-pass must be at least 1"]),
    (["--gamma", "0.5"], ["takes no --gamma", "--tau, -K/--tokens-per-pass, --spacing"]),
    (["--max-tokens-per-pass", "4"], ["takes no --max-tokens-per-pass"]),
    (["--spacing", "-1"], ["--spacing must be an integer >= 0"]),
])
def test_bad_parameters_exit_2_with_one_line(capsys, args, words):
    rc = main(["generate", "--base", str(TASK_BASE), "--strategy", "threshold-adjust", *args, "--gen-length", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("adjust: error: ")
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("spec,words", [("threshold-adjust:tau=2;K=2", ["--tau must be in (0, 1]"]),
                                        ("threshold-adjust:K=0", ["must be at least 1"]),
                                        ("threshold-adjust:tau=abc", ["--tau must be a number"]),
                                        ("threshold-adjust:gamma=1", ["takes no gamma", "tau, K, spacing"]),
                                        ("threshold-adjust:spacing=1.5", ["--spacing must be an integer >= 0"])])
def test_bad_specs_exit_2_with_one_line(capsys, tmp_path, spec, words):
    prompts = tmp_path / "p.txt"
    prompts.write_text("list: cat dog sun =\n")
    rc = main(["eval", "tasks", "--base", str(TASK_BASE), "--prompts", str(prompts), "--strategies", spec])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("adjust: error: ")
    for w in words:
        assert w in err, err


def test_generate_help_names_every_registered_strategy(capsys):
    from adjust.strategies import strategy_names

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("--strategy STRATEGY ", 1)[1].split("(default: exact)", 1)[0]
    assert sorted(n.strip() for n in listed.split("|")) == strategy_names()
