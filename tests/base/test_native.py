"""Native Dream and LLaDA (adjust.base.dream / llada) on random checkpoints in the published layouts.

The reference is independent of our code: transformers' own Qwen2ForCausalLM (Dream's layout)
and LlamaForCausalLM (LLaDA's, with the weights renamed), made bidirectional, fed the same
weights. Nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from published import dream_config, llada_as_llama, llada_config, write_dream, write_llada  # noqa: E402

from adjust.base import load_base  # noqa: E402
from adjust.base import hf  # noqa: E402
from adjust.base.checkpoint import INDEX, read_header  # noqa: E402
from adjust.base.dream import DreamNative  # noqa: E402
from adjust.base.llada import LLaDANative  # noqa: E402
from adjust.cli import main  # noqa: E402
from adjust.errors import AdjustError  # noqa: E402
from stand_ins import make_bidirectional  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def quiet_hf():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {"dream": write_dream(root / "dream", seed=1), "llada": write_llada(root / "llada", seed=2)}


@pytest.fixture(scope="module")
def bases(dirs):
    return {k: load_base(p) for k, p in dirs.items()}


def _state(path) -> dict:
    from safetensors.torch import load_file

    index = json.loads((path / INDEX).read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(path / shard)))
    return state


def _reference(kind, path):
    """transformers' Qwen2 (Dream) or Llama (LLaDA) with the checkpoint's weights, bidirectional."""
    raw = json.loads((path / "config.json").read_text())
    if kind == "dream":
        cfg = transformers.Qwen2Config(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"], rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=raw["rope_theta"], max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=False, attn_implementation="eager")
        net, state = transformers.Qwen2ForCausalLM(cfg), _state(path)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=raw["embedding_size"], hidden_size=raw["d_model"], intermediate_size=raw["mlp_hidden_size"],
            num_hidden_layers=raw["n_layers"], num_attention_heads=raw["n_heads"], num_key_value_heads=raw["n_kv_heads"],
            rms_norm_eps=raw["rms_norm_eps"], rope_theta=raw["rope_theta"],
            max_position_embeddings=raw["max_sequence_length"], tie_word_embeddings=False, attn_implementation="eager")
        net, state = transformers.LlamaForCausalLM(cfg), llada_as_llama(_state(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    make_bidirectional(net)
    return net.eval()


def _canvas(base, B=2, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    usable = torch.tensor([i for i in range(len(base.tokenizer)) if i not in base.banned_ids])
    x = usable[torch.randint(0, len(usable), (B, L), generator=g)]
    x[:, L // 2:] = base.mask_id
    return x


@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_native_equals_transformers_reference(dirs, bases, kind):
    base = bases[kind]
    assert type(base) is {"dream": DreamNative, "llada": LLaDANative}[kind]
    ref = _reference(kind, dirs[kind])
    x = _canvas(base)
    with torch.no_grad():
        want = ref(input_ids=x).logits
        if kind == "dream":
            want = hf.dream_align(want)  # Dream's shift, undone in its one place
        got = base.lm_head(base.hidden_states(x))
        # a left-padded batch: the reference with explicit positions and a padding mask
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_pad = ref(input_ids=x, attention_mask=mask, position_ids=pos).logits
        if kind == "dream":
            want_pad = hf.dream_align(want_pad, mask)
        got_pad = base.lm_head(base.hidden_states(x, mask))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_pad[mask.bool()], want_pad[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_left_padded_row_equals_unpadded(bases, kind):
    """LLaDA's published code ignores the attention mask (LLaDA #89, #90); ours honours it, so padding is invisible."""
    base = bases[kind]
    x = _canvas(base, B=1, L=10)
    padded = torch.cat([torch.full((1, 4), base.pad_id), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = base(x).logits
        inside = base(padded, mask).logits[:, 4:]
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)


def test_configs_read_by_published_names(dirs, bases):
    dream, llada = bases["dream"], bases["llada"]
    d_raw = json.loads((dirs["dream"] / "config.json").read_text())
    l_raw = json.loads((dirs["llada"] / "config.json").read_text())
    assert dream.mask_id == d_raw["mask_token_id"] and dream.eos_id == d_raw["eos_token_id"]
    assert dream.cfg.num_kv_heads == 2 and dream.cfg.num_heads == 4 and dream.cfg.qkv_bias  # grouped-query, biased
    assert dream.model.blocks[0].attn.qkv.bias is not None and dream.max_length == 256
    assert llada.mask_id == l_raw["mask_token_id"] and llada.eos_id == l_raw["eos_token_id"]
    assert llada.vocab_size == l_raw["embedding_size"] and llada.rope_theta == 500000.0
    assert llada.max_length == l_raw["max_sequence_length"]
    assert len({f for f in (dirs["dream"] / INDEX, dirs["llada"] / INDEX) if f.is_file()}) == 2  # sharded, >= 2 shards
    assert len(set(json.loads((dirs["dream"] / INDEX).read_text())["weight_map"].values())) >= 2
    # the published field names are what the reader needs: dropping one is a clear error
    assert set(dream_config(10)) >= {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "vocab_size", "mask_token_id", "rope_theta",
                                     "rms_norm_eps", "tie_word_embeddings"}
    assert set(llada_config(10)) >= {"d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                                     "embedding_size", "mask_token_id", "rope_theta", "max_sequence_length",
                                     "weight_tying", "rms_norm_eps"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(tmp_path, dtype):
    """A bf16 checkpoint (as published) loads at any --dtype; the values are the file's, converted once."""
    path = write_dream(tmp_path / "d", seed=3, dtype=getattr(torch, dtype))
    as_is = load_base(path, dtype=dtype)
    as_fp32 = load_base(path)
    assert as_is.dtype == getattr(torch, dtype) and as_fp32.dtype == torch.float32
    w = as_fp32.model.blocks[1].attn.qkv.weight
    assert torch.equal(as_is.model.blocks[1].attn.qkv.weight.float(), w)


def test_remote_code_path_still_behind_flag(dirs):
    """With --remote-code the old path runs the directory's code; here none is shipped, so it fails clearly."""
    with pytest.raises(AdjustError):
        load_base(dirs["dream"], remote_code=True)


def _corrupt(tmp_path, kind, how):
    path = (write_dream if kind == "dream" else write_llada)(tmp_path / f"{kind}-{how}", seed=5)
    index = json.loads((path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    if how == "missing-shard":
        (path / shards[-1]).unlink()
    elif how == "wrong-shape":
        from safetensors.torch import load_file, save_file

        state = load_file(str(path / shards[0]))
        name = sorted(state)[0]
        state[name] = torch.zeros(3, 5)
        save_file(state, str(path / shards[0]))
        return path, name
    elif how == "missing-tensor":
        name = next(iter(index["weight_map"]))
        del index["weight_map"][name]
        (path / INDEX).write_text(json.dumps(index))
        return path, name
    elif how == "unknown-arch":
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="gpt9", architectures=["Gpt9ForCausalLM"])
        (path / "config.json").write_text(json.dumps(cfg))
        return path, "gpt9"
    return path, shards[-1]


@pytest.mark.parametrize("kind", ["dream", "llada"])
@pytest.mark.parametrize("how", ["missing-shard", "wrong-shape", "missing-tensor", "unknown-arch"])
def test_bad_checkpoint_one_line_exit_2(tmp_path, capsys, kind, how):
    path, named = _corrupt(tmp_path, kind, how)
    rc = main(["generate", "--base", str(path), "--prompt", "the", "--gen-length", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("adjust: error:") and err.count("\n") == 1
    assert named in err and "Traceback" not in err


def test_header_checks(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdjustError, match="bad header length"):
        read_header(bad)
    bad.write_bytes((20).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}')
    with pytest.raises(AdjustError):
        read_header(bad)


def test_dream_tokenizer_without_remote_code(dirs, bases):
    """Qwen2's byte-level BPE from vocab.json + merges.txt, added tokens at their published ids,
    although tokenizer_config.json names a remote class (DreamTokenizer) that is not shipped."""
    from published import DREAM_ADDED, _bpe

    tok, path = bases["dream"].tokenizer, dirs["dream"]
    conf = json.loads((path / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "DreamTokenizer" and not list(path.glob("*.py"))
    for i, info in conf["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(info["content"]) == int(i)
    cfg = json.loads((path / "config.json").read_text())
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == cfg["mask_token_id"]
    assert tok.eos_token_id == cfg["eos_token_id"] and tok.bos_token == "<|beginoftext|>"
    # the same merges as the BPE the files came from, on text where GPT-2's and Qwen2's splits agree
    plain = _bpe(300)
    for text in ["the quick brown fox jumps", "  over the lazy dog, and the cat sat on the mat."]:
        assert tok.encode(text, add_special_tokens=False) == plain.encode(text).ids
    # Qwen2's own pre-tokenization: every digit is its own piece; specials are single tokens, never split
    digits = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == list("12345")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(tok.encode("the fox 12345, ok?", add_special_tokens=False)) == "the fox 12345, ok?"
    assert len(tok) == min(int(i) for i in conf["added_tokens_decoder"]) + len(DREAM_ADDED)


def test_llada_tokenizer_from_tokenizer_json(dirs, bases):
    tok, path = bases["llada"].tokenizer, dirs["llada"]
    cfg = json.loads((path / "config.json").read_text())
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == cfg["mask_token_id"] == bases["llada"].mask_id
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|eot_id|>" and tok.chat_template


@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_never_sampled_and_stop_tokens(bases, kind):
    """Mask, reserved/role/tool/BOS tokens and the vocabulary padding are never sampled; EOS and end-of-turn are."""
    base = bases[kind]
    tok = base.tokenizer
    stops = {"dream": ["<|endoftext|>", "<|im_end|>"], "llada": ["<|endoftext|>", "<|eot_id|>"]}[kind]
    never = {"dream": ["<|mask|>", "<|im_start|>", "<|object_ref_start|>", "<tool_call>", "<|beginoftext|>"],
             "llada": ["<|mdm_mask|>", "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|reserved_special_token_0|>"]}[kind]
    assert set(base.stop_ids) == {tok.convert_tokens_to_ids(t) for t in stops}
    banned = set(base.banned_ids)
    assert {tok.convert_tokens_to_ids(t) for t in never} <= banned and not banned & set(base.stop_ids)
    assert set(range(len(tok), base.vocab_size)) <= banned and base.vocab_size > len(tok)
    assert not banned & set(range(len(tok) - len(tok.added_tokens_decoder)))  # ordinary tokens all allowed
    with torch.no_grad():
        logits = base(_canvas(base)).logits
    assert torch.isinf(logits[..., sorted(banned)]).all() and torch.isfinite(logits[..., list(base.stop_ids)]).all()


@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_cli_pipeline(tmp_path, capsys, dirs, kind):
    """Through the CLI on the installed transformers, no remote code: generate with exact, parallel and
    (after rollouts and a few distill steps) adjust."""
    base, roll, sampler = str(dirs[kind]), tmp_path / "roll", tmp_path / "sampler"

    def run(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out

    for strategy in (["--strategy", "exact"], ["--strategy", "parallel", "-K", "4"]):
        obj = json.loads(run("generate", "--base", base, "--prompt", "the quick", "--gen-length", 8, *strategy,
                             "--json"))
        assert len(obj["samples"][0]["token_ids"]) == 8
    run("rollouts", "--base", base, "--out", roll, "--num-samples", 24, "--gen-length", 8, "--prompt", "the",
        "--batch-size", 12, "--quiet")
    result = json.loads(run("distill", "--base", base, "--rollouts", roll, "--out", sampler, "--steps", 3,
                            "--batch-size", 4, "--eval-every", 3, "--quiet"))
    assert result
    obj = json.loads(run("generate", "--base", base, "--sampler", sampler, "--strategy", "adjust", "-K", 4,
                         "--prompt", "the quick", "--gen-length", 8, "--json"))
    s = obj["samples"][0]
    banned = set(load_base(base).banned_ids)
    assert len(s["token_ids"]) == 8 and not banned & set(s["token_ids"]) and obj["stats"]["sampler_passes"] > 0
