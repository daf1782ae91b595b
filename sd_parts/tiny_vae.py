"""The tiny autoencoder (AutoencoderTiny) of the TAESD family: a fast stand-in for the big VAE.

TAESD ("Tiny AutoEncoder for Stable Diffusion", Ollin Boer Bohan, github.com/madebyollin/taesd,
MIT licence) was trained by distillation: its encoder learned to give what SD's VAE encoder gives,
and its decoder to turn those latents into what SD's VAE decoder draws. So it reads and writes the
diffusion model's own latent space, already scaled: a latent from the UNet goes straight into
``decode``, with no ``scaling_factor`` (TAESD's latents approximate SD's VAE means times
0.18215). TAESDXL, TAESD3 and TAEF1 are the same network trained for SDXL, SD3 and FLUX.1 (the
last two with 16 latent channels).

It has about 2.4 million parameters against the VAE's 84 million, and no attention and no
normalization, only 3x3 convolutions and ReLUs: on 2 CPU cores it decodes a 256x256 image in
0.1 s where the VAE takes 1.4 s, and a 512x512 one in 0.4 s against 8.8 s. That makes
it the tool for previews: each denoising step's latent can be shown as a picture, as it is made,
for a small part of the step's time. Its pictures are a little softer than the VAE's and it is not
meant for the final image.

Other differences from AutoencoderKL (``vae.py``): the encoder is deterministic (no Gaussian to
sample from); a stride-2 convolution pads symmetrically; the decoder softly limits its input to
(-3, 3) with ``3 tanh(z / 3)``; and TAESD works on images in [0, 1] internally, mapped here from
and to the [-1, 1] that the rest of this package uses.

Parameter names equal the keys of the Hub's ``diffusion_pytorch_model.safetensors``, written by
diffusers, which holds each half as one ``nn.Sequential`` named ``layers``: weights are named by
position (``decoder.layers.6.weight``). The halves here are Sequentials for that reason, built
level by level so the code says what each position holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TAESD, TAESD3, TINY_TAESD, TINY_TAESD_16, TinyVAEConfig
from .runtime import run_with_fallback
from .vae import _check_shape

__all__ = ["TAESD", "TAESD3", "TINY_TAESD", "TINY_TAESD_16", "AutoencoderTiny", "TinyVAEConfig"]

# The decoder's soft clamp: latents pass through 3 tanh(z / 3), close to z for |z| < 1 and never
# beyond 3 in size, so an off-distribution latent (early, noisy steps) cannot blow up a preview.
LATENT_LIMIT = 3.0


def conv(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """A 3x3 convolution that keeps H and W (stride 1) or halves them (stride 2)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """TAESD's only block: three 3x3 convs with ReLUs between, plus the input, then a ReLU.

    Input and output widths are equal in every TAESD network, so the skip path is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        # positions 0, 2 and 4 of the checkpoint's ``conv`` keys; the ReLUs take 1 and 3
        self.conv = nn.Sequential(
            conv(channels, channels), nn.ReLU(inplace=True),
            conv(channels, channels), nn.ReLU(inplace=True),
            conv(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the sum is a new tensor, so the ReLU may work in place without touching x
        return F.relu(self.conv(x) + x, inplace=True)


class TinyEncoder(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> latent (B, latent_channels, H / downscale, W / downscale)."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        widths, counts = config.encoder_block_out_channels, config.num_encoder_blocks
        layers: list[nn.Module] = [conv(config.in_channels, widths[0])]
        for level, (width, count) in enumerate(zip(widths, counts, strict=True)):
            if level > 0:  # halve H and W; bias-free, as TAESD was trained
                layers.append(conv(width, width, stride=2, bias=False))
            layers += [TinyBlock(width) for _ in range(count)]
        layers.append(conv(widths[-1], config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyDecoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h * downscale, w * downscale), roughly
    in [0, 1]."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        widths, counts = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list[nn.Module] = [conv(config.latent_channels, widths[0]), nn.ReLU(inplace=True)]
        for level, (width, count) in enumerate(zip(widths, counts, strict=True)):
            layers += [TinyBlock(width) for _ in range(count)]
            if level < len(widths) - 1:  # double H and W, then mix the copied pixels
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           conv(width, width, bias=False)]
            else:  # to RGB
                layers.append(conv(width, config.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / LATENT_LIMIT) * LATENT_LIMIT)


class AutoencoderTiny(nn.Module):
    """TAESD: ``encode`` gives the diffusion model's latents, ``decode`` gives images back.

    Images are in [-1, 1], as for AutoencoderKL, and latents are the diffusion model's scaled ones.
    Both run in the dtype of the weights (float32, or bfloat16/float16 for speed) and return
    tensors in the caller's dtype, channels-last inside as in ``vae.py``.
    """

    def __init__(self, config: TinyVAEConfig = TinyVAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    @property
    def downscale(self) -> int:
        return self.config.downscale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of ``downscale`` -> latents."""
        _check_shape(images, self.config.in_channels, self.downscale, "images")
        return run_with_fallback(self, self._encode, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the diffusion model sees them -> images (B, 3, H, W), roughly
        in [-1, 1] (not clamped, as AutoencoderKL's are not)."""
        _check_shape(latents, self.config.latent_channels, 1, "latents")
        return run_with_fallback(self, self._decode, latents)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.add(1).div(2))  # [-1, 1] -> TAESD's [0, 1]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).mul(2).sub(1)  # TAESD's [0, 1] -> [-1, 1]

