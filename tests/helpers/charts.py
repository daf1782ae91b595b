"""Reading a density chart (``viz.chart``) back from its pixels: every group's density at the
middle column of each bin, and the dashed N(0, 1) where a dash is, each within one pixel of
what ``np.histogram`` and the normal density say."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from viz.chart import BINS, Chart


def pixel_value(chart: Chart) -> float:
    """How much density one pixel row stands for."""
    low, high = chart.plot.y_range
    return (high - low) / (chart.plot.height - 1)


def assert_densities_drawn(chart: Chart, groups: Sequence[np.ndarray],
                           spread: Sequence[np.ndarray]) -> None:
    """Each group's line, read from its colour in the middle column of every bin, is its
    np.histogram density on 80 bins over +-max(4, the 99.9th percentile of |spread|), within
    one pixel. Where the colour is missing, a curve drawn later (a later group, N(0, 1)) lies on
    that row: nothing else, the legend least of all, may hide a line."""
    extent = max(4.0, *(float(np.quantile(np.abs(values), 0.999)) for values in spread))
    plot = chart.plot
    assert plot.x_range == (-extent, extent)
    edges = np.linspace(-extent, extent, BINS + 1)
    middles = [round(plot.column(edge)) + plot.width // BINS // 2 for edge in edges[:-1]]
    colours = [entry.colour for entry in chart.legend]  # the groups' in order, then N(0, 1)'s
    assert len(colours) == len(groups) + 1
    for index, values in enumerate(groups):
        density = np.histogram(values, bins=edges, density=True)[0]
        drawn = chart.read_line(colours[index], middles)
        seen = ~np.isnan(drawn)
        np.testing.assert_allclose(drawn[seen], density[seen], rtol=0,
                                   atol=1.01 * pixel_value(chart))
        assert seen.mean() > 0.25  # most of each line shows
        for column, value in zip(np.array(middles)[~seen], density[~seen], strict=True):
            row = round(plot.row(value))
            around = {tuple(p) for p in chart.pixels[row - 2 : row + 3, column]}
            assert around & set(colours[index + 1 :]), (index, column, value)


def assert_normal_drawn(chart: Chart, at: Sequence[float] = (-3, -2, 0, 2, 3)) -> None:
    """The dashed black N(0, 1): in the columns near each of ``at`` that a dash covers, its
    height is the normal density within one pixel (where it is nearly flat: a steep stretch
    spans several rows of one column)."""
    plot, black = chart.plot, chart.legend[-1].colour
    for x in at:
        near = round(plot.column(x)) + np.arange(-6, 7)
        drawn = chart.read_line(black, near)
        seen = ~np.isnan(drawn)
        assert seen.sum() >= 3, x  # a dash, not a gap, covers some of these 13 columns
        x_drawn = np.array([plot.value_at_column(c) for c in near[seen]])
        expected = np.exp(-0.5 * x_drawn**2) / np.sqrt(2 * np.pi)
        np.testing.assert_allclose(drawn[seen], expected, rtol=0,
                                   atol=1.01 * pixel_value(chart))
