"""A small layout kit for matplotlib figures whose axes are placed in inches.

Figures are built with the object-oriented API on their own Agg canvas, never through pyplot, so
nothing is kept in a global figure registry and a figure is freed once dropped. Each figure is
sized from its content (cells, labels, colour bar) and its axes are placed in inches, because a
layout engine would draw every figure twice and double the time to show it.

Conventions used by every view: heat maps of signed values use a diverging colour map centred on
0 (red positive, blue negative); magnitudes use a sequential one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.textpath import text_to_path

DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"
# Room for a colour bar to the right of a plot, in inches: gap, bar, then its ticks and label.
BAR_GAP, BAR_WIDTH, BAR_ROOM = 0.12, 0.15, 0.85
BAR_BLOCK = BAR_GAP + BAR_WIDTH + BAR_ROOM
# Gradio draws a component's label over the top-left corner of a plot: keep that strip empty.
LABEL_ROOM = 0.4


def new_figure(width: float, height: float) -> Figure:
    """A figure of this size in inches on its own Agg canvas (no pyplot, no layout engine)."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def add_axes(figure: Figure, left: float, bottom: float, width: float, height: float) -> Axes:
    """An axes placed in inches from the figure's bottom-left corner."""
    figure_width, figure_height = figure.get_size_inches()
    return figure.add_axes(
        (left / figure_width, bottom / figure_height, width / figure_width, height / figure_height)
    )


def add_colorbar(
    figure: Figure,
    mappable: AxesImage | ScalarMappable,
    left: float,
    bottom: float,
    height: float,
    label: str,
    extend: str = "neither",
) -> None:
    """A vertical colour bar placed in inches; ``left`` is where the gap before the bar starts."""
    bar = add_axes(figure, left + BAR_GAP, bottom, BAR_WIDTH, height)
    figure.colorbar(mappable, cax=bar, extend=extend)
    bar.set_ylabel(label, fontsize=8)
    bar.tick_params(labelsize=7)


def text_width(texts: Sequence[str], fontsize: float) -> float:
    """Width in inches of the widest text at this font size, to leave room for tick labels."""
    font = FontProperties(size=fontsize)
    widths = [text_to_path.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts]
    return max(widths, default=0.0) / 72.0  # points to inches


def cell_font(cell: float) -> float:
    """A tick label size in points that fits a cell of this many inches (5 to 9 pt)."""
    return min(max(cell * 72.0 * 0.7, 5.0), 9.0)


def as_array(values: torch.Tensor | np.ndarray, ndim: int, what: str) -> np.ndarray:
    """A tensor or array as float64 numpy with the expected number of dimensions."""
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {array.shape}")
    return array


def plain(text: str) -> str:
    """Text shown literally: matplotlib would read a pair of '$' as a formula."""
    return text.replace("$", r"\$")


def panel_size(height: int, width: int, longer: float, shortest: float) -> tuple[float, float]:
    """Width and height in inches of a panel with the array's aspect ratio (within limits)."""
    scale = longer / max(height, width)
    return max(width * scale, shortest), max(height * scale, shortest)
