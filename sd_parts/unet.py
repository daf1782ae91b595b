"""The noise predictor of Stable Diffusion v1: a UNet conditioned on time and on text.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022), after
Ronneberger et al., "U-Net" (2015) and Ho et al., "Denoising Diffusion Probabilistic Models"
(2020). Given a noisy latent (B, 4, h, w), the timestep it was noised to and the text encoder's
context (B, 77, 768), it predicts the noise in the latent, eps, of the same shape.

The encoder half halves the resolution three times (64 -> 8 latent positions at 512 pixels),
the decoder half doubles it back, and skip connections carry every encoder stage's output to
the decoder stage of the same size. Each stage has residual blocks, which see the timestep, and
(except at the coarsest level) transformer blocks, whose cross-attention is where the words of
the prompt reach the image: every position of the latent asks which tokens it should take from.

Parameter names equal the keys of the Hub's ``unet/diffusion_pytorch_model.safetensors``.
SD 2.x UNets (linear projections, per-level head counts, 1024-wide context) build too. Any
latent size works: where the encoder halves an odd side, the decoder resizes to the skip's size.

The residual and resampling blocks and the UNet itself are here, in the order data flows
through them; the transformer blocks are in unet_transformer.py, the probe that records what
happens inside one call in unet_probe.py, the config (UNetConfig) in config.py and the CPU
kernel choices in runtime.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import vae
from .config import TINY_UNET, UNetConfig
from .runtime import conv3x3, run_with_fallback
from .unet_probe import CrossAttentionHook, UNetBlock, UNetProbe, observe, unet_blocks
from .unet_transformer import BasicTransformerBlock, Transformer2DModel

__all__ = ["TINY_UNET", "UNet2DConditionModel", "UNetBlock", "UNetConfig", "UNetProbe",
           "guidance_embedding", "timestep_embedding", "unet_blocks"]


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: int
) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoids, as positions are encoded in transformers.

    Frequencies fall geometrically from 1 to 1/10000 over dim/2 channels, so nearby timesteps
    differ in the fast channels and distant ones in the slow channels. SD was trained with the
    cosines first (flip_sin_to_cos) and freq_shift 0.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32,
                                               device=timesteps.device) / (half - freq_shift)
    angles = timesteps.float()[:, None] * exponent.exp()[None, :]  # (B, half)
    sin, cos = angles.sin(), angles.cos()
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepSinusoids(nn.Module):
    """``timestep_embedding`` as a module without weights (the checkpoint code's ``time_proj``),
    so that the sinusoids a UNet call used can be recorded like any layer's output."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: int):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


def guidance_embedding(guidance_scale: float | torch.Tensor, dim: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A guidance scale (a number, or (B,) numbers) -> (B, dim) sinusoids, the ``timestep_cond``
    of a guidance-distilled UNet (Luo et al., "Latent Consistency Models", 2023).

    LCM counts guidance from 0 (w = scale - 1: 0 is no guidance) and spreads w x 1000 over the
    sinusoids as a timestep is spread, sines first, the slowest frequency 1/10000 exactly
    (diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``, after VDM).
    Computed in float32, returned in ``dtype``; an odd ``dim`` ends with one zero.
    """
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.ndim > 1 or guidance_scale.is_complex():
            raise ValueError(f"guidance_scale must be a number or a (batch,) tensor; got shape "
                             f"{tuple(guidance_scale.shape)}")
        w = guidance_scale.float().reshape(-1) - 1
    else:
        w = torch.tensor([float(guidance_scale) - 1.0])  # the subtraction in float64, as LCM's
    half = dim // 2
    if half < 2:
        raise ValueError(f"the guidance embedding needs dim >= 4; got {dim}")
    step = torch.tensor(10000.0).log() / (half - 1)
    frequencies = (torch.arange(half, dtype=torch.float32) * -step).exp().to(w.device)
    angles = (w * 1000.0)[:, None] * frequencies[None, :]  # (B, half)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(embedding, (0, dim % 2)).to(dtype)


class TimestepEmbedding(nn.Module):
    """The sinusoids (320) through a two-layer MLP, to the width the residual blocks read (1280).

    A guidance-distilled UNet (``time_cond_proj_dim``) adds a projection of its extra condition,
    the guidance scale's own sinusoids, to the timestep's before the MLP (``cond_proj``).
    """

    def __init__(self, in_features: int, out_features: int, cond_features: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)
        self.cond_proj = (nn.Linear(cond_features, in_features, bias=False)
                          if cond_features is not None else None)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x), inplace=True))


class ResnetBlock2D(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps and a skip connection; the timestep is added between
    them, one learned offset per channel, so every block knows how noisy its input is."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int,
                 eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the skip path's channels where the block changes them
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb`` is SiLU(time embedding), (B, temb_channels): the same for every block."""
        # SiLU and the sums work in place on tensors this block has just made (no extra buffers)
        h = conv3x3(F.silu(self.norm1(x), inplace=True), self.conv1)
        h = h.add_(self.time_emb_proj(temb)[:, :, None, None])
        h = conv3x3(F.silu(self.norm2(h), inplace=True), self.conv2)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # Unlike the VAE's (0, 1, 0, 1) padding, the UNet pads one pixel on every side: the
        # stride-2 grid then starts at the first pixel, which is how the checkpoint was trained.
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.conv)


# Below this many input positions (batch x H x W) an upsampler convolves the upsampled image
# directly: the VAE's phase kernels save 44-55% of the multiply-adds, but deriving them costs
# time in proportion to the weights, which the UNet's small coarse levels do not win back
# (on 2 cores: 2 x 1280 x 8 x 8 in 178 ms with phase kernels, 54 ms without; 2 x 640 x 32 x 32
# in 85 ms with them, 137 ms without).
PHASE_MIN_POSITIONS = 2048


class Upsample2D(vae.Upsample2D):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (the VAE's module, same weights).

    ``size`` is the skip connection's size, which is not twice ``x``'s where the encoder halved
    an odd side (a 520-pixel image has 65 latent rows, then 33, 17, 9): the nearest-neighbour
    resize then goes to that size, as diffusers does.
    """

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is not None and tuple(size) != (2 * x.shape[2], 2 * x.shape[3]):
            return conv3x3(F.interpolate(x, size=tuple(size), mode="nearest"), self.conv)
        if x.shape[0] * x.shape[2] * x.shape[3] >= PHASE_MIN_POSITIONS:
            return super().forward(x)
        return conv3x3(F.interpolate(x, scale_factor=2.0, mode="nearest"), self.conv)


class DownBlock2D(nn.Module):
    """One encoder level: ``num_layers`` residual blocks, each followed by a transformer when
    ``heads`` > 0 (diffusers' CrossAttnDownBlock2D; DownBlock2D without), then optionally a
    stride-2 conv. Every intermediate output is kept for the decoder's skip connections."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 groups: int, eps: float, heads: int, context_dim: int, linear_projection: bool,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups, eps)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, context_dim, groups, linear_projection)
            for _ in range(num_layers if heads else 0)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if add_downsample else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class UpBlock2D(nn.Module):
    """One decoder level: each residual block first takes in one skip connection (concatenated
    on channels), the last one the output that entered the mirrored encoder level; transformers
    when ``heads`` > 0 (diffusers' CrossAttnUpBlock2D); then optionally 2x upsampling."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int,
                 temb_channels: int, num_layers: int, groups: int, eps: float, heads: int,
                 context_dim: int, linear_projection: bool, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_channels if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, context_dim, groups, linear_projection)
            for _ in range(num_layers if heads else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor,
                upsample_to: tuple[int, int] | None = None) -> torch.Tensor:
        """``skips``: this level's skip connections in the order the encoder made them;
        ``upsample_to``: the size of the next level's skips."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_to)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """Residual block, transformer, residual block, at the coarsest level."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, heads: int,
                 context_dim: int, linear_projection: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList(
            [Transformer2DModel(channels, heads, context_dim, groups, linear_projection)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """The noise predictor: ``eps = unet(latents, timestep, context)``.

    It runs in the dtype of its weights (float32: exact mode; bfloat16 or float16: fast mode, see
    ``sd_parts.fast_dtype``) on channels-last activations, and returns the latents' dtype.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        channels, heads = config.block_out_channels, config.num_attention_heads
        levels, temb = len(channels), 4 * channels[0]
        common = dict(temb_channels=temb, groups=config.norm_num_groups, eps=config.norm_eps,
                      context_dim=config.cross_attention_dim,
                      linear_projection=config.use_linear_projection)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = TimestepSinusoids(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb, config.time_cond_proj_dim)
        last = levels - 1  # the coarsest level has no attention (SD's layout)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block,
                        heads=heads[i] if i < last else 0, add_downsample=i < last, **common)
            for i in range(levels)
        )
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], heads=heads[-1], **common)
        # up block i mirrors down block last - i: it consumes that level's skips
        self.up_blocks = nn.ModuleList(
            UpBlock2D(channels[max(last - i - 1, 0)], channels[min(last - i + 1, last)],
                      channels[last - i], num_layers=config.layers_per_block + 1,
                      heads=heads[last - i] if i > 0 else 0, add_upsample=i < last, **common)
            for i in range(levels)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)
        # Conv weights in channels-last memory, like the activations: otherwise every call would
        # copy each weight into that layout first. A loader that assigns the file's tensors
        # must convert them again once they are all in (load_unet does): converting inside
        # load_state_dict would hold both layouts of every conv weight at once.
        self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timestep: int | float | torch.Tensor,
        context: torch.Tensor,
        on_cross_attention: CrossAttentionHook | None = None,
        timestep_cond: torch.Tensor | None = None,
        probe: UNetProbe | None = None,
    ) -> torch.Tensor:
        """(B, 4, h, w) noisy latents, a timestep (one for all or one per sample) and the text
        context (B, T, 768) -> the predicted noise (B, 4, h, w).

        ``on_cross_attention(probs, (h, w))``, when given, is called by each cross-attention
        layer in forward order (16 in SD v1: 6 down, 1 mid, 9 up) with its probabilities
        (B, heads, h*w, T), float32, computed explicitly beside the fused attention (which still
        makes the output, so it is the same with or without the hook). It must not change them.
        If a 16-bit run overflows and is repeated in float32, it is called again.

        ``timestep_cond`` (B, time_cond_proj_dim): the extra time condition of a guidance-
        distilled (LCM) UNet, e.g. ``guidance_embedding(scale, time_cond_proj_dim)``; only for a
        config with ``time_cond_proj_dim`` (without it such a UNet runs as if it were 0).

        ``probe`` (a ``UNetProbe``): records the layer outputs, skip connections and attention
        probabilities it asks for, during this call only; the output is the same without it.
        """
        self._check_inputs(latents, context, timestep_cond)
        t = self._timesteps(timestep, latents.shape[0], latents.device)
        with observe(self, probe, on_cross_attention, tuple(latents.shape[-2:])):
            return run_with_fallback(
                self, lambda x: self._predict(x, t, context, timestep_cond), latents)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 timestep_cond: torch.Tensor | None) -> torch.Tensor:
        sinusoids = self.time_proj(t)
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(x.dtype)
        # every residual block's time projection starts with a SiLU: applied once, here
        temb = F.silu(self.time_embedding(sinusoids.to(x.dtype), timestep_cond), inplace=True)
        context = context.to(x.dtype)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips += outputs
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, level = skips[:-n], skips[-n:]
            x = block(x, level, temb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))

    @property
    def cross_attention_layers(self) -> int:
        """How many layers attend to the text (16 in SD v1): the hook's calls per forward."""
        return sum(1 for m in self.modules() if isinstance(m, BasicTransformerBlock))

    def block_paths(self) -> list[UNetBlock]:
        """The top-level blocks in forward order, for drawing the UNet: ``unet_blocks(config)``."""
        return unet_blocks(self.config)

    def _check_inputs(self, latents: torch.Tensor, context: torch.Tensor,
                      timestep_cond: torch.Tensor | None = None) -> None:
        config = self.config
        if (latents.ndim != 4 or latents.shape[1] != config.in_channels
                or not latents.is_floating_point()):
            raise ValueError(
                f"latents must be a float tensor (batch, {config.in_channels}, h, w); got "
                f"{tuple(latents.shape)} {latents.dtype}")
        if (context.ndim != 3 or context.shape[0] != latents.shape[0]
                or context.shape[2] != config.cross_attention_dim):
            raise ValueError(
                f"context must be the text encoder's output (batch {latents.shape[0]}, tokens, "
                f"{config.cross_attention_dim}); got {tuple(context.shape)}")
        if timestep_cond is not None:
            dim = config.time_cond_proj_dim
            if dim is None:
                raise ValueError("timestep_cond is for guidance-distilled (LCM) UNets, whose "
                                 "config has time_cond_proj_dim; this UNet has none")
            if tuple(timestep_cond.shape) != (latents.shape[0], dim) \
                    or not timestep_cond.is_floating_point():
                raise ValueError(f"timestep_cond must be a float tensor (batch {latents.shape[0]}"
                                 f", {dim}); got {tuple(timestep_cond.shape)}")

    @staticmethod
    def _timesteps(timestep: int | float | torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
        """A number, a 0-d tensor or a (batch,) tensor -> (batch,) float32 timesteps."""
        t = torch.as_tensor(timestep, device=device)
        if t.dtype == torch.bool or t.is_complex() or t.ndim > 1 or t.numel() not in (1, batch):
            raise ValueError(f"timestep must be a number or {batch} numbers (one per sample); "
                             f"got {timestep!r}")
        return t.float().reshape(-1).expand(batch)
