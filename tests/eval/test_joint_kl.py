"""The joint-KL estimator: zero where the approximation is the truth, log 2 for perfectly correlated pairs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from adjust.base import BaseModel
from adjust.cli import main
from adjust.distill.rollouts import Rollouts, load_rollouts, make_rollouts
from adjust.errors import AdjustError
from adjust.eval.joint_kl import joint_kl, markdown_table, summarize
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


def test_ratio_is_reported_with_its_stderr_when_parallel_kl_is_clearly_positive():
    base = CopyBase()
    identity = JointSampler(SamplerConfig(4, 1, 8, base=base.identity()))
    for p in identity.parameters():
        torch.nn.init.zeros_(p)
    out = joint_kl(base, identity, copy_rollouts(), k=2, draws=4, states=[(0, 0), (1, 0), (2, 0)])
    assert out["kl_parallel_stderr"] == pytest.approx(0, abs=1e-9)  # every path misses by exactly log 2
    assert out["adjust_over_parallel"] == pytest.approx(1.0)
    assert out["adjust_over_parallel_stderr"] == pytest.approx(0, abs=1e-9)
    assert out["ratio_note"] is None


def test_summarize_pairs_the_two_estimates_by_state():
    par = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    out = summarize(par, 0.25 * par)  # ADJUST a quarter of parallel on every state: no noise in the ratio
    assert out["kl_parallel"] == pytest.approx(1.875)
    assert out["kl_parallel_stderr"] == pytest.approx(par.std().item() / 2)
    assert out["adjust_over_parallel"] == pytest.approx(0.25)
    assert out["adjust_over_parallel_stderr"] == pytest.approx(0, abs=1e-12)  # unpaired errors would not cancel
    noisy = summarize(par, torch.tensor([0.2, 0.2, 0.5, 1.0], dtype=torch.float64))
    assert noisy["adjust_over_parallel_stderr"] > 0
    one = summarize(par[:1], par[:1])
    assert one["kl_parallel_stderr"] is None and one["adjust_over_parallel"] is None
    assert "two states" in one["ratio_note"]


def test_no_ratio_when_parallel_kl_is_within_two_stderr_of_zero(tiny_base, tmp_path):
    """The random tiny base barely couples two positions: parallel's KL is noise around zero while
    ADJUST's (an untrained sampler) is large, so their ratio would be a meaningless huge number."""
    make_rollouts(tiny_base, tmp_path, 8, 6, SamplingConfig(), seed=0, progress=False)
    r = load_rollouts(tmp_path, tiny_base)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    states = [(n, t) for n in range(8) for t in range(5)]
    out = joint_kl(tiny_base, sampler, r, k=2, draws=2, states=states)
    assert out["distinct_states"] == 40
    assert abs(out["kl_parallel"]) <= 2 * out["kl_parallel_stderr"]
    assert out["kl_adjust"] > 2 * out["kl_adjust_stderr"] > 0
    assert out["adjust_over_parallel"] is None and out["adjust_over_parallel_stderr"] is None
    assert "within two standard errors" in out["ratio_note"]
    k1 = joint_kl(tiny_base, sampler, r, k=1, draws=2, states=states)  # K = 1: both KLs exactly 0
    assert k1["kl_parallel"] == 0 and k1["adjust_over_parallel"] is None and k1["ratio_note"]


def test_stderr_counts_a_repeated_state_once(tiny_base, tmp_path):
    make_rollouts(tiny_base, tmp_path, 4, 6, SamplingConfig(), seed=0, progress=False)
    r = load_rollouts(tmp_path, tiny_base)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base))
    out = joint_kl(tiny_base, sampler, r, k=3, draws=1, states=[(0, 0), (1, 1), (0, 0), (0, 0)])
    assert out["num_states"] == 4 and out["distinct_states"] == 2


