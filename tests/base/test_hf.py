"""Hugging Face adapters (adjust.base.hf) on tiny random models built from real transformers classes.

Dream's and LLaDA's adapters (whose real path runs remote code) are exercised on STAND-INS from
tests/stand_ins.py: a Qwen2ForCausalLM for Dream, a LlamaForCausalLM for LLaDA, made bidirectional and
called through transformers' own class. The masked LM is a real tiny BertForMaskedLM, loaded by the
package's own loader. Nothing is downloaded; every model is a few thousand parameters.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adjust.base import detect_base_type, load_base  # noqa: E402
from adjust.base import hf  # noqa: E402
from adjust.decode import generate  # noqa: E402
from adjust.errors import AdjustError  # noqa: E402
from adjust.sampler import JointSampler, SamplerConfig  # noqa: E402
from adjust.strategies import make_strategy  # noqa: E402
from adjust.train_base import train_tokenizer  # noqa: E402
from stand_ins import load_stand_in, save_random_bert, save_stand_in  # noqa: E402

DOCS = [f"the quick brown fox {i} jumps over the lazy dog, and the cat sat on the mat." for i in range(40)]
KINDS = ["dream", "llada", "bert"]


@pytest.fixture(scope="module", autouse=True)
def quiet_hf():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, 300)  # byte-level BPE, ids 0, 1, 2 = pad, mask, eos


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf_bases")
    out = {"dream": save_stand_in("dream", root / "dream", tokenizer, seed=1),
           "llada": save_stand_in("llada", root / "llada", tokenizer, seed=2)}
    # A tiny BERT: the BPE tokenizer plus cls/unk; EOS (= sep) is the BPE's end-of-text token.
    out["bert"] = save_random_bert(root / "bert", tokenizer, vocab_size=320, intermediate_size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def bases(dirs):
    return {"dream": load_stand_in("dream", dirs["dream"]), "llada": load_stand_in("llada", dirs["llada"]),
            "bert": load_base(dirs["bert"])}


def _ids(base, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    usable = torch.tensor([i for i in range(len(base.tokenizer)) if i not in base.banned_ids])
    x = usable[torch.randint(0, len(usable), (2, L), generator=g)]
    x[:, L // 2:] = base.mask_id  # a realistic canvas: some tokens, then masks
    return x


def test_detect_and_identity(dirs, bases, tokenizer):
    assert detect_base_type(dirs["bert"]) == "masked-lm"
    dream, llada, bert = bases["dream"], bases["llada"], bases["bert"]
    assert isinstance(dream, hf.DreamBase) and isinstance(llada, hf.LLaDABase)
    assert isinstance(bert, hf.MaskedLMBase)
    for base in (dream, llada):
        # ids come from the tokenizer / config, never literals
        assert base.mask_id == tokenizer.mask_token_id and base.eos_id == tokenizer.eos_token_id
        assert base.vocab_size == 320 and base.hidden_size == 32 and base.max_length == 128
        assert base.num_heads == 4 and base.rope_theta == 10000.0
        assert set(range(len(tokenizer), 320)) <= set(base.banned_ids)  # vocabulary padding rows
        assert {base.mask_id, base.pad_id} <= set(base.banned_ids) and base.eos_id not in base.banned_ids
        assert base.name == str(dirs["dream" if base is dream else "llada"])
    assert json.loads((dirs["llada"] / "config.json").read_text())["mask_token_id"] == tokenizer.mask_token_id
    tok = bert.tokenizer
    assert bert.mask_id == tok.mask_token_id and bert.eos_id == tok.sep_token_id
    assert {tok.cls_token_id, tok.pad_token_id, tok.mask_token_id, tok.unk_token_id} <= set(bert.banned_ids)
    assert bert.eos_id not in bert.banned_ids and bert.max_length == 128 and bert.vocab_size == 320
    for base in bases.values():
        assert all(not p.requires_grad for p in base.parameters()) and not base.training


@torch.no_grad()
def test_aligned_logits(bases):
    """lm_head(hidden_states) reproduces the raw model's logits: at i-1 for Dream (shift), at i otherwise."""
    for kind, base in bases.items():
        x = _ids(base)
        hidden = base.hidden_states(x)
        assert hidden.shape == (*x.shape, base.hidden_size)
        mine = base.lm_head(hidden)
        raw = base.net(input_ids=x).logits  # the transformers model itself
        if kind == "dream":
            torch.testing.assert_close(mine[:, 1:], raw[:, :-1])
            torch.testing.assert_close(mine[:, 0], raw[:, 0])
            assert not torch.allclose(mine[:, 1:], raw[:, 1:])  # the shift is real
        else:
            torch.testing.assert_close(mine, raw)
        logits = base.logits(hidden)
        banned = list(base.banned_ids)
        assert torch.isinf(logits[..., banned]).all() and (logits[..., banned] < 0).all()
        keep = torch.ones(base.vocab_size, dtype=torch.bool)
        keep[banned] = False
        torch.testing.assert_close(logits[..., keep], mine.float()[..., keep])


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional(bases, kind):
    """Changing the last token changes the earliest positions' hidden states."""
    base = bases[kind]
    x = _ids(base)
    y = x.clone()
    y[:, -1] = base.eos_id
    a, b = base.hidden_states(x), base.hidden_states(y)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_left_padding_is_invisible(bases, kind):
    """A left-padded row gets the same aligned states as the row alone (mask + position ids + alignment)."""
    base = bases[kind]
    x = _ids(base, L=8)[:1]
    pad = 3
    padded = torch.cat([torch.full((1, pad), base.pad_id), x], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(x)], dim=1)
    torch.testing.assert_close(base.hidden_states(padded, mask)[:, pad:], base.hidden_states(x))


