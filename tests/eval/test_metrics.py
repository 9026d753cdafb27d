"""Quality metrics: MAUVE separates styles, distinct-n counts exactly, NLLs are finite and reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from adjust.errors import AdjustError

from adjust.eval.metrics import distinct_n, featurize, mauve_buckets, mauve_score, nll_under_base, nll_under_causal_lm

pytest.importorskip("mauve")

ANIMALS = ["fox", "dog", "cat", "horse", "bird", "goat"]
PLACES = ["hill", "river", "field", "fence", "wall", "garden", "barn", "road", "bridge", "meadow"]
STORY = [f"The little {a} ran over the {p} and slept in the warm sun." for a in ANIMALS for p in PLACES]
FINANCE = [f"Quarterly revenue rose {n} percent while operating margin fell to {m} percent in {y}."
           for n, m, y in zip(range(3, 63), range(60, 0, -1), [2001 + i % 20 for i in range(60)])]


def test_distinct_n_exact_values():
    texts = ["a b a b", "a b c", "x"]
    # unigrams: a b a b a b c x -> 8 total, {a, b, c, x} unique
    assert distinct_n(texts, 1) == pytest.approx(4 / 8)
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 5 total, 3 unique; "x" has none
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams: (a b a) (b a b) | (a b c) -> 3 unique of 3
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(["one two"], 3) == 0.0
    assert distinct_n(["same same same same"], 2) == pytest.approx(1 / 3)


def test_mauve_buckets_small_sets():
    assert mauve_buckets(500) == 50
    assert mauve_buckets(60) == 6
    assert mauve_buckets(6) == 2 and mauve_buckets(2) == 2


def test_mauve_self_high_and_shifted_low():
    assert len(STORY) == len(FINANCE) == 60
    story, finance = featurize(STORY), featurize(FINANCE)
    assert story.shape == (60, 384)
    assert mauve_score(p_features=story, q_features=story) > 0.9
    assert mauve_score(p_features=finance, q_features=story) < 0.5
    # texts in, same as features in; fixed seed = same number twice
    a = mauve_score(STORY[:30] + FINANCE[:30], STORY)
    assert a == mauve_score(STORY[:30] + FINANCE[:30], STORY)


def test_nll_under_base_finite_and_reproducible(tiny_base):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tiny_base.tokenizer), (5, 12), generator=g).tolist()
    a = nll_under_base(tiny_base, ids, draws=2, seed=3, batch_size=2)
    assert len(a) == 5 and all(math.isfinite(v) and v > 0 for v in a)
    assert a == nll_under_base(tiny_base, ids, draws=2, seed=3, batch_size=2)
    assert a != nll_under_base(tiny_base, ids, draws=2, seed=4, batch_size=2)


def test_nll_under_base_given_prompts_scores_only_the_continuation(tiny_base):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tiny_base.tokenizer), (4, 6), generator=g).tolist()
    prompts = [[], [5, 6], [5, 6], [7, 8, 9]]
    plain = nll_under_base(tiny_base, ids, draws=2, seed=3, batch_size=4)
    assert nll_under_base(tiny_base, ids, draws=2, seed=3, batch_size=4, prompt_ids=[[]] * 4) == plain
    given = nll_under_base(tiny_base, ids, draws=2, seed=3, batch_size=4, prompt_ids=prompts)
    assert len(given) == 4 and all(math.isfinite(v) and v > 0 for v in given)
    assert given[1] != plain[1] and given[3] != plain[3]  # the prompt conditions the continuation
    # the bound with the prompt visible and only the continuation eligible (masked and scored)
    from adjust.likelihood import estimate_nll

    x = torch.tensor([[5, 6] + ids[1]])
    eligible = torch.tensor([[False, False] + [True] * 6])
    assert nll_under_base(tiny_base, [ids[1]], draws=2, seed=3, prompt_ids=[[5, 6]]) == pytest.approx(
        estimate_nll(tiny_base, x, eligible, draws=2, seed=3).tolist())
    with pytest.raises(AdjustError):
        nll_under_base(tiny_base, ids, prompt_ids=prompts[:2])


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    d = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_causal_lm_nll_and_hf_featurizer(tiny_gpt2, tokenizer):
    texts = ["The dog sleeps in the sun.", "A cat sat on the mat.", ""]
    nll = nll_under_causal_lm(tiny_gpt2, texts, batch_size=2)
    assert all(math.isfinite(v) and v > 0 for v in nll[:2]) and math.isnan(nll[2])
    # a random model is near-uniform over the vocabulary
    assert nll[0] == pytest.approx(math.log(len(tokenizer)), rel=0.2)
    assert nll[:2] == nll_under_causal_lm(tiny_gpt2, texts[:2], batch_size=1)  # padding does not matter
    f = featurize(texts, str(tiny_gpt2), batch_size=2)
    assert f.shape == (3, 32) and (f[0] != f[1]).any()
    assert (featurize(texts[:1], str(tiny_gpt2)) == pytest.approx(f[:1], abs=1e-5))


def test_finite_stderr():
    from adjust.eval.metrics import finite_stderr

    assert finite_stderr([1.0, 2.0, 3.0, float("nan"), None]) == pytest.approx(1 / math.sqrt(3))
    assert finite_stderr([4.0, float("inf")]) is None and finite_stderr([]) is None
