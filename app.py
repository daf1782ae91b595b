"""Look inside Stable Diffusion v1: a Gradio app over its VAE, CLIP, UNet and schedulers.

The entry point: settings, the models (each loaded on first use, then kept), the page built from
the tabs in ``ui/tabs``, and the launch. Every picture, table and metric comes from a pure
function in ``viz``; the models come from ``sd_parts``.

    python app.py                     # real weights from the Hugging Face Hub (cached)
    python app.py --weights random    # full-size architecture, seeded random weights, offline
    python app.py --weights tiny      # tiny random models, for tests and development
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from dataclasses import dataclass

import gradio as gr
import torch

import sd_parts
from sd_parts.schedulers import read_scheduler_config
from sd_parts.weights import TEXT_ENCODER_LAYOUT, TINY_VAE_LAYOUT, UNET_LAYOUT, VAE_LAYOUT
from ui import loading, server
from ui.tabs import compare, generate, how_it_works, image, prompt, prompt_lab

# The Stable Diffusion family's VAEs, label -> (source, subfolder). The first is SD v1.5's own,
# the one the generation tab decodes with; the image tab and the comparison offer them all.
VAE_SOURCES = {
    "SD v1.5 VAE": (sd_parts.DEFAULT_REPO, "vae"),
    "stabilityai/sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", None),
    "stabilityai/sd-vae-ft-ema": ("stabilityai/sd-vae-ft-ema", None),
    "stabilityai/sdxl-vae": ("stabilityai/sdxl-vae", None),
    # SDXL's VAE fine-tuned so its activations stay within float16's range
    "madebyollin/sdxl-vae-fp16-fix": ("madebyollin/sdxl-vae-fp16-fix", None),
    # gated: the Hub asks for the licence to be accepted and a login (sd_parts says so)
    "SD3 medium VAE (gated)": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
    "FLUX.1-schnell VAE": ("black-forest-labs/FLUX.1-schnell", "vae"),  # Apache-2.0
}
# --weights random | tiny: label -> the configuration built with seeded random weights, one per
# architecture (the SD v1.5 fine-tunes share SD v1's and SDXL's differs only in its scaling).
RANDOM_VAES = {
    "random": {
        "SD v1 VAE architecture, random weights": sd_parts.VAEConfig(),
        "SDXL VAE architecture, random weights": sd_parts.SDXL_VAE,
        "SD3 VAE architecture, random weights": sd_parts.SD3_VAE,
        "FLUX.1 VAE architecture, random weights": sd_parts.FLUX_VAE,
    },
    "tiny": {
        "tiny VAE, random weights": sd_parts.TINY_VAE,  # 4 channels, like SD v1 and SDXL
        "tiny 16-channel VAE, random weights": sd_parts.TINY_VAE_16,  # like SD3 and FLUX
    },
}
RANDOM_VAE = {weights: next(iter(labels)) for weights, labels in RANDOM_VAES.items()}  # the first
# The TAESD family (madebyollin, MIT): tiny autoencoders distilled from the VAEs above, for fast
# previews and the comparison, label -> Hub repo. The first reads SD v1's latents.
TINY_VAE_SOURCES = {
    "TAESD (SD v1)": "madebyollin/taesd",
    "TAESDXL": "madebyollin/taesdxl",
    "TAESD3": "madebyollin/taesd3",
    "TAEF1": "madebyollin/taef1",
}
# --weights random | tiny: one random tiny autoencoder per latent shape (TAESDXL has TAESD's,
# TAEF1 TAESD3's), the first for SD v1's 4-channel latents
RANDOM_TINY_VAES = {
    "random": {
        "TAESD architecture, random weights": sd_parts.TAESD,
        "TAESD3 architecture, random weights": sd_parts.TAESD3,
    },
    "tiny": {
        "tiny TAESD, random weights": sd_parts.TINY_TAESD,
        "tiny 16-channel TAESD, random weights": sd_parts.TINY_TAESD_16,
    },
}
HUB = loading.HubAccess()
# The UNet's half-size file (1.7 GB instead of 3.4 GB): the weights as float16 numbers, read into
# float32 (exact mode) or bfloat16; outputs differ from the float32 file's by float16 rounding.
UNET_VARIANT = "fp16"
# The generation tab runs on a GPU when there is one; the image and prompt tabs stay on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Settings:
    weights: str = "hub"  # hub | random | tiny
    vae: str | None = None  # a repo id or folder that replaces the VAE choices
    text_encoder: str = sd_parts.DEFAULT_REPO
    tokenizer: str | None = None  # None: the vocabulary bundled with sd_parts
    default_size: int = 384  # the longer side; 384 px round-trips in a few seconds on 2 cores
    queue_size: int = 16  # requests waiting at most; one more gets "busy, try again"
    cache_max_age: int = 3600  # seconds an upload or a served output is kept on disk

    @property
    def random(self) -> bool:
        return self.weights != "hub"

    @property
    def vae_choices(self) -> list[str]:
        if self.random:
            return list(RANDOM_VAES[self.weights])
        return [self.vae] if self.vae else list(VAE_SOURCES)

    @property
    def tiny_vae_choices(self) -> list[str]:
        """The TAESD family; the first decodes SD v1's latents (the generation tab's previews)."""
        return list(RANDOM_TINY_VAES[self.weights] if self.random else TINY_VAE_SOURCES)

    @property
    def clip_config(self) -> sd_parts.CLIPTextConfig:
        return sd_parts.TINY_CLIP if self.weights == "tiny" else sd_parts.CLIPTextConfig()

    @property
    def generate_multiple(self) -> int:
        """Image sides are multiples of the VAE's downscale: one latent pixel per block."""
        return 2 if self.weights == "tiny" else 8

    @property
    def generate_size(self) -> int:
        """The default side of a generated image: 512 px (SD v1's own) on a GPU; on a CPU
        256 px, which takes about a minute for 20 steps on 2 cores."""
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


