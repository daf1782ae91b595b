"""Heat maps drawn straight from arrays: a colour-map lookup, nearest-neighbour cells, Pillow text.

A matplotlib figure spends most of its time laying out and rasterizing text; a labelled heat map
drawn here takes a few milliseconds instead of about a hundred, which is what lets a view answer
as fast as the model it shows. Every cell is a block of identical pixels whose colour is the
colour map's entry for the value, so the drawn data can be read back exactly (``Picture.maps``
says where each map's cells are). Pictures are composed: ``heatmap`` draws one map with its labels,
``arrange`` puts several side by side, ``add_colorbar`` and ``add_title`` extend a picture.

Colour maps are matplotlib's (looked up once as 256-entry tables); the font is the DejaVu Sans
that matplotlib ships, and characters it cannot draw are written as their code point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_FILE = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
MASKED = (217, 217, 217)  # cells with no value (the future in causal attention): light grey
INK = (20, 20, 20)
GAP = 8  # pixels between a map and its labels, and between pictures


@dataclass(frozen=True)
class Box:
    """Where a heat map's cells are in a picture, in pixels, and the size of one cell."""

    top: int
    left: int
    rows: int
    columns: int
    cell_height: int
    cell_width: int

    def moved(self, down: int, right: int) -> Box:
        return replace(self, top=self.top + down, left=self.left + right)

    def cells(self, pixels: np.ndarray) -> np.ndarray:
        """The colour of every cell, (rows, columns, 3): the centre pixel of each block."""
        ys = self.top + np.arange(self.rows) * self.cell_height + self.cell_height // 2
        xs = self.left + np.arange(self.columns) * self.cell_width + self.cell_width // 2
        return pixels[np.ix_(ys, xs)]


@dataclass(frozen=True)
class Picture:
    """An RGB drawing (H, W, 3) uint8 and the boxes of the heat maps drawn in it, in order."""

    pixels: np.ndarray
    maps: tuple[Box, ...] = ()


# ---------------------------------------------------------------------------------------------
# Colours and fonts


@lru_cache(maxsize=16)
def colormap_table(name: str) -> np.ndarray:
    """matplotlib's colour map ``name`` as a (256, 3) uint8 table."""
    colours = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.rint(colours * 255).astype(np.uint8)


