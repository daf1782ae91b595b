"""The variational autoencoder (AutoencoderKL) of Stable Diffusion v1, SDXL, SD3 and FLUX.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022). The encoder
maps an image (B, 3, H, W) in [-1, 1] to a diagonal Gaussian over latents (B, C, H/8, W/8); the
decoder maps a latent back to an image. C is 4 for SD v1 and SDXL, 16 for SD3 and FLUX (Esser et
al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", 2024, whose more
latent channels keep finer detail). The diffusion model works on
``(latent - config.shift_factor) * config.scaling_factor``; that shift and scaling belong to the
caller, never to this module.

Parameter names equal the keys of the Hub's ``vae/diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .runtime import run_with_fallback

GROUP_NORM_EPS = 1e-6
# Tiled processing (for big images): tile side and overlap between neighbouring tiles, in latent
# positions (one latent is 8x8 pixels). Decoding a 96-latent (768-pixel) tile peaks at about 2 GB
# in float32, whatever the size of the whole image; bigger tiles would need more, smaller ones would
# spend more time on overlaps (2048 pixels: 1.27x the untiled work with 96, 1.56x with 64).
TILE_SIZE = 96
TILE_OVERLAP = 16


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class ResnetBlock2D(nn.Module):
    """The VAE's residual block: two (GroupNorm, SiLU, 3x3 conv) steps plus a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the skip path's channels where the block changes them
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU and the residual sum work in place on tensors this block has just made: at 512x512
        # each spared allocation is a 128 MB buffer that would otherwise be written and freed.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    It is the only place where the VAE mixes information across the whole image. Its cost grows
    with (H*W)^2, which is why big images are processed in tiles.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # one token per position; in channels-last memory this reshape is a view, not a copy
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # (B, 1, HW, C)
        q, k, v = (p(h) for p in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.to_out[0](h).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only, as the original LDM code does: (0, 1, 0, 1) then a stride-2
        # conv with no padding. Symmetric padding would shift the grid and break the checkpoint.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Upsampling by 2 repeats every pixel in a 2x2 block, so a 3x3 window on the upsampled image
# covers only 2 distinct input rows. Which kernel rows fall on which input row depends on the parity
# (phase) of the output row: an even row 2i sees input rows (i-1, i) through kernel rows (0 | 1+2),
# an odd row 2i+1 sees rows (i, i+1) through (0+1 | 2). Columns work the same way.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                           [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, input row, kernel row)
# So each of the four 2x2 kernels (row phase a, column phase b) is a fixed sum of the 9 taps:
# one (9, 16) matrix maps a 3x3 kernel to all of them, indexed (i, j) -> (a, b, p, q).
PHASE_MAP = torch.einsum("api,bqj->ijabpq", PHASE_TAPS, PHASE_TAPS).reshape(9, 16)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv: ``conv(interpolate(x, scale_factor=2))``.

    It is computed without building the upsampled image: summing the taps that fall on the same
    input pixel gives one 2x2 kernel per output phase (row and column parity), run on ``x``
    itself. That is 16 multiply-adds per input pixel and channel pair instead of 36, the same
    result up to float rounding, and 15% less work for the whole decoder.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C_in, H, W = x.shape
        weight = self.conv.weight
        C = weight.shape[0]
        # the phase kernels, summed in float32 and rounded once, ordered (a, b, out, in, p, q)
        kernels = weight.float().reshape(C * C_in, 9) @ PHASE_MAP.to(weight.device)
        kernels = kernels.view(C, C_in, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5)
        kernels = kernels.reshape(4 * C, C_in, 2, 2).to(weight.dtype)
        # with padding 1, output row r sees input rows r-1 and r: phase 0 of row i is at r = i,
        # phase 1 at r = i + 1
        phases = F.conv2d(x, kernels, self.conv.bias.repeat(4), padding=1)  # (B, 4C, H+1, W+1)
        out = torch.empty(B, C, 2 * H, 2 * W, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        for a in (0, 1):
            for b in (0, 1):
                phase = phases[:, (2 * a + b) * C:(2 * a + b + 1) * C]
                out[:, :, a::2, b::2] = phase[:, :, a:a + H, b:b + W]
        return out


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if add_downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class UNetMidBlock2D(nn.Module):
    """Residual block, self-attention, residual block, at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> Gaussian moments (B, 2 * latent_channels, H/8, W/8)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block,
                               groups, add_downsample=i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups)
        self.conv_norm_out = group_norm(channels[-1], groups)
        # mean and log-variance for every latent channel
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1,
                             groups, add_upsample=i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class DiagonalGaussian:
    """The encoder's posterior q(z | x): an independent Gaussian for every latent value."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # the clamp keeps exp() finite for untrained or extreme inputs, as in the original code
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reparameterization trick: z = mean + std * eps with eps ~ N(0, I).

        The draws are made on the generator's device and then moved, as diffusers makes them, so
        a CPU generator gives the same latent whatever device the VAE runs on.
        """
        draw_on = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=draw_on,
                            dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    """The VAE of SD v1, SDXL, SD3 and FLUX: ``encode`` gives a posterior over latents,
    ``decode`` gives images back.

    Both run in the dtype of the weights (float32: exact mode; bfloat16 or float16: fast mode, see
    ``sd_parts.fast_dtype``) and return tensors in the caller's dtype. Activations are kept
    channels-last, the layout in which the CPU and GPU convolution kernels run fastest. With
    ``tiled=True`` a big image goes through in overlapping tiles, so memory stays bounded.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        # 1x1 convs on the moments and on the latent; absent (no tensors at all, so a file that has
        # them is refused) when the config drops them, as SD3 and FLUX do
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        )
        # tile side and overlap in latent positions, used with tiled=True
        self.tile_size = TILE_SIZE
        self.tile_overlap = TILE_OVERLAP

    @property
    def downscale(self) -> int:
        return self.config.downscale

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tiled: bool = False) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over latents."""
        _check_shape(images, self.config.in_channels, self.downscale, "images")
        if tiled:  # the tile grid is laid out in latent positions, each 8x8 image pixels
            moments = blend_tiles(self._encode_moments, images, self.tile_size, self.tile_overlap,
                                  in_scale=self.downscale, out_scale=1)
        else:
            moments = self._encode_moments(images)
        return DiagonalGaussian(moments)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Unscaled, unshifted latents (B, C, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        _check_shape(latents, self.config.latent_channels, 1, "latents")
        if tiled:
            return blend_tiles(self._decode_images, latents, self.tile_size, self.tile_overlap,
                               in_scale=1, out_scale=self.downscale)
        return self._decode_images(latents)

    def _encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        return run_with_fallback(self, self._encoder_and_quant_conv, images)

    def _decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        return run_with_fallback(self, self._post_quant_conv_and_decoder, latents)

    def _encoder_and_quant_conv(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _post_quant_conv_and_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of the fewest equal tiles of at most ``tile`` that cover ``range(length)``
    with at least ``overlap`` shared between neighbours (one span if the length fits a tile)."""
    if not 0 < overlap < tile:
        raise ValueError(f"tile overlap must be in [1, tile size); got {overlap} for {tile}")
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)  # shrink tiles to what is needed
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return [(start, start + size) for start in starts]