@pytest.mark.parametrize("kind", KINDS)
def test_adjust_k1_equals_exact(bases, kind):
    base = bases[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sampler = JointSampler(SamplerConfig.for_base(base)).to(base.dtype).eval()
    prompts = [base.encode("the quick brown"), base.encode("the lazy dog sat")]
    exact = generate(base, prompts, make_strategy("exact"), gen_length=6, seed=5)
    adjust = generate(base, prompts, make_strategy("adjust", tokens_per_pass=1), gen_length=6, seed=5,
                      sampler=sampler)
    assert torch.equal(exact.tokens, adjust.tokens)
    assert exact.stats.full_passes == adjust.stats.full_passes == 6 and adjust.stats.sampler_passes == 0
    assert not set(exact.tokens.flatten().tolist()) & set(base.banned_ids)
    assert isinstance(base.decode(exact.tokens[0]), str)


def test_sampler_refuses_other_base(bases, tmp_path):
    dream, llada, bert = bases["dream"], bases["llada"], bases["bert"]
    JointSampler(SamplerConfig.for_base(dream)).save(tmp_path / "s")
    assert JointSampler.load(tmp_path / "s", dream).cfg.base["name"] == dream.name
    for other in (llada, bert):
        with pytest.raises(AdjustError, match="distill a sampler for this base"):
            JointSampler.load(tmp_path / "s", other)


def test_errors(dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for base_type in ("auto", "dream", "masked-lm"):
        with pytest.raises(AdjustError, match="config.json"):
            load_base(empty, base_type)
    with pytest.raises(AdjustError, match="neither a local directory"):
        load_base("some-org/some-model-that-is-not-cached", "dream")

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=32)).save_pretrained(gpt2)
    qwen = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           num_key_value_heads=2)).save_pretrained(qwen)
    for path in (gpt2, qwen):
        with pytest.raises(AdjustError, match="not a masked diffusion or masked LM"):
            load_base(path)
        with pytest.raises(AdjustError, match="no masked-LM head"):
            load_base(path, "masked-lm")
        with pytest.raises(AdjustError, match="not a Dream checkpoint"):
            load_base(path, "dream")
        with pytest.raises(AdjustError, match="not a LLaDA checkpoint"):
            load_base(path, "llada")
    for kind in ("dream", "llada"):  # a stand-in is a plain Qwen2/Llama to the package's loader
        with pytest.raises(AdjustError, match=r"holds a (qwen2|llama) model .* not a masked diffusion"):
            load_base(dirs[kind])
        with pytest.raises(AdjustError, match=f"not a {'Dream' if kind == 'dream' else 'LLaDA'} checkpoint"):
            load_base(dirs[kind], kind)
    for err in _collect(load_base, [(empty,), (gpt2,), (gpt2, "masked-lm"), (qwen, "dream")]):
        assert "\n" not in str(err)  # one line each


