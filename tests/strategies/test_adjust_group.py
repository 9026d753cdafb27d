"""`adjust` with `group` G: each draw (the full pass's, then each unroll's) writes G positions at once.

Real modules: our tiny random base with a random JointSampler (weights x10 so unrolls move the
distributions), and the shipped task model with its trained sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

from adjust.cli import main
from adjust.decode import generate
from adjust.errors import AdjustError
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy

from test_threshold_adjust import task_model, task_prompts, tiny_sampler  # noqa: F401  (fixtures)

PROMPTS = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]


def run(base, sampler, strategy, prompts=PROMPTS, gen_length=14, order="entropy", **kw):
    return generate(base, prompts, strategy, SamplingConfig(order=order), gen_length=gen_length, seed=2,
                    sampler=sampler, record_history=True, **kw)


@pytest.mark.parametrize("k", [2, 4, 6])
@pytest.mark.parametrize("order", ["entropy", "random"])
def test_group_k_is_parallel_token_for_token(tiny_base, tiny_sampler, k, order):  # noqa: F811
    a = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=k, group=k), order=order)
    b = run(tiny_base, None, make_strategy("parallel", tokens_per_pass=k), order=order)
    assert torch.equal(a.tokens, b.tokens) and a.history == b.history
    assert a.stats.sampler_passes == 0 and a.stats.full_passes == b.stats.full_passes


@pytest.mark.parametrize("k", [2, 4])
def test_group_1_is_adjust(tiny_base, tiny_sampler, k):  # noqa: F811
    a = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=k, group=1))
    b = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=k))
    assert torch.equal(a.tokens, b.tokens) and a.history == b.history
    assert a.stats.sampler_passes == b.stats.sampler_passes > 0


@pytest.mark.parametrize("k,group", [(4, 2), (6, 4), (8, 3), (16, 4)])
def test_each_draw_writes_group_tokens_and_a_step_runs_ceil_k_over_g_minus_1_unrolls(tiny_base, tiny_sampler, k,
                                                                                     group):  # noqa: F811
    gen = 2 * k  # two full steps, no masks run out inside a step
    out = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=k, group=group), gen_length=gen)
    draws = math.ceil(k / group)
    sizes = [group] * (draws - 1) + [k - group * (draws - 1)]
    for history in out.history:
        assert len(history) == 2
        for step in history:
            unrolls = [u for _pos, _tok, u in step["unmasked"]]
            assert [unrolls.count(j) for j in range(draws)] == sizes
    assert out.stats.full_passes == 2 and out.stats.sampler_passes == 2 * (draws - 1)


def test_the_last_step_stops_when_the_block_runs_out(tiny_base, tiny_sampler):  # noqa: F811
    """10 tokens at K = 8, G = 3: the second step has 2 masks left, one draw and no unroll."""
    out = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=8, group=3), gen_length=10)
    assert [len(s["unmasked"]) for s in out.history[0]] == [8, 2]
    assert out.stats.sampler_passes == 2  # the first step's draws of 3, 3, 2


@pytest.mark.parametrize("unroll", ["full", "fast"])
def test_a_sequence_alone_equals_it_in_a_batch(task_model, unroll):  # noqa: F811
    """Equal-length prompts (no padding); early exit makes rows finish at different passes."""
    base, sampler = task_model
    by_len: dict = {}
    for p in task_prompts(base, n=4):
        by_len.setdefault(len(p), []).append(p)
    group = max(by_len.values(), key=len)
    assert len(group) >= 3
    strategy = make_strategy("adjust", tokens_per_pass=6, group=2)
    kw = dict(gen_length=10, seed=5, sampler=sampler, early_exit=True, record_history=True, unroll=unroll)
    batch = generate(base, group, strategy, sample_indices=list(range(len(group))), **kw)
    assert batch.stats.sampler_passes > 0
    for b, p in enumerate(group):
        alone = generate(base, [p], strategy, sample_indices=[b], **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[b]) and alone.history[0] == batch.history[b]


def test_fast_unroll_takes_groups(tiny_base, tiny_sampler):  # noqa: F811
    out = run(tiny_base, tiny_sampler, make_strategy("adjust", tokens_per_pass=6, group=2), unroll="fast")
    assert out.stats.unroll == "fast" and out.stats.sampler_passes > 0
    assert all(len(s["unmasked"]) <= 6 for h in out.history for s in h)


@pytest.mark.parametrize("group", [0, 5, -1, 1.5, True, "2"])
def test_a_bad_group_is_refused(group):
    with pytest.raises(AdjustError, match="group must be an integer from 1 to K"):
        make_strategy("adjust", tokens_per_pass=4, group=group)


def test_only_adjust_takes_a_group():
    with pytest.raises(AdjustError, match="takes no --group"):
        make_strategy("parallel", tokens_per_pass=4, group=2)
    assert make_strategy("adjust", tokens_per_pass=8, group=4).describe() == "adjust(K=8,group=4)"
    assert make_strategy("adjust", tokens_per_pass=8).describe() == "adjust(K=8)"


def test_cli_group(tiny_model_dir, capsys):
    common = ["generate", "--base", str(tiny_model_dir), "--gen-length", "8", "--prompt", "a b"]
    assert main([*common, "--strategy", "adjust", "-K", "4", "--group", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adjust: error: --group must be an integer from 1 to K (4)")
    assert main([*common, "--strategy", "parallel", "-K", "4", "--group", "2"]) == 2
    assert "takes no --group" in capsys.readouterr().err