def colorize(
    values: np.ndarray, cmap: str, low: float, high: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Values (h, w) to colours (h, w, 3) uint8: ``low`` is the map's first entry, ``high`` its
    last, values outside are clipped; masked and NaN cells are light grey."""
    values = np.asarray(values, dtype=np.float64)
    scaled = (values - low) / max(high - low, 1e-12)
    index = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = colormap_table(cmap)[index]
    hidden = np.isnan(values) if mask is None else (np.asarray(mask, dtype=bool) | np.isnan(values))
    rgb[hidden] = MASKED
    return rgb


def enlarge(rgb: np.ndarray, cell_height: int, cell_width: int) -> np.ndarray:
    """Every pixel as a block of cell_height x cell_width identical pixels (nearest neighbour),
    in a new array.

    The columns are repeated first, on the picture before it grows taller: repeating along
    columns copies one 3-byte pixel at a time, repeating rows copies whole rows. In that order
    a 76 x 72 picture enlarged 10 times takes 0.3-0.4 ms, rows first about 2 ms (``python -m
    timeit``, both side by side on an AVX2-only AMD EPYC).
    """
    return np.repeat(np.repeat(rgb, cell_width, axis=1), cell_height, axis=0)


class RememberingFont(ImageFont.FreeTypeFont):
    """A FreeType font that renders each text once: the glyph masks ``ImageDraw.text`` asks for
    are kept and handed out again, so labels drawn in every view of an answer (the tokens, the
    ticks) cost one rendering, not one per view. FreeType hinting a glyph takes most of a
    labelled picture's time; a kept mask is the very bitmap FreeType would draw again, so the
    pixels are the same."""

    KEPT = 20_000  # masks per font size before starting afresh (a mask is a few hundred bytes)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._masks: dict[tuple, tuple] = {}
        self._lengths: dict[tuple, float] = {}

    def getmask2(self, text, mode="", *args, **kwargs):  # noqa: ANN001, ANN201 (Pillow's own)
        try:
            key = (text, mode, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # a list of OpenType features, say: render it anew
            return super().getmask2(text, mode, *args, **kwargs)
        if key not in self._masks:
            if len(self._masks) >= self.KEPT:
                self._masks.clear()
            self._masks[key] = super().getmask2(text, mode, *args, **kwargs)
        return self._masks[key]

    def getlength(self, text, mode="", *args, **kwargs):  # noqa: ANN001, ANN201 (Pillow's own)
        try:
            key = (text, mode, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return super().getlength(text, mode, *args, **kwargs)
        if key not in self._lengths:
            if len(self._lengths) >= self.KEPT:
                self._lengths.clear()
            self._lengths[key] = super().getlength(text, mode, *args, **kwargs)
        return self._lengths[key]


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    return RememberingFont(str(FONT_FILE), size)


@lru_cache(maxsize=1)
def _drawable_codepoints() -> frozenset[int]:
    from fontTools.ttLib import TTFont  # a matplotlib dependency; read once

    return frozenset(TTFont(str(FONT_FILE)).getBestCmap())


def drawable(text: str) -> str:
    """``text`` with every character the font has no glyph for written as ``U+XXXX``."""
    known = _drawable_codepoints()
    return "".join(c if ord(c) in known or c == " " else f"U+{ord(c):04X}" for c in text)


def text_width(texts: Sequence[str], size: int) -> int:
    return int(max((font(size).getlength(drawable(t)) for t in texts), default=0.0)) + 1


def _contrast(rgb: np.ndarray) -> tuple[int, int, int]:
    """Black or white, whichever reads better on a cell of this colour."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (255, 255, 255) if luminance < 128 else (0, 0, 0)


def _rotated_labels(labels: Sequence[str], step: int, size: int) -> Image.Image:
    """Labels written upwards, one every ``step`` pixels along x, right-aligned to the top edge."""
    width = text_width(labels, size)
    strip = Image.new("RGB", (width, step * len(labels)), "white")
    draw = ImageDraw.Draw(strip)
    for i, label in enumerate(labels):
        if label:  # an empty label draws nothing (most of the embeddings' 768 columns)
            draw.text((width, i * step + step / 2), drawable(label), font=font(size), fill=INK,
                      anchor="rm")
    return strip.transpose(Image.Transpose.ROTATE_90)  # one rotation for all the labels


# ---------------------------------------------------------------------------------------------
# Pictures


def label_size(cell: int) -> int:
    """A label font size in pixels that fits a row or column of ``cell`` pixels (7 to 13)."""
    return int(min(max(cell - 2, 7), 13))


def heatmap(
    values: np.ndarray,
    cmap: str,
    limits: tuple[float, float],
    cell: tuple[int, int],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    title: str = "",
    annotate: str = "",
    numbers: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    fade_from: int | None = None,
) -> Picture:
    """One heat map: (rows, columns) values as cells of ``cell`` = (height, width) pixels.

    Labels go left of the rows and below the columns (written upwards); an empty label leaves its
    row or column unlabelled. ``annotate`` is a format such as ``"{:.2f}"`` for the number written
    in each cell: the value itself, or the same cell of ``numbers``. Masked cells are grey. Rows
    from ``fade_from`` on are washed with white (they still count), below a line.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"a heat map needs (rows, columns) values, got shape {values.shape}")
    rows, columns = values.shape
    for labels, count, what in ((row_labels, rows, "row"), (column_labels, columns, "column")):
        if labels and len(labels) != count:
            raise ValueError(f"{count} {what}s but {len(labels)} {what} labels")
    cell_h, cell_w = cell
    rgb = colorize(values, cmap, *limits, mask)
    if fade_from is not None and fade_from < rows:
        rgb[fade_from:] = (rgb[fade_from:] * 0.45 + 255 * 0.55).astype(np.uint8)
    row_size, column_size = label_size(cell_h), label_size(cell_w)
    left = text_width(row_labels, row_size) + GAP if row_labels else 0
    top = (font(13).size + GAP) * len(title.splitlines()) if title else 0
    map_h, map_w = rows * cell_h, columns * cell_w
    strip = _rotated_labels(column_labels, cell_w, column_size) if column_labels else None
    bottom = strip.height + GAP if strip else 0
    width = max(left + map_w, text_width(title.splitlines(), 13) if title else 0)
    image = Image.new("RGB", (width, top + map_h + bottom), "white")
    image.paste(Image.fromarray(enlarge(rgb, cell_h, cell_w)), (left, top))
    draw = ImageDraw.Draw(image)
    for line, text in enumerate(title.splitlines()):
        draw.text((0, line * (font(13).size + GAP)), drawable(text), font=font(13), fill=INK)
    for i, label in enumerate(row_labels):
        draw.text((left - GAP // 2, top + i * cell_h + cell_h / 2), drawable(label),
                  font=font(row_size), fill=INK, anchor="rm")
    if strip:
        image.paste(strip, (left, top + map_h + GAP // 2))
    if annotate:
        size = label_size(min(cell_h, cell_w // 3))
        shown = values if numbers is None else np.asarray(numbers, dtype=np.float64)
        for (r, c), value in np.ndenumerate(shown):
            if not np.isnan(values[r, c]) and (mask is None or not mask[r, c]):
                draw.text((left + c * cell_w + cell_w / 2, top + r * cell_h + cell_h / 2),
                          annotate.format(value), font=font(size), fill=_contrast(rgb[r, c]),
                          anchor="mm")
    if fade_from is not None and 0 < fade_from < rows:  # on the edge of the first faded row
        y = top + fade_from * cell_h
        draw.line([(left, y), (left + map_w - 1, y)], fill=INK, width=1)
    return Picture(np.asarray(image), (Box(top, left, rows, columns, cell_h, cell_w),))


def arrange(pictures: Sequence[Picture], columns: int, gap: int = 2 * GAP) -> Picture:
    """Pictures in a grid, row by row; each column as wide as its widest picture, each row as tall
    as its tallest."""
    if not pictures:
        raise ValueError("nothing to arrange")
    grid_rows = -(-len(pictures) // columns)
    heights = [max(p.pixels.shape[0] for p in pictures[r * columns : (r + 1) * columns])
               for r in range(grid_rows)]
    widths = [max(p.pixels.shape[1] for p in pictures[c::columns])
              for c in range(min(columns, len(pictures)))]
    tops = np.cumsum([0] + [h + gap for h in heights])
    lefts = np.cumsum([0] + [w + gap for w in widths])
    pixels = np.full((tops[-1] - gap, lefts[-1] - gap, 3), 255, dtype=np.uint8)
    boxes = []
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        y, x = int(tops[row]), int(lefts[column])
        h, w = picture.pixels.shape[:2]
        pixels[y : y + h, x : x + w] = picture.pixels
        boxes += [box.moved(y, x) for box in picture.maps]
    return Picture(pixels, tuple(boxes))


def add_colorbar(picture: Picture, cmap: str, limits: tuple[float, float], label: str,
                 ticks: Sequence[float] = ()) -> Picture:
    """A vertical colour bar right of the picture, as tall as its maps, with values at its ticks.

    Without ``ticks`` it marks the two ends, and 0 when the range spans it.
    """
    low, high = limits
    if not ticks:
        ticks = [low, high] + ([0.0] if low < 0 < high else [])
    picture = pad(picture, top=GAP, bottom=GAP)  # room for the labels of the end ticks
    boxes = picture.maps
    top, bottom = 0, picture.pixels.shape[0]
    if boxes:
        top = min(b.top for b in boxes)
        bottom = max(b.top + b.rows * b.cell_height for b in boxes)
    height = max(bottom - top, 40)
    texts = [f"{t:.3g}" for t in ticks]
    bar_w, size = 14, 11
    label_h = font(size).size + 4
    extra = GAP + bar_w + 4 + text_width(texts, size) + GAP + label_h
    old_h, old_w = picture.pixels.shape[:2]
    image = Image.new("RGB", (old_w + extra, max(old_h, top + height)), "white")
    image.paste(Image.fromarray(picture.pixels), (0, 0))
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(bar_w, axis=1)  # high at the top
    image.paste(Image.fromarray(colorize(ramp, cmap, 0.0, 1.0)), (old_w + GAP, top))
    draw = ImageDraw.Draw(image)
    for value, text in zip(ticks, texts, strict=True):
        y = top + (high - value) / max(high - low, 1e-12) * (height - 1)
        x = old_w + GAP + bar_w
        draw.line([(x, y), (x + 3, y)], fill=INK)
        draw.text((x + 5, y), text, font=font(size), fill=INK, anchor="lm")
    # the label runs along the bar, rotated; a label longer than the bar makes the picture taller
    length = max(height, text_width([label], size))
    if top + length > image.height:
        taller = Image.new("RGB", (image.width, top + length), "white")
        taller.paste(image, (0, 0))
        image = taller
    side = Image.new("RGB", (length, label_h), "white")
    ImageDraw.Draw(side).text((length / 2, 0), drawable(label), font=font(size), fill=INK,
                              anchor="ma")
    image.paste(side.transpose(Image.Transpose.ROTATE_90), (old_w + extra - label_h, top))
    return Picture(np.asarray(image), picture.maps)


def pad(picture: Picture, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0
        ) -> Picture:
    """White margins around a picture; the maps' boxes move with it."""
    pixels = np.pad(picture.pixels, ((top, bottom), (left, right), (0, 0)), constant_values=255)
    return Picture(pixels, tuple(box.moved(top, left) for box in picture.maps))


def add_title(picture: Picture, title: str, size: int = 15) -> Picture:
    """Lines of text above the picture; the maps' boxes move down with it."""
    lines = title.splitlines()
    line_h = font(size).size + 6
    old_h, old_w = picture.pixels.shape[:2]
    width = max(old_w, text_width(lines, size))
    image = Image.new("RGB", (width, old_h + line_h * len(lines) + GAP), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((0, i * line_h), drawable(line), font=font(size), fill=INK)
    shift = line_h * len(lines) + GAP
    image.paste(Image.fromarray(picture.pixels), (0, shift))
    return Picture(np.asarray(image), tuple(box.moved(shift, 0) for box in picture.maps))
