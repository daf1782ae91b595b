"""Shared by the views: the colour-map conventions, tensors as arrays, and matplotlib figures
placed in inches.

Figures are built with the object-oriented API on their own Agg canvas, never through pyplot, so
nothing is kept in a global figure registry and a figure is freed once dropped; axes are placed
in inches, because a layout engine would draw every figure twice. Only the figures a person
reads once use matplotlib (the training schedule, the denoising loss, the vocabulary's norms);
what a tab draws at every answer is drawn from arrays (``viz.heatmap``, ``viz.chart``).

Conventions used by every view: heat maps of signed values use a diverging colour map centred on
0 (red positive, blue negative); magnitudes use a sequential one.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"


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


def as_array(values: torch.Tensor | np.ndarray, ndim: int, what: str) -> np.ndarray:
    """A tensor or array as float64 numpy with the expected number of dimensions."""
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {array.shape}")
    return array
