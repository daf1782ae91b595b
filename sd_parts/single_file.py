"""Single-file Stable Diffusion v1 checkpoints, in the original LDM layout.

Most SD v1 checkpoints people have (``v1-5-pruned-emaonly.safetensors``, community fine-tunes)
are one file as the CompVis latent-diffusion code saved it (Rombach et al., "High-Resolution
Image Synthesis with Latent Diffusion Models", 2022): the UNet under ``model.diffusion_model.``,
the VAE under ``first_stage_model.``, the CLIP text encoder under ``cond_stage_model.transformer.``
and the training run's noise schedule beside them. The modules of this package use diffusers'
names, which number the same blocks differently; a handful of rename rules per model translate
one into the other. Some rules remap an index (the UNet's flat ``input_blocks.4`` is level 1,
layer 0; the VAE decoder's ``up.3`` is diffusers' ``up_blocks.0``) and one reshapes a tensor
(LDM stores the VAE attention's linear layers as 1x1 convolutions). diffusers'
``loaders/single_file_utils.py`` documents the same conversion.

A single file carries no config: the configs default to SD v1.5's, and the one architectural
fact that varies among SD v1 files and shows in a shape, the UNet's input channels (9 for
inpainting), is read from the file. Files of other families are refused with their name.
Pickled ``.ckpt`` files are never opened: unpickling can run any code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .clip import CLIPTextEncoder
from .config import CLIPTextConfig, VAEConfig
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL
from .weights import (
    TEXT_ENCODER_LAYOUT,
    RenameRule,
    WeightsError,
    channels_last,
    load_state_dict_strict,
    squeeze_1x1,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
PARTS = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": TEXT_ENCODER_PREFIX}

# Tensors of the training run that no model here needs, dropped by name: the DDPM noise schedule
# (the samplers compute it from beta_start and beta_end) and the EMA copy of the UNet, whose
# names are flattened (``model_ema.diffusion_modelinput_blocks00weight``). SD releases put the
# EMA weights in the UNet's own keys (the ``-emaonly`` files) or ship both; the UNet's own keys
# are the ones loaded, as diffusers does by default.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
})


def ignored(key: str) -> bool:
    return key in SCHEDULE_BUFFERS or key.startswith("model_ema.")


# Other checkpoints, recognised by a key prefix (as diffusers' CHECKPOINT_KEY_NAMES does), so
# that they are refused by name rather than with a list of a thousand missing tensors.
OTHER_FAMILIES = (
    ("conditioner.embedders.", "an SDXL checkpoint (its text encoders are under "
                               "conditioner.embedders.)"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (its text encoder is OpenCLIP ViT-H, under "
                                "cond_stage_model.model., with a 1024-wide context)"),
    ("control_model.", "a ControlNet checkpoint"),
)
# What a file holding one model alone looks like, and what loads it.
SINGLE_MODELS = (
    ("encoder.down.", "a VAE alone, in the LDM layout"),
    ("input_blocks.", "a UNet alone, in the LDM layout"),
    ("encoder.down_blocks.", "a VAE in the diffusers layout: load its folder (with config.json) "
                             "with load_vae"),
    ("down_blocks.", "a UNet in the diffusers layout: load its folder (with config.json) "
                     "with load_unet"),
    ("text_model.", "a text encoder in the transformers layout: load its folder (with "
                    "config.json) with load_text_encoder"),
    ("encoder.layers.", "a text encoder in the transformers layout: load its folder (with "
                        "config.json) with load_text_encoder"),
)
SUPPORTED = (
    "load_single_file reads Stable Diffusion v1 checkpoints in the LDM layout (the UNet under "
    "model.diffusion_model., the VAE under first_stage_model., the CLIP ViT-L text encoder under "
    "cond_stage_model.transformer.), as .safetensors"
)
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


# --- Rename rules: LDM names -> diffusers names ------------------------------------------------

# LDM's residual block keeps its layers in nn.Sequential lists, so its names are positions; the
# gaps are the activations and the dropout, which have no weights.
UNET_RESNET_NAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
UNET_FIXED_NAMES = {
    "input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
}
UNET_MIDDLE_NAMES = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def unet_ldm_rules(layers_per_block: int) -> list[RenameRule]:
    """Rules from LDM's UNet names to diffusers' UNet2DConditionModel names.

    LDM numbers the encoder's steps in one flat list: ``input_blocks.0`` is conv_in, then every
    level has ``layers_per_block`` steps (residual block ``.0``, transformer ``.1``) and, except
    the last level, one downsampling step (``.0.op``). The decoder's ``output_blocks`` have
    ``layers_per_block + 1`` steps per level, the last one ending with the upsampler (``.1.conv``
    after a residual block alone, ``.2.conv`` after a transformer). Transformer blocks already
    have diffusers' names inside.
    """
    steps = layers_per_block + 1  # steps per level: the layers, then the down- or upsampler

    def down(m: re.Match[str]) -> str:
        level, layer = divmod(int(m[1]) - 1, steps)
        if m[2] == "0.op":
            return f"down_blocks.{level}.downsamplers.0.conv."
        return f"down_blocks.{level}.{'resnets' if m[2] == '0' else 'attentions'}.{layer}."

    def up(m: re.Match[str]) -> str:
        level, layer = divmod(int(m[1]), steps)
        if m[2].endswith("conv"):
            return f"up_blocks.{level}.upsamplers.0.conv."
        return f"up_blocks.{level}.{'resnets' if m[2] == '0' else 'attentions'}.{layer}."

    return [
        RenameRule(r"^(input_blocks\.0\.0|time_embed\.[02]|out\.[02])\.",
                   lambda m: UNET_FIXED_NAMES[m[1]] + "."),
        RenameRule(r"^input_blocks\.(\d+)\.(0\.op|0|1)\.", down),
        RenameRule(r"^middle_block\.([012])\.", lambda m: f"mid_block.{UNET_MIDDLE_NAMES[m[1]]}."),
        RenameRule(r"^output_blocks\.(\d+)\.([12]\.conv|0|1)\.", up),
        RenameRule(r"\.(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)\.",
                   lambda m: f".{UNET_RESNET_NAMES[m[1]]}."),
    ]


VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                       "proj_out": "to_out.0"}


def vae_ldm_rules(levels: int) -> list[RenameRule]:
    """Rules from LDM's VAE names to diffusers' AutoencoderKL names, for ``levels`` resolutions.

    LDM numbers the decoder's levels from the lowest resolution's end (``up.0`` is the last to
    run, at full resolution), diffusers in the order they run, so the index is reversed. The
    mid-block attention's q, k, v and output projections are 1x1 convs there and Linears here:
    the same weights, squeezed.
    """

    def down(m: re.Match[str]) -> str:
        part = "resnets" if m[2] == "block" else "downsamplers.0"
        return f"encoder.down_blocks.{m[1]}.{part}."

    def up(m: re.Match[str]) -> str:
        if int(m[1]) >= levels:
            return m[0]  # no such level: left as it is, for the strict load to name
        part = "resnets" if m[2] == "block" else "upsamplers.0"
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{part}."

    return [
        RenameRule(r"^encoder\.down\.(\d+)\.(block|downsample)\.", down),
        RenameRule(r"^decoder\.up\.(\d+)\.(block|upsample)\.", up),
        RenameRule(r"^(encoder|decoder)\.mid\.block_([12])\.",
                   lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        RenameRule(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                   lambda m: f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION_NAMES[m[2]]}.",
                   reshape=squeeze_1x1),
        RenameRule(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        RenameRule(r"(^|\.)nin_shortcut(\.|$)", r"\1conv_shortcut\2"),
    ]


# Text encoder: LDM keeps transformers' CLIPTextModel under ``transformer.``, with its
# ``text_model.`` level (files from early transformers versions lack it); both load.
TEXT_ENCODER_RULES = TEXT_ENCODER_LAYOUT.rename_rules


# --- Loading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SingleFileModels:
    """The three models of a single-file checkpoint, loaded strictly."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder


