"""What an add-on changed in the model's weights: the UNet drawn as the UNet view draws it and the
text encoder's layers, each block coloured by how much its weights moved, and a table of the
layers that moved most.

The measure is the relative Frobenius norm of the change, ||ΔW|| / ||W||: for a fine-tune
ΔW = W_new - W_base, for a LoRA its effective change scale · (alpha / r) · B A (Hu et al., "LoRA",
2021), computed by ``sd_parts.lora.lora_deltas`` without touching the model. A block's number is
the same measure over all its weights at once, sqrt(Σ ||ΔW_i||²) / sqrt(Σ ||W_i||²), so a block
where a LoRA touched 4 of 40 layers reads smaller than one of those layers. Colours are log10 of
the measure (a fine-tune moves layers by 1e-4 to 1e-1); unchanged blocks are grey. The geometry
of the UNet is ``viz.unet.diagram_slots``'s, one tile per block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd_parts.lora import block_of
from sd_parts.unet_probe import UNetBlock
from sd_parts.weight_changes import layer_kind
from viz.heatmap import (
    GAP,
    INK,
    MASKED,
    Picture,
    add_colorbar,
    add_title,
    colorize,
    drawable,
    font,
    heatmap,
)
from viz.unet import FLOW, SKIP, diagram_slots, short_name, skip_pairs

CHANGE_CMAP = "plasma"  # log10 of ||ΔW|| / ||W||
PARTS = {"unet": "UNet", "text_encoder": "text encoder"}
# the measure and the kind first, so a narrow page shows them before it scrolls sideways
TABLE_HEADERS = ["rank", "||ΔW|| / ||W||", "what it is", "part", "layer", "||ΔW||", "||W||"]
BLOCK_HEADERS = ["part", "block", "||ΔW|| / ||W||", "layers changed", "layers"]


@dataclass(frozen=True)
class LayerChange:
    """One weight's change: its norms and what the layer is."""

    part: str  # "unet" or "text_encoder"
    name: str  # the parameter in its part: "down_blocks.0.resnets.0.conv1.weight"
    weight_norm: float  # ||W|| (Frobenius)
    change_norm: float  # ||ΔW||
    kind: str  # sd_parts.weight_changes.layer_kind

    @property
    def relative(self) -> float:
        if self.weight_norm:
            return self.change_norm / self.weight_norm
        return 0.0 if self.change_norm == 0 else math.inf


@dataclass(frozen=True)
class BlockChange:
    relative: float  # over all the block's weights
    changed: int  # how many of its weights changed at all
    layers: int  # how many weights it has


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach().double()))


def weight_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """||W|| of every floating-point tensor of a state dict."""
    return {name: _norm(t) for name, t in state.items() if t.is_floating_point()}


def state_changes(part: str, base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
                  ) -> list[LayerChange]:
    """Every floating-point weight of two state dicts of one model, base order. Both must have
    the same names and shapes (a fine-tune of this architecture), or a message names the odd
    ones."""
    only = sorted(set(base) ^ set(new))
    shapes = sorted(n for n in base if n in new and base[n].shape != new[n].shape)
    if only or shapes:
        named = [f"names in only one of them: {', '.join(only[:6])}" if only else "",
                 f"different shapes: {', '.join(shapes[:6])}" if shapes else ""]
        raise ValueError(f"the second {PARTS[part]} is not of this architecture: "
                         + "; ".join(filter(None, named)))
    return [LayerChange(part, name, _norm(weight),
                        _norm(new[name].detach().to(weight.device).double() - weight.double()),
                        layer_kind(name))
            for name, weight in base.items() if weight.is_floating_point()]


def delta_changes(part: str, weights: Mapping[str, torch.Tensor],
                  deltas: Mapping[str, torch.Tensor]) -> list[LayerChange]:
    """The changes ``deltas`` (name -> ΔW) would make to ``weights`` (name -> W)."""
    return [LayerChange(part, name, _norm(weights[name]), _norm(delta), layer_kind(name))
            for name, delta in deltas.items()]


