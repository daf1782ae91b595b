"""Several VAEs on one image, side by side: what each gives back, where each errs, how each
latent is spread, and the same small region of every reconstruction enlarged.

Stable Diffusion's successors kept the autoencoder design of Rombach et al. (2022) and changed
its size and training: SD v1 and SDXL squeeze each 8x8 block of pixels into 4 numbers, SD3 and
FLUX into 16; the TAESD family (madebyollin) distils a big VAE into a network a hundred times
smaller. Compared on one image, the extra channels show as sharper text and fine texture, and
the tiny ones as softer detail. Everything here is drawn on one scale for all VAEs, so a
difference in colour or length is a difference between the VAEs.

Each function takes plain pictures (H, W, 3) uint8 and numbers; the VAEs are run by the caller.
Pictures are drawn with Pillow (``viz.heatmap``) and record where each image lies
(``Picture.maps``), so tests read the drawn pixels back; the histogram is a ``viz.chart`` density
chart, which records its plot area and axis ranges for the same reason.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from viz.chart import Chart, density_chart
from viz.heatmap import (
    GAP,
    INK,
    Box,
    Picture,
    add_colorbar,
    add_title,
    arrange,
    drawable,
    enlarge,
    font,
    heatmap,
    text_width,
)
from viz.metrics import abs_error_map

Labelled = tuple[str, np.ndarray | Image.Image]  # (what it is, an RGB picture)

ERROR_CMAP = "magma"
ERROR_QUANTILE = 0.995  # the shared scale ends at the largest 99.5th percentile of the errors
ROW_WIDTH = 1080  # pixels: as many pictures a row as fit in this (2 of 512 px, 4 of 256 px), so
# the page shows each near its own size and its title stays legible; at most MAX_COLUMNS
MAX_COLUMNS = 4
CROP_SIDES = (32, 64, 128)  # pixels of the original a crop may cover
CROP_DISPLAY = 256  # pixels: a crop is enlarged by a whole factor to about this size
TABLE_HEADERS = ["VAE", "latent shape", "channels", "latent space", "PSNR (dB)", "SSIM",
                 "encode (s)", "decode (s)", "note"]


def _rgb(picture: np.ndarray | Image.Image) -> np.ndarray:
    pixels = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an RGB picture (H, W, 3) uint8, got {pixels.shape} "
                         f"{pixels.dtype}")
    return pixels


TITLE_SIZE = 13  # pixels: the font of a picture's title


def _title_lines(title: str, width: int) -> list[str]:
    """``title`` broken at spaces into lines no wider than ``width`` pixels where its words
    allow, so a long VAE name does not widen its picture (and the row) beyond the picture."""
    lines: list[str] = []
    for word in title.split(" "):
        if lines and text_width([f"{lines[-1]} {word}"], TITLE_SIZE) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _titled_panels(pictures: Sequence[tuple[str, np.ndarray]], cell: int = 1) -> list[Picture]:
    """Each picture with its title above it, wrapped to the picture's width; every title gets
    as many lines as the longest, so the pictures of a row line up. Each picture's pixels are
    recorded as one map whose cells are the ``cell`` x ``cell`` blocks of an enlargement."""
    titles = [_title_lines(title, pixels.shape[1]) for title, pixels in pictures]
    line_h = font(TITLE_SIZE).size + 2
    top = line_h * max(len(lines) for lines in titles) + GAP
    panels = []
    for lines, (_, pixels) in zip(titles, pictures, strict=True):
        height, width = pixels.shape[:2]
        image = Image.new("RGB", (max(width, text_width(lines, TITLE_SIZE)), top + height),
                          "white")
        image.paste(Image.fromarray(pixels), (0, top))
        draw = ImageDraw.Draw(image)
        for index, line in enumerate(lines):
            draw.text((0, index * line_h), drawable(line), font=font(TITLE_SIZE), fill=INK)
        box = Box(top, 0, height // cell, width // cell, cell, cell)
        panels.append(Picture(np.asarray(image), (box,)))
    return panels


def fitting_columns(panels: Sequence[Picture], width: int = ROW_WIDTH) -> int:
    """How many of ``panels`` a row holds within ``width`` pixels: at least 1, at most
    MAX_COLUMNS and the number of panels."""
    widest = max(panel.pixels.shape[1] for panel in panels)
    return max(1, min(MAX_COLUMNS, len(panels), (width + 2 * GAP) // (widest + 2 * GAP)))


def side_by_side(pictures: Sequence[Labelled], columns: int | None = None) -> Picture:
    """The original and every reconstruction at their own size, each titled, in rows of
    ``columns`` (by default as many as fit in ROW_WIDTH). ``maps`` holds one box per picture,
    in order, with 1x1-pixel cells."""
    if not pictures:
        raise ValueError("no pictures to show")
    panels = _titled_panels([(label, _rgb(picture)) for label, picture in pictures])
    return arrange(panels, min(columns or fitting_columns(panels), len(panels)))


# ---------------------------------------------------------------------------------------------
# Errors


def shared_error_scale(errors: Sequence[np.ndarray]) -> float:
    """The top of the one colour scale for several error maps (0-255 units): the largest of
    their 99.5th percentiles, so the rare worst pixels of one VAE do not wash out the others;
    at least 1."""
    if not errors:
        raise ValueError("no error maps")
    return max(1.0, *(float(np.quantile(error, ERROR_QUANTILE)) for error in errors))


def error_maps_view(original: np.ndarray | Image.Image, reconstructions: Sequence[Labelled],
                    columns: int | None = None) -> Picture:
    """|reconstruction - original| (mean over R, G, B) of every VAE on ONE colour scale.

    The same colour means the same error in every map, and the colour bar says the scale.
    ``maps`` holds one box per reconstruction, in order.
    """
    if not reconstructions:
        raise ValueError("no reconstructions to compare")
    reference = _rgb(original)
    errors = [abs_error_map(reference, _rgb(picture)) for _, picture in reconstructions]
    top = shared_error_scale(errors)
    panels = [heatmap(error, ERROR_CMAP, (0.0, top), (1, 1),
                      title=f"{label}\nmean {error.mean():.2f}, max {error.max():.0f}")
              for (label, _), error in zip(reconstructions, errors, strict=True)]
    columns = min(columns or fitting_columns(panels), len(panels))
    picture = add_colorbar(arrange(panels, columns), ERROR_CMAP, (0.0, top),
                           "mean |error| over R, G, B (of 255)")
    worst = max(float(error.max()) for error in errors)
    title = f"Absolute error, one colour scale for all: 0 (black) to {top:.0f} of 255"
    if worst > top:
        title += (f"\nthe scale ends at the largest 99.5th percentile; errors above it (up to "
                  f"{worst:.0f}) get its colour")
    return add_title(picture, title)


# ---------------------------------------------------------------------------------------------
# Crops


def crop_box(x: float, y: float, size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square of ``side`` pixels centred on pixel (x, y) of an
    image of ``size`` = (width, height), moved inside the image where it would stick out (and
    shrunk to the shorter side of a smaller image)."""
    width, height = size
    if side < 1 or width < 1 or height < 1:
        raise ValueError(f"need a positive crop side and image size, got {side} and {size}")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"the crop centre must be a pixel position, got ({x}, {y})")
    side = min(side, width, height)
    left = min(max(int(round(x)) - side // 2, 0), width - side)
    top = min(max(int(round(y)) - side // 2, 0), height - side)
    return left, top, left + side, top + side


def crop_view(pictures: Sequence[Labelled], box: tuple[int, int, int, int],
              display: int = CROP_DISPLAY, columns: int | None = None) -> Picture:
    """The same region of every picture, enlarged by one whole factor (nearest neighbour, so
    each pixel is a square block) to about ``display`` pixels, titled, side by side.

    ``maps`` holds one box per picture whose cells are the region's pixels.
    """
    if not pictures:
        raise ValueError("no pictures to crop")
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    zoom = max(1, display // side)
    regions = []
    for label, picture in pictures:
        pixels = _rgb(picture)
        if right > pixels.shape[1] or bottom > pixels.shape[0] or left < 0 or top < 0:
            raise ValueError(f"the region {box} lies outside {label!r} "
                             f"({pixels.shape[1]}x{pixels.shape[0]})")
        regions.append((label, enlarge(pixels[top:bottom, left:right], zoom, zoom)))
    panels = _titled_panels(regions, zoom)
    picture = arrange(panels, min(columns or fitting_columns(panels), len(panels)))
    return add_title(picture, f"Pixels x {left}-{right - 1}, y {top}-{bottom - 1}, enlarged "
                              f"{zoom}x (each pixel a {zoom}x{zoom} square)")


# ---------------------------------------------------------------------------------------------
# Numbers


def table_row(label: str, latent_shape: Sequence[int], space: str, psnr: float, ssim: float,
              encode_s: float, decode_s: float, note: str = "") -> list:
    """One VAE's row of ``TABLE_HEADERS``; the shape is (channels, height, width)."""
    channels, height, width = latent_shape
    return [label, f"{channels}x{height}x{width}", int(channels), space, round(psnr, 2),
            round(ssim, 4), round(encode_s, 3), round(decode_s, 3), note]


def failure_row(label: str, message: str) -> list:
    """The row of a VAE that could not run: empty numbers, the reason as its note."""
    return [label] + [None] * (len(TABLE_HEADERS) - 2) + [message]


def table_to_csv(rows: Sequence[Sequence], path: str | Path) -> Path:
    """The table as a CSV file with ``TABLE_HEADERS`` as its first line."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(TABLE_HEADERS)
        writer.writerows(["" if value is None else value for value in row] for row in rows)
    return path


def latent_histograms_view(latents: Sequence[tuple[str, np.ndarray]]) -> Chart:
    """The density of each VAE's latent in the diffusion model's space, all channels together,
    against the standard normal N(0, 1) that the noise schedule assumes.

    ``latents`` pairs a label with the latent as the diffusion model sees it: (z - shift) x scale
    for a KL VAE, the output itself for TAESD. One line per VAE on shared bins. The legend sits
    under the axes, where it covers none of the curves (they all peak in the middle).
    """
    if not latents:
        raise ValueError("no latents to draw")
    values = [np.asarray(latent, dtype=np.float64) for _, latent in latents]
    return density_chart([(f"{label}: mean {value.mean():+.2f}, std {value.std():.2f}", value)
                          for (label, _), value in zip(latents, values, strict=True)], values,
                         "value in the diffusion model's space, all channels", (560, 275),
                         legend_below=True)
