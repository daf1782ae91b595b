"""Configurations of the models in this package, with Stable Diffusion v1 defaults.

Field names follow the Hub's ``config.json`` files (diffusers for the VAE, transformers for CLIP),
so a config is read from the checkpoint's own folder and other models of the same family load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL of SD v1 (``vae/config.json`` of stable-diffusion-v1-5)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    # channels of the four resolution levels, highest resolution first; each level halves H and W
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # residual blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    # Multiplies latents before the UNet sees them, bringing them to roughly unit variance.
    # SD v1.5's config.json has no such key, so the default is the value SD v1 was trained with.
    scaling_factor: float = 0.18215

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        _check_supported(config, {
            "act_fn": "silu",
            "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",),
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            "mid_block_add_attention": True,
        })
        values = _known_fields(cls, config)
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        if values.get("scaling_factor") is None:
            values.pop("scaling_factor", None)
        return cls(**values)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower of CLIP ViT-L/14 (``text_encoder/config.json`` of stable-diffusion-v1-5)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072  # MLP width, 4x hidden
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # the context length: every prompt is padded to 77 tokens
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x), the activation CLIP was trained with
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict) -> CLIPTextConfig:
        # a full CLIP checkpoint (openai/clip-vit-large-patch14) nests the text tower's config
        config = config.get("text_config") or config
        if config.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}")
        return cls(**_known_fields(cls, config))


def _known_fields(cls: type, config: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names}


def _check_supported(config: dict, supported: dict) -> None:
    """Refuse configs that describe a different architecture instead of loading them wrongly."""
    for key, value in supported.items():
        if key not in config:
            continue
        actual = config[key]
        ok = set(actual) <= set(value) if isinstance(value, tuple) else actual == value
        if not ok:
            raise ValueError(
                f"unsupported VAE config: {key}={actual!r} (this package builds {value!r})"
            )


TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