def parse_settings(argv: list[str]) -> Settings:
    """Command-line flags, each defaulting to an environment variable (for Spaces)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Look inside Stable Diffusion v1.")
    parser.add_argument("--weights", choices=["hub", "random", "tiny"],
                        default=env("SD_PARTS_WEIGHTS", "hub"))
    parser.add_argument("--vae", default=env("SD_PARTS_VAE"), help="repo id or local folder")
    parser.add_argument("--text-encoder", default=env("SD_PARTS_TEXT_ENCODER",
                                                      sd_parts.DEFAULT_REPO))
    parser.add_argument("--tokenizer", default=env("SD_PARTS_TOKENIZER"))
    parser.add_argument("--default-size", type=int, choices=image.SIZES,
                        default=int(env("SD_PARTS_DEFAULT_SIZE", "384")))
    parser.add_argument("--queue-size", type=int, default=int(env("SD_PARTS_QUEUE_SIZE", "16")))
    parser.add_argument("--cache-max-age", type=int,
                        default=int(env("SD_PARTS_CACHE_MAX_AGE", "3600")))
    return Settings(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Models: loaded on first use, then kept. A failure is a ModelUnavailable whose message says
# what to do; the tabs show it in place of the views.


def vae_source(choice: str) -> tuple[str, str | None]:
    return VAE_SOURCES.get(choice, (choice, None))


def random_config(configs: dict[str, object], choice: str, what: str, weights: str) -> object:
    """The configuration a label builds with random weights, or a message naming the labels."""
    if choice not in configs:
        raise loading.ModelUnavailable(f"No {what} is called {choice!r}; with --weights {weights} "
                                       f"the choices are {', '.join(configs)}.")
    return configs[choice]


# Room for every VAE of the catalogue in both modes: a comparison keeps them all loaded. Each
# SD-family VAE is 84 M parameters, 335 MB in float32 (168 MB in bfloat16).
@functools.lru_cache(maxsize=2 * len(VAE_SOURCES) + 2)
def get_vae(settings: Settings, choice: str, exact: bool) -> sd_parts.AutoencoderKL:
    dtype = torch.float32 if exact else sd_parts.fast_dtype("cpu")
    if settings.random:
        config = random_config(RANDOM_VAES[settings.weights], choice, "VAE", settings.weights)
        torch.manual_seed(0)
        return sd_parts.AutoencoderKL(config).eval().requires_grad_(False).to(dtype)
    source, subfolder = vae_source(choice)
    return HUB.load(source, lambda: sd_parts.load_vae(source, subfolder=subfolder, dtype=dtype),
                    f"the VAE {choice!r}")


# Each tiny autoencoder is 2.4 M parameters (10 MB in float32): all of them fit, in both modes.
@functools.lru_cache(maxsize=2 * len(TINY_VAE_SOURCES))
def get_tiny_vae(settings: Settings, choice: str, exact: bool) -> sd_parts.AutoencoderTiny:
    dtype = torch.float32 if exact else sd_parts.fast_dtype("cpu")
    if settings.random:
        config = random_config(RANDOM_TINY_VAES[settings.weights], choice, "tiny autoencoder",
                               settings.weights)
        torch.manual_seed(0)
        return sd_parts.AutoencoderTiny(config).eval().requires_grad_(False).to(dtype)
    source = TINY_VAE_SOURCES.get(choice)
    if source is None:
        raise loading.ModelUnavailable(f"No tiny autoencoder is called {choice!r}; the choices "
                                       f"are {', '.join(TINY_VAE_SOURCES)}.")
    return HUB.load(source, lambda: sd_parts.load_tiny_vae(source, dtype=dtype),
                    f"the tiny autoencoder {choice!r}")


@functools.lru_cache(maxsize=1)
def get_text_encoder(settings: Settings) -> sd_parts.CLIPTextEncoder:
    if settings.random:
        torch.manual_seed(0)
        return sd_parts.CLIPTextEncoder(settings.clip_config).eval().requires_grad_(False)
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
        config = sd_parts.TINY_UNET if settings.weights == "tiny" else sd_parts.UNetConfig()
        torch.manual_seed(0)
        return sd_parts.UNet2DConditionModel(config).eval().requires_grad_(False).to(DEVICE,
                                                                                     dtype)
    return HUB.load(sd_parts.DEFAULT_REPO,
                    lambda: sd_parts.load_unet(sd_parts.DEFAULT_REPO, subfolder="unet",
                                               variant=UNET_VARIANT, dtype=dtype, device=DEVICE),
                    "the UNet")


@functools.lru_cache(maxsize=1)
def get_scheduler_config(settings: Settings) -> sd_parts.SchedulerConfig:
    if settings.random:
        return sd_parts.SchedulerConfig()  # SD v1.5's schedule
    return HUB.load(sd_parts.DEFAULT_REPO,
                    lambda: read_scheduler_config(sd_parts.DEFAULT_REPO, subfolder="scheduler"),
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

    def vae(self, choice: str, exact: bool) -> sd_parts.AutoencoderKL:
        return get_vae(self.settings, choice, exact)

    def tiny_vae(self, choice: str, exact: bool) -> sd_parts.AutoencoderTiny:
        return get_tiny_vae(self.settings, choice, exact)

    def text_encoder(self) -> sd_parts.CLIPTextEncoder:
        return get_text_encoder(self.settings)

    def tokenizer(self) -> sd_parts.CLIPTokenizer:
        return get_tokenizer(self.settings)

    @property
    def device(self) -> str:
        """Where the generation tab runs: a CUDA GPU when there is one, else the CPU."""
        return DEVICE

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
            self.tokenizer(), on_device(self.text_encoder()), get_unet(self.settings, exact),
            self.generation_vae(exact), self.scheduler_config())


def downloads(settings: Settings) -> list[loading.Download]:
    """What the first requests will need from the Hub: SD v1.5's VAE, text encoder and UNet,
    then what the comparison ticks at first (the last VAE of the menu and TAESD)."""
    if settings.random:
        return []
    first, last = settings.vae_choices[0], settings.vae_choices[-1]
    wanted = [loading.Download(f"the VAE ({first})", *vae_source(first), VAE_LAYOUT),
              loading.Download("the text encoder", settings.text_encoder, None,
                               TEXT_ENCODER_LAYOUT),
              loading.Download("the UNet", sd_parts.DEFAULT_REPO, "unet", UNET_LAYOUT,
                               UNET_VARIANT)]
    if last != first:
        wanted.append(loading.Download(f"the VAE ({last})", *vae_source(last), VAE_LAYOUT))
    taesd = settings.tiny_vae_choices[0]
    wanted.append(loading.Download(f"the tiny autoencoder ({taesd})", TINY_VAE_SOURCES[taesd],
                                   None, TINY_VAE_LAYOUT))
    return wanted


# ---------------------------------------------------------------------------------------------
# The page


def build_demo(settings: Settings) -> gr.Blocks:
    models = Models(settings)
    # The example images are served from assets/ as they are. Copies in Gradio's cache would be
    # removed by delete_cache after cache_max_age, and the examples would then stop working.
    gr.set_static_paths([image.ASSETS])
    # No telemetry: Gradio would otherwise report each start to its own servers.
    with gr.Blocks(title="Inside Stable Diffusion v1", delete_cache=settings.delete_cache,
                   analytics_enabled=False) as demo:
        gr.Markdown("# Inside Stable Diffusion v1\nWatch the UNet and a scheduler denoise a "
                    "latent into an image, step by step; see how the VAE turns an image into a "
                    "latent and back, and compare the Stable Diffusion family's VAEs on it; see "
                    "how CLIP reads a prompt, and what prompt habits do to its embeddings.")
        # the VAE's two tabs, CLIP's two, then the whole loop
        with gr.Tab(image.TITLE):
            image.build(models)
        with gr.Tab(compare.TITLE):
            compare.build(models)
        with gr.Tab(prompt.TITLE) as prompt_tab:
            prompt.build(models, prompt_tab)
        with gr.Tab(prompt_lab.TITLE) as lab_tab:
            prompt_lab.build(models, lab_tab)
        with gr.Tab(generate.TITLE):
            generate.build(models)
        with gr.Tab(how_it_works.TITLE):
            how_it_works.build()
    demo.queue(max_size=settings.queue_size)
    return demo


loading.configure_timeouts()
SETTINGS = parse_settings(sys.argv[1:] if __name__ == "__main__" else [])
demo = build_demo(SETTINGS)

if __name__ == "__main__":
    loading.start_prefetch(downloads(SETTINGS), HUB)
    server.launch(demo)
