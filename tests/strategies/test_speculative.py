"""`speculative`: exact decoding's tokens at several per full pass (docs/speculative.md).

Real modules: the shipped models with their trained samplers; our tiny random base with a random sampler; a
tiny random base with a vocabulary of three tokens, small enough to enumerate every completion's probability
under exact decoding, for a goodness-of-fit test (with the same test failing for `parallel` and `adjust`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adjust.base import load_base
from adjust.cli import main
from adjust.decode import Decoding, generate
from adjust.errors import AdjustError
from adjust.sampler import JointSampler
from adjust.sampling import SamplingConfig, log_probs, order_scores
from adjust.strategies import make_strategy

from conftest import make_tiny_base, random_sampler
from test_threshold_adjust import task_prompts, tiny_sampler  # noqa: F401  (fixtures)

stats = pytest.importorskip("scipy.stats")

MODELS = Path(__file__).resolve().parents[2] / "models"


def spec(depth=4, drafter=None, branch=0, rule="coupled", **kw):
    return make_strategy("speculative", depth=depth, drafter=drafter, branch=branch, rule=rule, **kw)


@pytest.fixture(scope="module")
def shakespeare():
    base = load_base(MODELS / "shakespeare-base")
    return base, JointSampler.load(MODELS / "shakespeare-base" / "sampler", base)


@pytest.fixture(scope="module")
def task():
    base = load_base(MODELS / "task-base")
    return base, JointSampler.load(MODELS / "task-base" / "sampler", base)


def same_as_exact(base, sampler, prompts, strategy, temperature, gen_length, **kw):
    """Speculative's tokens equal exact's in the batch, and each row's equal that row run alone; its stats."""
    sampling = SamplingConfig(temperature=temperature, **kw.pop("sampling", {}))
    ex = generate(base, prompts, make_strategy("exact"), sampling, gen_length=gen_length, seed=5, **kw)
    sp = generate(base, prompts, strategy, sampling, gen_length=gen_length, seed=5, sampler=sampler, **kw)
    assert torch.equal(sp.tokens, ex.tokens)
    for b in (0, len(prompts) - 1):
        alone = generate(base, [prompts[b]], strategy, sampling, gen_length=gen_length, seed=5, sampler=sampler,
                         sample_indices=None, **kw)
        assert torch.equal(alone.tokens[0], ex.tokens[b])
    return sp.stats, ex.stats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafter", ["sampler", "self"])
def test_same_tokens_as_exact_on_the_shipped_models_alone_and_in_a_batch(shakespeare, task, temperature, drafter):
    base, sampler = shakespeare
    prompts = [base.encode(p) for p in ("ROMEO:", "KING:")]  # rows of two lengths: padding
    st, ex = same_as_exact(base, sampler, prompts, spec(4, drafter), temperature, 32)
    assert st.full_passes < ex.full_passes and st.drafts_accepted > 0
    base, sampler = task
    st, ex = same_as_exact(base, sampler, task_prompts(base, 1), spec(4, drafter), temperature, 10)
    assert st.full_passes < ex.full_passes and st.drafts_accepted > 0


@pytest.mark.parametrize("sampling", [dict(order="random"), dict(top_p=0.8), dict(top_k=5, order="margin"),
                                      dict(order="confidence")])
@pytest.mark.parametrize("depth,branch", [(1, 0), (3, 0), (2, 2)])
def test_same_tokens_as_exact_for_every_order_rule_and_filter(tiny_base, tiny_sampler, sampling, depth,
                                                              branch):  # noqa: F811
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    for drafter in ("sampler", "self"):
        same_as_exact(tiny_base, tiny_sampler, prompts, spec(depth, drafter, branch), 1.0, 12, sampling=sampling)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_alternative_first_drafts_are_verified_too(shakespeare, temperature):
    """--branch: alternative first drafts, one row each; exact's tokens, and (here) fewer passes than the chain."""
    base, sampler = shakespeare
    prompts = [base.encode(p) for p in ("ROMEO:", "KING:")]
    for drafter in ("sampler", "self"):
        st, _ = same_as_exact(base, sampler, prompts, spec(3, drafter, 2), temperature, 32)
        chain, _ = same_as_exact(base, sampler, prompts, spec(3, drafter), temperature, 32)
        assert st.base_rows - st.full_passes * 2 > chain.base_rows - chain.full_passes * 2  # the alternatives' rows
        assert st.full_passes < chain.full_passes  # some first writes matched an alternative


def test_same_tokens_as_exact_with_blocks_and_early_exit(task):
    base, sampler = task
    prompts = task_prompts(base, 1)
    for drafter in ("sampler", "self"):
        st, _ = same_as_exact(base, sampler, prompts, spec(3, drafter), 1.0, 12, block_length=4, early_exit=True)
        assert st.eos_filled > 0  # answers ended: the positions after EOS were filled, not decoded


