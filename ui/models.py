"""The models the app serves: its settings, the catalogue of choices and the models themselves,
each loaded on first use and then kept.

Every tab reaches the models through one ``Models``; none loads a checkpoint itself. A failure is
a ``ModelUnavailable`` whose message says what to do, and the tabs show it in place of their
views. What a VAE family is (its latent's channels, downscale, scaling and shift) is read from the
model's config, and its colour map from ``viz.latents.rgb_map_for``: the catalogue below only
says where each choice comes from and what stands in for it with random weights.

    --weights hub       the Hub's checkpoints (cached after the first download)
    --weights random    the full-size architectures with seeded random weights, offline
    --weights tiny      tiny random models, for tests and development
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import sd_parts
from sd_parts.schedulers import read_scheduler_config
from sd_parts.weights import TEXT_ENCODER_LAYOUT, TINY_VAE_LAYOUT, UNET_LAYOUT, VAE_LAYOUT
from ui import loading

WEIGHTS = ("hub", "random", "tiny")
# The UNet's half-size file (1.7 GB instead of 3.4 GB): the weights as float16 numbers, read into
# float32 (exact mode) or bfloat16; outputs differ from the float32 file's by float16 rounding.
UNET_VARIANT = "fp16"
# The generation tab runs on a GPU when there is one; the image and prompt tabs stay on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HUB = loading.HubAccess()


@dataclass(frozen=True)
class Choice:
    """One entry of a model menu: where its weights come from with ``--weights hub``, and the
    (label, configuration) that stands in for it with seeded random weights in the other modes.
    Choices that share an architecture share their stand-in, which is then offered once."""

    label: str
    source: str  # a Hub repo id
    subfolder: str | None
    random: tuple[str, object]  # --weights random: the full-size architecture
    tiny: tuple[str, object]  # --weights tiny: a tiny network with the same latent shape


_SD1_VAE = ("SD v1 VAE architecture, random weights", sd_parts.VAEConfig())
_SDXL_VAE = ("SDXL VAE architecture, random weights", sd_parts.SDXL_VAE)
_SD3_VAE = ("SD3 VAE architecture, random weights", sd_parts.SD3_VAE)
_FLUX_VAE = ("FLUX.1 VAE architecture, random weights", sd_parts.FLUX_VAE)
_TINY_VAE = ("tiny VAE, random weights", sd_parts.TINY_VAE)  # 4 channels, like SD v1 and SDXL
_TINY_VAE_16 = ("tiny 16-channel VAE, random weights", sd_parts.TINY_VAE_16)  # like SD3, FLUX
# The Stable Diffusion family's VAEs. The first is SD v1.5's own, the one the generation tab
# decodes with; the image tab and the comparison offer them all.
VAES = (
    Choice("SD v1.5 VAE", sd_parts.DEFAULT_REPO, "vae", _SD1_VAE, _TINY_VAE),
    Choice("sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse", None, _SD1_VAE, _TINY_VAE),
    Choice("sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema", None, _SD1_VAE, _TINY_VAE),
    Choice("SDXL VAE", "stabilityai/sdxl-vae", None, _SDXL_VAE, _TINY_VAE),
    # SDXL's VAE fine-tuned so its activations stay within float16's range
    Choice("SDXL VAE fp16-fix", "madebyollin/sdxl-vae-fp16-fix", None, _SDXL_VAE, _TINY_VAE),
    # gated: the Hub asks for the licence to be accepted and a login (sd_parts says so)
    Choice("SD3 medium VAE (gated)", "stabilityai/stable-diffusion-3-medium-diffusers", "vae",
           _SD3_VAE, _TINY_VAE_16),
    Choice("FLUX.1-schnell VAE", "black-forest-labs/FLUX.1-schnell", "vae", _FLUX_VAE,
           _TINY_VAE_16),  # Apache-2.0
)
_TAESD = ("TAESD architecture, random weights", sd_parts.TAESD)
_TAESD3 = ("TAESD3 architecture, random weights", sd_parts.TAESD3)
_TINY_TAESD = ("tiny TAESD, random weights", sd_parts.TINY_TAESD)
_TINY_TAESD_16 = ("tiny 16-channel TAESD, random weights", sd_parts.TINY_TAESD_16)
# The TAESD family (madebyollin, MIT): tiny autoencoders distilled from the VAEs above, for fast
# previews and the comparison. The first reads SD v1's latents.
TINY_VAES = (
    Choice("TAESD (SD v1)", "madebyollin/taesd", None, _TAESD, _TINY_TAESD),
    Choice("TAESDXL", "madebyollin/taesdxl", None, _TAESD, _TINY_TAESD),
    Choice("TAESD3", "madebyollin/taesd3", None, _TAESD3, _TINY_TAESD_16),
    Choice("TAEF1", "madebyollin/taef1", None, _TAESD3, _TINY_TAESD_16),
)


def menu(choices: tuple[Choice, ...], weights: str) -> dict[str, tuple[str, str | None] | object]:
    """label -> (source, subfolder) with the Hub's weights, else label -> the configuration
    built with random weights (one entry per architecture)."""
    if weights == "hub":
        return {c.label: (c.source, c.subfolder) for c in choices}
    return dict(getattr(c, weights) for c in choices)


@dataclass(frozen=True)
class Settings:
    weights: str = "hub"  # hub | random | tiny
    vae: str | None = None  # a repo id or folder that replaces the VAE choices
    text_encoder: str = sd_parts.DEFAULT_REPO
    tokenizer: str | None = None  # None: the vocabulary bundled with sd_parts
    unet: str = sd_parts.DEFAULT_REPO  # a repo id or folder (the UNet, or a pipeline's unet/)
    pipeline: str | None = None  # one .safetensors checkpoint (LDM layout) with all three models
    default_size: int = 384  # the longer side; 384 px round-trips in a few seconds on 2 cores
    queue_size: int = 16  # requests waiting at most; one more gets "busy, try again"
    cache_max_age: int = 3600  # seconds an upload or a served output is kept on disk
    cache_dir: str | None = None  # where finished example runs are kept; None: no such cache

    @property
    def random(self) -> bool:
        return self.weights != "hub"

    @property
    def vae_choices(self) -> list[str]:
        if self.pipeline and not self.vae:
            return [f"the VAE of {Path(self.pipeline).name}"]
        if self.vae and not self.random:
            return [self.vae]
        return list(menu(VAES, self.weights))

    @property
    def tiny_vae_choices(self) -> list[str]:
        """The TAESD family; the first decodes SD v1's latents (the generation tab's previews)."""
        return list(menu(TINY_VAES, self.weights))

    @property
    def clip_config(self) -> sd_parts.CLIPTextConfig:
        return sd_parts.TINY_CLIP if self.weights == "tiny" else sd_parts.CLIPTextConfig()

    @property
    def unet_config(self) -> sd_parts.UNetConfig:
        """The architecture built with random weights."""
        return sd_parts.TINY_UNET if self.weights == "tiny" else sd_parts.UNetConfig()

    @property
    def generate_size(self) -> int:
        """The default side of a generated image: 512 px (SD v1's own) on a GPU, 256 px on a
        CPU (a 20-step guided run at 512 px takes minutes on 2 cores), 32 px with tiny models."""
        if self.weights == "tiny":
            return 32
        return 512 if torch.cuda.is_available() else 256

    @property
    def delete_cache(self) -> tuple[int, int]:
        """Gradio's (how often, how old) for removing uploads and served copies of outputs."""
        return max(1, self.cache_max_age // 6), self.cache_max_age

    @property
    def output_max_age(self) -> int:
        # Gradio copies each download into its cache as it serves it, so ours can go sooner.
        return max(1, self.cache_max_age // 4)


def _random_config(choices: tuple[Choice, ...], label: str, what: str, weights: str) -> object:
    """The configuration a label builds with random weights, or a message naming the labels."""
    configs = menu(choices, weights)
    if label not in configs:
        raise loading.ModelUnavailable(f"No {what} is called {label!r}; with --weights {weights} "
                                       f"the choices are {', '.join(configs)}.")
    return configs[label]


# Module constructors draw their random weights from torch's one global generator.
_SEEDING = threading.Lock()


def _seeded(build: Callable[[], torch.nn.Module], dtype: torch.dtype = torch.float32
            ) -> torch.nn.Module:
    """The model ``build`` makes, its random weights drawn from seed 0, in inference mode.

    One build at a time: threads that build models at once (the example run at start-up and a
    visitor's first request, say) would otherwise draw from the generator in turns, each model
    getting weights that no other process rebuilds from the seed.
    """
    with _SEEDING:
        torch.manual_seed(0)
        module = build()
    return module.eval().requires_grad_(False).to(dtype)


@functools.lru_cache(maxsize=2)
def _single_file(path: str, exact: bool) -> sd_parts.single_file.SingleFileModels:
    dtype = torch.float32 if exact else sd_parts.fast_dtype(DEVICE)
    return HUB.load(path, lambda: sd_parts.load_single_file(path, dtype=dtype),
                    f"the checkpoint {path!r}")


# Room for every VAE of the catalogue in both modes: a comparison keeps them all loaded. Each
# SD-family VAE is 84 M parameters, 335 MB in float32 (168 MB in bfloat16).
@functools.lru_cache(maxsize=2 * len(VAES) + 2)
def get_vae(settings: Settings, label: str, exact: bool) -> sd_parts.AutoencoderKL:
    dtype = torch.float32 if exact else sd_parts.fast_dtype("cpu")
    if settings.random:
        config = _random_config(VAES, label, "VAE", settings.weights)
        return _seeded(lambda: sd_parts.AutoencoderKL(config), dtype)
    if settings.pipeline and not settings.vae and label == settings.vae_choices[0]:
        return copy.deepcopy(_single_file(settings.pipeline, True).vae).to(dtype)
    source, subfolder = menu(VAES, "hub").get(label, (label, None))
    return HUB.load(source, lambda: sd_parts.load_vae(source, subfolder=subfolder, dtype=dtype),
                    f"the VAE {label!r}")


# Each tiny autoencoder is 2.4 M parameters (10 MB in float32): all of them fit, in both modes.
@functools.lru_cache(maxsize=2 * len(TINY_VAES))
def get_tiny_vae(settings: Settings, label: str, exact: bool) -> sd_parts.AutoencoderTiny:
    dtype = torch.float32 if exact else sd_parts.fast_dtype("cpu")
    if settings.random:
        config = _random_config(TINY_VAES, label, "tiny autoencoder", settings.weights)
        return _seeded(lambda: sd_parts.AutoencoderTiny(config), dtype)
    sources = menu(TINY_VAES, "hub")
    if label not in sources:
        raise loading.ModelUnavailable(f"No tiny autoencoder is called {label!r}; the choices "
                                       f"are {', '.join(sources)}.")
    source, _ = sources[label]
    return HUB.load(source, lambda: sd_parts.load_tiny_vae(source, dtype=dtype),
                    f"the tiny autoencoder {label!r}")


@functools.lru_cache(maxsize=1)
def get_text_encoder(settings: Settings) -> sd_parts.CLIPTextEncoder:
    if settings.random:
        return _seeded(lambda: sd_parts.CLIPTextEncoder(settings.clip_config))
    if settings.pipeline:
        return _single_file(settings.pipeline, True).text_encoder
    source = settings.text_encoder
    return HUB.load(source, lambda: sd_parts.load_text_encoder(source),
                    f"the text encoder {source!r}")


@functools.lru_cache(maxsize=1)
def get_tokenizer(settings: Settings) -> sd_parts.CLIPTokenizer:
    if settings.tokenizer is None:
        return sd_parts.load_tokenizer()  # bundled: no network, no failure
    source = settings.tokenizer
    return HUB.load(source, lambda: sd_parts.load_tokenizer(source), f"the tokenizer {source!r}")


@functools.lru_cache(maxsize=1)  # one UNet resident: exact and fast would double 3.4 GB
def get_unet(settings: Settings, exact: bool) -> sd_parts.UNet2DConditionModel:
    dtype = torch.float32 if exact else sd_parts.fast_dtype(DEVICE)
    if settings.random:
        return _seeded(lambda: sd_parts.UNet2DConditionModel(settings.unet_config),
                       dtype).to(DEVICE)
    if settings.pipeline:
        return _single_file(settings.pipeline, exact).unet.to(DEVICE)
    source = settings.unet
    subfolder, variant = _unet_file(source)
    return HUB.load(source, lambda: sd_parts.load_unet(source, subfolder=subfolder,
                                                       variant=variant, dtype=dtype,
                                                       device=DEVICE), f"the UNet {source!r}")


def _unet_file(source: str) -> tuple[str | None, str | None]:
    """(subfolder, variant) of a UNet source: SD v1.5's repo keeps it in unet/, half-size."""
    return ("unet", UNET_VARIANT) if source == sd_parts.DEFAULT_REPO else (None, None)


@functools.lru_cache(maxsize=1)
def get_scheduler_config(settings: Settings) -> sd_parts.SchedulerConfig:
    source = settings.unet
    if settings.random or settings.pipeline or (loading.is_local(source) and not os.path.isdir(
            os.path.join(source, "scheduler"))):
        return sd_parts.SchedulerConfig()  # SD v1.5's schedule
    return HUB.load(source, lambda: read_scheduler_config(source, subfolder="scheduler"),
                    "the scheduler settings")


@functools.lru_cache(maxsize=5)  # the text encoder, and the VAE and TAESD in exact and fast mode
def on_device(module: torch.nn.Module) -> torch.nn.Module:
    """The generation tab's copy of a model the other tabs use on the CPU (the same one on a
    machine without a GPU)."""
    return module if DEVICE == "cpu" else copy.deepcopy(module).to(DEVICE)


@dataclass(frozen=True)
class Models:
    """The tabs' access to the settings and the models, each loaded on first use."""

    settings: Settings

    def vae(self, label: str, exact: bool) -> sd_parts.AutoencoderKL:
        return get_vae(self.settings, label, exact)

    def tiny_vae(self, label: str, exact: bool) -> sd_parts.AutoencoderTiny:
        return get_tiny_vae(self.settings, label, exact)

    def text_encoder(self) -> sd_parts.CLIPTextEncoder:
        return get_text_encoder(self.settings)

    def tokenizer(self) -> sd_parts.CLIPTokenizer:
        return get_tokenizer(self.settings)

    def unet(self, exact: bool) -> sd_parts.UNet2DConditionModel:
        return get_unet(self.settings, exact)

    @property
    def device(self) -> str:
        """Where the generation tab runs: a CUDA GPU when there is one, else the CPU."""
        return DEVICE

    @property
    def max_latent_channels(self) -> int:
        """The most channels a VAE of the menu has (16: SD3's and FLUX's)."""
        configs = menu(VAES, self.settings.weights if self.settings.random else "random")
        return max(config.latent_channels for config in configs.values())

    @property
    def generation_downscale(self) -> int:
        """Pixels per latent pixel of the generation tab's VAE, known before it loads: from its
        configuration with random weights, or for a catalogue choice the architecture that
        stands in for it. A VAE from elsewhere is taken to be the SD family's 8x; the pipeline
        checks the real one when it runs."""
        label = self.settings.vae_choices[0]
        if self.settings.random:
            return menu(VAES, self.settings.weights)[label].downscale
        stand_ins = {c.label: c.random[1] for c in VAES}
        return stand_ins[label].downscale if label in stand_ins else 8

    def generation_vae(self, exact: bool) -> sd_parts.AutoencoderKL:
        """The first VAE choice on the generation tab's device (no UNet loaded for it)."""
        return on_device(get_vae(self.settings, self.settings.vae_choices[0], exact))

    def generation_tiny_vae(self, exact: bool) -> sd_parts.AutoencoderTiny:
        """SD v1's TAESD (the first tiny choice) on the generation tab's device, for previews."""
        return on_device(get_tiny_vae(self.settings, self.settings.tiny_vae_choices[0], exact))

    def scheduler_config(self) -> sd_parts.SchedulerConfig:
        return get_scheduler_config(self.settings)

    def pipeline(self, exact: bool) -> sd_parts.StableDiffusionPipeline:
        """SD v1 from the models above (the first VAE choice), sharing them with the tabs."""
        return sd_parts.StableDiffusionPipeline(
            self.tokenizer(), on_device(self.text_encoder()), self.unet(exact),
            self.generation_vae(exact), self.scheduler_config())


def downloads(settings: Settings) -> list[loading.Download]:
    """What the first requests will need from the Hub: the VAE, text encoder and UNet, then what
    the comparison ticks at first (the last VAE of the menu and TAESD)."""
    if settings.random:
        return []
    sources = menu(VAES, "hub")
    first, last = settings.vae_choices[0], settings.vae_choices[-1]

    def vae(label: str) -> loading.Download:
        return loading.Download(f"the VAE ({label})", *sources.get(label, (label, None)),
                                VAE_LAYOUT)

    wanted = [] if settings.pipeline and not settings.vae else [vae(first)]  # or in the file
    if not settings.pipeline:
        wanted += [loading.Download("the text encoder", settings.text_encoder, None,
                                    TEXT_ENCODER_LAYOUT),
                   loading.Download("the UNet", settings.unet, *_unet_file(settings.unet)[:1],
                                    UNET_LAYOUT, _unet_file(settings.unet)[1])]
    if last != first:
        wanted.append(vae(last))
    taesd = settings.tiny_vae_choices[0]
    wanted.append(loading.Download(f"the tiny autoencoder ({taesd})",
                                   menu(TINY_VAES, "hub")[taesd][0], None, TINY_VAE_LAYOUT))
    return [d for d in wanted if not loading.is_local(d.source)]
