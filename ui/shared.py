"""What the tabs share: the download folder, the notes every tab shows, and how a failure looks.

A request that cannot be answered (an unreadable upload, a model that cannot be loaded) leaves
every output empty and puts one readable message in the tab's status box, rather than raising:
Gradio would mark each output box with a bare "Error" badge.
"""

from __future__ import annotations

import html
import re
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

import sd_parts
from viz.heatmap import Picture, pad

LABEL_ROOM = 30  # pixels: Gradio draws a component's label over the top-left of its picture

OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="sd-parts-"))


def output_path(name: str, max_age_s: int) -> Path:
    """A fresh file for a download; files older than max_age_s are removed first."""
    now = time.time()
    for old in OUTPUT_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > max_age_s:
                old.unlink()
        except FileNotFoundError:  # removed meanwhile by a request in another session
            pass
    return OUTPUT_DIR / f"{uuid.uuid4().hex[:12]}-{name}"


def random_banner(weights: str) -> str:
    return ("**Random weights: every output below is meaningless.** The architecture is real "
            f"({'full-size' if weights == 'random' else 'tiny'} configuration); start without "
            "`--weights` to use the real checkpoints.")


def mode_note(exact: bool) -> str:
    dtype = sd_parts.fast_dtype("cpu")
    if exact or dtype == torch.float32:
        why = "" if exact else " (this CPU has no fast bfloat16, so fast mode is float32 too)"
        return f"Exact mode: float32{why}."
    return "Fast mode: bfloat16 on this CPU. Tick *Exact mode* for float32 numerics."


def literal(text: str) -> str:
    """Text that Markdown shows as it is: markup, entities and emphasis marks are escaped.

    Messages quote what a visitor chose (a file name, the words of a prompt), and names such as
    HF_HUB_OFFLINE would otherwise turn italic.
    """
    return re.sub(r"([\\`*_\[\]~|#])", r"\\\1", html.escape(text, quote=False))


def failure(names: Iterable[str], status: str, message: str) -> dict[str, object]:
    """Every output empty but the status box, which says what went wrong and what to do."""
    return {name: None for name in names} | {status: literal(message)}


def shown(value: object) -> object:
    """A view as Gradio takes it: a Picture becomes its pixels, below a strip left free for the
    component's label; anything else stays as it is."""
    return pad(value, top=LABEL_ROOM).pixels if isinstance(value, Picture) else value