def test_depth_1_is_exact_at_most_two_tokens_per_pass(task):
    base, sampler = task
    prompts = task_prompts(base, 1)
    st, ex = same_as_exact(base, sampler, prompts, spec(1), 0.0, 10)
    assert ex.full_passes / 2 <= st.full_passes < ex.full_passes
    assert st.drafts_proposed <= st.full_passes * len(prompts)


def test_rows_joining_and_leaving_get_their_exact_tokens(task):
    """The server's continuous batching: rows join a running decoding and leave it; each gets exact's tokens."""
    base, sampler = task
    prompts = [base.encode("reverse: bee ink key pen egg =")] * 3  # one length: rows can join
    sampling = SamplingConfig(temperature=1.0)
    run = Decoding(base, spec(4, "sampler"), sampling, gen_length=10, seed=4, sampler=sampler)
    run.add(prompts[:2], [0, 1])
    run.step()
    run.step()
    run.add(prompts[2:], [2])
    run.remove([0])
    while run.step():
        pass
    got = run.tokens([0, 1])
    for row, (p, i) in enumerate([(prompts[1], 1), (prompts[2], 2)]):
        alone = generate(base, [p], make_strategy("exact"), sampling, gen_length=10, seed=4, sample_indices=[i])
        assert torch.equal(got[row], alone.tokens[0])


def test_stats_count_passes_rows_and_drafts(task):
    base, sampler = task
    prompts = task_prompts(base, 1)
    out = generate(base, prompts, spec(4, "sampler"), SamplingConfig(temperature=0.0), gen_length=10, seed=1,
                   sampler=sampler)
    s, B = out.stats, len(prompts)
    d = s.to_dict()
    assert s.base_rows == s.full_passes * B + s.drafts_proposed  # the canvas and its drafted rows, per pass
    assert 0 < s.drafts_accepted <= s.drafts_proposed <= s.full_passes * B * 4
    assert d["tokens_per_full_pass"] == round(10 * B / s.row_passes, 4) > 1
    assert d["drafts_proposed"] == s.drafts_proposed and d["rows_per_full_pass"] > B
    # every write is the target's, equal to a draft (accepted) or not: one per row and pass, but for a pass
    # whose last accepted draft filled the block (at most once per row here: one block)
    assert 10 * B - s.drafts_accepted <= s.row_passes <= 10 * B - s.drafts_accepted + B
    ex = generate(base, prompts, make_strategy("exact"), SamplingConfig(temperature=0.0), gen_length=10, seed=1)
    assert ex.stats.base_rows == ex.stats.full_passes * B and ex.stats.drafts_proposed == 0


def test_bad_parameters_are_refused():
    for kw, flag in [(dict(depth=0), "--depth"), (dict(depth=True), "--depth"), (dict(drafter="peer"), "--drafter"),
                     (dict(branch=-1), "--branch"), (dict(rule="exact"), "--rule"),
                     (dict(rule="sampling", branch=1), "--branch"), (dict(target="parallel"), "--target"),
                     (dict(tau=0.9), "--tau"), (dict(target="threshold", rule="sampling"), "--target"),
                     (dict(target="threshold", tau=1.5), "--tau")]:
        with pytest.raises(AdjustError, match=flag):
            make_strategy("speculative", **kw)
    with pytest.raises(AdjustError, match="takes no --depth"):
        make_strategy("exact", depth=2)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_same_tokens_as_exact_with_a_key_value_cache(shakespeare, task, cache, temperature):
    """Drafted rows take their sequence's cache and the canvas's span: exact's tokens with the same cache mode."""
    base, sampler = shakespeare
    prompts = [base.encode(p) for p in ("ROMEO:", "KING:")]
    for drafter in ("sampler", "self"):
        st, ex = same_as_exact(base, sampler, prompts, spec(4, drafter), temperature, 24, block_length=8,
                               cache=cache)
        assert st.full_passes < ex.full_passes and st.drafts_accepted > 0
        assert st.refresh_passes == ex.refresh_passes == 3  # one per block start
        assert st.positions_per_full_pass < base.max_length  # the cached passes computed only a span
    base, sampler = task
    st, ex = same_as_exact(base, sampler, task_prompts(base, 1), spec(3), temperature, 10, block_length=5,
                           cache=cache, early_exit=True)
    assert st.full_passes <= ex.full_passes  # blocks of 5 in lockstep: the batch waits for its slowest row


def test_drafter_sampler_needs_a_sampler_and_cache_refresh_is_refused(tiny_base):
    with pytest.raises(AdjustError, match="needs a joint sampler"):
        generate(tiny_base, [[5, 6]], spec(2, "sampler"), gen_length=4)
    with pytest.raises(AdjustError, match="--cache-refresh"):
        generate(tiny_base, [[5, 6]], spec(2, "self"), gen_length=4, block_length=2, cache="prefix", cache_refresh=2)


