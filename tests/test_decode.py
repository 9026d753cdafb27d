"""The decoding loop: quotas, prompt safety, determinism, batching, order rules, blocks, ADJUST at K=1."""

from __future__ import annotations

import math

import pytest
import torch

from adjust.decode import Stats, build_canvas, full_passes_needed, generate, generate_texts
from adjust.errors import AdjustError
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy, strategy_names

from conftest import DummyBase, make_tiny_base


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def positions_by_step(history_row) -> list[list[int]]:
    return [[pos for pos, _tok, _u in step["unmasked"]] for step in history_row]


def block_sizes(gen_length: int, block_length: int | None) -> list[int]:
    b = block_length or gen_length
    return [min(b, gen_length - lo) for lo in range(0, gen_length, b)]


class Spy:
    """Proxy of a base that records every canvas handed to a full pass."""

    def __init__(self, base):
        self._base = base
        self.inputs: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._base, name)

    def hidden_states(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return self._base.hidden_states(input_ids, attention_mask)


# Dummy vocabulary: 0 = mask, 1 = pad (both banned), 2..7 real tokens.
V, MASK, PAD, REAL = 8, 0, 1, list(range(2, 8))


def dummy_table(L: int, special: dict[int, list[float]], ties: bool = False) -> torch.Tensor:
    """(L, V) logits over the real tokens, rows in `special` given as probabilities over the 6 real
    tokens (tiny mass added everywhere). Other rows are near-uniform, each a little different (no
    two rows score the same under any rule), or exactly uniform with `ties`. The banned ids get the
    *largest* logit everywhere, so a decoder that forgot to ban them would pick and emit them."""
    t = torch.zeros(L, V)
    if not ties:
        t[:, REAL[0]] = torch.tensor([0.04 * ((7 * i) % L) for i in range(L)])
    for pos, probs in special.items():
        p = torch.tensor(probs, dtype=torch.float64) + 1e-4
        t[pos, REAL] = (p / p.sum()).log().float()
    t[:, [MASK, PAD]] = 50.0
    return t


# Three rows on which the three deterministic rules disagree:
#   E = lowest entropy,  C = highest top-1 probability,  M = largest top1 - top2 margin.
E_ROW = [0.52, 0.48, 0, 0, 0, 0]
C_ROW = [0.70, 0.20, 0.025, 0.025, 0.025, 0.025]
M_ROW = [0.66, 0.068, 0.068, 0.068, 0.068, 0.068]


def rule_scores(table: torch.Tensor, order: str) -> torch.Tensor:
    """The rule computed independently of adjust.sampling, over the real tokens only."""
    p = torch.softmax(table[:, REAL].double(), -1)
    if order == "entropy":
        return (p * p.log()).sum(-1)  # -H
    top = p.topk(2, -1).values
    if order == "confidence":
        return top[:, 0]
    if order == "margin":
        return top[:, 0] - top[:, 1]
    raise ValueError(order)


def ranking(scores: torch.Tensor, lo: int, hi: int) -> list[int]:
    """Positions lo..hi-1 best first (absolute canvas positions); the tests' tables have no ties."""
    assert len(set(scores[lo:hi].tolist())) == hi - lo, "tied scores: the expected order would be ambiguous"
    return sorted(range(lo, hi), key=lambda i: -float(scores[i]))


def run(base, prompts, strategy="parallel", k=None, gen_length=16, **kw):
    strat = make_strategy(strategy, tokens_per_pass=k)
    return generate(base, prompts, strat, gen_length=gen_length, record_history=True, **kw)


# --------------------------------------------------------------------------------------------
# 1. quotas
# --------------------------------------------------------------------------------------------

def test_parallel_k4_gen64_takes_16_full_passes(tiny_base):
    out = run(tiny_base, [[]], "parallel", 4, gen_length=64)
    assert out.stats.full_passes == 16
    assert full_passes_needed(64, 4) == 16
    assert all(len(step["unmasked"]) == 4 for step in out.history[0])
    assert out.stats.tokens_per_full_pass == pytest.approx(4.0)
    assert out.stats.sampler_passes == 0


@pytest.mark.parametrize("gen_length,k,block_length", [
    (64, 4, 10), (64, 3, 16), (30, 4, 7), (64, 5, None), (17, 4, 4), (12, 8, 5)])
def test_parallel_quota_is_ceil_per_block(tiny_base, gen_length, k, block_length):
    expected = sum(math.ceil(s / k) for s in block_sizes(gen_length, block_length))
    assert full_passes_needed(gen_length, k, block_length) == expected
    out = run(tiny_base, [[5, 6]], "parallel", k, gen_length=gen_length, block_length=block_length)
    assert out.stats.full_passes == expected
    # every step unmasks min(K, masks left in its block): K until the block's last step
    steps = positions_by_step(out.history[0])
    assert len(steps) == expected
    i = 0
    for size in block_sizes(gen_length, block_length):
        left = size
        while left:
            assert len(steps[i]) == min(k, left)
            left -= len(steps[i])
            i += 1


def test_exact_uses_gen_length_passes(tiny_base):
    out = run(tiny_base, [[7]], "exact", gen_length=64)
    assert out.stats.full_passes == 64 == full_passes_needed(64, 1)
    assert all(len(step["unmasked"]) == 1 for step in out.history[0])


def test_quota_holds_for_a_batch(tiny_base):
    """A padded batch of several rows still takes ceil(N/K) full passes (rows advance together)."""
    out = run(tiny_base, [[5], [6, 7, 8], []], "parallel", 4, gen_length=22)
    assert out.stats.full_passes == full_passes_needed(22, 4)
    assert out.stats.row_passes == 3 * full_passes_needed(22, 4)
    assert out.stats.new_tokens == 22 and out.stats.sequences == 3


def test_adjust_quota_and_unrolls(tiny_base):
    torch.manual_seed(1)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    out = run(tiny_base, [[9, 10]], "adjust", 4, gen_length=18, sampler=sampler)
    assert out.stats.full_passes == full_passes_needed(18, 4)
    # one unroll between consecutive tokens of a step, none after a step's last token
    steps = out.history[0]
    assert out.stats.sampler_passes == sum(len(s["unmasked"]) - 1 for s in steps)
    for s in steps:
        assert [u for _p, _t, u in s["unmasked"]] == list(range(len(s["unmasked"])))


def test_strategy_registry_and_bad_k():
    assert {"exact", "parallel", "adjust"} <= set(strategy_names())
    for name in ("parallel", "adjust"):
        with pytest.raises(AdjustError):
            make_strategy(name, tokens_per_pass=0)
    with pytest.raises(AdjustError):
        make_strategy("exact", tokens_per_pass=2)
    with pytest.raises(AdjustError):
        make_strategy("no-such-strategy")


# --------------------------------------------------------------------------------------------
# 2. prompt safety, no mask left, seeds
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,k", [("exact", None), ("parallel", 4)])
def test_prompt_region_never_changes(tiny_base, strategy, k):
    prompts = [[10, 11, 12, 13, 14], [20, 21], [], [30, 31, 32]]
    spy = Spy(tiny_base)
    out = run(spy, prompts, strategy, k, gen_length=12, block_length=5)
    P = max(map(len, prompts))
    assert spy.inputs, "no full pass was made"
    for x in spy.inputs:
        for b, p in enumerate(prompts):
            assert x[b, P - len(p):P].tolist() == p
            assert (x[b, :P - len(p)] == tiny_base.pad_id).all()
    # history positions are generation-relative and cover each generated position exactly once
    for b in range(len(prompts)):
        seen = [pos for step in positions_by_step(out.history[b]) for pos in step]
        assert sorted(seen) == list(range(12))
    assert (out.tokens != tiny_base.mask_id).all()
    assert not torch.isin(out.tokens, torch.tensor(tiny_base.banned_ids)).any()
    assert out.tokens.shape == (len(prompts), 12)


def test_canvas_layout(tiny_base):
    x, mask, P = build_canvas([[4, 5, 6], [7]], 4, tiny_base)
    assert P == 3
    assert x[0, :3].tolist() == [4, 5, 6] and x[1, 2].item() == 7
    assert x[1, :2].tolist() == [tiny_base.pad_id] * 2
    assert (x[:, 3:] == tiny_base.mask_id).all()
    assert mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1] and mask[0].all()
    assert build_canvas([[4], [5]], 2, tiny_base)[1] is None  # no padding -> no attention mask


