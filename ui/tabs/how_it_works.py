"""Tab "How it works": the pipeline of Stable Diffusion v1, with the parts this app runs marked.

The text is ``ui/how_it_works.md``; where it names a sampler family (``{multistep}``), the
family's samplers are filled in from ``sd_parts.schedulers.SAMPLERS``, so a sampler added there
is named here too.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from sd_parts.schedulers import SAMPLERS
from sd_parts.schedulers.registry import FAMILIES
from ui.models import Models

TITLE = "How it works"
TEXT_FILE = Path(__file__).resolve().parents[1] / "how_it_works.md"
MODEL_CARDS = {
    "SD v1.5": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse",
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema",
    "CLIP ViT-L/14": "https://huggingface.co/openai/clip-vit-large-patch14",
}


def text() -> str:
    """The tab's Markdown, each family's placeholder replaced by the names of its samplers."""
    members = {family: ", ".join(info.label for info in SAMPLERS.values()
                                 if info.family == family) for family in FAMILIES}
    # only a family's name in braces: the equations' subscripts, x_{i+1}, stay as they are
    placeholder = re.compile(r"\{(" + "|".join(map(re.escape, FAMILIES)) + r")\}")
    return placeholder.sub(lambda match: members[match[1]],
                           TEXT_FILE.read_text(encoding="utf-8"))


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's text, inside an open ``gr.Blocks``."""
    gr.Markdown(text())
    gr.Markdown("Model cards: " + " · ".join(f"[{name}]({url})"
                                             for name, url in MODEL_CARDS.items()))
