"""Runs of one prompt side by side: what each run predicted at the same noise levels, the images
and how far they differ, and the noise levels each run walked through.

Runs with different samplers, sigma schedules or step counts visit different timesteps, so their
step 5 means different things: a 4-step LCM run is almost done at its step 3, a 20-step Euler
run has barely started. What is comparable is the noise level sigma the UNet saw, the
noise-to-signal ratio of its input, sigma_t = sqrt((1 - abar_t) / abar_t). So the runs' clean
image predictions (x0) are shown at a few shared noise levels, each run's step nearest in log
sigma, and each cell says which step and sigma it is.

Every function is pure: lists and arrays in, arrays or pictures out. Pictures record where their
panels are (``Picture.maps``, one box per panel with one-pixel cells), so a test reads back what
was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from viz.compare import ERROR_CMAP, fitting_columns, shared_error_scale
from viz.heatmap import (
    GAP,
    INK,
    Box,
    Picture,
    add_colorbar,
    add_title,
    arrange,
    drawable,
    font,
    heatmap,
    text_width,
)
from viz.metrics import abs_error_map

MAX_RUNS = 4
LEVELS_SHOWN = 5  # noise levels at which the runs' x0 are put side by side
THUMBNAIL = 128  # pixels: the longer side of an x0 in the grid
# One colour per run, told apart with colour-blindness too (blue, orange, green, purple)
RUN_COLOURS = ((31, 119, 180), (230, 120, 20), (40, 150, 60), (150, 70, 170))
MISSING = (225, 225, 225)  # a cell the run did not reach (it was stopped)


def run_label(index: int, setting: str) -> str:
    return f"run {index + 1}: {setting}"


# ---------------------------------------------------------------------------------------------
# Matching steps by noise level


def matched_levels(schedules: Sequence[Sequence[float]], count: int = LEVELS_SHOWN
                   ) -> list[float]:
    """``count`` noise levels, from high to low, that lie within every run's schedule: spaced
    evenly in log sigma from the lowest of the runs' highest levels to the highest of their
    lowest. Runs whose ranges do not overlap (a one-step run has a single level) share one
    level, the lowest highest."""
    if not schedules or any(len(levels) == 0 for levels in schedules):
        raise ValueError("every run needs at least one noise level")
    high = min(max(levels) for levels in schedules)
    low = max(min(levels) for levels in schedules)
    if count < 2 or low >= high:
        return [high]
    logs = np.linspace(math.log(high), math.log(low), count)
    return [float(math.exp(value)) for value in logs]


def nearest_steps(levels: Sequence[float], targets: Sequence[float]) -> list[int]:
    """For each target, the index of the step whose noise level is nearest in log sigma (the
    first of equally near ones)."""
    logs = np.log(np.maximum(np.asarray(levels, dtype=np.float64), 1e-12))
    return [int(np.argmin(np.abs(logs - math.log(max(target, 1e-12))))) for target in targets]


# ---------------------------------------------------------------------------------------------
# Pictures


def thumbnail(picture: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """``picture`` (H, W, 3) uint8 shrunk (or enlarged) so its longer side is ``side``."""
    h, w = picture.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))


def _panel(pixels: np.ndarray, title: str, size: int = 11) -> Picture:
    """A picture with its title above; its pixels recorded as one box of one-pixel cells."""
    h, w = pixels.shape[:2]
    return add_title(Picture(pixels, (Box(0, 0, h, w, 1, 1),)), title, size=size)


def _label_panel(text: str, height: int, size: int = 12) -> Picture:
    """Text, one line per line of ``text``, in a white panel ``height`` pixels tall."""
    lines = text.splitlines()
    width = text_width(lines, size) + GAP
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    line_h = font(size).size + 4
    top = max(0, (height - line_h * len(lines)) // 2)
    for i, line in enumerate(lines):
        draw.text((0, top + i * line_h), drawable(line), font=font(size), fill=INK)
    return Picture(np.asarray(image))


def x0_grid(targets: Sequence[float], rows: Sequence[tuple[str, Sequence[tuple[str, object]]]],
            side: int = THUMBNAIL) -> Picture:
    """One row per run: its label, then its x0 at each target noise level.

    ``rows``: (run label, cells); a cell is (title, picture (H, W, 3) uint8), or (title, None)
    for a level the run did not reach. Columns line up; ``maps`` holds one box per cell, row by
    row, each covering the cell's thumbnail with one-pixel cells (a missing cell's grey square).
    """
    if not rows:
        raise ValueError("no runs to show")
    columns = len(targets)
    if any(len(cells) != columns for _, cells in rows):
        raise ValueError(f"every run needs one cell per target level ({columns})")
    panels: list[Picture] = []
    shape = next((np.asarray(p).shape for _, cells in rows for _, p in cells if p is not None),
                 (side, side, 3))
    blank = np.full((*thumbnail(np.zeros(shape, np.uint8), side).shape[:2], 3), MISSING,
                    dtype=np.uint8)
    for label, cells in rows:
        pictures = [_panel(blank if picture is None else thumbnail(np.asarray(picture), side),
                           title) for title, picture in cells]
        height = max(p.pixels.shape[0] for p in pictures)
        panels += [_label_panel(label, height), *pictures]
    grid = arrange(panels, columns + 1, gap=GAP)
    levels = ", ".join(f"{sigma:.3g}" for sigma in targets)
    return add_title(grid, f"Each run's clean-image prediction (x0) at matching noise levels "
                           f"σ ≈ {levels}:\nthe step whose σ is nearest (log scale), drawn by "
                           "TAESD", size=13)


def differences_view(images: Sequence[tuple[str, np.ndarray]]) -> Picture | None:
    """|image of run k - image of run 1| (mean over R, G, B) for every later run, on one colour
    scale; None for fewer than two images. ``maps`` holds one box per later run."""
    if len(images) < 2:
        return None
    _, first = images[0]
    errors = [abs_error_map(first, picture) for _, picture in images[1:]]
    top = shared_error_scale(errors)
    panels = [heatmap(error, ERROR_CMAP, (0.0, top), (1, 1),
                      title=f"{label}\nmean {error.mean():.2f}, max {error.max():.0f}")
              for (label, _), error in zip(images[1:], errors, strict=True)]
    picture = add_colorbar(arrange(panels, fitting_columns(panels)), ERROR_CMAP, (0.0, top),
                           "mean |difference| over R, G, B (of 255)")
    return add_title(picture, f"How far each image is from run 1's: 0 (black) to {top:.0f} "
                              "of 255 on one scale")


def mean_difference(first: np.ndarray, other: np.ndarray) -> float:
    """The mean |difference| of two RGB images over pixels and channels, in 0-255 units."""
    return float(abs_error_map(first, other).mean())


# ---------------------------------------------------------------------------------------------
# The sigma schedules on one chart


@dataclass(frozen=True)
class SigmaChart:
    """Where a (step, sigma) point lies in the chart of ``sigma_chart``: steps 1..``steps`` along
    x, log10 sigma from ``low`` to ``high`` decades along y."""

    steps: int
    low: int
    high: int
    width: int = 560
    height: int = 240
    left: int = 50
    right: int = 150  # room for the legend
    top: int = 26
    bottom: int = 30

    @classmethod
    def for_schedules(cls, schedules: Sequence[Sequence[float]]) -> SigmaChart:
        logs = np.log10(np.maximum(np.concatenate([np.asarray(s, np.float64)
                                                   for s in schedules]), 1e-4))
        low, high = math.floor(logs.min()), math.ceil(logs.max() + 1e-9)
        return cls(max(len(s) for s in schedules), low, max(high, low + 1))

    def point(self, step: int, sigma: float) -> tuple[float, float]:
        """Pixel (x, y) of step ``step`` (1-based) at noise level ``sigma``."""
        span = self.width - self.left - self.right
        x = self.left + span * ((step - 1) / max(self.steps - 1, 1))
        value = math.log10(max(sigma, 1e-4))
        y = self.top + (self.height - self.top - self.bottom) * (self.high - value) / \
            (self.high - self.low)
        return x, y

    def marker_radius(self, run: int, runs: int) -> int:
        """Earlier runs get larger dots, so runs with the same schedule show as rings."""
        return 2 + 2 * (runs - 1 - run)


def sigma_chart(schedules: Sequence[Sequence[float]], labels: Sequence[str]) -> np.ndarray:
    """Every run's noise level sigma per UNet evaluation (log scale) on one chart, one colour
    per run; the same schedule twice shows as dots one inside the other."""
    if not schedules or len(schedules) != len(labels) or len(schedules) > len(RUN_COLOURS):
        raise ValueError(f"1 to {len(RUN_COLOURS)} schedules, each with a label")
    chart = SigmaChart.for_schedules(schedules)
    image = Image.new("RGB", (chart.width, chart.height), "white")
    draw = ImageDraw.Draw(image)
    axis_bottom = chart.height - chart.bottom
    draw.line([(chart.left, chart.top), (chart.left, axis_bottom),
               (chart.width - chart.right, axis_bottom)], fill=INK)
    for decade in range(chart.low, chart.high + 1):
        _, y = chart.point(1, 10.0 ** decade)
        draw.line([(chart.left - 3, y), (chart.left, y)], fill=INK)
        draw.text((chart.left - 5, y), f"{10.0 ** decade:g}", font=font(10), fill=INK,
                  anchor="rm")
    for step in sorted({1, chart.steps}):
        x, _ = chart.point(step, 1.0)
        draw.text((x, axis_bottom + 4), str(step), font=font(10), fill=INK, anchor="ma")
    draw.text(((chart.left + chart.width - chart.right) / 2, chart.height - 2),
              "UNet evaluation", font=font(10), fill=INK, anchor="mb")
    draw.text((chart.left, 4), "noise level σ (log) the UNet saw, per run", font=font(11),
              fill=INK)
    runs = len(schedules)
    points = [[chart.point(i + 1, sigma) for i, sigma in enumerate(levels)]
              for levels in schedules]
    for run, line in enumerate(points):  # the lines first, so no line covers a dot
        if len(line) > 1:
            draw.line(line, fill=RUN_COLOURS[run], width=1)
    for run, line in enumerate(points):
        radius = chart.marker_radius(run, runs)
        for x, y in line:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=RUN_COLOURS[run])
    legend_x = chart.width - chart.right + 12
    for run, label in enumerate(labels):
        y = chart.top + 4 + run * 18
        draw.ellipse([legend_x, y - 4, legend_x + 8, y + 4], fill=RUN_COLOURS[run])
        shown = label if text_width([label], 10) < chart.right - 26 else label[:18] + "…"
        draw.text((legend_x + 13, y), drawable(shown), font=font(10), fill=INK, anchor="lm")
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# The table


def table_headers(varied: str) -> list[str]:
    return ["run", varied, "steps", "UNet evaluations", "time (s)", "s per evaluation",
            "mean |difference| from run 1 (of 255)"]


def table_row(index: int, setting: str, steps: int, evaluations: int, seconds: float,
              difference: float | None) -> list:
    """One run's row; ``difference`` None for run 1 (or a run without an image)."""
    per_evaluation = round(seconds / evaluations, 3) if evaluations else ""
    return [index + 1, setting, steps, evaluations, round(seconds, 2), per_evaluation,
            "" if difference is None else round(difference, 2)]