def _collect(fn, calls):
    errors = []
    for args in calls:
        try:
            fn(*args)
        except AdjustError as e:
            errors.append(e)
    assert len(errors) == len(calls)
    return errors


def test_remote_code_only_when_asked(tmp_path, monkeypatch):
    """The code in a checkpoint's directory (auto_map) never runs without --remote-code: Dream and LLaDA load
    natively instead (here the config lacks the sizes, so that fails, clearly, without running the file)."""
    fake = tmp_path / "dream"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({
        "model_type": "Dream", "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}))
    (fake / "modeling_dream.py").write_text("raise SystemExit('remote code ran')\n")
    monkeypatch.setattr(hf, "installed_transformers", lambda: "4.46.2")
    with pytest.raises(AdjustError, match="Dream config.json lacks the field"):
        load_base(fake)
    from adjust.cli import main

    assert main(["generate", "--base", str(fake), "--gen-length", "4"]) == 2


def test_transformers_version_gate(tmp_path, monkeypatch):
    """Real Dream/LLaDA (remote code) need the pinned transformers unless ADJUST_ALLOW_TRANSFORMERS=1."""
    fake = tmp_path / "dream"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({
        "model_type": "Dream", "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}))
    assert detect_base_type(fake) == "dream"
    monkeypatch.delenv(hf.ALLOW_TRANSFORMERS_ENV, raising=False)
    for version, ok in (("4.46.2", True), ("4.49.0", True), ("4.46.1", False), ("5.0.0", False)):
        monkeypatch.setattr(hf, "installed_transformers", lambda v=version: v)
        if ok:
            hf.check_transformers_version("dream")
        else:
            with pytest.raises(AdjustError, match=r"transformers==4\.46\.2.*ADJUST_ALLOW_TRANSFORMERS=1"):
                hf.check_transformers_version("dream")
    monkeypatch.setattr(hf, "installed_transformers", lambda: "4.38.2")
    hf.check_transformers_version("llada")
    monkeypatch.setattr(hf, "installed_transformers", lambda: "5.24.0")
    with pytest.raises(AdjustError, match=r"transformers==4\.46\.2"):
        load_base(fake, remote_code=True)  # refused before any remote code is touched
    monkeypatch.setenv(hf.ALLOW_TRANSFORMERS_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.check_transformers_version("llada")
    assert any("4.38.2" in str(w.message) for w in caught)


def test_dtypes(dirs, monkeypatch):
    base = load_stand_in("dream", dirs["dream"], dtype="bfloat16")
    assert base.dtype == torch.bfloat16
    x = _ids(base)
    hidden = base.hidden_states(x)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(base.lm_head(hidden)).all()
    # float16 matmuls run on this CPU (torch >= 2.1); where a kernel is missing the load-time
    # self-check turns the failure into one clear line:
    def broken(self, *a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore detail')

    monkeypatch.setattr(hf.HFDecoderBase, "_raw_hidden", broken)
    with pytest.raises(AdjustError, match=r"does not run with --dtype float16 on cpu: \"addmm_impl_cpu_\"") as e:
        load_stand_in("llada", dirs["llada"], dtype="float16")
    assert "\n" not in str(e.value)
