"""Tab "How it works": the pipeline of Stable Diffusion v1, with the parts this app runs marked."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ui.models import Models

TITLE = "How it works"
TEXT_FILE = Path(__file__).resolve().parents[1] / "how_it_works.md"
MODEL_CARDS = {
    "SD v1.5": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse",
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema",
    "CLIP ViT-L/14": "https://huggingface.co/openai/clip-vit-large-patch14",
}


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's text, inside an open ``gr.Blocks``."""
    gr.Markdown(TEXT_FILE.read_text(encoding="utf-8"))
    gr.Markdown("Model cards: " + " · ".join(f"[{name}]({url})"
                                             for name, url in MODEL_CARDS.items()))
