"""Look inside Stable Diffusion v1: a Gradio app over its VAE, CLIP, UNet and schedulers.

The entry point: the settings from the command line, the page built from the tabs in
``ui/tabs`` (one module each, in the page's order), and the launch. The models the tabs share
are in ``ui/models.py``; every picture, table and metric comes from a pure function in ``viz``.

    python app.py                     # real weights from the Hugging Face Hub (cached)
    python app.py --weights random    # full-size architecture, seeded random weights, offline
    python app.py --weights tiny      # tiny random models, for tests and development
"""

from __future__ import annotations

import argparse
import os
import sys

import gradio as gr

import sd_parts
from ui import encoding, loading, server
from ui.models import HUB, WEIGHTS, Models, Settings, downloads
from ui.sections import example_runs
from ui.tabs import addons, compare, generate, how_it_works, image, prompt, prompt_lab

# The page's tabs in order: the VAE's two, CLIP's two, the whole loop, what add-ons change to
# it, then the explainer.
TABS = (image, compare, prompt, prompt_lab, generate, addons, how_it_works)


def parse_settings(argv: list[str]) -> Settings:
    """Command-line flags, each defaulting to an environment variable (for Spaces)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Look inside Stable Diffusion v1. Each model comes from the Hugging Face Hub "
        "(cached after the first download) unless a local folder or file is given.")
    parser.add_argument("--weights", choices=WEIGHTS, default=env("SD_PARTS_WEIGHTS", "hub"),
                        help="hub: the real checkpoints; random: the full-size architectures "
                        "with seeded random weights, offline; tiny: tiny random models")
    parser.add_argument("--vae", default=env("SD_PARTS_VAE"),
                        help="a repo id or folder whose VAE replaces the menu of VAEs")
    parser.add_argument("--text-encoder", default=env("SD_PARTS_TEXT_ENCODER",
                                                      sd_parts.DEFAULT_REPO),
                        help="a repo id or folder with CLIP's text encoder (at its top or in "
                        "text_encoder/)")
    parser.add_argument("--tokenizer", default=env("SD_PARTS_TOKENIZER"),
                        help="a repo id or folder with vocab.json and merges.txt (default: the "
                        "vocabulary bundled with sd_parts)")
    parser.add_argument("--unet", default=env("SD_PARTS_UNET", sd_parts.DEFAULT_REPO),
                        help="a repo id or folder with the UNet (at its top or in unet/); a "
                        "pipeline folder's scheduler/ is read too")
    parser.add_argument("--pipeline", default=env("SD_PARTS_PIPELINE"),
                        help="one .safetensors checkpoint in the LDM layout (AUTOMATIC1111's, "
                        "ComfyUI's) that holds the UNet, the VAE and the text encoder")
    parser.add_argument("--default-size", type=int, choices=encoding.SIZES,
                        default=int(env("SD_PARTS_DEFAULT_SIZE", "384")),
                        help="the image tab's longer side at start, in pixels")
    parser.add_argument("--queue-size", type=int, default=int(env("SD_PARTS_QUEUE_SIZE", "16")),
                        help="requests that may wait; one more is told the app is busy")
    parser.add_argument("--cache-max-age", type=int,
                        default=int(env("SD_PARTS_CACHE_MAX_AGE", "3600")),
                        help="seconds an upload or an output file is kept")
    parser.add_argument("--cache-dir", default=env("SD_PARTS_CACHE_DIR", default_cache_dir()),
                        help="where finished example runs are kept for every visitor and "
                        "restart ('' keeps none)")
    args = vars(parser.parse_args(argv))
    args["cache_dir"] = args["cache_dir"] or None
    return Settings(**args)


def default_cache_dir() -> str:
    """Spaces' persistent storage when the Space has it, else the user's cache folder."""
    if os.path.isdir("/data") and os.access("/data", os.W_OK):
        return "/data/sd-parts"
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "sd-parts")


def build_demo(settings: Settings) -> gr.Blocks:
    models = Models(settings)
    # The example images are served from assets/ as they are. Copies in Gradio's cache would be
    # removed by delete_cache after cache_max_age, and the examples would then stop working.
    gr.set_static_paths([encoding.ASSETS])
    # No telemetry: Gradio would otherwise report each start to its own servers.
    with gr.Blocks(title="Inside Stable Diffusion v1", delete_cache=settings.delete_cache,
                   analytics_enabled=False) as demo:
        gr.Markdown("# Inside Stable Diffusion v1\nWatch the UNet and a scheduler denoise a "
                    "latent into an image, step by step; see how the VAE turns an image into a "
                    "latent and back, and compare the Stable Diffusion family's VAEs on it; see "
                    "how CLIP reads a prompt, and what prompt habits do to its embeddings.")
        for module in TABS:
            with gr.Tab(module.TITLE) as tab:
                module.build(models, tab)
    demo.queue(max_size=settings.queue_size)
    return demo


loading.configure_timeouts()
SETTINGS = parse_settings(sys.argv[1:] if __name__ == "__main__" else [])
demo = build_demo(SETTINGS)

if __name__ == "__main__":
    loading.start_prefetch(downloads(SETTINGS), HUB)
    server.launch(demo, prevent_thread_lock=True)
    example_runs.start_waiting(SETTINGS)  # the generation tab's first view, made once
    demo.block_thread()