def load_single_file(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_encoder_config: CLIPTextConfig | None = None,
) -> SingleFileModels:
    """The UNet, VAE and text encoder of an SD v1 ``.safetensors`` file in the LDM layout.

    Configs default to SD v1.5's; the UNet's ``in_channels`` then comes from the file (4, or 9
    for inpainting). Each tensor is renamed, reshaped and cast to ``dtype`` as it is read into a
    model built on the meta device, so loading holds no second copy of the weights. Any missing,
    unexpected or mis-shaped tensor is an error naming its key in the file and its converted name.
    """
    path = Path(path)
    shapes = read_shapes(path)
    check_sd_v1(path, shapes)
    unet_config = unet_config_for(path, shapes, unet_config)
    vae_config = vae_config or VAEConfig()
    text_encoder_config = text_encoder_config or CLIPTextConfig()
    unet_rules = unet_ldm_rules(unet_config.layers_per_block)
    vae_rules = vae_ldm_rules(len(vae_config.block_out_channels))
    unet = _load_part(UNet2DConditionModel, unet_config, path, UNET_PREFIX, unet_rules, dtype,
                      device)
    return SingleFileModels(
        unet=channels_last(unet),
        vae=_load_part(AutoencoderKL, vae_config, path, VAE_PREFIX, vae_rules, dtype, device),
        text_encoder=_load_part(CLIPTextEncoder, text_encoder_config, path, TEXT_ENCODER_PREFIX,
                                TEXT_ENCODER_RULES, dtype, device, TEXT_ENCODER_LAYOUT.drop),
    )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every key of a safetensors file and its tensor's shape, from the header alone.

    A file that is not safetensors is never passed to anything that could unpickle it: a
    torch.save archive (zip, or a bare pickle in old versions) or a ``.ckpt`` is refused by name.
    """
    if not path.is_file():
        raise WeightsError(f"{path}: no such file. {SUPPORTED}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as exc:
        with path.open("rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive ("PK"), older versions a bare pickle (0x80, protocol)
        if head == b"PK" or head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(
                f"{path} is a pickled checkpoint (torch.save / .ckpt format): pickled checkpoints "
                "are never loaded; use a .safetensors version of it (unpickling a file can run "
                f"any code in it). {SUPPORTED}."
            ) from exc
        raise WeightsError(
            f"{path} is not a valid safetensors file ({exc}); it may be truncated or in another "
            f"format. {SUPPORTED}."
        ) from exc


def check_sd_v1(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, by name, a file that is not a whole SD v1 checkpoint in the LDM layout."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    for prefix, family in OTHER_FAMILIES:
        if has(prefix):
            raise WeightsError(f"{path} is {family}, which this package does not build. "
                               f"{SUPPORTED}.")
    present = [name for name, prefix in PARTS.items() if has(prefix)]
    if not present:
        kind = next((kind for prefix, kind in SINGLE_MODELS if has(prefix)), None)
        what = f"holds {kind}" if kind else "holds none of the three models"
        raise WeightsError(f"{path} {what}, not a whole SD v1 checkpoint. {SUPPORTED}.")
    absent = [f"{name} ({prefix}*)" for name, prefix in PARTS.items() if name not in present]
    if absent:
        raise WeightsError(
            f"{path} holds only the {' and the '.join(present)}: it has no "
            f"{' and no '.join(absent)}, so it is not a whole SD v1 checkpoint. {SUPPORTED}."
        )
    strays = sorted(key for key in shapes
                    if not ignored(key) and not any(key.startswith(p) for p in PARTS.values()))
    if strays:
        raise WeightsError(f"{path} has tensors outside the UNet, VAE and text encoder that no "
                           f"SD v1 model uses: {', '.join(strays[:20])}"
                           + (f" and {len(strays) - 20} more" if len(strays) > 20 else "")
                           + f". {SUPPORTED}.")
    # the width of the context the UNet's cross-attention reads: 768 (CLIP ViT-L) in SD v1
    widths = {shape[-1] for key, shape in shapes.items()
              if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight")}
    if 1024 in widths:
        raise WeightsError(f"{path} is an SD 2.x checkpoint: its UNet reads a 1024-wide text "
                           f"context (OpenCLIP ViT-H). {SUPPORTED}.")


# what a UNet's input channels say about the model
IN_CHANNELS_MEANING = {
    4: "a text-to-image model: the latent",
    8: "an InstructPix2Pix-style model: the latent and the input image's latent",
    9: "an inpainting model: the latent, the mask and the masked image's latent",
}


def unet_config_for(
    path: Path, shapes: dict[str, tuple[int, ...]], config: UNetConfig | None
) -> UNetConfig:
    """``config``, or SD v1.5's with the file's input channels; refuse a config that differs."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return config or UNetConfig()  # the strict load names the missing or mis-shaped tensor
    in_channels = conv_in[1]
    if config is None:
        return dataclasses.replace(UNetConfig(), in_channels=in_channels)
    if config.in_channels != in_channels:
        meaning = IN_CHANNELS_MEANING.get(in_channels, "an unusual model")
        raise WeightsError(
            f"{path}: the UNet takes {in_channels} input channels ({meaning}), but "
            f"unet_config.in_channels is {config.in_channels}; pass a config with "
            f"in_channels={in_channels}, or no config (SD v1.5's, with the file's in_channels)."
        )
    return config


def _load_part(
    model_class: Callable[[object], nn.Module],
    config: object,
    path: Path,
    prefix: str,
    rules: Sequence[RenameRule],
    dtype: torch.dtype,
    device: str | torch.device,
    drop: Callable[[str], bool] = lambda key: False,
) -> nn.Module:
    with torch.device("meta"):  # no memory is allocated until the weights are assigned
        model = model_class(config)
    load_state_dict_strict(model, path, rules, drop, dtype, prefix=prefix)
    return model.to(device).eval().requires_grad_(False)