def test_cli_generate_json_and_bad_flags(capsys):
    model = str(MODELS / "task-base")
    common = ["generate", "--base", model, "--prompt", "reverse: bee ink key pen egg =", "--gen-length", "10", "--json",
              "--temperature", "0", "--num-samples", "2"]
    main(common + ["--strategy", "speculative", "--depth", "3"])
    sp = json.loads(capsys.readouterr().out)
    main(common)
    ex = json.loads(capsys.readouterr().out)
    assert [s["token_ids"] for s in sp["samples"]] == [s["token_ids"] for s in ex["samples"]]
    st = sp["stats"]
    assert st["strategy"] == "speculative(D=3,drafter=auto)"
    assert st["sampler_passes"] > 0  # the sampler beside the base drafted
    assert st["full_passes"] < ex["stats"]["full_passes"] and st["drafts_accepted"] > 0
    for key in ("base_rows", "drafts_proposed", "tokens_per_full_pass", "tokens_per_full_pass_with_eos"):
        assert key in st
    for flags in (["--strategy", "speculative", "--depth", "0"], ["--strategy", "speculative", "--drafter", "x"],
                  ["--depth", "2"]):  # the last: exact takes no depth
        assert main(common + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("adjust: error: ") and flags[-2] in err[0]


# ---------------------------------------------------------------------------------------------------------------
# goodness of fit on a base small enough to enumerate
# ---------------------------------------------------------------------------------------------------------------
GEN = 4
PROMPT = [3, 4]


@pytest.fixture(scope="module")
def micro():
    """Three generable tokens (2, 3, 4), a canvas of 2 + 4: 81 completions. Weights x5 (embedding x10): the
    positions depend on each other (exact's joint is 0.38 in total variation from the product of the first
    pass's marginals, which `parallel` at K = 4 samples) and the distribution is spread (entropy 3.6 nats)."""
    base = make_tiny_base(None, seed=3, scale=10.0, vocab_size=8, tokenizer_size=5, max_length=8)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5)
    return base


def exact_probabilities(base, prompt, gen_length, sampling) -> dict[tuple, float]:
    """Every completion's probability under exact decoding: each order-rule path, one base pass per state."""
    states = {tuple(): (torch.tensor([prompt + [base.mask_id] * gen_length]), 1.0)}
    for _ in range(gen_length):
        nxt = {}
        for _, (x, p) in states.items():
            masked = (x[0] == base.mask_id).nonzero(as_tuple=True)[0]
            masked = masked[masked >= len(prompt)]
            logp = log_probs(base.logits(base.hidden_states(x)[0, masked]), sampling)
            at = int(order_scores(logp, sampling.order).argmax())  # the first of the best, as `exact`
            probs = logp[at].double().exp()
            for t in (probs > 0).nonzero(as_tuple=True)[0].tolist():
                y = x.clone()
                y[0, masked[at]] = t
                key = tuple(y[0, len(prompt):].tolist())
                nxt[key] = (y, p * float(probs[t]))
        states = nxt
    return {k: p for k, (_, p) in states.items()}


def chi_square_p(base, sampler, strategy, n=3000, seed=11) -> float:
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_probabilities(base, PROMPT, GEN, sampling)
    out = generate(base, [PROMPT] * n, strategy, sampling, gen_length=GEN, seed=seed, sample_indices=list(range(n)),
                   sampler=sampler)
    seen: dict[tuple, int] = {}
    for row in out.tokens.tolist():
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    assert set(seen) <= set(probs)
    keys = sorted(probs, key=probs.get, reverse=True)
    exp = [probs[k] * n for k in keys]
    obs = [seen.get(k, 0) for k in keys]
    # cells expected under 5 are pooled into one (chi-square's rule of thumb)
    small = [i for i, e in enumerate(exp) if e < 5]
    big = [i for i, e in enumerate(exp) if e >= 5]
    exp_c = [exp[i] for i in big] + ([sum(exp[i] for i in small)] if small else [])
    obs_c = [obs[i] for i in big] + ([sum(obs[i] for i in small)] if small else [])
    assert len(big) >= 10
    p = float(stats.chisquare(obs_c, [e * sum(obs_c) / sum(exp_c) for e in exp_c]).pvalue)
    print(f"chi-square {strategy.describe()}: p = {p:.3g}, {len(obs_c)} cells, "
          f"{out.stats.drafts_accepted} drafts accepted")
    return p


@pytest.fixture(scope="module")
def micro_sampler(micro):
    return random_sampler(micro)


