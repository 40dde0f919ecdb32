"""Attention building blocks of the LDM denoiser (official `ldm/modules/attention.py`), on PyTorch SDPA.

Parameter names follow the official modules exactly, so official state dicts load strictly:
`SpatialTransformer.{norm, proj_in, transformer_blocks.N, proj_out}`, and inside a block
`attn1/attn2.{to_q, to_k, to_v, to_out.0}`, `ff.net.{0.proj, 2}`, `norm1/2/3`.

Differences from the official code that do not change the function: attention is computed by
`F.scaled_dot_product_attention` (the official code uses xformers or an einsum with QK^T forced to fp32);
tensors are reshaped with views that keep channels-last inputs channels-last.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (official `zero_module`: residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class CrossAttention(nn.Module):
    """Multi-head attention of `x` (B, N, query_dim) over `context` (B, M, context_dim); self-attention if
    `context` is None.

    q/k/v projections are bias-free, the output projection has a bias (official `CrossAttention`).
    Softmax scale 1/sqrt(dim_head), SDPA's default.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 1,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        split = (self.heads, self.dim_head)
        q = self.to_q(x).unflatten(-1, split).transpose(1, 2)  # (B, heads, N, dim_head)
        k = self.to_k(context).unflatten(-1, split).transpose(1, 2)  # (B, heads, M, dim_head)
        v = self.to_v(context).unflatten(-1, split).transpose(1, 2)  # (B, heads, M, dim_head)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim_head)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, heads*dim_head) -> (B, N, query_dim)


class GEGLU(nn.Module):
    """Gated GELU projection: one Linear to 2*dim_out, split into value and gate, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # value first, as in the official GEGLU
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input projection; inner width `mult * dim` (official `gated_ff=True`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = mult * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, GEGLU feed-forward, each residual."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # Registration order follows the official block (attn1, ff, attn2, norms) so printed keys line up.
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` by cross-attention.

    GroupNorm(32, eps 1e-6) -> 1x1 conv `proj_in` -> `depth` BasicTransformerBlocks on the (H*W) tokens ->
    zero-initialised 1x1 conv `proj_out` -> + input (official `SpatialTransformer`, `use_linear=False`).
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)  # official `Normalize`: plain GroupNorm, eps 1e-6
        self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, inner); a view for channels-last inputs
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.transpose(1, 2).unflatten(2, (h, w))  # (B, inner, H, W), channels-last strides
        return self.proj_out(x) + x_in


def attention_heads(width: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, dim_head) the official UNet uses for a SpatialTransformer of `width` channels.

    With `num_head_channels == -1` the width is split into `num_heads` heads (ZoomLDM: 1 head, so the head
    dimension is the full width, `legacy=True`); otherwise heads of `num_head_channels` channels. Either way
    heads * dim_head must equal the width, or the official proj_in/proj_out shapes would not be square.
    """
    if num_head_channels == -1:
        heads, dim_head = num_heads, width // max(num_heads, 1)
    else:
        heads, dim_head = width // num_head_channels, num_head_channels
    if heads < 1 or heads * dim_head != width:
        raise ValueError(
            f"attention width {width} is not divisible into heads (num_heads={num_heads}, "
            f"num_head_channels={num_head_channels})"
        )
    return heads, dim_head


__all__ = [
    "GEGLU",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "SpatialTransformer",
    "attention_heads",
    "zero_module",
]
