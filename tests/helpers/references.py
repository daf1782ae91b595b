"""Reference models from diffusers and transformers, seeded, in the configurations the tests
compare sd_parts against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sd_parts
from sd_parts import load_tokenizer


def reference_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(block_out_channels)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        latent_channels=4,
        sample_size=512,
    ).eval()


def diffusers_vae(config: sd_parts.VAEConfig, seed: int = 0) -> torch.nn.Module:
    """diffusers' AutoencoderKL with the fields of ``config``, seeded. A config without a shift
    passes none (null in its config.json), as SDXL's file has."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=1024,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor or None,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
    ).eval()


def tiny_reference_vae():
    """The reference VAE in sd_parts' TINY_VAE configuration."""
    from sd_parts import TINY_VAE

    return reference_vae(TINY_VAE.block_out_channels, TINY_VAE.layers_per_block,
                         TINY_VAE.norm_num_groups)


def reference_text_encoder(hidden_size=768, intermediate_size=3072, layers=12, heads=12):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act="quick_gelu", attn_implementation="eager",
    )
    return CLIPTextModel(config).eval()


# The tiny noise predictor of sd_parts.unet.TINY_UNET, as diffusers arguments:
# reference_unet(**TINY_UNET_OVERRIDES) builds the same network with diffusers' names.
TINY_UNET_OVERRIDES = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "sample_size": 8,
}


def reference_unet(**overrides):
    """diffusers' UNet2DConditionModel, seeded, in SD v1.5's unet/config.json unless overridden.

    The block types follow the number of resolutions, as in SD v1: cross-attention in every down
    block but the last and every up block but the first."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    config.update(overrides)
    n = len(config["block_out_channels"])
    config["block_out_channels"] = list(config["block_out_channels"])
    config.setdefault("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    config.setdefault("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def saved(factory: pytest.TempPathFactory, name: str, model: object) -> tuple[object, Path]:
    """The model and the folder its own library's save_pretrained wrote it to."""
    folder = factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


# SD v1.5's scheduler_config.json, as diffusers' schedulers take it
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                      set_alpha_to_one=False, clip_sample=False)


def save_tiny_pipeline(folder: Path, scheduler: str | None = None, distilled: bool = False
                       ) -> object:
    """A whole tiny SD v1 pipeline in the Hub layout, written by diffusers' save_pretrained, and
    returned; ``scheduler`` names diffusers' class (default PNDMScheduler, SD v1.5's). With
    ``distilled``, an LCM: a UNet with time_cond_proj_dim, driven by
    LatentConsistencyModelPipeline with LCMScheduler."""
    scheduler = scheduler or ("LCMScheduler" if distilled else "PNDMScheduler")
    import diffusers
    import transformers

    load_tokenizer().save(folder / "vocabulary")
    parts = dict(
        vae=reference_vae(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
        text_encoder=reference_text_encoder(hidden_size=32, intermediate_size=64, layers=2,
                                            heads=4),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "vocabulary",
                                                          model_max_length=77),
        scheduler=getattr(diffusers, scheduler).from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if distilled:
        pipe = diffusers.LatentConsistencyModelPipeline(
            unet=reference_unet(**TINY_UNET_OVERRIDES | {"time_cond_proj_dim": 16}), **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(unet=reference_unet(**TINY_UNET_OVERRIDES),
                                                 **parts)
    pipe.save_pretrained(folder)
    load_tokenizer().save(folder / "tokenizer")  # transformers 5 writes only tokenizer.json
    return pipe