def block_name(part: str, name: str) -> str:
    """The block a parameter belongs to: ``down_blocks.1``, ``mid_block``, ``layers.3``,
    ``embeddings``, ``final_layer_norm``."""
    return block_of(name.rsplit(".", 1)[0] if name.count(".") else name)


def block_changes(changes: Iterable[LayerChange], norms: Mapping[str, float], part: str
                  ) -> dict[str, BlockChange]:
    """Each block of ``part``: the relative change over all its weights (``norms``: ||W|| of
    every weight of the part, changed or not), and how many of them changed."""
    moved: dict[str, list[float]] = {}
    for change in changes:
        if change.part == part:
            moved.setdefault(block_name(part, change.name), []).append(change.change_norm)
    sizes: dict[str, list[float]] = {}
    for name, norm in norms.items():
        sizes.setdefault(block_name(part, name), []).append(norm)
    blocks = {}
    for block, weights in sizes.items():
        changed = moved.get(block, [])
        total = math.sqrt(sum(n * n for n in weights))
        change = math.sqrt(sum(n * n for n in changed))
        blocks[block] = BlockChange(change / total if total else 0.0,
                                    sum(n > 0 for n in changed), len(weights))
    return blocks


def log_limits(values: Iterable[float]) -> tuple[float, float]:
    """The colour scale's ends, log10, over the values that are not 0."""
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    if not logs:
        return -6.0, 0.0
    low, high = min(logs), max(logs)
    return (low, high) if high - low > 1e-6 else (low - 0.5, high + 0.5)


def change_colour(value: float, limits: tuple[float, float]) -> np.ndarray:
    """The colour a relative change is drawn in: log10 on the scale ``limits``; 0 is grey."""
    if value <= 0:
        return np.array(MASKED, dtype=np.uint8)
    return colorize(np.array([[math.log10(value)]]), CHANGE_CMAP, *limits)[0, 0]


def ink_on(colour: np.ndarray) -> tuple[int, int, int]:
    """Black or white, whichever reads on ``colour``."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return INK if luminance > 128 else (255, 255, 255)


def short(value: float) -> str:
    return "0" if value == 0 else f"{value:.2e}"


def unet_change_diagram(blocks: Sequence[UNetBlock], changes: Mapping[str, BlockChange],
                        limits: tuple[float, float], title: str) -> Picture:
    """The UNet's blocks in the diagram's places (``viz.unet.diagram_slots``), each tile
    coloured by its block's relative change, the number and the count of changed layers
    written in it; the data flow in grey, the skip connections in orange. ``maps``: one 1 x 1
    box per block, in ``blocks``' order."""
    slots = diagram_slots(blocks, {b.path: (b.channels, 1, 1) for b in blocks})
    right = max(s.left + s.width for s in slots) + GAP
    bottom = max(s.top + s.height for s in slots) + GAP
    image = Image.new("RGB", (right, bottom), "white")
    draw = ImageDraw.Draw(image)
    by_path = {s.path: s for s in slots}
    for a, b in zip(slots, slots[1:], strict=False):
        ya, yb = (s.box.top + s.box.cell_height / 2 for s in (a, b))
        draw.line([(a.left + a.width, ya), (b.left, yb)], fill=FLOW, width=2)
    lanes: dict[int, int] = {}
    for source, target in skip_pairs(blocks):
        a, b = by_path[source], by_path[target]
        lane = lanes[a.top] = lanes.get(a.top, -1) + 1
        y = a.top - 8 - 10 * lane
        x0, x1 = a.left + a.width / 2 + 6 * lane, b.left + b.width / 2 - 6 * lane
        draw.line([(x0, a.top), (x0, y), (x1, y), (x1, a.top)], fill=SKIP, width=2)
    small = font(11)
    for block, slot in zip(blocks, slots, strict=True):
        change = changes.get(block.path, BlockChange(0.0, 0, 0))
        colour = change_colour(change.relative, limits)
        box = slot.box
        draw.rectangle([box.left, box.top, box.left + box.cell_width - 1,
                        box.top + box.cell_height - 1], fill=tuple(int(c) for c in colour))
        centre = (box.left + box.cell_width / 2, box.top + box.cell_height / 2)
        draw.text(centre, short(change.relative), font=font(12), fill=ink_on(colour),
                  anchor="mm")
        lines = [short_name(block.path), block.path, f"{change.changed} of {change.layers} "
                 "layers changed"]
        for i, line in enumerate(lines):
            draw.text((slot.left, slot.top + 2 + 14 * i), drawable(line), font=small, fill=INK)
    picture = Picture(np.asarray(image), tuple(s.box for s in slots))
    picture = add_colorbar(picture, CHANGE_CMAP, limits, "log10 of ||ΔW|| / ||W||")
    return add_title(picture, title)