def test_history_matches_returned_tokens(tiny_base):
    out = run(tiny_base, [[3, 4]], "parallel", 3, gen_length=10)
    written = {pos: tok for step in out.history[0] for pos, tok, _ in step["unmasked"]}
    assert [written[i] for i in range(10)] == out.tokens[0].tolist()


def test_same_seed_same_tokens_different_seed_different_tokens(tiny_base):
    strat = make_strategy("parallel", tokens_per_pass=2)
    a = generate(tiny_base, [[5, 6]], strat, gen_length=24, seed=123).tokens
    b = generate(tiny_base, [[5, 6]], strat, gen_length=24, seed=123).tokens
    c = generate(tiny_base, [[5, 6]], strat, gen_length=24, seed=124).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_of_one_prompt_differ(tokenizer, tiny_base):
    samples, _ = generate_texts(tiny_base, ["the cat"], make_strategy("exact"), gen_length=16, num_samples=2)
    assert [s["sample_index"] for s in samples] == [0, 1]
    assert samples[0]["token_ids"] != samples[1]["token_ids"]


# --------------------------------------------------------------------------------------------
# 3. batching does not change tokens
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,k", [("exact", None), ("parallel", 3)])
def test_batch_equals_each_prompt_alone(tiny_base, strategy, k):
    prompts = ["the dog", "the sun", "", "the river", "Once upon a time there was a little house"]
    lengths = [len(tiny_base.encode(p)) for p in prompts]
    assert len(set(lengths)) >= 3 and len(set(lengths)) < len(lengths)  # mixed lengths, and a shared one
    strat = make_strategy(strategy, tokens_per_pass=k)
    batched, stats = generate_texts(tiny_base, prompts, strat, gen_length=16, num_samples=2, seed=7)
    assert [(s["prompt"], s["sample_index"]) for s in batched] == [(p, i) for p in prompts for i in range(2)]
    assert stats.sequences == 2 * len(prompts)
    for n, p in enumerate(prompts):
        alone, _ = generate_texts(tiny_base, [p], strat, gen_length=16, num_samples=2, seed=7, batch_size=1)
        for i in range(2):
            got = batched[2 * n + i]
            assert got["token_ids"] == alone[i]["token_ids"], (p, i)
            assert got["text"] == alone[i]["text"]
            assert tiny_base.mask_id not in got["token_ids"]


