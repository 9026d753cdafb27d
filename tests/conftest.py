"""Shared fixtures: a tiny BPE tokenizer, a tiny random TinyBase (in memory and saved),
and a dummy base with hand-made per-position logits for checking the order rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adjust.base import BaseModel
from adjust.base.tiny import TinyBase, TinyConfig, token_ids
from adjust.train_base import train_tokenizer

# Small CPU tensors: extra threads only spin against whatever else runs on the machine.
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long.",
    "A cat sat on the mat and looked at the bird in the tree. The bird sang a short song.",
    "Once upon a time there was a little house by the river, and in the house lived an old man.",
    "She walked to the market in the morning to buy bread, milk, apples and a small basket of eggs.",
    "It was a dark and stormy night; the rain fell in torrents, and the wind blew hard over the hills.",
    "We hold these truths to be plain: that rivers run to the sea and that the sea is never full.",
] * 4


def tiny_config(tokenizer=None, **overrides) -> TinyConfig:
    """A one-layer config; with a tokenizer, sized to it and using its special-token ids."""
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=64, tokenizer_size=64,
              max_length=64)
    if tokenizer is not None:
        kw.update(vocab_size=64 * math.ceil(len(tokenizer) / 64), tokenizer_size=len(tokenizer), max_length=128,
                  **token_ids(tokenizer))
    kw.update(overrides)
    return TinyConfig(**kw)


def make_tiny_base(tokenizer=None, seed: int = 0, scale: float = 20.0, **overrides) -> TinyBase:
    """A random TinyBase, frozen. `scale` sharpens the embedding so logits vary across positions."""
    torch.manual_seed(seed)
    base = TinyBase(tiny_config(tokenizer, **overrides), tokenizer, name="tiny-test")
    with torch.no_grad():
        base.model.embed.weight.mul_(scale)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def random_sampler(base, seed: int = 3, num_layers: int = 1):
    """A random JointSampler for `base` (torch seed `seed`, `num_layers` blocks), its matrices x10 so that unrolls
    move the distributions (the initialisation's small weights barely do)."""
    from adjust.sampler import JointSampler, SamplerConfig

    torch.manual_seed(seed)
    s = JointSampler(SamplerConfig.for_base(base, num_layers=num_layers)).eval()
    with torch.no_grad():
        for p in s.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return s


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> TinyBase:
    """Random TinyBase with the real tokenizer, context 128. Do not mutate."""
    return make_tiny_base(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_base, tmp_path_factory):
    """tiny_base saved as a model directory (config.json, model.safetensors, tokenizer.json)."""
    d = tmp_path_factory.mktemp("models") / "tiny"
    tiny_base.save(d)
    return d


class DummyBase(BaseModel):
    """A base whose logits at canvas position i are row i of a fixed (L, V) table, whatever the tokens.

    hidden_states = one-hot of the position index (H = L); lm_head = hidden @ table.
    Ids `mask_id` and `pad_id` are in the vocabulary and banned.
    """

    name = "dummy"

    def __init__(self, table: torch.Tensor, mask_id: int = 0, pad_id: int = 1, eos_id: int | None = None):
        super().__init__()
        L, V = table.shape
        self.table = nn.Parameter(table.clone().float(), requires_grad=False)
        self.mask_id, self.pad_id, self.eos_id = mask_id, pad_id, eos_id
        self.vocab_size, self.hidden_size, self.max_length = V, L, L
        self.banned_ids = (mask_id, pad_id)
        self.tokenizer = None
        self.calls: list[torch.Tensor] = []  # canvases seen by each full pass

    def hidden_states(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.clone())
        B, L = input_ids.shape
        return torch.eye(self.hidden_size, device=input_ids.device)[:L].expand(B, L, -1).clone()

    def embed(self, input_ids):
        return F.one_hot(input_ids, self.vocab_size).float() @ self.table.T

    def lm_head(self, hidden):
        return hidden @ self.table


@pytest.fixture
def dummy_base():
    """Factory: dummy_base(table) -> DummyBase."""
    return DummyBase