def text_encoder_change_view(changes: Mapping[str, BlockChange], n_layers: int,
                             limits: tuple[float, float]) -> Picture:
    """The text encoder as one row: its embeddings, layers 0..n-1 and the final LayerNorm, each
    cell coloured (log10) by its relative change and the number written in it; grey: unchanged.
    """
    names = ["embeddings", *[f"layers.{i}" for i in range(n_layers)], "final_layer_norm"]
    labels = ["embeddings", *[f"layer {i}" for i in range(n_layers)], "final norm"]
    values = np.array([[changes.get(n, BlockChange(0.0, 0, 0)).relative for n in names]])
    unchanged = values <= 0
    logs = np.log10(np.where(unchanged, 1.0, values))
    cell = (44, 64)
    picture = heatmap(logs, CHANGE_CMAP, limits, cell, (), labels, annotate="{:.1e}",
                      numbers=values, mask=unchanged)
    picture = add_colorbar(picture, CHANGE_CMAP, limits, "log10 of ||ΔW|| / ||W||")
    return add_title(picture, f"The text encoder's {n_layers} layers: ||ΔW|| / ||W|| per block "
                              "(grey: unchanged)")


def largest_changes(changes: Iterable[LayerChange], count: int = 20) -> list[list[object]]:
    """Rows for TABLE_HEADERS: the ``count`` weights with the largest relative change."""
    ranked = sorted((c for c in changes if c.change_norm > 0), key=lambda c: -c.relative)
    return [[rank, float(f"{c.relative:.4g}"), c.kind, PARTS[c.part], c.name,
             float(f"{c.change_norm:.4g}"), float(f"{c.weight_norm:.4g}")]
            for rank, c in enumerate(ranked[:count], start=1)]


def block_rows(blocks: Mapping[str, Mapping[str, BlockChange]]) -> list[list[object]]:
    """Rows for BLOCK_HEADERS: every block of every part, in the parts' own order."""
    return [[PARTS[part], block, float(f"{change.relative:.4g}"), change.changed, change.layers]
            for part, of_part in blocks.items() for block, change in of_part.items()]


def kinds_reading(changes: Sequence[LayerChange], total: int) -> str:
    """Which kinds of layer changed, how many of each, largest first: a sentence (``total``:
    the weights of the model, changed or not)."""
    by_kind: dict[str, list[float]] = {}
    for change in changes:
        if change.change_norm > 0:
            by_kind.setdefault(change.kind, []).append(change.relative)
    if not by_kind:
        return "No weight changed."
    parts = [f"{kind} ({len(values)}, up to {short(max(values))})"
             for kind, values in sorted(by_kind.items(), key=lambda kv: -max(kv[1]))]
    changed = sum(len(v) for v in by_kind.values())
    return f"{changed} of {total} weights changed: " + ", ".join(parts) + "."