def test_cli_several_k_write_one_report(tiny_model_dir, tiny_base, tmp_path, capsys):
    rollouts = tmp_path / "r"
    make_rollouts(tiny_base, rollouts, 8, 6, SamplingConfig(), seed=0, progress=False)
    JointSampler(SamplerConfig.for_base(tiny_base)).save(tmp_path / "s")
    args = ["eval", "joint-kl", "--base", str(tiny_model_dir), "--sampler", str(tmp_path / "s"),
            "--rollouts", str(rollouts), "--num-states", "4", "--draws", "2"]
    capsys.readouterr()
    rc = main(args + ["-K", "1,2", "-K", "3", "--out-dir", str(tmp_path / "o"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    obj = json.loads(out)
    assert [row["tokens_per_pass"] for row in obj["rows"]] == [1, 2, 3]
    assert obj["rows"][0]["adjust_over_parallel"] is None  # K = 1: parallel is exact, no ratio
    assert obj["code_version"]["package"] and obj["settings"]["num_states"] == 4
    md = (tmp_path / "o" / "joint_kl.md").read_text()
    assert md == markdown_table(obj)
    assert "| 1 | 0.000 ± 0.000 | 0.000 ± 0.000 | not reported (see below) |" in md
    assert "K = 1: ratio not reported" in md
    assert json.loads((tmp_path / "o" / "joint_kl.json").read_text())["rows"] == obj["rows"]
    assert (tmp_path / "o" / "joint_kl.png").is_file()
    rc = main(args + ["-K", "2,x"])
    assert rc == 2 and "adjust: error: -K/--tokens-per-pass takes integers" in capsys.readouterr().err
    rc = main(args + ["-K", "2", "-K", "99"])  # every K is checked before any is computed
    assert rc == 2 and "larger than the rollouts' generation length" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    rc = main(args + ["--out-dir", str(tmp_path / "file")])
    assert rc == 2 and "is not a directory" in capsys.readouterr().err


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


def test_every_decoding_option_is_measured_by_the_code_that_generates(tiny_base, tmp_path):
    """joint-KL runs the decoding loop itself: ADJUST with group = K is parallel token for token, so its KL is
    parallel's exactly; a fast unroll is measured (and differs from the full one: another approximation);
    grouped draws in between."""
    make_rollouts(tiny_base, tmp_path, 24, 8, SamplingConfig(), seed=0, progress=False)
    r = load_rollouts(tmp_path, tiny_base)
    torch.manual_seed(0)
    sampler = JointSampler(SamplerConfig.for_base(tiny_base)).eval()
    kw = dict(num_states=8, draws=2, seed=1)
    full = joint_kl(tiny_base, sampler, r, k=4, **kw)
    as_parallel = joint_kl(tiny_base, sampler, r, k=4, group=4, **kw)
    assert as_parallel["kl_adjust"] == as_parallel["kl_parallel"] == full["kl_parallel"]
    assert as_parallel["group"] == 4 and "group" not in full
    fast = joint_kl(tiny_base, sampler, r, k=4, unroll="fast", **kw)
    assert fast["kl_parallel"] == full["kl_parallel"] and fast["unroll"] == "fast"
    assert math.isfinite(fast["kl_adjust"]) and fast["kl_adjust"] != full["kl_adjust"]
    grouped = joint_kl(tiny_base, sampler, r, k=4, group=2, **kw)
    assert math.isfinite(grouped["kl_adjust"]) and grouped["kl_adjust"] not in (full["kl_adjust"], full["kl_parallel"])
    with pytest.raises(AdjustError, match="--unroll"):
        joint_kl(tiny_base, sampler, r, k=2, unroll="fastest", **kw)


def test_forced_path_scores_the_tokens_the_loop_would_draw(tiny_base):
    """Decoding.force: the strategy's step writes the given path and records each token's log-probability in
    the distribution it would have been drawn from: for exact, the full pass's (checked against a fresh pass)."""
    from adjust.decode import Decoding
    from adjust.strategies import make_strategy

    prompt = tiny_base.encode("the dog")
    x = torch.full((1, len(prompt) + 4), tiny_base.mask_id)
    x[0, : len(prompt)] = torch.tensor(prompt)
    run = Decoding(tiny_base, make_strategy("parallel", tokens_per_pass=2), gen_length=4, logprobs=0)
    run.start_from(x, len(prompt), [0])
    usable = [i for i in range(tiny_base.vocab_size) if i not in tiny_base.banned_ids]
    run.force(torch.tensor([[3, 1]]), torch.tensor([[usable[5], usable[7]]]))
    assert run.step()
    got = run.loop.x[0, len(prompt):].tolist()
    assert got[3] == usable[5] and got[1] == usable[7] and got[0] == got[2] == tiny_base.mask_id
    with torch.no_grad():
        logp = torch.log_softmax(tiny_base.logits(tiny_base.hidden_states(x)).float(), -1)[0]
    P = len(prompt)
    assert run.loop.token_logp[0, P + 3].item() == pytest.approx(logp[P + 3, usable[5]].item(), abs=1e-5)
    assert run.loop.token_logp[0, P + 1].item() == pytest.approx(logp[P + 1, usable[7]].item(), abs=1e-5)
