"""Rollouts, the distillation loop and ADJUST's quotas with a trained-or-not sampler."""

import json
import math

import pytest
import torch

from adjust.decode import full_passes_needed, generate
from adjust.distill.rollouts import load_rollouts, make_rollouts
from adjust.distill.train import (DistillConfig, distill, draw_examples, draw_weighted, example_loss, step_entropies,
                                  unroll_probs, window_weights)
from adjust.errors import AdjustError
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig
from adjust.strategies import make_strategy

G = 8


@pytest.fixture(scope="module")
def rollouts_dir(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rollouts")
    make_rollouts(tiny_base, out, num_samples=24, gen_length=G, sampling=SamplingConfig(), seed=3,
                  batch_size=8, shard_size=10, progress=False)
    return out


def test_rollouts_store_complete_exact_trajectories(tiny_base, rollouts_dir):
    r = load_rollouts(rollouts_dir, tiny_base)
    assert len(r) == 24 and r.gen_length == G
    for n in range(len(r)):
        assert sorted(r.order[n].tolist()) == list(range(G))  # every position exactly once
        assert not (r.state(n, G, tiny_base.mask_id) == tiny_base.mask_id).any()
        assert (r.state(n, 0, tiny_base.mask_id) == tiny_base.mask_id).all()
        assert (r.state(n, 3, tiny_base.mask_id) == tiny_base.mask_id).sum() == G - 3
    # a trajectory is the exact sampler's output for its (seed, sample index)
    again = generate(tiny_base, [[], []], make_strategy("exact"), SamplingConfig(), G, seed=3, sample_indices=[5, 17])
    assert torch.equal(again.tokens, r.tokens[[5, 17]])


def test_rollouts_resume_after_a_lost_shard(tiny_base, rollouts_dir, tmp_path):
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(rollouts_dir, copy)
    first = sorted(copy.glob("shard-*"))[1]
    first.unlink()
    make_rollouts(tiny_base, copy, num_samples=24, gen_length=G, sampling=SamplingConfig(), seed=3,
                  batch_size=8, shard_size=10, progress=False)
    a, b = load_rollouts(rollouts_dir), load_rollouts(copy)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)


def test_rollouts_refuse_other_settings_and_missing_dirs(tiny_base, rollouts_dir, tmp_path):
    with pytest.raises(AdjustError, match="other settings"):
        make_rollouts(tiny_base, rollouts_dir, 24, G + 1, SamplingConfig(), seed=3, progress=False)
    with pytest.raises(AdjustError, match="not found"):
        load_rollouts(tmp_path / "nope")


def test_unroll_distribution_prefers_short_chains():
    p = unroll_probs(3)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] > p[1] > p[2]
    e = [math.exp(0.5 ** i) for i in range(3)]
    assert p.tolist() == pytest.approx([x / sum(e) for x in e])


def test_distillation_lowers_the_kl(tiny_base, rollouts_dir, tmp_path):
    r = load_rollouts(rollouts_dir, tiny_base)
    cfg = DistillConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, max_unrolls=2, eval_every=20, val_examples=8)
    g = torch.Generator().manual_seed(0)
    batches = [(*draw_examples(r, list(range(len(r))), 8, u, g), u) for u in (1, 2, 2)]

    def kl(sampler):
        with torch.no_grad():
            return sum(example_loss(tiny_base, sampler, r, ns, ts, u, 64).item() for ns, ts, u in batches)

    torch.manual_seed(cfg.seed)
    before = kl(JointSampler(SamplerConfig.for_base(tiny_base)))
    result = distill(tiny_base, r, tmp_path / "s", cfg, progress=False)
    after = kl(JointSampler.load(tmp_path / "s", tiny_base))
    assert result["step"] == 40
    assert after < 0.8 * before, (before, after)
    # the held-out KL without a sampler (parallel's marginals) is logged beside the sampler's
    assert result["val_kl_parallel"] > 0
    # resume: a longer run continues from the saved step
    more = distill(tiny_base, r, tmp_path / "s", DistillConfig(**{**cfg.__dict__, "steps": 45}), progress=False)
    assert more["step"] == 45


