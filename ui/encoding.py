"""An image through the VAE, as the image tab and the latent experiments under it do it: the
example images, the upload limits, the settings that make a latent (``Source``) and what one
encode gives (``Encoded``), so an experiment starts from the tab's latent instead of encoding the
image again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sd_parts
from ui.models import Models
from viz import experiments, pixels, upload

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLE_IMAGES = [str(p) for p in sorted(ASSETS.iterdir()) if p.suffix in (".png", ".jpg")]
MEAN, SAMPLE = "posterior mean", "seeded sample (mean + std x noise)"
SIZES = [256, 384, 512, 768, 1024, 2048]
MAX_PIXELS = 40_000_000  # checked from the file header, before any pixel is decoded
TILE_ABOVE_PIXELS = 768 * 768  # bigger images go through the VAE in overlapping tiles


def uses_tiles(fitted: Image.Image) -> bool:
    """Whether the tab (and the experiments on its latent) run an image through the VAE in tiles."""
    return fitted.width * fitted.height > TILE_ABOVE_PIXELS


def latent_space(config: sd_parts.VAEConfig) -> tuple[float, float]:
    """(scaling_factor, shift_factor): the diffusion model sees (latent - shift) x scale.

    SD3's and FLUX's VAEs shift their latents; SD v1's and SDXL's shift_factor is 0.
    """
    return config.scaling_factor, config.shift_factor


@dataclass(frozen=True)
class Source:
    """The tab's settings that make a latent: which image, VAE, size and latent kind."""

    path: str | None
    choice: str
    max_side: int
    fit: str
    latent_kind: str
    seed: int | None
    exact: bool


@dataclass(frozen=True)
class Encoded:
    """One image through the VAE as this tab does it: the latent and its plain decode. The
    latent experiments keep it, keyed by ``source`` and ``size``, and start from it."""

    source: Source
    size: tuple[int, int] | None  # None: fitted as the tab fits it; else (width, height) made
    latent: torch.Tensor  # (C, h, w) float32: the posterior mean or the seeded sample
    decoded: torch.Tensor  # (3, H, W) float32 in about [-1, 1], not yet clamped
    fitted: Image.Image  # what the encoder saw
    note: str  # how the upload was brought to the encoder's size
    downscale: int
    space: tuple[float, float]  # (scaling_factor, shift_factor)
    tiled: bool

    @property
    def reconstruction(self) -> np.ndarray:
        """The plain decode as the tab shows it: (H, W, 3) uint8."""
        return np.asarray(pixels.tensor_to_image(self.decoded))


def choose_latent(posterior: sd_parts.DiagonalGaussian, latent_kind: str, seed: int | None
                  ) -> torch.Tensor:
    """The latent (C, h, w) to decode: the posterior mean, or a sample seeded by ``seed``."""
    if latent_kind == SAMPLE:
        return posterior.sample(torch.Generator().manual_seed(int(seed)))[0]
    return posterior.mean[0]


def encode(models: Models, source: Source, cached: Encoded | None,
           size: tuple[int, int] | None = None) -> Encoded:
    """The latent and plain decode of ``source`` (``cached`` when its settings are the same).

    ``size`` None fits the image as the tab does; a (width, height) brings it to that size.
    """
    if not source.path:
        raise ValueError("Upload an image (or click an example) and encode it first.")
    if source.latent_kind == SAMPLE and source.seed is None:
        raise ValueError("Fill in the seed for the sample.")
    if cached is not None and (cached.source, cached.size) == (source, size):
        return cached
    image = upload.load_image(source.path, MAX_PIXELS)
    vae = models.vae(source.choice, bool(source.exact))
    if size is None:
        fitted, note = pixels.fit_for_vae(image, int(source.max_side), vae.downscale,
                                          mode=source.fit)
    else:
        fitted, note = experiments.match_size(image, size)
    tiled = uses_tiles(fitted)
    posterior = vae.encode(pixels.image_to_tensor(fitted), tiled=tiled)
    latent = choose_latent(posterior, source.latent_kind, source.seed)
    decoded = vae.decode(latent[None], tiled=tiled)[0]
    return Encoded(source, size, latent, decoded, fitted, note, vae.downscale,
                   latent_space(vae.config), tiled)


def decode(models: Models, source: Source, encoded: Encoded, latent: torch.Tensor
           ) -> torch.Tensor:
    """Decode an edited latent as the plain one was; the plain latent's decode is reused."""
    if torch.equal(latent, encoded.latent):
        return encoded.decoded
    vae = models.vae(source.choice, bool(source.exact))
    return vae.decode(latent[None], tiled=encoded.tiled)[0]