def blend_ramp(spans: list[tuple[int, int]], i: int, scale: int) -> torch.Tensor:
    """The 1-D blending weight of tile ``i``, at ``scale`` pixels per grid step: 1 inside, rising
    across the overlap with the previous tile and falling across the overlap with the next one."""
    start, end = spans[i]
    position = torch.arange(start * scale, end * scale) + 0.5  # pixel centres
    weight = torch.ones(len(position))
    if i > 0:
        weight = weight.minimum(_rise(position, start * scale, spans[i - 1][1] * scale))
    if i < len(spans) - 1:  # the mirror image of a rise
        weight = weight.minimum(_rise(-position, -end * scale, -spans[i + 1][0] * scale))
    return weight


def _rise(position: torch.Tensor, begin: float, end: float) -> torch.Tensor:
    """A weight that goes from 0 to 1 across the overlap [begin, end).

    It stays 0 over the outer quarter, where the tile is distorted by the zero padding at its
    border, and 1 over the inner quarter; in between it follows a raised cosine, whose smooth ends
    leave no visible crease. The rise of one tile and the fall of its neighbour add up to 1.
    """
    margin = (end - begin) / 4
    t = ((position - begin - margin) / (end - begin - 2 * margin)).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def blend_tiles(
    network: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """Apply ``network`` to overlapping tiles of ``x`` and blend the results.

    Tiles are laid out on a grid whose one step is ``in_scale`` pixels of ``x`` and ``out_scale``
    pixels of the output. Each tile sees only itself, so its GroupNorm statistics and mid-block
    attention differ a little from those of the whole image; the blending ramps spread that
    difference over the overlap instead of leaving an edge. One tile: exactly ``network(x)``.
    """
    rows = tile_spans(x.shape[2] // in_scale, tile, overlap)
    cols = tile_spans(x.shape[3] // in_scale, tile, overlap)
    if len(rows) == len(cols) == 1:
        return network(x)
    height, width = x.shape[2] // in_scale * out_scale, x.shape[3] // in_scale * out_scale
    out = None
    # the ramps of two neighbours add up to 1; where three tiles overlap (an overlap of more than
    # half a tile) they do not, and dividing by the summed weights keeps that case right too
    total = torch.zeros(height, width, device=x.device)
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(cols):
            y = network(x[:, :, top * in_scale:bottom * in_scale, left * in_scale:right * in_scale])
            if out is None:  # the output's channel count is known once the first tile is done
                out = x.new_zeros(x.shape[0], y.shape[1], height, width, dtype=torch.float32)
            where = (slice(top * out_scale, bottom * out_scale),
                     slice(left * out_scale, right * out_scale))
            weight = torch.outer(blend_ramp(rows, i, out_scale), blend_ramp(cols, j, out_scale))
            out[:, :, where[0], where[1]] += y * weight.to(x.device)
            total[where] += weight.to(x.device)
    return (out / total).to(x.dtype)


def _check_shape(x: torch.Tensor, channels: int, multiple: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"{name} must have shape (batch, {channels}, H, W) with H and W multiples of "
            f"{multiple}; got {tuple(x.shape)}"
        )
