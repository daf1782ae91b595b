"""The UNet's transformer blocks: where the image looks at itself and at the prompt.

Vaswani et al., "Attention Is All You Need" (2017), as Rombach et al. (2022) put it inside the
UNet: at every level but the coarsest, after each residual block, the latent's H*W positions
become a sequence of tokens and go through one pre-LayerNorm transformer block. Its
self-attention (attn1) lets every position gather from every other one; its cross-attention
(attn2) takes keys and values from the text encoder's 77 context vectors, so that is where the
words of the prompt reach the image.

Parameter names equal the Hub checkpoint's keys. The Linears run through ``runtime.linear``
(a 1x1 convolution on CPU, see there); they are still called as modules, so a forward hook on
any of them (``attn2.to_q``) sees its output, which is how ``sd_parts.unet_probe`` records them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import linear

__all__ = ["Attention", "BasicTransformerBlock", "Transformer2DModel", "attention_probabilities"]

# The transformer's GroupNorm uses this epsilon whatever the config says, as the checkpoint did.
TRANSFORMER_NORM_EPS = 1e-6


class TokenLinear(nn.Linear):
    """``nn.Linear`` on (..., C) tokens, computed by ``runtime.linear``: the same weights and the
    same result up to float rounding, faster on CPU for long sequences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PointwiseConv(nn.Conv2d):
    """SD v1's 1x1 convolution on a (B, C, H, W) image (proj_in, proj_out): a Linear on each
    position's channels, run as one over the positions of the channels-last image (a view)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: the explicit path, for showing where each
    query looks. (B, Nq, C) projected queries and (B, Nk, C) keys -> (B, heads, Nq, Nk).

    Fused attention computes the same probabilities without storing them; ``probs @ v`` then
    equals its output up to float rounding (tested). A few query rows cost Nq x Nk, not Nk^2.
    """
    B, Nq, C = q.shape
    q = q.float().reshape(B, Nq, heads, -1).transpose(1, 2)  # (B, nh, Nq, hs)
    k = k.float().reshape(B, k.shape[1], heads, -1).transpose(1, 2)  # (B, nh, Nk, hs)
    return ((q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)).softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head attention of queries from the image over keys and values from ``context``:
    the image itself (self-attention, attn1) or the prompt's tokens (cross-attention, attn2)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = TokenLinear(query_dim, query_dim, bias=False)
        self.to_k = TokenLinear(context_dim, query_dim, bias=False)
        self.to_v = TokenLinear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([TokenLinear(query_dim, query_dim)])  # [1] was a Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        context = x if context is None else context
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, N or T, hs)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](y.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """A gated GELU unit (Shazeer, "GLU Variants Improve Transformer", 2020): one Linear makes a
    value and a gate, and the output is value * GELU(gate)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = TokenLinear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # in place on GELU's fresh output


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 was a Dropout: an Identity keeps the output Linear at the checkpoint's net.2
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Identity(), TokenLinear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """The image as a sequence of H*W tokens through one transformer block, with a residual.

    proj_in/proj_out are 1x1 convs on the image in SD v1 and Linears on the tokens in SD 2.x:
    the same Linear on each position's channels, applied on either side of the image-to-token
    reshape, as the checkpoint's code did (on channels-last activations the reshape is a view).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int,
                 linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = (TokenLinear(channels, channels) if linear_projection
                        else PointwiseConv(channels))
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, heads)])
        self.proj_out = (TokenLinear(channels, channels) if linear_projection
                         else PointwiseConv(channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape

        def to_tokens(image: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, HW, C)
            return image.permute(0, 2, 3, 1).reshape(B, H * W, C)

        def to_image(tokens: torch.Tensor) -> torch.Tensor:  # channels-last (B, C, H, W)
            return tokens.view(B, H, W, C).permute(0, 3, 1, 2)

        h = self.norm(x)
        tokens = self.proj_in(to_tokens(h)) if self.linear_projection \
            else to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = to_image(self.proj_out(tokens)) if self.linear_projection \
            else self.proj_out(to_image(tokens))
        return out.add_(x)
