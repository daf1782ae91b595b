"""Add-on files for the "What changed" tests: a LoRA in kohya's layout with random non-zero A
and B on the tiny app's UNet attention and resblock convolutions and text-encoder attention, and
the tiny app's models rebuilt from the same seeds."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import sd_parts
from ui.models import Models, Settings

RANK, ALPHA = 4, 2.0  # alpha differs from the rank: the change is halved
# the tiny UNet's attention and resblock convolutions, and the text encoder's attention
LAYERS = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
          ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
          ("unet", "down_blocks.0.resnets.0.conv1"),
          ("unet", "up_blocks.1.resnets.0.conv_shortcut"),
          ("text_encoder", "encoder.layers.1.self_attn.q_proj")]


def base_pipeline(exact: bool) -> sd_parts.StableDiffusionPipeline:
    """The tiny server's models, rebuilt here from the same seeds."""
    return Models(Settings(weights="tiny")).pipeline(exact)


def kohya_lora(path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    base = base_pipeline(True)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for part, module in LAYERS:
        weight = models[part].get_submodule(module).weight
        kernel = tuple(weight.shape[2:])
        name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + \
            module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], *kernel,
                                                          generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK,
                                                        *(1,) * len(kernel), generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors | (extra or {}), path)
    return path
