"""Configurations of the models in this package, with Stable Diffusion v1 defaults.

Field names follow the Hub's ``config.json`` files (diffusers for the VAE and the UNet,
transformers for CLIP), so a config is read from the checkpoint's own folder and other models of
the same family load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL of SD v1 (``vae/config.json`` of stable-diffusion-v1-5).

    SDXL, SD3 and FLUX use the same network with other fields (see ``SDXL_VAE``, ``SD3_VAE``,
    ``FLUX_VAE`` below): the diffusion model sees ``(latent - shift_factor) * scaling_factor``.
    """

    in_channels: int = 3
    out_channels: int = 3
    # 4 in SD v1/v2 and SDXL; 16 in SD3 and FLUX, which keep more detail per latent position
    latent_channels: int = 4
    # channels of the four resolution levels, highest resolution first; each level halves H and W
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # residual blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    # Multiplies latents before the diffusion model sees them, bringing them to roughly unit
    # variance. SD v1.5's config.json has no such key, so the default is the value SD v1 was
    # trained with.
    scaling_factor: float = 0.18215
    # Subtracted before scaling, so the latents the diffusion model sees have roughly zero mean.
    # SD v1 and SDXL have none (0.0); SD3 and FLUX measured one on their training latents.
    shift_factor: float = 0.0
    # A 1x1 conv on the encoder's moments (quant_conv) and on the latent before the decoder
    # (post_quant_conv), kept from the VQGAN code LDM grew out of. SD3 and FLUX drop both: a 1x1
    # conv beside a 3x3 one adds no capacity.
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along each side: one halving per encoder level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        """A config from a diffusers ``config.json``'s dict.

        Keys that do not change the network are ignored: ``sample_size`` (the training size,
        informative) and ``force_upcast`` (a hint to pipelines to run this VAE in float32 because
        its float16 activations overflow; precision is chosen here by the weights' dtype, see
        ``sd_parts.fast_dtype``). Keys that would change what is computed are refused by name.
        """
        _check_supported(config, {
            "act_fn": "silu",
            "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",),
            "mid_block_add_attention": True,
            # per-channel latent statistics (used by some fine-tunes in place of one scaling and
            # shift): a caller using only scaling_factor would give their model wrong latents
            "latents_mean": None,
            "latents_std": None,
        })
        values = _known_fields(cls, config)
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        for key in ("scaling_factor", "shift_factor"):  # null in the file means the default
            if key in values and values[key] is None:
                del values[key]
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
                f"unsupported VAE config: {key}={actual!r} (this package builds {key}={value!r} "
                "only)"
            )


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel of SD v1.5 (``unet/config.json`` of stable-diffusion-v1-5)."""

    sample_size: int = 64  # latent side the model was trained at (512 pixels / 8); informative
    in_channels: int = 4  # 9 for inpainting models: latent, mask and masked-image latent
    out_channels: int = 4
    # channels of the four resolution levels, highest resolution first; each level but the last
    # halves H and W. The time embedding is 4x the first (1280).
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # residual(+transformer) blocks per encoder level; decoder has +1
    cross_attention_dim: int = 768  # width of the text context: CLIP ViT-L/14 (1024 in SD 2.x)
    # Attention heads per level (one int: the same everywhere). SD v1 uses 8 heads at every level,
    # so a head is 40, 80 or 160 wide; SD 2.x uses 64-wide heads (5, 10, 20, 20).
    num_attention_heads: int | tuple[int, ...] = 8
    # False: proj_in/proj_out are 1x1 convs (SD v1); True: Linears (SD 2.x). Same maths, other
    # weight shapes.
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # the sinusoidal timestep embedding: cos half first (True), and the frequency spacing
    # exp(-log(10000) * i / (half - freq_shift)); SD was trained with True and 0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # Width of an extra condition added to the timestep's sinusoids (time_embedding.cond_proj):
    # guidance-distilled Latent Consistency Models (LCM Dreamshaper v7: 256) take the guidance
    # scale this way, so one UNet call replaces the two of classifier-free guidance. None: SD's.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        heads = self.num_attention_heads
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        if len(heads) != levels:
            raise ValueError(f"num_attention_heads {heads} must give one count per level "
                             f"of block_out_channels {self.block_out_channels}")
        for channels, count in zip(self.block_out_channels, heads, strict=True):
            if channels % count or channels % self.norm_num_groups:
                raise ValueError(f"{channels} channels do not split into {count} heads and "
                                 f"{self.norm_num_groups} norm groups")
        cond = self.time_cond_proj_dim
        if cond is not None and (isinstance(cond, bool) or not isinstance(cond, int) or cond < 1):
            raise ValueError(f"time_cond_proj_dim must be a positive int or None; got {cond!r}")
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "num_attention_heads", heads)

    @property
    def downscale(self) -> int:
        """How much smaller the coarsest level is than the input: H and W must divide by it."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> UNetConfig:
        """Read a diffusers ``unet/config.json``; refuse the UNets this module does not build."""
        _check_builds(config)
        values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        if config.get("num_attention_heads") is None:
            # diffusers' historical misnomer: in SD configs "attention_head_dim" is the head
            # COUNT (8 heads for SD v1), and num_attention_heads is null
            values.pop("num_attention_heads", None)
            if "attention_head_dim" in config:
                values["num_attention_heads"] = config["attention_head_dim"]
        for key in ("block_out_channels", "num_attention_heads"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


# Keys of diffusers' config, the values this module builds (the first is diffusers' default,
# taken when the key is absent) and what another value means.
_BUILDS = {
    "addition_embed_type": ((None,), "an SDXL-style added embedding"),
    "transformer_layers_per_block": ((1,), "several transformer layers per block (SDXL)"),
    "class_embed_type": ((None,), "class embeddings"),
    "num_class_embeds": ((None,), "class embeddings"),
    "encoder_hid_dim": ((None,), "a projection of the text context"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "another middle block"),
    "only_cross_attention": ((False,), "cross-attention in place of self-attention"),
    "mid_block_only_cross_attention": ((None, False), "cross-attention in place of self-attention"),
    "dual_cross_attention": ((False,), "dual cross-attention"),
    "act_fn": (("silu",), "another activation"),
    "center_input_sample": ((False,), "input centring"),
    "time_embedding_type": (("positional",), "another time embedding"),
    "time_embedding_dim": ((None,), "another time embedding width"),
    "time_embedding_act_fn": ((None,), "another time embedding activation"),
    "timestep_post_act": ((None,), "another time embedding activation"),
    "resnet_time_scale_shift": (("default",), "scale-shift time conditioning"),
    "resnet_skip_time_act": ((False,), "another time conditioning"),
    "resnet_out_scale_factor": ((1,), "scaled residual outputs"),
    "mid_block_scale_factor": ((1,), "scaled residual outputs"),
    "downsample_padding": ((1,), "other downsampling padding"),
    "conv_in_kernel": ((3,), "another input convolution"),
    "conv_out_kernel": ((3,), "another output convolution"),
    "attention_type": (("default",), "gated (GLIGEN) attention"),
    "cross_attention_norm": ((None,), "a normalized context"),
    "class_embeddings_concat": ((False,), "class embeddings"),
    "reverse_transformer_layers_per_block": ((None,), "several transformer layers per block"),
}
# Not checked: "dropout" (inactive at inference) and "upcast_attention" (SD 2.1), which asks for
# attention scores in float32; here they are always accumulated (fused attention) or computed
# (the explicit path) in float32, and diffusers' default attention ignores the flag too.


def _check_builds(config: dict) -> None:
    for key, (allowed, meaning) in _BUILDS.items():
        actual = config.get(key, allowed[0])
        values = actual if isinstance(actual, list) else [actual]  # per-level lists
        if any(value not in allowed for value in values):
            raise ValueError(f"unsupported UNet config: {key}={actual!r} means {meaning}; this "
                             f"module builds SD v1/v2 UNets ({key}={allowed[0]!r})")
    levels = len(config.get("block_out_channels", UNetConfig.block_out_channels))
    layout = {
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
    }
    for key, expected in layout.items():
        if key in config and list(config[key]) != expected:
            raise ValueError(f"unsupported UNet config: {key}={config[key]!r}; this module "
                             f"builds SD's layout {expected!r}")
    for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
        if key in config and not isinstance(config[key], int):
            raise ValueError(f"unsupported UNet config: {key}={config[key]!r} (one int only)")


# The Hub's VAEs of SD v1's successors, each equal to its vae/config.json.
SDXL_VAE = VAEConfig(scaling_factor=0.13025)  # stabilityai/sdxl-vae: SD v1's shape, retrained
# stabilityai/stable-diffusion-3-medium-diffusers (gated) and black-forest-labs/FLUX.1-dev
SD3_VAE = VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False)

TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
# the SD3/FLUX shape in miniature: 16 latent channels, a shift, no quant convs
TINY_VAE_16 = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        latent_channels=16, scaling_factor=0.5, shift_factor=0.1,
                        use_quant_conv=False, use_post_quant_conv=False)
TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
TINY_UNET = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                       cross_attention_dim=32, num_attention_heads=2, norm_num_groups=8)


@dataclass(frozen=True)
class TinyVAEConfig:
    """AutoencoderTiny, the TAESD family (``config.json`` of madebyollin/taesd).

    Both halves keep one width at every level: diffusers builds each level's convolutions from
    that level's width alone, so only equal widths give a network its files can describe.
    """

    in_channels: int = 3
    out_channels: int = 3
    # 4 for SD v1/v2 and SDXL (TAESD, TAESDXL); 16 for SD3 and FLUX.1 (TAESD3, TAEF1)
    latent_channels: int = 4
    # channels of each level, highest resolution first; every level after the first halves H and
    # W in the encoder and doubles them in the decoder, so four levels give SD's 8x
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    # residual blocks per level: the encoder spends its blocks at low resolution (cheap), the
    # decoder at high resolution only one, since a block at 512x512 costs 64 times one at 64x64
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)

    def __post_init__(self) -> None:
        for half in ("encoder", "decoder"):
            widths = tuple(getattr(self, f"{half}_block_out_channels"))
            counts = tuple(getattr(self, f"num_{half}_blocks"))
            if len(widths) != len(counts):
                raise ValueError(f"{half}_block_out_channels {widths} and num_{half}_blocks "
                                 f"{counts} must give one value per level")
            if len(set(widths)) != 1:
                raise ValueError(f"{half}_block_out_channels {widths}: every level must have the "
                                 "same width (the only layout AutoencoderTiny's files describe)")
            object.__setattr__(self, f"{half}_block_out_channels", widths)
            object.__setattr__(self, f"num_{half}_blocks", counts)
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ValueError("the encoder and the decoder must have the same number of levels, "
                             "so that decoding undoes encoding's downscale")

    @property
    def downscale(self) -> int:
        """How much smaller a latent is than its image: H and W must divide by it."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> TinyVAEConfig:
        """A config from a diffusers ``config.json``'s dict.

        Ignored, as they change nothing that ``encode`` and ``decode`` compute: ``force_upcast``
        and ``sample_size``, ``block_out_channels`` (a copy of the decoder's widths), and
        ``latent_magnitude`` and ``latent_shift``, with which diffusers' ``forward`` rounds
        latents to 8 bits (TAESD's latents-as-PNG format) between encoding and decoding.
        """
        name = config.get("_class_name", "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise ValueError(f"the config is for {name}, not for AutoencoderTiny (TAESD); "
                             "load it with its own loader")
        _check_supported(config, {
            "act_fn": "relu",
            "upsample_fn": "nearest",
            "upsampling_scaling_factor": 2,
            # TAESD's latents are the diffusion model's own: nothing to scale or shift
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
        })
        return cls(**_known_fields(cls, config))


# The Hub's tiny autoencoders, each equal to its config.json. madebyollin/taesdxl has TAESD's
# shape (SDXL's latents have SD v1's 4 channels), madebyollin/taef1 has TAESD3's.
TAESD = TinyVAEConfig()  # madebyollin/taesd, for SD v1 and v2
TAESD3 = TinyVAEConfig(latent_channels=16)  # madebyollin/taesd3
# In miniature, for tests and the app's tiny mode: two levels, so 2x like TINY_VAE
TINY_TAESD = TinyVAEConfig(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
TINY_TAESD_16 = dataclasses.replace(TINY_TAESD, latent_channels=16)
