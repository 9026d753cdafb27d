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
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        assert hidden % heads == 0, "hidden size must be divisible by the number of heads"
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cos, sin, key_mask=None):
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L): True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hd), bidirectional
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

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float = 1e-6):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = Attention(hidden, heads)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x, cos, sin, key_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding is skipped)."""
    if attention_mask is None:
        return torch.arange(shape[1], device=device).expand(shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
