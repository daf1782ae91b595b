"""What the denoising loop shows: latent previews, the noise schedule, guidance, words on the image.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020) for the schedule; Ho & Salimans,
"Classifier-Free Diffusion Guidance" (2022); Tang et al., "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention" (2023) for the word maps. Latents here are in the diffusion
model's space (the VAE's latent times its scaling factor), as the UNet and the scheduler see them.

Every function is pure: tensors and lists in, arrays, pictures or figures out. Per-step views are
drawn straight into arrays (a few milliseconds each) so that streaming them costs little beside a
UNet call; matplotlib is kept for the figures a person reads once (the whole schedule).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from sd_parts.tiny_vae import AutoencoderTiny
from sd_parts.vae import AutoencoderKL
from viz.heatmap import (
    INK,
    Box,
    Picture,
    add_colorbar,
    add_title,
    arrange,
    colorize,
    font,
    heatmap,
)
from viz.latents import apply_rgb_map, enlarge_to
from viz.pixels import images_to_pixels
from viz.plot import add_axes, new_figure
from viz.tokens import SPECIAL, words

WORD_MAP_CMAP = "inferno"
STEP_CHART_SIZE = (360, 150)  # pixels: wide enough for 100 steps, small enough to stream


def latent_preview(latent: torch.Tensor, rgb_matrix: np.ndarray, size: tuple[int, int]
                   ) -> np.ndarray:
    """A model-space latent (C, h, w) as RGB at ``size`` = (width, height): the linear map, then
    each latent pixel enlarged to the block of image pixels it stands for."""
    return enlarge_to(apply_rgb_map(latent.float(), rgb_matrix, 1.0), size)


def taesd_preview(tiny_vae: AutoencoderTiny, latent: torch.Tensor) -> np.ndarray:
    """A model-space latent (C, h, w), on any device, as TAESD draws it: (H, W, 3) uint8 at the
    image's own size.

    TAESD reads the diffusion model's latents as they are (no scaling factor) and runs on its own
    device, where the run's latents already are on a GPU. It shows what the VAE would draw, a
    little softer, at a small part of the VAE's cost; the linear map shows only colours.
    """
    device = next(tiny_vae.parameters()).device
    return images_to_pixels(tiny_vae.decode(latent[None].to(device)))


def step_chart(noise_levels: Sequence[float], current: int | None) -> np.ndarray:
    """The noise level sigma of every step of this run, log scale, the current step marked.

    sigma_t = sqrt((1 - abar_t) / abar_t) is the noise-to-signal ratio of x_t: about 14.6 at the
    start of SD's schedule, 0.03 at its end. Drawn with PIL, so each streamed update costs about
    a millisecond.
    """
    width, height = STEP_CHART_SIZE
    left, right, top, bottom = 46, 10, 22, 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    levels = np.log10(np.maximum(np.asarray(noise_levels, dtype=np.float64), 1e-4))
    low, high = math.floor(levels.min()), math.ceil(levels.max() + 1e-9)
    high = max(high, low + 1)
    n = len(levels)

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(n - 1, 1))
        y = top + (height - top - bottom) * (high - value) / (high - low)
        return x, y

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=INK)
    for decade in range(low, high + 1):
        _, y = point(0, decade)
        draw.text((left - 4, y), f"{10.0 ** decade:g}", font=font(10), fill=INK, anchor="rm")
    if n > 1:
        draw.line([point(i, v) for i, v in enumerate(levels)], fill=(70, 110, 200), width=2)
    if current is not None and 0 <= current < n:
        x, y = point(current, levels[current])
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(220, 60, 40))
    draw.text((left, 4), "noise level σ (log) per step", font=font(11), fill=INK)
    draw.text((width - right, height - 4), f"step 1 … {n}", font=font(10), fill=INK,
              anchor="rb")
    return np.asarray(image)


def schedule_figure(alphas_cumprod: torch.Tensor, t: int) -> Figure:
    """The training schedule: beta_t, abar_t and the signal-to-noise ratio over t, t marked.

    ``t`` counts as the DDPM paper does: 0 is the clean latent, 1..T the noising steps (the
    tensor's index t - 1).
    """
    abar = alphas_cumprod.double()
    previous = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1 - abar / previous
    snr = abar / (1 - abar)
    steps = np.arange(1, len(abar) + 1)
    figure = new_figure(6.4, 2.6)
    left = add_axes(figure, 0.6, 0.5, 2.4, 1.8)
    left.plot(steps, abar.numpy(), label="ᾱ_t (x_t keeps √ᾱ_t of the image)")
    left.plot(steps, beta.numpy() * 50, label="β_t x 50 (noise added per step)")
    left.set_xlabel("t")
    left.legend(fontsize=7, loc="center right")
    right = add_axes(figure, 3.8, 0.5, 2.4, 1.8)
    right.semilogy(steps, snr.numpy(), color="tab:green")
    right.set_xlabel("t")
    right.set_title("signal-to-noise ratio ᾱ/(1-ᾱ)", fontsize=8)
    for axes in (left, right):
        axes.axvline(max(t, 0.5), color="tab:red", lw=1)
        axes.tick_params(labelsize=7)
    return figure


def forward_noise(latent: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                  t: int) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with t = 0 the clean latent itself."""
    if not 0 <= t <= len(alphas_cumprod):
        raise ValueError(f"t must be from 0 to {len(alphas_cumprod)}; got {t}")
    if t == 0:
        return latent.clone()
    abar = alphas_cumprod[t - 1].to(latent.dtype)
    return abar.sqrt() * latent + (1 - abar).sqrt() * noise


def predicted_original(x_t: torch.Tensor, noise_prediction: torch.Tensor,
                       alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): what the UNet thinks the image was."""
    if t == 0:
        return x_t.clone()
    abar = alphas_cumprod[t - 1].to(x_t.dtype)
    return (x_t - (1 - abar).sqrt() * noise_prediction) / abar.sqrt()


def guidance_view(noise_uncond: torch.Tensor, noise_text: torch.Tensor, scale: float
                  ) -> Picture:
    """The two noise predictions of one step and how far apart they are, per latent pixel.

    Each map is the length of the (C,)-vector at a latent pixel. Guidance moves the prediction
    ``scale`` times the difference away from the unconditional one, so the third map is where the
    prompt changes the image at this step.
    """
    maps = [noise_uncond.float().norm(dim=0), noise_text.float().norm(dim=0),
            (noise_text - noise_uncond).float().norm(dim=0)]
    titles = ["without the prompt |ε_uncond|", "with the prompt |ε_text|",
              f"difference |ε_text - ε_uncond| (x {scale:g})"]
    height, width = maps[0].shape
    cell = max(1, 192 // max(height, width))
    shared = float(max(m.max() for m in maps[:2]))
    pictures = [heatmap(m.numpy(), "viridis", (0.0, shared if i < 2 else float(m.max()) or 1.0),
                        (cell, cell), title=title)
                for i, (m, title) in enumerate(zip(maps, titles, strict=True))]
    return arrange(pictures, 3)


def word_groups(pieces: Sequence[str], context_length: int) -> list[tuple[str, list[int]]]:
    """The 77 context positions grouped for display: BOS, each word (its BPE pieces merged), EOS,
    and all padding positions together. ``pieces`` are the prompt's pieces as the text encoder
    got them (at most 75)."""
    groups = [("<start>", [0])]
    for text, start, end in words(list(pieces)):
        if text not in SPECIAL:
            groups.append((text, list(range(start + 1, end + 1))))
    eos = len(pieces) + 1
    groups.append(("<end>", [eos]))
    if eos + 1 < context_length:
        groups.append((f"<padding> x{context_length - eos - 1}",
                       list(range(eos + 1, context_length))))
    return groups


def word_maps_view(maps: torch.Tensor, groups: Sequence[tuple[str, list[int]]],
                   image: np.ndarray, columns: int = 4, side: int = 200) -> Picture:
    """Each group's cross-attention map over the image: the summed map of its positions,
    scaled to its own maximum, blended over the image (bright: where the word is looked at).

    ``maps`` (T, h, w) summed over layers and steps; ``image`` (H, W, 3) uint8.
    """
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float64)
    pictures = []
    for label, positions in groups:
        summed = maps[positions].float().sum(dim=0)[None, None]
        resized = F.interpolate(summed, size=(size[1], size[0]), mode="bilinear",
                                align_corners=False)[0, 0].numpy()
        peak = float(resized.max())
        colours = colorize(resized, WORD_MAP_CMAP, 0.0, peak if peak > 0 else 1.0)
        blended = (0.45 * base + 0.55 * colours).astype(np.uint8)
        # where the map lies in the picture (one cell per pixel), as every heat map records it
        box = Box(0, 0, size[1], size[0], 1, 1)
        pictures.append(add_title(Picture(blended, (box,)), label))
    return add_colorbar(arrange(pictures, columns), WORD_MAP_CMAP, (0.0, 1.0),
                        "share of the word's peak", ticks=(0.0, 0.5, 1.0))


def step_strip(previews: Sequence[np.ndarray], labels: Sequence[str], side: int = 128
               ) -> Picture:
    """Previews of chosen steps side by side, each shrunk to ``side`` pixels and titled."""
    pictures = []
    for preview, label in zip(previews, labels, strict=True):
        h, w = preview.shape[:2]
        scale = side / max(h, w)
        small = Image.fromarray(preview).resize((max(1, round(w * scale)),
                                                 max(1, round(h * scale))), Image.BILINEAR)
        pictures.append(add_title(Picture(np.asarray(small)), label, size=12))
    return arrange(pictures, len(pictures), gap=6)


def strip_steps(count: int, shown: int = 6) -> list[int]:
    """``shown`` step indices spread over ``count`` steps, always the first and the last."""
    if count <= shown:
        return list(range(count))
    return sorted({round(i * (count - 1) / (shown - 1)) for i in range(shown)})


def save_png_with_settings(image: np.ndarray, settings: dict, path: Path) -> Path:
    """The image as PNG with the settings that made it in a text chunk named "parameters"."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings, ensure_ascii=False))
    Image.fromarray(image).save(path, "PNG", pnginfo=info)
    return path


def save_step_latents(latents: Sequence[torch.Tensor], timesteps: Sequence[float],
                      settings: dict, path: Path) -> Path:
    """Every step's latent (model space) in one .safetensors file: ``step_000`` is the start
    noise, ``step_k`` the latent after step k; the timesteps and settings in its metadata."""
    tensors = {f"step_{i:03d}": latent.float().contiguous() for i, latent in enumerate(latents)}
    metadata = {"timesteps": json.dumps(list(timesteps)),
                "settings": json.dumps(settings, ensure_ascii=False)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def vae_image(vae: AutoencoderKL, latent: torch.Tensor) -> np.ndarray:
    """A model-space latent (B, C, h, w), on any device, as the VAE's image (H, W, 3) uint8."""
    device = next(vae.parameters()).device
    return images_to_pixels(vae.decode(latent.to(device) / vae.config.scaling_factor))
