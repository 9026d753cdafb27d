"""Key/value caches (decode.generate cache="prefix" | "dual", issue 12) on our tiny model and the native Dream
and LLaDA (random checkpoints in the published layouts, tests/base/published.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adjust.base import load_base
from adjust.decode import generate
from adjust.errors import AdjustError
from adjust.layers import rope_for
from adjust.strategies import make_strategy

from conftest import make_tiny_base, random_sampler

sys.path.insert(0, str(Path(__file__).parent / "base"))
from published import write_dream, write_llada  # noqa: E402

KINDS = ["tiny", "dream", "llada"]
STRATEGIES = [("exact", {}), ("parallel", {"tokens_per_pass": 4}), ("threshold", {"tau": 0.9}),
              ("adjust", {"tokens_per_pass": 4}), ("adjust-threshold", {}), ("threshold-adjust", {"tau": 0.5})]


@pytest.fixture(scope="module")
def bases(tokenizer, tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("cache")
    out = {"tiny": make_tiny_base(tokenizer, num_layers=2),
           "dream": load_base(write_dream(root / "dream", seed=1)),
           "llada": load_base(write_llada(root / "llada", seed=2))}
    return out


@pytest.fixture(scope="module")
def samplers(bases):
    out = {}
    for kind, base in bases.items():
        out[kind] = random_sampler(base, seed=3)
    return out


def prompts_for(base, n=3, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    usable = torch.tensor([i for i in range(min(base.vocab_size, len(base.tokenizer)))
                           if i not in base.banned_ids and i not in base.stop_ids])
    return [usable[torch.randint(0, len(usable), (length,), generator=g)].tolist() for _ in range(n)]


def canvas(base, B=2, P=6, G=12, seed=0):
    x = torch.tensor(prompts_for(base, B, P + G, seed))
    x[:, P:] = base.mask_id
    x[:, P + 2] = x[:, 1]  # a few generated tokens already written
    return x


def run(base, sampler, name, params, cache="none", refresh=None, prompts=None, **kw):
    prompts = prompts or prompts_for(base)
    return generate(base, prompts, make_strategy(name, **params), gen_length=16, block_length=kw.pop("block", 4),
                    seed=5, sampler=sampler, cache=cache, cache_refresh=refresh, **kw)


# --- the model: cached keys/values and spans ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_cache_pass_is_the_plain_pass_bit_for_bit(bases, kind):
    base = bases[kind]
    x = canvas(base)
    with torch.no_grad():
        hidden, kv = base.cache_pass(x)
        again, kv2 = base.cache_pass(x)
        assert torch.equal(hidden, base.hidden_states(x))
    assert len(kv) == len(base.model.blocks)
    for (k, v), (k2, v2) in zip(kv, kv2):  # the same canvas: the cached keys/values are the fresh ones exactly
        assert torch.equal(k, k2) and torch.equal(v, v2) and k.shape[2] == x.shape[1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("span", [(0, 5), (6, 10), (6, 18), (9, 18), (17, 18)])
def test_span_against_its_own_cache_equals_the_full_pass(bases, kind, span):
    """Nothing changed since the cache was filled: the span's states equal the full pass's (float tolerance).
    For Dream the span's first aligned state is the network's output one position to its left."""
    base = bases[kind]
    x = canvas(base)
    lo, hi = span
    with torch.no_grad():
        full, kv = base.cache_pass(x)
        got = base.span_hidden(x, None, kv, lo, hi)
    assert got.shape == (x.shape[0], hi - lo, base.hidden_size)
    torch.testing.assert_close(got, full[:, lo:hi], atol=1e-5, rtol=1e-5)


def test_dream_span_start_takes_the_state_left_of_it(bases):
    """The Dream shift at a span boundary: aligned[lo] is the network's raw output at lo - 1, not at lo."""
    base = bases["dream"]
    x = canvas(base)
    with torch.no_grad():
        raw = base.model(x)
        _, kv = base.cache_pass(x)
        got = base.span_hidden(x, None, kv, 6, 10)
    torch.testing.assert_close(got[:, 0], raw[:, 5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 0], raw[:, 6], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_span_with_left_padding(bases, kind):
    """Padded rows: positions and the key mask of the whole canvas; a row whose first real token opens the span
    (Dream: it keeps its own state, as dream_align does) equals the full pass."""
    base = bases[kind]
    x = canvas(base, B=3)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :6] = 0  # row 2's first real token is position 6, the span's start
    x[mask == 0] = base.pad_id
    with torch.no_grad():
        full, kv = base.cache_pass(x, mask)
        got = base.span_hidden(x, mask, kv, 6, 12)
        assert torch.equal(full, base.hidden_states(x, mask))
    torch.testing.assert_close(got, full[:, 6:12], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_keys_after_block_edits(bases, kind):
    """The first layer's keys/values of positions left of the block depend on their tokens only: unchanged when
    the block is written, so a cache filled before the edits holds the fresh values there."""
    base = bases[kind]
    x = canvas(base)
    with torch.no_grad():
        _, before = base.cache_pass(x)
        y = x.clone()
        y[:, 10:14] = y[:, 0:4]
        _, after = base.cache_pass(y)
    for i in (0, 1):
        assert torch.equal(before[0][i][:, :, :10], after[0][i][:, :, :10])
        assert not torch.equal(before[0][i][:, :, 10:14], after[0][i][:, :, 10:14])


@pytest.mark.parametrize("kind", KINDS)
def test_cached_unroll_equals_uncached_on_block_rows(bases, samplers, kind):
    base, sampler = bases[kind], samplers[kind]
    x = canvas(base)
    with torch.no_grad():
        prior = base.hidden_states(x)
        want = sampler(base, x, prior)
        kv = sampler.keys_values(base, x, prior)
        got = sampler.forward_span(base, x, prior, None, kv, 6, 10)
    torch.testing.assert_close(got, want[:, 6:10], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_later_cached_unroll_sees_the_full_pass_outside_the_block(bases, samplers, kind):
    """The approximation, stated exactly: a later unroll of a step (prior = the previous unroll's output) equals
    the uncached unroll whose prior outside the block is the step's full pass (the keys/values computed once)."""
    base, sampler = bases[kind], samplers[kind]
    x = canvas(base)
    with torch.no_grad():
        h0 = base.hidden_states(x)
        kv = sampler.keys_values(base, x, h0)
        first = h0.clone()
        first[:, 6:10] = sampler.forward_span(base, x, h0, None, kv, 6, 10)
        x[:, 7] = x[:, 0]  # a token written between the unrolls
        got = sampler.forward_span(base, x, first, None, kv, 6, 10)
        want = sampler(base, x, first)[:, 6:10]  # `first` holds h0 outside the block
        uncached = sampler(base, x, sampler(base, x, h0))[:, 6:10]  # the uncached chain: its own outside rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, uncached, atol=1e-5)


# --- the decoding loop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,params", STRATEGIES)
def test_cache_none_is_the_plain_loop(bases, samplers, kind, name, params):
    """cache="none" runs the base's plain full pass on the whole canvas every time (never the cache methods)."""
    base = bases[kind]

    class NoCache:
        def __getattr__(self, a):
            if a in ("cache_pass", "span_hidden"):
                raise AssertionError("cache used with cache='none'")
            return getattr(base, a)

    g = run(NoCache(), samplers[kind], name, params)
    assert g.tokens.equal(run(base, samplers[kind], name, params).tokens)
    assert g.stats.positions_per_full_pass == 16 + 6 and g.stats.cache == "none"
    if g.stats.sampler_passes:
        assert g.stats.positions_per_unroll == 16 + 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name,params", STRATEGIES[:3] + [("adjust", {"tokens_per_pass": 2})])
def test_refresh_every_pass_gives_the_uncached_tokens(bases, samplers, kind, mode, name, params):
    """A refresh on every pass: each base pass is the plain one, so exact, parallel and threshold give the
    uncached tokens bit for bit; ADJUST at K=2 (one unroll a step, computed on the block's rows only) gives
    the same tokens (its logits agree within float tolerance)."""
    base, sampler = bases[kind], samplers[kind]
    want = run(base, sampler, name, params)
    got = run(base, sampler, name, params, cache=mode, refresh=1)
    assert got.tokens.equal(want.tokens)
    assert got.stats.refresh_passes == got.stats.full_passes == want.stats.full_passes


@pytest.mark.parametrize("kind", ["tiny", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_sampler_of_two_blocks_unrolls_every_row_under_a_cache(bases, kind, mode):
    """A sampler of several blocks reads a written word through other positions, so under a cache its unrolls
    run on every row, as without one: with a refresh on every pass (each base pass the plain one) ADJUST K = 4
    gives the uncached tokens bit for bit, and every unroll counts the whole canvas; the block-only unroll
    (what the one-block sampler keeps) would not see the later block's rows move."""
    base = bases[kind]
    sampler = random_sampler(base, seed=5, num_layers=2)
    want = run(base, sampler, "adjust", {"tokens_per_pass": 4})
    got = run(base, sampler, "adjust", {"tokens_per_pass": 4}, cache=mode, refresh=1)
    assert got.tokens.equal(want.tokens)
    assert got.stats.sampler_positions == 22 * got.stats.sampler_passes > 0
    plain = run(base, sampler, "adjust", {"tokens_per_pass": 4}, cache=mode)  # the plain cache: unrolls too
    assert plain.stats.sampler_positions == 22 * plain.stats.sampler_passes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_computes_fewer_positions(bases, samplers, kind, mode):
    base, sampler = bases[kind], samplers[kind]
    g = run(base, sampler, "adjust", {"tokens_per_pass": 2}, cache=mode)  # 4 blocks of 4, 2 passes each
    s = g.stats
    assert s.cache == mode and s.full_passes == 8 and s.refresh_passes == 4
    L, spans = 22, [4, 4, 4, 4] if mode == "dual" else [16, 12, 8, 4]
    assert s.positions == 4 * L + sum(spans)
    assert s.positions_per_unroll == 4 and s.sampler_passes == 8
    d = s.to_dict()
    assert d["cache"] == mode and d["unroll_cost"] > 0 and d["positions_per_unroll"] == 4


@pytest.mark.parametrize("kind", KINDS)
def test_cache_refresh_every_n(bases, samplers, kind):
    g = run(bases[kind], None, "exact", {}, cache="dual", refresh=2, block=8)  # 2 blocks of 8 passes
    assert g.stats.full_passes == 16 and g.stats.refresh_passes == 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name,params", [("exact", {}), ("threshold", {"tau": 0.9}), ("adjust", {"tokens_per_pass": 4}),
                                         ("threshold-adjust", {"tau": 0.5})])
def test_alone_equals_in_a_batch_with_cache(bases, samplers, kind, mode, name, params):
    base, sampler = bases[kind], samplers[kind]
    prompts = prompts_for(base, n=3, seed=4)  # equal lengths: no padding
    batch = run(base, sampler, name, params, cache=mode, prompts=prompts)
    for b, p in enumerate(prompts):
        alone = run(base, sampler, name, params, cache=mode, prompts=[p])
        assert alone.tokens[0].equal(batch.tokens[b])


def test_span_sees_stale_cache_after_edits(bases):
    """The cache is an approximation: after block edits a span against the old cache differs from a fresh pass
    (so the equalities above do not compare a path with itself)."""
    base = bases["tiny"]
    with torch.no_grad():
        x = canvas(base)
        _, kv = base.cache_pass(x)
        y = x.clone()
        y[:, 6:10] = x[:, 0:4]
        _, fresh = base.cache_pass(y)
        stale, new = base.span_hidden(y, None, kv, 6, 10), base.span_hidden(y, None, fresh, 6, 10)
    torch.testing.assert_close(new, base.hidden_states(y)[:, 6:10], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, new, atol=1e-4)


@pytest.fixture(scope="module")
def one_layer(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-layer")
    return {"tiny": make_tiny_base(tokenizer, num_layers=1),
            "dream": load_base(write_dream(root / "dream", seed=1, layers=1)),
            "llada": load_base(write_llada(root / "llada", seed=2, layers=1))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_layer_cache_is_exact_without_refresh(one_layer, kind, mode):
    """With one layer the keys/values of a position depend on its token only, so a cache filled at the block start
    is still exact when the block changes: cached decoding must give the uncached tokens with no refresh at all.
    (Checks the cached path against an independent fact, not against itself.)"""
    base = one_layer[kind]
    for name, params in STRATEGIES[:3]:
        want = run(base, None, name, params)
        got = run(base, None, name, params, cache=mode)
        assert got.tokens.equal(want.tokens) and got.stats.refresh_passes == 4
        if name == "exact":
            assert got.stats.full_passes == 16  # 12 of them cached passes


# --- the refresh rule --cache-verify (V-verify: recompute the positions whose values moved most) -----------
@pytest.mark.parametrize("kind", KINDS)
def test_verify_every_position_is_the_full_pass_on_the_new_canvas(bases, kind):
    """With `verify` covering every position outside the span, a cached pass on an edited canvas is a whole-canvas
    pass: its states and the refreshed cache equal those of a fresh pass on that canvas (float tolerance), while
    the plain span against the same stale cache does not."""
    base = bases[kind]
    x = canvas(base)
    y = x.clone()
    y[:, 10:14] = x[:, 0:4]  # the block is written after the cache was filled
    with torch.no_grad():
        _, stale = base.cache_pass(x)
        _, stale2 = base.cache_pass(x)
        full, fresh = base.cache_pass(y)
        got = base.span_hidden(y, None, stale, 10, 14, verify=100)
        plain = base.span_hidden(y, None, stale2, 10, 14)
    torch.testing.assert_close(got, full[:, 10:14], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, 10:14], atol=1e-4)
    for (k, v), (fk, fv) in zip(stale, fresh):
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


def first_layer_attention(model, x):
    """(B, L, H) the first layer's attention output on the canvas x (a plain whole-canvas computation)."""
    block = model.blocks[0]
    return block.attn(block.attn_norm(model.embed(x)), *rope_of(model, x))


def test_verify_refreshes_the_positions_that_moved_most(bases):
    """verify = 2: per row the span and exactly 2 other positions get fresh keys/values in every layer after the
    first, the 2 whose first-layer attention output moved most since the cache was filled; the rest keep the
    stale cache. A second pass ranks the others against the attention the first pass left them."""
    base = bases["tiny"]
    model = base.model
    x = canvas(base)
    y = x.clone()
    y[:, 10:14] = x[:, 0:4]
    with torch.no_grad():
        _, stale = base.cache_pass(x)
        before = [(k.clone(), v.clone()) for k, v in stale]
        base.span_hidden(y, None, stale, 10, 14, verify=2)
        moved = (first_layer_attention(model, y) - first_layer_attention(model, x)).norm(dim=-1)
    last = len(model.blocks) - 1  # the cache: each layer's (k, v), then the probe's reference
    changed = (stale[last][1] != before[last][1]).any(1).any(-1)  # (B, L) positions rewritten in the last layer
    for b in range(x.shape[0]):
        picked = changed[b].nonzero().flatten().tolist()
        assert len(picked) == 6 and set(range(10, 14)) <= set(picked)
        moved[b, 10:14] = -1
        assert set(picked) - set(range(10, 14)) == set(moved[b].topk(2).indices.tolist())
    with torch.no_grad():  # the same canvas again: the two refreshed have not moved since, the next two have
        again = [(k.clone(), v.clone()) for k, v in stale[:last + 1]]
        base.span_hidden(y, None, stale, 10, 14, verify=2)
    changed = (stale[last][1] != again[last][1]).any(1).any(-1)
    for b in range(x.shape[0]):
        moved[b, 10:14] = -1
        assert set(changed[b].nonzero().flatten().tolist()) - set(range(10, 14)) == set(
            moved[b].topk(4).indices.tolist()[2:])


def rope_of(model, x):
    return rope_for(None, x.shape, x.device, model.head_dim, model.rope_theta, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name,params", STRATEGIES[:3])
def test_verify_always_gives_the_uncached_tokens(bases, samplers, kind, mode, name, params):
    """The rule at its always-fresh setting (every position verified): the uncached tokens, with a refresh only
    at block starts. (ADJUST's sampler reads the base's states outside the block, which a cached pass leaves
    at the last refresh's, verified positions included: not compared.)"""
    base, sampler = bases[kind], samplers[kind]
    want = run(base, sampler, name, params)
    got = run(base, sampler, name, params, cache=mode, cache_verify=64)
    assert got.tokens.equal(want.tokens)
    assert got.stats.refresh_passes == 4 and got.stats.positions == 22 * got.stats.full_passes


@pytest.mark.parametrize("kind", KINDS)
def test_verify_with_left_padding(bases, kind):
    """Prompts of different lengths (left padding): padding is never verified before a real position, and
    verifying every position still gives the uncached tokens."""
    base = bases[kind]
    prompts = [p[:n] for p, n in zip(prompts_for(base, n=3, seed=6), (6, 3, 5))]
    want = run(base, None, "exact", {}, prompts=prompts)
    got = run(base, None, "exact", {}, cache="dual", cache_verify=64, prompts=prompts)
    assert got.tokens.equal(want.tokens)
    x = canvas(base, B=2)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    x[mask == 0] = base.pad_id
    y = x.clone()
    y[:, 10:14] = x[:, 6:10]
    with torch.no_grad():
        _, kv = base.cache_pass(x, mask)
        cos, sin = rope_for(mask, y.shape, y.device, base.model.head_dim, base.model.rope_theta, torch.float32)
        rows = base.model.verify_rows(y, mask.bool(), cos, sin, kv, 10, 14, 3)
    assert rows.shape == (2, 3) and not set(rows[0].tolist()) & {0, 1, 2, 3}  # 14 real positions: no padding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_verify_never_is_the_plain_cache(bases, samplers, kind, mode):
    """The rule at its never setting (0, the default) is today's cache: the same tokens and positions."""
    base, sampler = bases[kind], samplers[kind]
    for name, params in [("exact", {}), ("adjust", {"tokens_per_pass": 4})]:
        plain = run(base, sampler, name, params, cache=mode)
        got = run(base, sampler, name, params, cache=mode, cache_verify=0)
        assert got.tokens.equal(plain.tokens) and got.stats.positions == plain.stats.positions


@pytest.mark.parametrize("kind", KINDS)
def test_verify_counts_its_positions(bases, kind):
    """verify = 3: each cached pass computes the block and 3 more positions in every layer (Stats.positions)."""
    base = bases[kind]
    g = run(base, None, "exact", {}, cache="dual", cache_verify=3)  # 4 blocks of 4: 4 refreshes, 12 cached passes
    assert g.stats.full_passes == 16 and g.stats.refresh_passes == 4
    assert g.stats.positions == 4 * 22 + 12 * (4 + 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,params", [("exact", {}), ("threshold", {"tau": 0.9}),
                                         ("adjust", {"tokens_per_pass": 4})])
def test_alone_equals_in_a_batch_with_verify(bases, samplers, kind, name, params):
    base, sampler = bases[kind], samplers[kind]
    prompts = prompts_for(base, n=3, seed=4)
    batch = run(base, sampler, name, params, cache="dual", cache_verify=2, prompts=prompts)
    for b, p in enumerate(prompts):
        alone = run(base, sampler, name, params, cache="dual", cache_verify=2, prompts=[p])
        assert alone.tokens[0].equal(batch.tokens[b])


def test_verify_refusals(bases, capsys):
    from adjust.cli import main

    base = bases["tiny"]
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(AdjustError, match="--cache-verify must be a whole number"):
            generate(base, [[]], make_strategy("exact"), gen_length=8, block_length=4, cache="dual", cache_verify=bad)
    with pytest.raises(AdjustError, match="there is none with --cache none"):
        generate(base, [[]], make_strategy("exact"), gen_length=8, block_length=4, cache_verify=2)
    from adjust.eval.bench import run_bench

    with pytest.raises(AdjustError, match="there is none with --cache none"):  # the bench's library call too
        run_bench(base, gen_length=8, block_length=4, caches=["none"], cache_verifies=[0, 2], progress=False)
    for argv, flag in ((["generate", "--cache-verify", "2", "--gen-length", "8"], "--cache-verify"),
                       (["generate", "--cache", "dual", "--block-length", "4", "--cache-verify", "-1"],
                        "--cache-verify"),
                       (["bench", "--cache", "none", "--cache-verify", "0,2"], "--cache-verify"),
                       (["bench", "--cache", "dual", "--block-length", "4", "--cache-verify", "x"], "--cache-verify")):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("adjust: error: ") and flag in err[0], (argv, err)


# --- refusals -------------------------------------------------------------------------------------------
def test_refusals(bases, tmp_path):
    base = bases["tiny"]
    with pytest.raises(AdjustError, match="needs --block-length"):
        generate(base, [[]], make_strategy("exact"), gen_length=8, cache="dual")
    with pytest.raises(AdjustError, match="unknown --cache"):
        generate(base, [[]], make_strategy("exact"), gen_length=8, block_length=4, cache="full")
    with pytest.raises(AdjustError, match="--cache-refresh"):
        generate(base, [[]], make_strategy("exact"), gen_length=8, block_length=4, cache="dual", cache_refresh=0)


def test_cli_refuses_before_loading(tmp_path, capsys):
    from adjust.cli import main

    rc = main(["generate", "--base", str(tmp_path / "nowhere"), "--gen-length", "8", "--cache", "dual"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["adjust: error: --cache dual needs --block-length: the cache is refreshed at each "
                               "block start"]


def test_base_without_cache_refuses(tmp_path, capsys, tokenizer):
    """A base through transformers (here a real tiny BertForMaskedLM) cannot take the cache: one error line,
    exit 2."""
    from stand_ins import save_random_bert

    from adjust.cli import main

    d = save_random_bert(tmp_path / "bert", tokenizer)
    base = load_base(d)
    assert not base.supports_cache
    with pytest.raises(AdjustError, match="cannot take a key/value cache"):
        generate(base, [[]], make_strategy("exact"), gen_length=4, block_length=2, cache="prefix")
    capsys.readouterr()
    rc = main(["generate", "--base", str(d), "--gen-length", "4", "--block-length", "2", "--cache", "prefix"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("adjust: error: --cache prefix") and "Traceback" not in "".join(err)
