"""The LM head's packed product (layers.head_matmul): same values as the plain product up to rounding,
batch-invariant, re-packed when the weight changes, and the plain product wherever packing does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adjust import layers
from adjust.layers import head_matmul

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def weight(out=512, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@needs_onednn
def test_packed_equals_the_plain_product_up_to_rounding():
    w, owner = weight(), nn.Module()  # model weights are made outside inference mode
    x = torch.randn(3, 7, 64)
    with torch.inference_mode():
        got = head_matmul(x, w, owner, min_weights=0)
    assert got.shape == (3, 7, 512)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-4)
    assert owner.__dict__["_packed_head"][1] is not None  # the packed path ran


@needs_onednn
@torch.no_grad()
def test_a_rows_logits_do_not_depend_on_how_many_rows_share_the_product():
    w, owner = weight(4096, 256), nn.Module()
    x = torch.randn(300, 256)
    every = head_matmul(x, w, owner, min_weights=0)
    for n in (1, 2, 3, 6, 7, 35, 253):
        assert torch.equal(head_matmul(x[:n], w, owner, min_weights=0), every[:n]), n


@needs_onednn
def test_a_changed_or_replaced_weight_is_packed_again():
    lin, owner = nn.Linear(64, 512, bias=False), nn.Module()
    x = torch.randn(5, 64)
    with torch.inference_mode():
        first = head_matmul(x, lin.weight, owner, min_weights=0)
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: its version changes
    with torch.inference_mode():
        torch.testing.assert_close(head_matmul(x, lin.weight, owner, min_weights=0), 2 * first, rtol=1e-5, atol=1e-4)
        other = weight(512, 64, seed=3)
        torch.testing.assert_close(head_matmul(x, other, owner, min_weights=0), x @ other.T, rtol=1e-5, atol=1e-4)


def test_the_plain_product_where_packing_does_not_apply(monkeypatch):
    w = weight().requires_grad_()
    x = torch.randn(4, 64)
    out = head_matmul(x, w, nn.Module())  # autograd on: plain, and gradients flow
    assert torch.equal(out, x @ w.T)
    out.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert torch.equal(head_matmul(x.double(), w.double(), nn.Module()), x.double() @ w.double().T)
        with torch.inference_mode():  # a weight made in inference mode has no version to watch: plain
            w_inf = weight()
            assert torch.equal(head_matmul(x, w_inf, nn.Module()), x @ w_inf.T)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert torch.equal(head_matmul(x, w, nn.Module()), x @ w.T)


@torch.no_grad()
def test_a_torch_that_cannot_pack_falls_back(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken, raising=False)
    w, x, owner = weight(), torch.randn(4, 64), nn.Module()
    assert torch.equal(head_matmul(x, w, owner, min_weights=0), x @ w.T)
    assert owner.__dict__["_packed_head"][1] is None  # decided once, not retried on every call


@needs_onednn
@torch.no_grad()
def test_only_heads_of_at_least_min_weights_are_packed(tiny_base):
    small, big = weight(512, 128), weight(4096, 256)
    assert small.numel() < layers.PACK_MIN_WEIGHTS <= big.numel()
    x_small, x_big = torch.randn(6, 128), torch.randn(6, 256)
    owner = nn.Module()
    assert torch.equal(head_matmul(x_small, small, owner), x_small @ small.T) and "_packed_head" not in owner.__dict__
    torch.testing.assert_close(head_matmul(x_big, big, owner), x_big @ big.T, rtol=1e-5, atol=1e-4)
    assert owner.__dict__["_packed_head"][1] is not None
    # the bases' LM head goes through it: the tiny test base's head is small, so it stays plain
    h = torch.randn(2, 5, tiny_base.hidden_size)
    assert torch.equal(tiny_base.lm_head(h), h @ tiny_base.model.output_weight().T)