def test_step_entropies_are_those_the_rollouts_drew_from(tiny_base, rollouts_dir):
    from adjust.sampling import entropy, log_probs

    r = load_rollouts(rollouts_dir, tiny_base)
    h = step_entropies(tiny_base, r, batch_size=7, progress=False)  # batches cut across trajectories
    assert h.shape == (len(r), G) and (h >= 0).all()
    for n, s in [(0, 0), (5, 3), (23, G - 1)]:
        x = r.state(n, s, tiny_base.mask_id)[None]
        pos = len(r.prompts[n]) + int(r.order[n, s])
        with torch.no_grad():
            want = entropy(log_probs(tiny_base.logits(tiny_base.hidden_states(x)[0, pos][None]), SamplingConfig()))
        assert h[n, s].item() == pytest.approx(want.item(), rel=1e-5)


def test_window_weights_mix_uniform_and_entropy():
    h = torch.tensor([[0.0, 0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    # u = 2: windows t = 0..2 write steps (t, t+1): sums [[0, 2, 3], [0, 0, 0]]
    assert torch.equal(window_weights(h, 2, 0.0), torch.full((2, 3), 1 / 6))
    assert window_weights(h, 2, 1.0).flatten().tolist() == pytest.approx([0, 0.4, 0.6, 0, 0, 0])
    mixed = window_weights(h, 2, 0.5)
    assert mixed.sum().item() == pytest.approx(1.0)
    assert mixed[1].tolist() == pytest.approx([1 / 12] * 3)  # only the uniform share reaches row 1
    # nothing uncertain anywhere: the uniform draw
    assert torch.equal(window_weights(torch.zeros(2, 5), 2, 1.0), torch.full((2, 3), 1 / 6))


def test_weighted_draw_only_takes_windows_with_weight(tiny_base, rollouts_dir):
    r = load_rollouts(rollouts_dir, tiny_base)
    h = torch.zeros(len(r), G)
    h[::2, 4] = 1.0  # only even trajectories have an uncertain step, at step 4
    g = torch.Generator().manual_seed(0)
    ns, ts = draw_weighted(r, list(range(len(r))), 200, window_weights(h, 2, 1.0), g)
    assert all(n % 2 == 0 for n in ns) and set(ts) <= {3, 4}  # windows (3, 4) and (4, 5) write step 4
    assert len(set(ns)) > 5
    # a pool without any weight falls back to the uniform draw
    ns, ts = draw_weighted(r, [1, 3, 5], 50, window_weights(h, 2, 1.0), g)
    assert set(ns) <= {1, 3, 5} and len(set(ts)) > 2


def test_distill_lr_schedule_is_constant_by_default_and_decays_on_request():
    from adjust.train_base import lr_at

    flat = DistillConfig(steps=1000, lr=1e-3, warmup=100)
    assert [lr_at(s, flat) for s in (0, 99, 100, 500, 999)] == pytest.approx([1e-5, 1e-3, 1e-3, 1e-3, 1e-3])
    cos = DistillConfig(steps=1000, lr=1e-3, warmup=100, min_lr_ratio=0.1)
    lrs = [lr_at(s, cos) for s in range(1000)]
    assert lrs[99] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_distill_shares_must_be_in_range(tiny_base, rollouts_dir, tmp_path):
    r = load_rollouts(rollouts_dir, tiny_base)
    for key in ("entropy_windows", "min_lr_ratio"):
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(AdjustError, match=key.replace("_", "-")):
                distill(tiny_base, r, tmp_path / "s", DistillConfig(steps=1, **{key: bad}), progress=False)
    assert not (tmp_path / "s").exists()
    result = distill(tiny_base, r, tmp_path / "ok", DistillConfig(steps=3, batch_size=4, eval_every=3, val_examples=4,
                                                                  entropy_windows=0.5), progress=False)
    assert result["step"] == 3
    # held-out KL also on windows drawn by entropy, with and without the sampler, saved with it
    assert result["val_kl_uncertain"] >= 0 and result["val_kl_uncertain_parallel"] > 0
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())["training"]
    assert saved["entropy_windows"] == 0.5 and saved["val_kl_uncertain_parallel"] == result["val_kl_uncertain_parallel"]


def test_distill_refuses_rollouts_of_another_base(tiny_base, tokenizer, rollouts_dir, tmp_path):
    from tests.conftest import make_tiny_base

    other = make_tiny_base(tokenizer, seed=1)
    with pytest.raises(AdjustError, match="base"):
        distill(other, load_rollouts(rollouts_dir), tmp_path / "s", DistillConfig(steps=1), progress=False)
    with pytest.raises(AdjustError):
        load_rollouts(rollouts_dir, other)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_adjust_quota_and_statistics(tiny_base, k):
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    gen = 16
    out = generate(tiny_base, [[]], make_strategy("adjust", tokens_per_pass=k), SamplingConfig(), gen,
                   sampler=sampler, record_history=True)
    steps = out.history[0]
    assert out.stats.full_passes == full_passes_needed(gen, k) == math.ceil(gen / k)
    assert [len(s["unmasked"]) for s in steps] == [min(k, gen - k * i) for i in range(len(steps))]
    # K-1 unrolls per full step, none after the last token of a step
    assert out.stats.sampler_passes == sum(len(s["unmasked"]) - 1 for s in steps)
    assert not (out.tokens == tiny_base.mask_id).any()


def test_adjust_with_k1_equals_exact(tiny_base):
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    for seed in range(3):
        a = generate(tiny_base, [[]] * 2, make_strategy("adjust", tokens_per_pass=1), SamplingConfig(), 12,
                     seed=seed, sampler=sampler)
        e = generate(tiny_base, [[]] * 2, make_strategy("exact"), SamplingConfig(), 12, seed=seed)
        assert torch.equal(a.tokens, e.tokens)
        assert a.stats.sampler_passes == 0


def test_adjust_without_sampler_is_refused(tiny_base):
    with pytest.raises(AdjustError, match="sampler"):
        generate(tiny_base, [[]], make_strategy("adjust"), SamplingConfig(), 8)


def test_k_larger_than_the_generation_is_refused(tiny_base):
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    for name in ("parallel", "adjust"):
        with pytest.raises(AdjustError, match="larger than --gen-length"):
            generate(tiny_base, [[]], make_strategy(name, tokens_per_pass=9), SamplingConfig(), 8, sampler=sampler)


def test_cached_base_states_are_the_base_passes_and_train_the_same_sampler(tiny_base, rollouts_dir, tmp_path):
    """--cache-base-states: the stored states are the base's own, and distill trains on them as on fresh passes."""
    from adjust.distill.train import BaseStates

    r = load_rollouts(rollouts_dir, tiny_base)
    cached = BaseStates(tiny_base, r, batch_size=5, progress=False)  # batches cut across trajectories
    for n, t in [(0, 0), (7, 3), (23, G - 1)]:
        with torch.no_grad():
            fresh = tiny_base.hidden_states(r.state(n, t, tiny_base.mask_id)[None])[0]
        torch.testing.assert_close(cached.states[n][t], fresh, atol=1e-5, rtol=1e-5)
    # the entropies and the loss read from the cache equal the ones the base computes
    torch.testing.assert_close(step_entropies(tiny_base, r, progress=False, cached=cached),
                               step_entropies(tiny_base, r, progress=False), atol=1e-5, rtol=1e-5)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    ns, ts = [1, 4, 9], [0, 2, 5]
    with torch.no_grad():
        assert example_loss(tiny_base, sampler, r, ns, ts, 2, 64, cached=cached).item() == pytest.approx(
            example_loss(tiny_base, sampler, r, ns, ts, 2, 64).item(), rel=1e-4)
    cfg = DistillConfig(steps=12, batch_size=8, lr=3e-3, warmup=2, max_unrolls=2, eval_every=6, val_examples=8)
    plain = distill(tiny_base, r, tmp_path / "plain", cfg, progress=False)
    fast = distill(tiny_base, r, tmp_path / "cached", DistillConfig(**{**cfg.__dict__, "cache_base_states": True}),
                   progress=False)
    assert fast["val_kl"] == pytest.approx(plain["val_kl"], rel=1e-3)
    a, b = (JointSampler.load(tmp_path / d, tiny_base).state_dict() for d in ("plain", "cached"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
