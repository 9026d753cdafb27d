"""Cheap sampler unrolls (decode.generate unroll="fast", issue 13 point 4) on our tiny model: what stays exact,
the approximation stated exactly, the option's refusals and the stats that record it."""

from __future__ import annotations

import json

import pytest
import torch

from adjust.cli import main
from adjust.decode import FAST_PICKS_PER_TOKEN, FastUnroll, Stats, generate, generate_texts
from adjust.errors import AdjustError
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy

from conftest import make_tiny_base, random_sampler

EVERY_MODE = ["full", "fast", FastUnroll(picks=1), FastUnroll(all_rows=True)]
ALL = 10 ** 6  # more picks than any canvas has masked positions


@pytest.fixture(scope="module")
def base(tokenizer):
    return make_tiny_base(tokenizer, num_layers=2)


@pytest.fixture(scope="module")
def sampler(base):
    return random_sampler(base, seed=3)


@pytest.fixture(scope="module")
def deep_sampler(base):
    """A sampler of two blocks (`adjust distill --sampler-layers 2`)."""
    return random_sampler(base, seed=4, num_layers=2)


def prompts_for(base, n=3, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    usable = torch.tensor([i for i in range(len(base.tokenizer)) if i not in base.banned_ids and i not in base.stop_ids])
    return [usable[torch.randint(0, len(usable), (length,), generator=g)].tolist() for _ in range(n)]


def run(base, sampler, name="adjust", unroll="full", prompts=None, gen_length=16, order="entropy", **params):
    params = params or {"tokens_per_pass": 4}
    return generate(base, prompts or prompts_for(base), make_strategy(name, **params), SamplingConfig(order=order),
                    gen_length=gen_length, seed=7, sampler=sampler, record_history=True, unroll=unroll)


def positions(history_row) -> list[list[int]]:
    return [[pos for pos, _tok, _u in step["unmasked"]] for step in history_row]


# --- what stays exact ----------------------------------------------------------------------------------
@pytest.mark.parametrize("unroll", EVERY_MODE)
@pytest.mark.parametrize("order", ["entropy", "random"])
def test_adjust_k1_is_exact_in_every_mode(base, sampler, unroll, order):
    a = run(base, sampler, unroll=unroll, order=order, tokens_per_pass=1)
    e = run(base, None, "exact", order=order, tokens_per_pass=1)
    assert torch.equal(a.tokens, e.tokens) and a.history == e.history
    assert a.stats.sampler_passes == 0


@pytest.mark.parametrize("name,params", [("adjust", {"tokens_per_pass": 2}), ("adjust", {"tokens_per_pass": 4}),
                                         ("adjust", {"tokens_per_pass": 8}), ("adjust-threshold", {"tau": 0.5})])
def test_fast_with_every_pick_and_every_row_is_the_full_unroll(base, sampler, name, params):
    """All positions kept and the sampler's queries on every row: the unroll is the full one (its rows' keys/values
    are all recomputed, the step's ones are only a starting point), so the tokens are the full mode's."""
    want = run(base, sampler, name, **params)
    got = run(base, sampler, name, unroll=FastUnroll(picks=ALL, all_rows=True), **params)
    assert torch.equal(got.tokens, want.tokens) and got.history == want.history
    assert got.stats.sampler_passes == want.stats.sampler_passes > 0


def test_the_first_unroll_of_a_step_is_exact_at_its_rows(base, sampler):
    """With every masked position kept, K = 2 (one unroll a step) gives the full mode's tokens even though the
    sampler runs only on the kept rows: the step's keys/values elsewhere are exactly the full unroll's."""
    want = run(base, sampler, tokens_per_pass=2)
    got = run(base, sampler, unroll=FastUnroll(picks=ALL), tokens_per_pass=2)
    assert torch.equal(got.tokens, want.tokens)
    assert got.stats.positions_per_unroll < want.stats.positions_per_unroll == 5 + 16


def test_forward_rows_equals_the_full_unroll_at_those_rows(base, sampler):
    """Any rows per sequence (repeats allowed), left padding included."""
    from adjust.decode import build_canvas

    x, mask, P = build_canvas([[5, 6, 7], [8, 9, 10, 11, 12]], 8, base)
    x[:, P + 2] = x[:, P - 1]  # a written token
    at = torch.tensor([[P, P + 2, P + 5, P + 5], [1, P + 1, P + 3, P + 7]])
    with torch.no_grad():
        prior = base.hidden_states(x, mask)
        want = sampler(base, x, prior, mask)
        got = sampler.forward_rows(base, x, prior, mask, sampler.keys_values(base, x, prior, mask), at)
    torch.testing.assert_close(got, want.gather(1, at[..., None].expand(-1, -1, want.shape[-1])), atol=1e-5, rtol=1e-5)


def test_a_deeper_sampler_keeps_every_exact_property(base, deep_sampler, tmp_path):
    """Two blocks: rows against the keys/values of every block equal the full unroll; K = 1 is exact; the fast
    unroll on every row and position is the full one, and its first unroll is exact at K = 2; saved and loaded
    it is the same sampler (and a config.json without the field is one block)."""
    from adjust.decode import build_canvas

    s = deep_sampler
    x, mask, P = build_canvas([[5, 6, 7], [8, 9, 10, 11, 12]], 8, base)
    x[:, P + 2] = x[:, P - 1]
    at = torch.tensor([[P, P + 2, P + 5, P + 5], [1, P + 1, P + 3, P + 7]])
    with torch.no_grad():
        prior = base.hidden_states(x, mask)
        want = s(base, x, prior, mask)
        got = s.forward_rows(base, x, prior, mask, s.keys_values(base, x, prior, mask), at)
        span = s.forward_span(base, x, prior, mask, s.keys_values(base, x, prior, mask), P, P + 4)
    torch.testing.assert_close(got, want.gather(1, at[..., None].expand(-1, -1, want.shape[-1])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(span, want[:, P:P + 4], atol=1e-5, rtol=1e-5)
    assert torch.equal(run(base, s, tokens_per_pass=1).tokens, run(base, None, "exact", tokens_per_pass=1).tokens)
    full = run(base, s, tokens_per_pass=4)
    assert torch.equal(run(base, s, unroll=FastUnroll(picks=ALL, all_rows=True), tokens_per_pass=4).tokens, full.tokens)
    assert torch.equal(run(base, s, unroll=FastUnroll(picks=ALL), tokens_per_pass=2).tokens,
                       run(base, s, tokens_per_pass=2).tokens)
    s.save(tmp_path / "deep")
    assert torch.equal(run(base, JointSampler.load(tmp_path / "deep", base), tokens_per_pass=4).tokens, full.tokens)
    cfg = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert cfg["num_layers"] == 2
    del cfg["num_layers"]
    (tmp_path / "deep" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdjustError, match="more_blocks"):  # read as one block: the second block's weights are extra
        JointSampler.load(tmp_path / "deep", base)


def test_the_default_unroll_is_full_for_a_deeper_sampler(base, sampler, deep_sampler, tiny_model_dir, tmp_path, capsys):
    """Unless told, a one-block sampler unrolls fast and a deeper one full (fast's stale keys/values in the later
    blocks lose what they learned); a mode given is kept; `adjust generate` resolves it after loading."""
    from adjust.decode import resolve_unroll

    adjust, exact = make_strategy("adjust", tokens_per_pass=4), make_strategy("exact")
    assert resolve_unroll(None, adjust, sampler) == "fast" and resolve_unroll(None, adjust) == "fast"
    assert resolve_unroll(None, adjust, deep_sampler) == "full" and resolve_unroll("fast", adjust, deep_sampler) == "fast"
    assert resolve_unroll(None, exact, sampler) == "full"
    from adjust.base import load_base

    JointSampler(SamplerConfig.for_base(load_base(tiny_model_dir), num_layers=2)).save(tmp_path / "deep")
    for extra, want in (([], "full"), (["--unroll", "fast"], "fast")):  # the CLI, a two-block sampler
        assert main(["generate", "--base", str(tiny_model_dir), "--sampler", str(tmp_path / "deep"), "--prompt", "a",
                     "--strategy", "adjust", "-K", "4", "--gen-length", "8", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["stats"]["unroll"] == want


# --- the approximation ---------------------------------------------------------------------------------
def test_later_picks_come_from_the_kept_positions(base, sampler):
    """picks = 1 at K = 3: after the full pass's token, an unroll may pick only the position the full pass ranks
    next, so every step writes the full pass's two best positions (checked against the base's own scores of
    that step's canvas); the step ends when its kept positions are written (no third, useless unroll)."""
    from adjust.sampling import log_probs, order_scores

    prompts = prompts_for(base)
    fast = run(base, sampler, unroll=FastUnroll(picks=1), prompts=prompts, tokens_per_pass=3)
    assert fast.stats.full_passes == 8 and fast.stats.sampler_passes == 8  # two tokens and one unroll a step
    P = len(prompts[0])
    for b, prompt in enumerate(prompts):
        x = torch.tensor([prompt + [base.mask_id] * 16])
        for step in fast.history[b]:
            masked = (x[0] == base.mask_id).nonzero()[:, 0]
            with torch.no_grad():
                scores = order_scores(log_probs(base.logits(base.hidden_states(x)[0, masked]), SamplingConfig()),
                                      "entropy")
            best_two = masked[scores.argsort(descending=True, stable=True)[:2]] - P
            assert sorted(p for p, _, _ in step["unmasked"]) == sorted(best_two.tolist())
            for p, tok, _ in step["unmasked"]:
                x[0, P + p] = tok


def test_fast_keeps_2_k_minus_1_positions_and_computes_few_rows(base, sampler):
    g = run(base, sampler, unroll="fast", prompts=prompts_for(base, n=1), gen_length=32)
    want = run(base, sampler, prompts=prompts_for(base, n=1), gen_length=32)
    assert g.stats.unroll == "fast" and want.stats.unroll == "full"
    # each unroll runs the sampler on 2 (K - 1) kept rows + the full pass's written one (fewer near the end)
    assert g.stats.positions_per_unroll <= FAST_PICKS_PER_TOKEN * 3 + 1 < want.stats.positions_per_unroll
    assert g.stats.tokens_per_full_pass == 4
    assert not torch.equal(g.tokens, want.tokens)  # an approximation: the later picks differ


@pytest.mark.parametrize("unroll", ["fast", FastUnroll(picks=2)])
def test_fast_alone_equals_in_a_batch(base, sampler, unroll):
    prompts = prompts_for(base, n=3, seed=4)
    batch = run(base, sampler, unroll=unroll, prompts=prompts)
    for b, p in enumerate(prompts):
        assert torch.equal(run(base, sampler, unroll=unroll, prompts=[p]).tokens[0], batch.tokens[b])


def test_fast_with_a_cache_stays_in_the_block(base, sampler):
    """With a key/value cache the kept positions are the block's; K = 2 with every position kept gives the cached
    full mode's tokens (one unroll a step, exact at its rows in both)."""
    kw = dict(block_length=4, cache="dual")
    prompts = prompts_for(base)
    strat = make_strategy("adjust", tokens_per_pass=2)
    want = generate(base, prompts, strat, gen_length=16, seed=7, sampler=sampler, **kw)
    got = generate(base, prompts, strat, gen_length=16, seed=7, sampler=sampler, unroll=FastUnroll(picks=ALL), **kw)
    assert torch.equal(got.tokens, want.tokens)
    four = generate(base, prompts, make_strategy("adjust", tokens_per_pass=4), gen_length=16, seed=7, sampler=sampler,
                    record_history=True, unroll="fast", **kw)
    for b in range(3):
        for i, step in enumerate(positions(four.history[b])):
            assert len(step) == 4 and {p // 4 for p in step} == {i}  # a block of 4 per step


# --- the option and the stats --------------------------------------------------------------------------
def test_bad_values_are_refused(base, sampler):
    with pytest.raises(AdjustError, match="unknown --unroll 'quick'; choose one of full, fast"):
        run(base, sampler, unroll="quick")
    with pytest.raises(AdjustError, match="unknown --unroll"):
        generate_texts(base, [""], make_strategy("exact"), gen_length=4, unroll="")
    for picks in (0, -1, 2.5):
        with pytest.raises(AdjustError, match="picks"):
            FastUnroll(picks=picks)


@pytest.mark.parametrize("command", [["generate", "--strategy", "adjust"], ["bench"], ["eval", "quality"],
                                     ["eval", "tasks", "--prompts", "p.txt"]])
def test_cli_refuses_a_bad_mode_before_loading(tmp_path, capsys, command):
    (tmp_path / "p.txt").write_text("list: cat dog =\n")
    command = [str(tmp_path / c) if c == "p.txt" else c for c in command]
    rc = main([*command, "--base", str(tmp_path / "nowhere"), "--unroll", "quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["adjust: error: unknown --unroll 'quick'; choose one of full, fast"]


def test_stats_record_the_mode(base, sampler, tiny_model_dir, tmp_path, capsys):
    g = run(base, sampler, unroll="fast")
    assert g.stats.unroll == "fast" and g.stats.to_dict()["unroll"] == "fast"
    assert g.stats.merge(Stats(sequences=1)).unroll == "fast"
    assert run(base, sampler, unroll=FastUnroll(picks=3)).stats.unroll == "fast(picks=3,all_rows=False)"
    _, stats = generate_texts(base, ["a", "b c"], make_strategy("adjust", tokens_per_pass=2), gen_length=6,
                              sampler=sampler, unroll="fast")
    assert stats.unroll == "fast"
    # the CLI: generate --json reports it (an untrained sampler of the saved base)
    from adjust.base import load_base

    JointSampler(SamplerConfig.for_base(load_base(tiny_model_dir))).save(tmp_path / "sampler")
    rc = main(["generate", "--base", str(tiny_model_dir), "--sampler", str(tmp_path / "sampler"),
               "--strategy", "adjust", "-K", "2", "--gen-length", "6", "--unroll", "fast", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["stats"]["unroll"] == "fast" and out["stats"]["sampler_passes"] == 3


def test_bench_times_each_mode(capsys, tiny_model_dir):
    capsys.readouterr()
    rc = main(["bench", "--base", str(tiny_model_dir), "--fresh-sampler", "--strategies", "exact,parallel:2,adjust:4",
               "--unroll", "full,fast", "--gen-length", "32", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
               "--unroll-repeats", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["unrolls"] == ["full", "fast"]
    rows = {(r["strategy"], r["unroll"]) for r in report["results"]}
    assert rows == {("exact", "full"), ("parallel:2", "full"), ("adjust:4", "full"), ("adjust:4", "fast")}
    c = report["unroll_cost"]["1"]
    assert set(c["modes"]) == {"full", "fast"} and c["unroll"] == "full" and c["k"] == 4
    assert c["unroll_cost"] == c["modes"]["full"]["unroll_cost"]
    full, fast = c["modes"]["full"], c["modes"]["fast"]
    assert full["sampler_positions_per_unroll"] == 32 and fast["sampler_positions_per_unroll"] <= 6
    assert fast["logit_positions_per_unroll"] < full["logit_positions_per_unroll"]
    assert 0 < fast["unroll_flops"] < full["unroll_flops"]
    assert {(v["strategy"], v["unroll"]) for v in report["adjust_vs_ideal"]} == {("adjust:4", "full"), ("adjust:4", "fast")}
