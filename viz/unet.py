"""Pictures and tables of one UNet call seen from inside: the blocks drawn as the U of the diagram,
a block's channels, where self-attention looks, what a word reaches, how guidance grows through
the blocks, the timestep's offsets and the denoising loss of captions.

Ronneberger et al., "U-Net" (2015) for the shape: an encoder that halves the resolution, a
decoder that doubles it back, skip connections between levels of the same size. Every function is
pure: tensors from a ``sd_parts.UNetProbe`` in, ``Picture``s (Pillow-drawn arrays), tables and
numbers out. A block's picture is the per-position L2 norm of its output over channels,
||out[:, i, j]||, coloured with viridis from 0 to the block's own maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from sd_parts.unet_probe import UNetBlock
from viz.heatmap import (
    GAP,
    INK,
    Box,
    Picture,
    add_colorbar,
    add_title,
    arrange,
    colorize,
    drawable,
    enlarge,
    font,
    heatmap,
)
from viz.plot import add_axes, new_figure

NORM_CMAP = "viridis"  # block outputs: 0 to the block's largest position norm
CHANNEL_CMAP = "RdBu_r"  # a block's channels: signed, centred on 0
ATTENTION_CMAP = "inferno"  # attention maps, each to its own peak
TILE = 96  # pixels: the side a block's picture is enlarged to (at most)
SLOT = (TILE + 28, 62 + TILE)  # (width, height) of one block in the diagram: text, then picture
SPACING = 26  # pixels between the columns of the diagram
ROW_GAP = 44  # pixels above each level's row, where the skip arrows run
FLOW = (150, 150, 150)  # the arrows of the data flow, block to block
SKIP = (214, 96, 40)  # the skip connections
BAR = (60, 110, 180)  # the guidance bars
MARKER = (0, 255, 255)  # the query position on the self-attention maps


# ---------------------------------------------------------------------------------------------
# The blocks


def position_norms(output: torch.Tensor) -> np.ndarray:
    """(C, h, w) -> (h, w): the L2 norm over channels at every position, float64."""
    if output.ndim != 3:
        raise ValueError(f"a block output is (channels, h, w); got shape {tuple(output.shape)}")
    return output.double().norm(dim=0).numpy()


def level_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The (h, w) grid of every level: each stride-2 conv with padding 1 takes ceil(side / 2)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


def short_name(path: str) -> str:
    """The diagram's name of a top-level block: "encoder 1" for down_blocks.1, and so on."""
    kind, _, index = path.partition(".")
    names = {"down_blocks": "encoder", "up_blocks": "decoder", "mid_block": "bottleneck",
             "conv_in": "conv_in", "conv_out": "conv_out"}
    return f"{names.get(kind, kind)} {index}".strip()


@dataclass(frozen=True)
class Slot:
    """Where one block is drawn in the diagram: its rectangle and the box of its picture."""

    path: str
    top: int
    left: int
    height: int
    width: int
    box: Box  # the norm map's cells

    def contains(self, x: float, y: float) -> bool:
        return self.left <= x < self.left + self.width and self.top <= y < self.top + self.height


@dataclass(frozen=True)
class Diagram:
    picture: Picture
    slots: tuple[Slot, ...]

    def block_at(self, x: float, y: float) -> str | None:
        """The block drawn at pixel (x, y) of the picture, or None between blocks."""
        return next((slot.path for slot in self.slots if slot.contains(x, y)), None)