def test_generate_texts_rejects_bad_counts(tiny_base):
    strat = make_strategy("exact")
    with pytest.raises(AdjustError):
        generate_texts(tiny_base, ["a"], strat, gen_length=4, num_samples=0)
    with pytest.raises(AdjustError):
        generate_texts(tiny_base, ["a"], strat, gen_length=4, batch_size=0)


# --------------------------------------------------------------------------------------------
# 4. order rules, on a dummy base with hand-made logits
# --------------------------------------------------------------------------------------------

L_DUMMY = 16
SPECIAL = {9: E_ROW, 4: C_ROW, 12: M_ROW}  # absolute canvas positions


def test_dummy_rows_separate_the_rules():
    """Sanity of the fixture: each deterministic rule has a different winner."""
    t = dummy_table(L_DUMMY, SPECIAL)
    winners = {o: ranking(rule_scores(t, o), 0, L_DUMMY)[0] for o in ("entropy", "confidence", "margin")}
    assert winners == {"entropy": 9, "confidence": 4, "margin": 12}


@pytest.mark.parametrize("prompt_len", [0, 3])
@pytest.mark.parametrize("order", ["entropy", "confidence", "margin"])
def test_order_rule_exact_step0_and_full_order(order, prompt_len):
    table = dummy_table(L_DUMMY, SPECIAL)
    base = DummyBase(table, mask_id=MASK, pad_id=PAD)
    gen = 10
    out = run(base, [[5] * prompt_len], "exact", gen_length=gen, sampling=SamplingConfig(order=order))
    expected = [i - prompt_len for i in ranking(rule_scores(table, order), prompt_len, prompt_len + gen)]
    steps = positions_by_step(out.history[0])
    assert steps[0] == [expected[0]]
    # the table never changes, so exact follows the whole ranking
    assert [s[0] for s in steps] == expected
    assert all(t in REAL for t in out.tokens[0].tolist())


@pytest.mark.parametrize("order", ["entropy", "confidence", "margin"])
def test_order_rule_parallel_k2_step0(order):
    table = dummy_table(L_DUMMY, SPECIAL)
    base = DummyBase(table, mask_id=MASK, pad_id=PAD)
    out = run(base, [[]], "parallel", 2, gen_length=L_DUMMY, sampling=SamplingConfig(order=order))
    expected = ranking(rule_scores(table, order), 0, L_DUMMY)
    assert set(positions_by_step(out.history[0])[0]) == set(expected[:2])


