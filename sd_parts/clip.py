"""CLIP text encoder: the text tower of CLIP ViT-L/14 that conditions Stable Diffusion v1.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021).
Stable Diffusion v1 uses ``last_hidden_state`` (B, 77, 768) as the UNet's cross-attention context.

Parameter names equal the keys of the Hub's ``text_encoder/model.safetensors`` (without the
``text_model.`` prefix), so weights load with a strict key-by-key check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (B, T, D), the last (or clip_skip) layer + final LayerNorm
    # embeddings + the output of each layer (13 for SD v1); the last one is before the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, T, T)


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        # learned absolute positions: one vector per slot of the 77-token context
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: token t sees tokens 0..t only."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        heads = [p(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = heads  # (B, nh, T, hs)
        if return_weights:
            # The explicit path, used when the app shows the attention probabilities.
            scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, nh, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
            weights = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(y), weights


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.hidden_act = hidden_act
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # QuickGELU: the sigmoid approximation of GELU that OpenAI trained CLIP with (in place on
        # fc1's fresh output, which saves one (B, T, 3072) buffer per layer)
        x = x.mul_(torch.sigmoid(1.702 * x)) if self.hidden_act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(self.layer_norm1(x), return_weights)
        x = x + attn_out
        x = x + self.mlp(self.layer_norm2(x))
        return x, weights


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        layers = range(config.num_hidden_layers)
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in layers)


class CLIPTextEncoder(nn.Module):
    """Token ids (B, T) -> contextual token embeddings (B, T, hidden_size).

    SD v1 passes no padding mask, only the causal mask, so the padding tokens after EOS are
    encoded like any other token (and the UNet attends to them).
    """

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        clip_skip: int | None = None,
    ) -> CLIPTextOutput:
        """Encode ``input_ids`` (B, T); ``last_hidden_state`` is what the UNet receives.

        ``clip_skip=k`` (diffusers' numbering; None or 0: the last layer) returns the output of
        the layer k before the last, passed through the final LayerNorm, as SD 1.5 fine-tunes
        trained on those embeddings expect. The web UIs count from 1: their "CLIP skip 2" is
        ``clip_skip=1``. All layers still run, so ``hidden_states`` and ``attentions`` are whole.
        """
        n_layers = len(self.encoder.layers)
        skip = 0 if clip_skip is None else clip_skip
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < n_layers:
            raise ValueError(
                f"clip_skip must be None or an integer from 0 to {n_layers - 1} (the number of "
                f"final layers to leave out of {n_layers}), got {clip_skip!r}"
            )
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be (batch, at most {self.config.max_position_embeddings}) token "
                f"ids, got shape {tuple(input_ids.shape)}; use the tokenizer to pad and truncate"
            )
        x = self.embeddings(input_ids)
        hidden_states = [x]
        attentions = []
        for layer in self.encoder.layers:
            x, weights = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(weights)
        # hidden_states[-1] is x, the last layer's output; skipping k layers reads -(k + 1)
        return CLIPTextOutput(
            last_hidden_state=self.final_layer_norm(hidden_states[-(skip + 1)]),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