def diagram_slots(blocks: Sequence[UNetBlock], shapes: Mapping[str, tuple[int, ...]]
                  ) -> tuple[Slot, ...]:
    """The diagram's geometry: one column per block in forward order, one row per level (the
    latent's at the top), so the encoder goes down, the decoder up. It depends on the blocks and
    their output shapes (C, h, w) only, never on the numbers written in it."""
    width, height = SLOT
    slots = []
    for column, block in enumerate(blocks):
        _, h, w = shapes[block.path]
        cell = max(1, TILE // max(h, w))
        top = ROW_GAP + block.level * (height + ROW_GAP)
        left = GAP + column * (width + SPACING)
        box = Box(top + height - TILE + (TILE - h * cell) // 2,
                  left + (width - w * cell) // 2, h, w, cell, cell)
        slots.append(Slot(block.path, top, left, height, width, box))
    return tuple(slots)


def skip_pairs(blocks: Sequence[UNetBlock]) -> list[tuple[str, str]]:
    """(encoder block, decoder block) for every skip path the diagram draws: conv_in and each
    down block hand their outputs to the up block of the same level (the last up block takes
    conv_in's and down_blocks.0's)."""
    decoders = {b.level: b.path for b in blocks if b.path.startswith("up_blocks")}
    return [(b.path, decoders[b.level]) for b in blocks
            if b.path == "conv_in" or b.path.startswith("down_blocks")]


def _arrow_head(draw: ImageDraw.ImageDraw, tip: tuple[float, float], direction: tuple[float, float],
                colour: tuple[int, int, int]) -> None:
    dx, dy = direction
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    back = (tip[0] - 7 * ux, tip[1] - 7 * uy)
    draw.polygon([tip, (back[0] - 4 * uy, back[1] + 4 * ux), (back[0] + 4 * uy, back[1] - 4 * ux)],
                 fill=colour)


def unet_diagram(blocks: Sequence[UNetBlock], outputs: Mapping[str, torch.Tensor],
                 time_shares: Mapping[str, float] | None = None) -> Diagram:
    """The UNet as the diagram draws it, each block showing its output (one batch item,
    (C, h, w)) as the norm over channels at each position, its shape and its share of the call's
    time (a fraction; omitted where not given). Skip connections are orange arrows above the rows.
    """
    shapes = {b.path: tuple(outputs[b.path].shape) for b in blocks}
    slots = diagram_slots(blocks, shapes)
    right = max(s.left + s.width for s in slots) + GAP
    bottom = max(s.top + s.height for s in slots) + GAP
    image = Image.new("RGB", (right, bottom), "white")
    draw = ImageDraw.Draw(image)
    by_path = {s.path: s for s in slots}
    for a, b in zip(slots, slots[1:], strict=False):  # the data flow, block to block
        start = (a.left + a.width, a.box.top + a.box.rows * a.box.cell_height / 2)
        end = (b.left, b.box.top + b.box.rows * b.box.cell_height / 2)
        draw.line([start, end], fill=FLOW, width=2)
        _arrow_head(draw, end, (end[0] - start[0], end[1] - start[1]), FLOW)
    lanes: dict[int, int] = {}
    for source, target in skip_pairs(blocks):
        a, b = by_path[source], by_path[target]
        lane = lanes.get(a.top, 0)
        lanes[a.top] = lane + 1
        y = a.top - 8 - 10 * lane
        x0, x1 = a.left + a.width / 2 + 6 * lane, b.left + b.width / 2 - 6 * lane
        draw.line([(x0, a.top), (x0, y), (x1, y), (x1, a.top - 1)], fill=SKIP, width=2)
        _arrow_head(draw, (x1, a.top), (0, 1), SKIP)
    small = font(11)
    for block, slot in zip(blocks, slots, strict=True):
        output = outputs[block.path]
        norms = position_norms(output)
        peak = float(norms.max())
        tile = colorize(norms, NORM_CMAP, 0.0, peak if peak > 0 else 1.0)
        box = slot.box
        image.paste(Image.fromarray(enlarge(tile, box.cell_height, box.cell_width)),
                    (box.left, box.top))
        c, h, w = output.shape
        share = (time_shares or {}).get(block.path)
        name = short_name(block.path)
        lines = [*([name] if name != block.path else []), block.path, f"{c} x {h} x {w}",
                 "" if share is None else f"{100 * share:.1f}% of the time"]
        for i, line in enumerate(lines):
            draw.text((slot.left, slot.top + 2 + 14 * i), drawable(line), font=small, fill=INK)
    boxes = tuple(s.box for s in slots)
    return Diagram(Picture(np.asarray(image), boxes), slots)


def block_table(blocks: Sequence[UNetBlock], outputs: Mapping[str, torch.Tensor],
                time_shares: Mapping[str, float]) -> list[list[object]]:
    """One row per block: name, checkpoint path, shape, time share (%), L2 norm, rms."""
    rows = []
    for block in blocks:
        output = outputs[block.path].double()
        rows.append([short_name(block.path), block.path,
                     " x ".join(str(s) for s in output.shape),
                     round(100 * time_shares.get(block.path, 0.0), 2),
                     significant(output.norm()), significant(output.pow(2).mean().sqrt())])
    return rows


# ---------------------------------------------------------------------------------------------
# One block


def channel_grid(output: torch.Tensor, shown: int = 64, columns: int = 16) -> Picture:
    """The first ``shown`` channels of a block output (C, h, w), each a heat map on one signed
    scale (plus and minus the largest |value| among them), titled with its index."""
    if output.ndim != 3:
        raise ValueError(f"a block output is (channels, h, w); got shape {tuple(output.shape)}")
    channels = output[:shown].double().numpy()
    limit = float(np.abs(channels).max()) or 1.0
    cell = max(1, 48 // max(channels.shape[1:]))
    maps = [heatmap(values, CHANNEL_CMAP, (-limit, limit), (cell, cell), title=f"ch {i}")
            for i, values in enumerate(channels)]
    return add_colorbar(arrange(maps, columns, gap=4), CHANNEL_CMAP, (-limit, limit),
                        "channel value")


def channel_statistics(output: torch.Tensor) -> list[list[float]]:
    """Per channel of (C, h, w): [channel, mean, std, min, max] over the positions."""
    flat = output.double().flatten(1)
    stats = torch.stack([flat.mean(1), flat.std(1, unbiased=False), flat.min(1).values,
                         flat.max(1).values], dim=1)
    return [[i, *map(significant, row)] for i, row in enumerate(stats)]


def significant(value: float | torch.Tensor, digits: int = 5) -> float:
    """A number rounded to ``digits`` significant digits, for tables a person reads."""
    return float(f"{float(value):.{digits}g}")


def skip_split(hidden: torch.Tensor, skip: torch.Tensor) -> tuple[float, float, float]:
    """A decoder resnet's input is cat(hidden from below, skip): (||hidden||, ||skip||, the
    skip's share of the squared norm of the whole input)."""
    below, across = float(hidden.double().norm()), float(skip.double().norm())
    total = below**2 + across**2
    return below, across, across**2 / total if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Attention over the image


def overlay(image: np.ndarray, values: np.ndarray, side: int) -> np.ndarray:
    """An attention map (h, w) resized bilinearly onto ``image`` (H, W, 3) shrunk to ``side``
    pixels on its longer side, scaled to its own peak and blended over it."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float64)
    resized = F.interpolate(torch.as_tensor(values, dtype=torch.float64)[None, None],
                            size=(size[1], size[0]), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    peak = float(resized.max())
    colours = colorize(resized, ATTENTION_CMAP, 0.0, peak if peak > 0 else 1.0)
    return (0.4 * base + 0.6 * colours).astype(np.uint8)


def attention_grid(image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
                   marker: tuple[float, float] | None = None, columns: int = 4,
                   side: int = 160) -> Picture:
    """Attention maps over the image, titled, in a grid: ``maps`` (title, (h, w) values), each
    to its own peak. ``marker`` (x, y) as fractions of the image's width and height: a cross
    where the query is."""
    pictures = []
    for title, values in maps:
        blended = overlay(image, np.asarray(values, dtype=np.float64), side)
        if marker is not None:
            blended = blended.copy()
            h, w = blended.shape[:2]
            x, y = int(marker[0] * w), int(marker[1] * h)
            x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
            blended[max(0, y - 6):y + 7, x] = MARKER
            blended[y, max(0, x - 6):x + 7] = MARKER
        box = Box(0, 0, blended.shape[0], blended.shape[1], 1, 1)
        pictures.append(add_title(Picture(blended, (box,)), title, size=12))
    return add_colorbar(arrange(pictures, columns, gap=10), ATTENTION_CMAP, (0.0, 1.0),
                        "share of the map's peak", ticks=(0.0, 0.5, 1.0))


def self_attention_maps(rows: Mapping[str, torch.Tensor], sizes: Mapping[str, tuple[int, int]]
                        ) -> list[tuple[str, np.ndarray]]:
    """Every attn1 layer's probabilities of one query (heads, h_l * w_l), averaged over heads
    and laid out on the layer's own grid: (title, (h_l, w_l))."""
    maps = []
    for path, probs in rows.items():
        h, w = sizes[path]
        maps.append((layer_title(path, (h, w)), probs.double().mean(0).reshape(h, w).numpy()))
    return maps


def layer_title(path: str, size: tuple[int, int]) -> str:
    """"down_blocks.1.attentions.0 (16x16)" for ...attentions.0.transformer_blocks.0.attn1."""
    return f"{path.split('.transformer_blocks')[0]} ({size[0]}x{size[1]})"


def word_maps(probs: Mapping[str, torch.Tensor], sizes: Mapping[str, tuple[int, int]],
              positions: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """Every attn2 layer's attention to a word: (heads, h_l * w_l, T) probabilities, averaged
    over heads and summed over the word's context positions, on the layer's grid."""
    maps = []
    for path, layer in probs.items():
        h, w = sizes[path]
        values = layer[:, :, list(positions)].double().sum(-1).mean(0).reshape(h, w)
        maps.append((layer_title(path, (h, w)), values.numpy()))
    return maps


def head_maps(probs: torch.Tensor, size: tuple[int, int], positions: Sequence[int]
              ) -> list[tuple[str, np.ndarray]]:
    """One attn2 layer's (heads, h*w, T) attention to a word, head by head."""
    h, w = size
    values = probs[:, :, list(positions)].double().sum(-1).reshape(-1, h, w)
    return [(f"head {i}", head.numpy()) for i, head in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# Guidance and the timestep


def guidance_ratios(outputs: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """||out_text - out_uncond|| / ||out_uncond|| for each block output (2, C, h, w), the batch
    being [unconditional, text] as the pipeline runs it."""
    ratios = {}
    for path, output in outputs.items():
        uncond, text = output.double()
        norm = float(uncond.norm())
        ratios[path] = float((text - uncond).norm()) / norm if norm > 0 else float("nan")
    return ratios


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, length: int = 320,
              bar: int = 16) -> Picture:
    """Horizontal bars, the longest ``length`` pixels, each labelled with its value. The one box
    of the picture has one row per bar (cell: bar height x full length)."""
    values = [float(v) for v in values]
    peak = max((v for v in values if np.isfinite(v)), default=0.0) or 1.0
    size = 12
    left = max(font(size).getlength(drawable(label)) for label in labels) + GAP
    left = int(left) + 1
    top = font(13).size + GAP
    width = left + length + GAP + 70
    image = Image.new("RGB", (width, top + bar * len(values) + GAP), "white")
    draw = ImageDraw.Draw(image)
    draw.text((0, 0), drawable(title), font=font(13), fill=INK)
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * bar
        draw.text((left - GAP // 2, y + bar / 2), drawable(label), font=font(size), fill=INK,
                  anchor="rm")
        filled = bar_length(value, peak, length)
        if filled:
            draw.rectangle([left, y + 2, left + filled - 1, y + bar - 3], fill=BAR)
        draw.text((left + filled + 4, y + bar / 2), f"{value:.3g}", font=font(size), fill=INK,
                  anchor="lm")
    return Picture(np.asarray(image), (Box(top, left, len(values), 1, bar, length),))


def bar_length(value: float, peak: float, length: int) -> int:
    """The pixels a bar of ``value`` fills when ``peak`` fills ``length``."""
    return 0 if not np.isfinite(value) or value <= 0 else int(round(value / peak * length))


def timestep_strips(sinusoids: torch.Tensor, embedding: torch.Tensor, t: float) -> Picture:
    """The sinusoidal embedding of timestep t (D,) and what the MLP makes of it (E,), each a
    one-row heat map on its own signed scale."""
    pictures = []
    for name, values in (("sinusoids (time_proj)", sinusoids),
                         ("time_embedding MLP output", embedding)):
        row = values.double().reshape(1, -1).numpy()
        limit = float(np.abs(row).max()) or 1.0
        cell_w = max(1, 640 // row.shape[1])
        pictures.append(heatmap(row, CHANNEL_CMAP, (-limit, limit), (18, cell_w),
                                title=f"{name}, t = {t:g}: {row.shape[1]} numbers, "
                                      f"|max| {limit:.3g}"))
    return arrange(pictures, 1)


def offset_table(names: Sequence[str], timesteps: Sequence[float], ratios: np.ndarray) -> Picture:
    """||time offset|| / ||features it is added to|| per residual block (rows) and t (columns)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    peak = float(np.nanmax(ratios)) if ratios.size else 1.0
    return heatmap(ratios, NORM_CMAP, (0.0, peak or 1.0), (16, 56), row_labels=list(names),
                   column_labels=[f"t={t:g}" for t in timesteps], annotate="{:.3f}",
                   title="How far each residual block's timestep offset moves its features")


def time_offsets(offsets: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor]
                 ) -> dict[str, float]:
    """For each resnet: the offset (C,) is added at every position of its conv1 output (C, h, w):
    ||offset broadcast|| / ||conv1 output|| = sqrt(h w) ||offset|| / ||features||."""
    ratios = {}
    for path, offset in offsets.items():
        feature = features[path].double()
        positions = feature.shape[-1] * feature.shape[-2]
        norm = float(feature.norm())
        ratios[path] = math.sqrt(positions) * float(offset.double().norm()) / norm \
            if norm > 0 else float("nan")
    return ratios


# ---------------------------------------------------------------------------------------------
# The denoising loss


def loss_figure(timesteps: Sequence[float], losses: Mapping[str, Sequence[float]]) -> Figure:
    """The denoising loss ||eps - eps_theta(x_t, t, caption)||^2 (mean per element) against t,
    one line per caption ("" is the empty prompt)."""
    figure = new_figure(6.4, 3.4)
    axes = add_axes(figure, 0.7, 0.55, 4.0, 2.6)
    for caption, values in losses.items():
        label = caption if caption else "(empty prompt)"
        axes.plot(list(timesteps), list(values), marker="o", markersize=3,
                  label=label[:40] + ("..." if len(label) > 40 else ""))
    axes.set_xlabel("timestep t")
    axes.set_ylabel("denoising loss (MSE)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return figure


def rank_captions(losses: Mapping[str, Sequence[float]]) -> list[list[object]]:
    """[rank, caption, mean loss, its difference from the empty prompt's] by mean loss, lowest
    (the caption that explains the image best) first."""
    means = {caption: float(np.mean(values)) for caption, values in losses.items() if values}
    empty = means.get("")
    ordered = sorted(means.items(), key=lambda item: item[1])
    return [[rank + 1, caption or "(empty prompt)", mean,
             None if empty is None else mean - empty]
            for rank, (caption, mean) in enumerate(ordered)]