@pytest.mark.parametrize("drafter", ["sampler", "self"])
def test_speculative_fits_the_exact_distribution(micro, micro_sampler, drafter):
    assert chi_square_p(micro, micro_sampler, spec(3, drafter)) > 0.01


@pytest.mark.parametrize("drafter", ["sampler", "self"])
def test_speculative_sampling_fits_the_exact_distribution(micro, micro_sampler, drafter):
    """Rule (a): drafted tokens kept with probability min(1, p/q), else drawn from (p - q)+. Its draws are not
    exact's, so the seed gives another sample: over seeds 1-8 (3,000-4,000 draws, sampler drafter) p ranged
    0.01-0.95, as a uniform p-value does; at seed 11, the test's for the coupled rule, it was 0.005."""
    assert chi_square_p(micro, micro_sampler, spec(3, drafter, rule="sampling"), seed=5) > 0.01


def test_speculative_sampling_draws_are_its_own_but_seeded(shakespeare, task):
    """Rule (a) at temperature 1: other tokens than exact's for the seed, the same alone and in a batch, and the
    same run twice; at temperature 0 it is rule (b), exact's tokens."""
    base, sampler = task
    prompts = task_prompts(base, 2)
    strategy = spec(4, "sampler", rule="sampling")
    kw = dict(gen_length=10, seed=3, sampler=sampler)
    one = generate(base, prompts, strategy, SamplingConfig(temperature=1.0), **kw)
    assert torch.equal(one.tokens, generate(base, prompts, strategy, SamplingConfig(temperature=1.0), **kw).tokens)
    for b in (0, len(prompts) - 1):
        alone = generate(base, [prompts[b]], strategy, SamplingConfig(temperature=1.0), **kw)
        assert torch.equal(alone.tokens[0], one.tokens[b])
    exact = generate(base, prompts, make_strategy("exact"), SamplingConfig(temperature=1.0), **kw)
    assert not torch.equal(one.tokens, exact.tokens) and one.stats.drafts_accepted > 0
    base, sampler = shakespeare
    # with the dual cache rows share the block: one that has finished it waits, and its drafts must not change
    prompts = [base.encode(p) for p in ("ROMEO:", "KING:", "To be")]
    kw = dict(gen_length=32, seed=3, sampler=sampler, cache="dual", block_length=16)
    batch = generate(base, prompts, strategy, SamplingConfig(temperature=1.0), **kw)
    for b in range(len(prompts)):
        alone = generate(base, [prompts[b]], strategy, SamplingConfig(temperature=1.0), **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b
    same_as_exact(base, sampler, [base.encode("ROMEO:")], spec(4, "sampler", rule="sampling"), 0.0, 24)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafter", ["sampler", "self"])
def test_threshold_target_writes_thresholds_tokens(shakespeare, task, temperature, drafter):
    """--target threshold: the tokens `threshold` writes at that tau for the seed, alone and in a batch, with and
    without the dual cache, at fewer full passes; depth 1 too."""
    def same(base, sampler, prompts, strategy, gen_length, tau, **kw):
        sampling = SamplingConfig(temperature=temperature)
        th = generate(base, prompts, make_strategy("threshold", tau=tau), sampling, gen_length=gen_length, seed=5,
                      **kw)
        sp = generate(base, prompts, strategy, sampling, gen_length=gen_length, seed=5, sampler=sampler, **kw)
        assert torch.equal(sp.tokens, th.tokens)
        alone = generate(base, [prompts[-1]], strategy, sampling, gen_length=gen_length, seed=5, sampler=sampler, **kw)
        assert torch.equal(alone.tokens[0], th.tokens[-1])
        return sp.stats, th.stats

    base, sampler = task
    st, th = same(base, sampler, task_prompts(base, 1), spec(4, drafter, target="threshold", tau=0.9), 10, 0.9)
    assert st.full_passes < th.full_passes and st.drafts_accepted > 0
    same(base, sampler, task_prompts(base, 1), spec(1, drafter, target="threshold", tau=0.7), 10, 0.7)
    base, sampler = shakespeare
    prompts = [base.encode(p) for p in ("ROMEO:", "KING:")]
    st, th = same(base, sampler, prompts, spec(4, drafter, target="threshold", tau=0.5), 32, 0.5)
    assert st.full_passes < th.full_passes
    same(base, sampler, [base.encode("ROMEO:")] * 2, spec(4, drafter, target="threshold", tau=0.5), 32, 0.5,
         cache="dual", block_length=16)


@pytest.mark.parametrize("name", ["parallel", "adjust"])
def test_the_fit_test_has_power_parallel_and_adjust_fail_it(micro, micro_sampler, name):
    assert chi_square_p(micro, micro_sampler, make_strategy(name, tokens_per_pass=4)) < 0.01
