"""The joint-KL estimator: zero where the approximation is the truth, log 2 for perfectly correlated pairs."""

import math

import pytest
import torch
import torch.nn.functional as F

from adjust.base import BaseModel
from adjust.distill.rollouts import Rollouts, load_rollouts, make_rollouts
from adjust.errors import AdjustError
from adjust.eval.joint_kl import joint_kl
from adjust.sampler import JointSampler, SamplerConfig
from adjust.sampling import SamplingConfig

MASK, PAD, A, B = 0, 1, 2, 3


class CopyBase(BaseModel):
    """Two positions that must hold the same letter: with both masked, each is a or b with
    probability 1/2; once one is written, the other copies it with probability 1."""

    name = "copy"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.mask_id, self.pad_id, self.eos_id = MASK, PAD, None
        self.vocab_size = self.hidden_size = 4
        self.max_length = 2
        self.banned_ids = (MASK, PAD)

    def hidden_states(self, x, attention_mask=None):
        logits = torch.full((*x.shape, 4), -30.0)
        other = x.flip(1)  # the other position's token
        logits[..., A] = torch.where(other == B, -30.0, 0.0)
        logits[..., B] = torch.where(other == A, -30.0, 0.0)
        return logits

    def embed(self, x):
        return F.one_hot(x, 4).float()

    def lm_head(self, hidden):
        return hidden


def copy_rollouts():
    return Rollouts([[]] * 4, torch.tensor([[A, A], [B, B]] * 2), torch.tensor([[0, 1]] * 4), {"num_samples": 4})


def test_product_of_marginals_misses_a_perfect_correlation_by_log2():
    base = CopyBase()
    identity = JointSampler(SamplerConfig(4, 1, 8, base=base.identity()))
    for p in identity.parameters():
        torch.nn.init.zeros_(p)  # returns its prior: the same marginals as parallel
    out = joint_kl(base, identity, copy_rollouts(), k=2, draws=16, states=[(0, 0), (1, 0)])
    assert out["kl_parallel"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["kl_adjust"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["num_states"] == 2


def test_kl_is_zero_at_k1(tiny_base, tmp_path):
    make_rollouts(tiny_base, tmp_path, 8, 6, SamplingConfig(), seed=0, progress=False)
    r = load_rollouts(tmp_path, tiny_base)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    out = joint_kl(tiny_base, sampler, r, k=1, num_states=6, draws=2)
    assert out["kl_parallel"] == 0 and out["kl_adjust"] == 0
    k3 = joint_kl(tiny_base, sampler, r, k=3, num_states=6, draws=2)
    assert k3["kl_parallel"] != 0  # a random base has dependent positions
    with pytest.raises(AdjustError):
        joint_kl(tiny_base, sampler, r, k=7)


def test_blocks_and_cache(tiny_base, tmp_path):
    """--block-length restricts picks to the current block (a block as long as the region changes nothing);
    --cache runs ADJUST's unrolls on the block rows only: at K=2 (one unroll, whose sampler keys/values are
    those of the same canvas) the same KL within float tolerance; prefix and dual are the same measure."""
    make_rollouts(tiny_base, tmp_path, 40, 8, SamplingConfig(), seed=0, progress=False)
    r = load_rollouts(tmp_path, tiny_base)
    torch.manual_seed(0)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    kw = dict(num_states=8, draws=2, seed=3)
    plain = joint_kl(tiny_base, sampler, r, k=3, **kw)
    whole = joint_kl(tiny_base, sampler, r, k=3, block_length=8, **kw)
    assert whole["kl_parallel"] == plain["kl_parallel"] and whole["kl_adjust"] == plain["kl_adjust"]
    none2 = joint_kl(tiny_base, sampler, r, k=2, block_length=4, **kw)
    for mode in ("prefix", "dual"):
        cached = joint_kl(tiny_base, sampler, r, k=2, block_length=4, cache=mode, **kw)
        assert cached["cache"] == mode and cached["kl_parallel"] == none2["kl_parallel"]
        assert cached["kl_adjust"] == pytest.approx(none2["kl_adjust"], abs=1e-4)
    k3 = [joint_kl(tiny_base, sampler, r, k=3, block_length=4, cache=m, **kw)["kl_adjust"] for m in ("prefix", "dual")]
    assert k3[0] == k3[1]
    with pytest.raises(AdjustError, match="needs --block-length"):
        joint_kl(tiny_base, sampler, r, k=2, cache="dual", **kw)