@pytest.mark.parametrize("order", ["entropy", "confidence", "margin"])
def test_ties_go_to_the_lower_position(order):
    """decode.StepContext.choose promises "ties -> lower position": with every position scoring the
    same (e.g. --top-k 1 makes all of them certain), decoding must go left to right."""
    base = DummyBase(dummy_table(L_DUMMY, {}, ties=True), mask_id=MASK, pad_id=PAD)
    cfg = SamplingConfig(order=order)
    out = run(base, [[]], "exact", gen_length=L_DUMMY, sampling=cfg)
    assert [s[0] for s in positions_by_step(out.history[0])] == list(range(L_DUMMY))
    out = run(base, [[]], "parallel", 4, gen_length=L_DUMMY, sampling=cfg)
    assert positions_by_step(out.history[0])[0] == [0, 1, 2, 3]


def test_top_k_1_ties_every_position_and_decodes_left_to_right(tiny_base):
    """With --top-k 1 every candidate is certain (entropy 0, confidence 1, margin 1): all tie."""
    out = run(tiny_base, [[5, 6]], "exact", gen_length=12, sampling=SamplingConfig(top_k=1))
    assert [s[0] for s in positions_by_step(out.history[0])] == list(range(12))


def test_temperature_zero_takes_argmax_and_never_banned_ids():
    torch.manual_seed(0)
    table = torch.randn(L_DUMMY, V) * 3
    table[:, [MASK, PAD]] = 100.0
    base = DummyBase(table, mask_id=MASK, pad_id=PAD)
    out = run(base, [[]], "parallel", 3, gen_length=L_DUMMY, sampling=SamplingConfig(temperature=0))
    argmax_real = [REAL[i] for i in table[:, REAL].argmax(-1).tolist()]
    assert out.tokens[0].tolist() == argmax_real
    # and greedy ignores the seed
    again = run(base, [[]], "parallel", 3, gen_length=L_DUMMY, seed=99, sampling=SamplingConfig(temperature=0))
    assert torch.equal(out.tokens, again.tokens)


def test_sampled_tokens_follow_the_position_distribution():
    """At temperature 1, a row with ~all mass on one real token yields that token."""
    table = torch.zeros(L_DUMMY, V)
    for i in range(L_DUMMY):
        table[i, REAL[i % 6]] = 40.0  # every other real token has probability ~e^-40
    base = DummyBase(table, mask_id=MASK, pad_id=PAD)
    out = run(base, [[]], "parallel", 4, gen_length=L_DUMMY)
    assert out.tokens[0].tolist() == [REAL[i % 6] for i in range(L_DUMMY)]


def test_random_order_reproducible_and_seed_dependent():
    base = DummyBase(dummy_table(L_DUMMY, SPECIAL), mask_id=MASK, pad_id=PAD)
    cfg = SamplingConfig(order="random")

    def order(seed):
        out = run(base, [[]], "exact", gen_length=L_DUMMY, seed=seed, sampling=cfg)
        return [s[0] for s in positions_by_step(out.history[0])]

    a, b, c = order(0), order(0), order(1)
    assert sorted(a) == list(range(L_DUMMY))
    assert a == b
    assert a != c
    # not secretly one of the deterministic rules
    t = dummy_table(L_DUMMY, SPECIAL)
    assert all(a != ranking(rule_scores(t, o), 0, L_DUMMY) for o in ("entropy", "confidence", "margin"))


