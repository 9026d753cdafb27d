"""Transformer pieces in the LLaMA/Qwen family, shared by our small base model and the sampler.

Bidirectional: no causal mask. Padding is handled by a key mask, and positions are explicit
so that a left-padded row sees exactly the rotary angles it would see alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple:
    """Rotary angles for positions (B, L) -> cos, sin of shape (B, 1, L, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@functools.lru_cache(maxsize=32)
def _rope_table(length: int, head_dim: int, theta: float, device, dtype) -> tuple:
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable under autograd later
        return rope_cos_sin(torch.arange(length, device=device)[None], head_dim, theta, dtype)


def rope_for(attention_mask, shape, device, head_dim: int, theta: float, dtype) -> tuple:
    """cos, sin for a batch: cached for unpadded canvases (every decoding step reuses them)."""
    if attention_mask is None:
        return _rope_table(shape[1], head_dim, float(theta), device, dtype)
    return rope_cos_sin(positions_from_mask(attention_mask, shape, device), head_dim, theta, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Bidirectional multi-head attention with rotary positions, optionally grouped-query.

    One fused projection `qkv` holds the rows of q (heads x head_dim), then k and v (kv_heads x
    head_dim each), with an optional bias (Qwen2/Dream has one on q, k, v; the output has none).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None, qkv_bias: bool = False):
        super().__init__()
        kv_heads = kv_heads or heads
        assert hidden % heads == 0, "hidden size must be divisible by the number of heads"
        assert heads % kv_heads == 0, "the number of heads must be a multiple of the key/value heads"
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def project(self, x, cos, sin):
        """q (B, nh, L, hd), k and v (B, nkv, L, hd), rotary positions applied to q and k."""
        B, L, _ = x.shape
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        if nkv == nh:
            q, k, v = self.qkv(x).view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hd)
        else:
            q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = (t.view(B, L, -1, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh | nkv, L, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, key_mask=None, kv=None, start=0, keep: list | None = None):
        """Attention of the rows `x` (B, n, H).

        Plain: `x` is the whole canvas. `keep`: a list that receives this layer's (k, v) of the rows (a full
        pass that fills a key/value cache). `kv` = (k, v) of the whole canvas (B, nkv, L, hd): `x` holds only
        the rows start .. start+n, whose fresh keys/values are written over the cached ones there (in place:
        a cache serves one span, recomputed on every use); the other positions are attended through their
        cached keys/values (`key_mask` is the whole canvas's). `start` may instead be a (B, n) tensor of
        positions: `x` holds those rows of each sequence (any positions; a repeated position must hold the
        same row), and their fresh keys/values are written at those positions."""
        B, L, H = x.shape
        q, k, v = self.project(x, cos, sin)
        if keep is not None:
            keep.append((k, v))
        if kv is not None:  # the rows' fresh keys/values go into the cache in place (no copy of the rest)
            ck, cv = kv
            if isinstance(start, torch.Tensor):
                at = start[:, None, :, None].expand(-1, ck.shape[1], -1, ck.shape[3])
                ck.scatter_(2, at, k)
                cv.scatter_(2, at, v)
            else:
                ck[:, :, start:start + L], cv[:, :, start:start + L] = k, v
            k, v = ck, cv
        # each group of nh / nkv query heads shares one key/value head
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L): True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)  # (B, nh, n, hd), bidirectional
        return self.out(y.transpose(1, 2).reshape(B, L, H))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float = 1e-6, kv_heads: int | None = None,
                 qkv_bias: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = Attention(hidden, heads, kv_heads, qkv_bias)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x, cos, sin, key_mask=None, kv=None, start=0, keep: list | None = None):
        """`kv`, `start`, `keep`: see `Attention.forward` (a span or a set of rows against cached keys/values)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask, kv, start, keep)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """embed -> pre-norm blocks -> final RMSNorm; the LM head is the embedding (tied) or `head`.

    Our tiny model, Dream and LLaDA are all this network; they differ only in sizes, grouped-query
    heads, the q/k/v bias and the names their checkpoints give the weights (base/dream.py, base/llada.py).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 norm_eps: float, rope_theta: float, tie_embeddings: bool, num_kv_heads: int | None = None,
                 qkv_bias: bool = False, init_embedding: bool = True):
        super().__init__()
        self.head_dim, self.rope_theta = hidden_size // num_heads, float(rope_theta)
        # init_embedding=False: leave the embedding uninitialised (a model built on the meta device to be
        # filled from a checkpoint; normal_ on meta tensors costs seconds of one-off imports in torch)
        self.embed = nn.Embedding(vocab_size, hidden_size,
                                  _weight=None if init_embedding else torch.empty(vocab_size, hidden_size))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, intermediate_size, norm_eps, num_kv_heads, qkv_bias)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.head = None if tie_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, keep: list | None = None):
        """Final post-norm hidden states (B, L, H) of the canvas. `keep`: a list that receives each layer's
        keys and values (k, v), each (B, kv_heads, L, head_dim), rotary positions applied: a key/value cache."""
        x = self.embed(input_ids)  # (B, L, H)
        cos, sin = rope_for(attention_mask, input_ids.shape, input_ids.device, self.head_dim, self.rope_theta, x.dtype)
        key_mask = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            x = block(x, cos, sin, key_mask, keep=keep)
        return self.norm(x)  # (B, L, H), final post-norm hidden states

    def forward_span(self, input_ids, attention_mask, kv: list, start: int, end: int, verify: int = 0) -> torch.Tensor:
        """Hidden states (B, end - start, H) of the positions start .. end-1 of the canvas `input_ids` (B, L) only.

        Those rows are computed afresh in every layer and attend to their own fresh keys/values and to the
        cached ones (`kv`, as `forward(keep=...)` filled it) of every other position: the canvas's other
        tokens are taken to be those the cache was computed on. With a cache of the same canvas the result
        equals forward(...)[:, start:end] up to floating-point rounding.

        `verify` > 0 (a refresh rule after dLLM-Cache's V-verify, with a cheaper probe): in each sequence the
        `verify` positions outside the span whose first-layer attention output moved most (`verify_rows`) are
        computed afresh with the span in every layer, their fresh keys/values written into the cache. With
        `verify` at least the positions outside the span, this is a whole-canvas pass. (One layer: nothing can
        drift, the span alone.)"""
        cos, sin = rope_for(attention_mask, input_ids.shape, input_ids.device, self.head_dim, self.rope_theta,
                            self.embed.weight.dtype)  # the whole canvas's, once
        key_mask = None if attention_mask is None else attention_mask.bool()
        if verify > 0 and len(self.blocks) > 1:
            span = torch.arange(start, end, device=input_ids.device).expand(input_ids.shape[0], -1)
            rows = torch.cat([span, self.verify_rows(input_ids, key_mask, cos, sin, kv, start, end, verify)], dim=1)
            x = self.embed(input_ids.gather(1, rows))
            at = rows[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
            cos, sin = (t.expand(x.shape[0], -1, -1, -1).gather(2, at) for t in (cos, sin))
            start_at = rows
        else:
            x = self.embed(input_ids[:, start:end])
            cos, sin = cos[:, :, start:end], sin[:, :, start:end]
            start_at = start
        for block, layer_kv in zip(self.blocks, kv):
            x = block(x, cos, sin, key_mask, kv=layer_kv, start=start_at)
        return self.norm(x[:, : end - start])

    def verify_rows(self, input_ids, key_mask, cos, sin, kv: list, start: int, end: int, verify: int) -> torch.Tensor:
        """(B, v) positions, ascending: the v = min(verify, L - span) outside start .. end-1 whose first-layer
        attention output moved most (L2 norm of the change) from the one their cached keys/values were computed
        from; padding (False in `key_mask`) ranks last. Per sequence, a stable sort: a row's choice does not depend
        on the batch. `cos`, `sin`: the whole canvas's rotary tables (`forward_span` computes them once for both).

        The probe (a first layer's keys/values depend on each position's own token, so only the attention
        moves there): every position's first-layer query against the cached first-layer keys/values, with the
        span's written afresh, is each position's attention output now; the cache `kv` keeps, as one more entry
        after the layers' (k, v) (added on its first verified pass, from the cache as it was filled), the
        attention output each position's cached keys/values were computed from, updated for the positions
        recomputed. It costs the first layer's queries, attention and output projection on the canvas (no MLP,
        no later layer): a position whose first layer is unchanged but whose later layers moved goes unseen."""
        B, L = input_ids.shape
        block = self.blocks[0]
        attn = block.attn
        nq = attn.heads * attn.head_dim
        h = block.attn_norm(self.embed(input_ids))
        q = F.linear(h, attn.qkv.weight[:nq], None if attn.qkv.bias is None else attn.qkv.bias[:nq])
        q = apply_rope(q.view(B, L, attn.heads, attn.head_dim).transpose(1, 2), cos, sin)
        gqa = {"enable_gqa": True} if attn.kv_heads != attn.heads else {}
        mask = None if key_mask is None else key_mask[:, None, None, :]
        ck, cv = kv[0]

        def attended() -> torch.Tensor:  # (B, L, H)
            y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, **gqa)
            return attn.out(y.transpose(1, 2).reshape(B, L, -1))

        if len(kv) == len(self.blocks):  # the cache as filled: the reference is the attention now
            kv.append(attended())
        ref = kv[len(self.blocks)]
        _, k, v = attn.project(h[:, start:end], cos[:, :, start:end], sin[:, :, start:end])
        ck[:, :, start:end], cv[:, :, start:end] = k, v  # the span's own first-layer keys/values, as written now
        now = attended()
        score = (now - ref).norm(dim=-1)
        score[:, start:end] = float("-inf")  # (B, L)
        if key_mask is not None:
            score = score.masked_fill(~key_mask, float("-inf"))
        n = min(verify, L - (end - start))
        picked = score.sort(dim=1, descending=True, stable=True).indices[:, :n].sort(dim=1).values
        at = picked[..., None].expand(-1, -1, ref.shape[-1])
        ref.scatter_(1, at, now.gather(1, at))  # recomputed now: their keys/values follow this attention
        return picked

    def output_weight(self) -> torch.Tensor:
        return (self.embed if self.head is None else self.head).weight

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden (..., H) -> logits (..., V), hidden @ W.T (`head_matmul`)."""
        w = self.output_weight()
        return head_matmul(hidden.to(w.dtype), w, self)


PACK_ROWS_HINT = 6  # oneDNN's row-count hint for the packed layout (batch-invariant for any row count, measured)
# Heads smaller than this keep the plain product: benchmarks/head_matmul.py measured the packed one 1.3-1.75x
# faster on the shipped model's 4096 x 256 head (6-253 rows) but 0.34-0.98x on a 512 x 128 one (an earlier task model).
PACK_MIN_WEIGHTS = 1 << 20


def head_matmul(x: torch.Tensor, w: torch.Tensor, owner: nn.Module, min_weights: int = PACK_MIN_WEIGHTS) -> torch.Tensor:
    """x (..., in) @ w.T for an output head w (out, in).

    At inference (autograd off) on the CPU in float32, for a head of at least `min_weights` weights, through a
    copy of w packed once for oneDNN's matrix product and kept on `owner` (re-packed if w is replaced or
    changed in place): on the shipped model's 4096 x 256 head it is 1.3-1.75x faster than the plain product
    for 6-253 rows, the rows one decoding step scores, where reading w dominates, and a row's result does not
    depend on how many rows are computed with it (the plain product's does, for 1-3 rows). It differs from
    the plain product by float rounding (~1e-5 relative); packing is checked against the plain product once,
    and anything else (autograd, other devices and dtypes, a smaller head, a torch without oneDNN) takes the
    plain product. The packed copy costs the head's size in memory once more.
    """
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or w.numel() < min_weights or not torch.backends.mkldnn.is_available()
            or x.numel() == 0):
        return x @ w.T
    try:
        key = (w.data_ptr(), w._version, tuple(w.shape))
    except RuntimeError:  # an inference-mode tensor has no version counter
        return x @ w.T
    entry = owner.__dict__.get("_packed_head")
    if entry is None or entry[0] != key:
        entry = (key, _pack(w))
        owner.__dict__["_packed_head"] = entry
    packed = entry[1]
    if packed is None:
        return x @ w.T
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "").reshape(*x.shape[:-1], w.shape[0])


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    """w packed for `head_matmul`, or None where this torch cannot or the packed product disagrees with the plain one."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS_HINT)
        probe = torch.randn(PACK_ROWS_HINT, w.shape[1], generator=torch.Generator().manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    want = probe @ w.detach().T
    return packed if torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6) else None


def positions_from_mask(attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding is skipped)."""
    if attention_mask is None:
        return torch.arange(shape[1], device=device).expand(shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