# --------------------------------------------------------------------------------------------
# 5. blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["entropy", "confidence", "margin"])
def test_block_decoding_stays_in_block_on_dummy(order):
    # the rules' favourite positions sit in later blocks, so ignoring the block would show
    L, gen, blk, k = 24, 16, 5, 2
    table = dummy_table(L, {13: E_ROW, 8: C_ROW, 17: M_ROW})
    base = DummyBase(table, mask_id=MASK, pad_id=PAD)
    P = 2
    out = run(base, [[5, 6]], "parallel", k, gen_length=gen, block_length=blk,
              sampling=SamplingConfig(order=order))
    steps = positions_by_step(out.history[0])
    blocks = [{p // blk for p in s} for s in steps]
    assert all(len(b) == 1 for b in blocks), "a step unmasked positions of two blocks"
    seq = [b.pop() for b in blocks]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] == (gen - 1) // blk
    # each block is finished before the next starts, with ceil(size / K) steps
    for blk_id, size in enumerate(block_sizes(gen, blk)):
        assert seq.count(blk_id) == math.ceil(size / k)
    # within its block, each step takes the rule's best remaining positions
    scores = rule_scores(table, order)
    done: set[int] = set()
    for s, b in zip(steps, seq):
        lo, hi = b * blk, min((b + 1) * blk, gen)
        remaining = [i - P for i in ranking(scores, P + lo, P + hi) if i - P not in done]
        assert set(s) == set(remaining[:k])
        done |= set(s)


def test_block_decoding_stays_in_block_on_tiny_batch(tiny_base):
    gen, blk = 20, 6
    out = run(tiny_base, [[5, 6, 7], [8], [9, 10, 11]], "parallel", 4, gen_length=gen, block_length=blk)
    for row in out.history:
        prev_block = 0
        for step in positions_by_step(row):
            blocks = {p // blk for p in step}
            assert len(blocks) == 1
            cur = blocks.pop()
            assert cur in (prev_block, prev_block + 1)
            prev_block = cur
    assert (out.tokens != tiny_base.mask_id).all()


# --------------------------------------------------------------------------------------------
# 8. ADJUST at K=1 is exact
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["entropy", "random"])
def test_adjust_k1_equals_exact(tiny_base, order):
    torch.manual_seed(3)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    prompts = [[5, 6, 7], [8, 9, 10]]
    cfg = SamplingConfig(order=order)
    a = generate(tiny_base, prompts, make_strategy("adjust", tokens_per_pass=1), cfg, gen_length=20, seed=11,
                 sampler=sampler, record_history=True)
    e = generate(tiny_base, prompts, make_strategy("exact"), cfg, gen_length=20, seed=11, record_history=True)
    assert torch.equal(a.tokens, e.tokens)
    assert a.history == e.history
    assert a.stats.sampler_passes == 0
    assert a.stats.full_passes == e.stats.full_passes == 20


def test_adjust_needs_a_sampler_of_this_base(tiny_base, tokenizer):
    strat = make_strategy("adjust", tokens_per_pass=2)
    with pytest.raises(AdjustError):
        generate(tiny_base, [[5]], strat, gen_length=4)
    other = make_tiny_base(tokenizer, seed=1)
    sampler = JointSampler(SamplerConfig.for_base(other))
    with pytest.raises(AdjustError):
        generate(tiny_base, [[5]], strat, gen_length=4, sampler=sampler)


# --------------------------------------------------------------------------------------------
# request checks and stats
# --------------------------------------------------------------------------------------------

def test_request_checks(tiny_base):
    strat = make_strategy("exact")
    with pytest.raises(AdjustError, match="context"):
        generate(tiny_base, [[5] * (tiny_base.max_length - 3)], strat, gen_length=4)
    generate(tiny_base, [[5] * (tiny_base.max_length - 4)], strat, gen_length=4)  # exactly fits
    with pytest.raises(AdjustError, match="mask"):
        generate(tiny_base, [[5, tiny_base.mask_id]], strat, gen_length=4)
    with pytest.raises(AdjustError):
        generate(tiny_base, [[5]], strat, gen_length=0)
    with pytest.raises(AdjustError):
        generate(tiny_base, [[5]], strat, gen_length=4, block_length=0)


def test_stats_merge_and_dict():
    a = Stats(full_passes=4, row_passes=8, new_tokens=16, sequences=2, seconds=1.0)
    b = Stats(full_passes=2, row_passes=2, new_tokens=4, sequences=1, seconds=1.0)
    m = a.merge(b)
    assert m.full_passes == 6 and m.sequences == 3 and m.row_passes == 10
    assert m.new_tokens * m.sequences == 16 * 2 + 4 * 1  # total tokens preserved
    assert m.tokens_per_full_pass == pytest.approx(36 / 10)
    d = m.to_dict()
    assert {"full_passes", "sampler_passes", "new_tokens", "tokens_per_full_pass", "seconds",
            "tokens_per_second"} <= set(d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the per-pass sync question only arises on a GPU")
def test_phase_timing_does_not_sync_the_device_every_pass(tokenizer, monkeypatch):
    """Stats' phase times come from CUDA events read once at the end, not from a sync after every pass."""
    base = make_tiny_base(tokenizer).to("cuda")
    sampler = JointSampler(SamplerConfig.for_base(base)).to("cuda").eval()
    syncs = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(1) or real(*a, **k))
    out = generate(base, [[]], make_strategy("adjust", tokens_per_pass=2), gen_length=32, sampler=sampler)
    assert out.stats.full_passes == 16 and out.stats.sampler_passes == 16
    assert len(syncs) <= 1 and out.stats.refresh_seconds > 0 and out.stats.unroll_seconds > 0
