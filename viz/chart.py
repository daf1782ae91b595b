"""A density chart drawn straight from arrays with Pillow: stepped lines on shared bins against
the standard normal N(0, 1), with numeric axes and a legend.

The latent views ask one question of a histogram: is this spread like the unit Gaussian the noise
schedule assumes? matplotlib answered it in about 70 ms (most of it laying out and rasterizing
text); drawn here with ``viz.heatmap``'s font, whose glyph masks are kept, it takes a few. Lines
are drawn without antialiasing, each in one exact colour, and the chart records where its plot
area lies and what its axes span (``Chart.plot``), so the drawn densities can be read back from
the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from viz.heatmap import GAP, INK, Picture, drawable, font, text_width

BINS = 80
# matplotlib's default colour cycle ("tab10"), one colour per group, in order
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
NORMAL_COLOUR = (0, 0, 0)  # pure black: text is drawn in INK, so no text pixel has this colour
NORMAL_LABEL = "N(0, 1)"
LINE_WIDTH = 2  # pixels: matplotlib's 1.5 points at 100 dpi
DASH, DASH_GAP = 6, 4  # pixels along the normal curve
TICK_SIZE, LABEL_SIZE, LEGEND_SIZE = 12, 13, 12  # font sizes in pixels
LEFT, RIGHT, TOP = 70, 16, 20  # pixels around the plot area: the y label and ticks on the left;
# TOP with the label strip above clears the buttons Gradio draws at the top right
X_LABEL_BELOW = 4 + TICK_SIZE + 2 + GAP  # pixels from the axis to the x label: ticks, values
SAMPLE = 24  # pixels: the length of a legend entry's line
ROW = 17  # pixels: the height of a legend entry


def density_edges(spread: Sequence[np.ndarray]) -> np.ndarray:
    """BINS + 1 shared bin edges over +-4, or further where the 99.9th percentile of any of
    ``spread``'s sizes reaches beyond: wide enough for a unit Gaussian and for a latent's tails,
    without a stray extreme value squeezing every curve into the middle."""
    extent = max(4.0, *(float(np.quantile(np.abs(values), 0.999)) for values in spread))
    return np.linspace(-extent, extent, BINS + 1)


def normal_density(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.asarray(x) ** 2) / math.sqrt(2 * math.pi)


def nice_ticks(low: float, high: float, count: int = 5) -> tuple[list[float], str]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) from
    ``low`` to ``high``, and the format that writes them with just enough decimals."""
    raw = (high - low) / count
    power = 10.0 ** math.floor(math.log10(raw))
    mantissa = next(m for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    step = mantissa * power
    ticks = [i * step for i in range(math.ceil(low / step - 1e-9),
                                     math.floor(high / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (mantissa == 2.5))
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks], f"{{:.{decimals}f}}"


@dataclass(frozen=True)
class PlotArea:
    """Where the axes' inside is in the picture, in pixels, and the values it spans: ``x_range``
    from its left column to its right edge, ``y_range`` from its bottom row to its top row."""

    top: int
    left: int
    height: int
    width: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def column(self, x: float) -> float:
        low, high = self.x_range
        return self.left + self.width * (x - low) / (high - low)

    def row(self, y: float) -> float:
        low, high = self.y_range
        return self.top + (self.height - 1) * (high - y) / (high - low)

    def value_at_row(self, row: float) -> float:
        low, high = self.y_range
        return high - (row - self.top) / (self.height - 1) * (high - low)

    def value_at_column(self, column: float) -> float:
        low, high = self.x_range
        return low + (column - self.left) / self.width * (high - low)


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: its text, its curve's colour, and the (left, top, right, bottom)
    pixels of its sample line."""

    label: str
    colour: tuple[int, int, int]
    sample: tuple[int, int, int, int]


@dataclass(frozen=True, kw_only=True)
class Chart(Picture):
    """A drawn chart: the plot area and its ranges, the legend's entries, in curve order with
    N(0, 1) last, and the (left, top, right, bottom) box the legend covers."""

    plot: PlotArea
    legend: tuple[LegendEntry, ...]
    legend_box: tuple[int, int, int, int]

    def read_line(self, colour: tuple[int, int, int], columns: Sequence[int]) -> np.ndarray:
        """The y value where the line of this colour is drawn in each pixel column of the plot
        area (the middle of its pixels there, less the half row by which Pillow's 2-pixel line
        lies below its row; the legend left out), NaN where none is."""
        plot, (left, top, right, bottom) = self.plot, self.legend_box
        rows = np.arange(plot.top, plot.top + plot.height)
        values = []
        for column in columns:
            drawn = (self.pixels[rows, column] == colour).all(axis=1)
            if left <= column <= right:
                drawn &= (rows < top) | (rows > bottom)
            values.append(plot.value_at_row(rows[drawn].mean() - 0.5) if drawn.any() else np.nan)
        return np.array(values)


def _dashed(draw: ImageDraw.ImageDraw, columns: np.ndarray, edge_rows: np.ndarray,
            colour: tuple[int, int, int]) -> None:
    """A curve drawn column by column, in dashes of DASH pixels and gaps of DASH_GAP along it.

    ``columns[i]`` spans the curve from row ``edge_rows[i]`` to ``edge_rows[i + 1]`` (its left
    and right edges) and gets those rows, rounded, and the one below: a flat stretch is two
    pixels thick like the stepped lines, and every column's middle row lies on the curve.
    """
    low = np.rint(np.minimum(edge_rows[:-1], edge_rows[1:])).astype(int)
    high = np.rint(np.maximum(edge_rows[:-1], edge_rows[1:])).astype(int)
    along = np.cumsum(np.hypot(1.0, np.diff(edge_rows)))  # length of the curve so far
    for column, top, bottom, length in zip(columns, low, high, along, strict=True):
        if length % (DASH + DASH_GAP) < DASH:
            draw.line([(int(column), top), (int(column), bottom + 1)], fill=colour)


def _draw_axes(image: Image.Image, plot: PlotArea, x_label: str) -> None:
    """The frame around the plot area, round ticks with their values, and the axis labels."""
    draw = ImageDraw.Draw(image)
    bottom = plot.top + plot.height
    draw.rectangle([plot.left - 1, plot.top - 1, plot.left + plot.width, bottom], outline=INK)
    x_ticks, x_format = nice_ticks(*plot.x_range)
    for value in x_ticks:
        x = round(plot.column(value))
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        draw.text((x, bottom + 6), x_format.format(value).replace("-", "−"),
                  font=font(TICK_SIZE), fill=INK, anchor="ma")
    y_ticks, y_format = nice_ticks(*plot.y_range)
    y_texts = [y_format.format(value) for value in y_ticks]
    for value, text in zip(y_ticks, y_texts, strict=True):
        y = round(plot.row(value))
        draw.line([(plot.left - 5, y), (plot.left - 1, y)], fill=INK)
        draw.text((plot.left - 7, y), text, font=font(TICK_SIZE), fill=INK, anchor="rm")
    draw.text((plot.left + plot.width / 2, bottom + X_LABEL_BELOW), drawable(x_label),
              font=font(LABEL_SIZE), fill=INK, anchor="ma")
    label_w, label_h = text_width(["density"], LABEL_SIZE), font(LABEL_SIZE).size + 4
    side = Image.new("RGB", (label_w, label_h), "white")
    ImageDraw.Draw(side).text((0, 0), "density", font=font(LABEL_SIZE), fill=INK)
    beside_ticks = plot.left - 7 - text_width(y_texts, TICK_SIZE) - GAP // 2 - label_h
    image.paste(side.transpose(Image.Transpose.ROTATE_90),
                (max(0, beside_ticks), plot.top + (plot.height - label_w) // 2))


def density_chart(groups: Sequence[tuple[str, np.ndarray]], spread: Sequence[np.ndarray],
                  x_label: str, plot_size: tuple[int, int], legend_below: bool) -> Chart:
    """Each labelled group's density (``np.histogram(..., density=True)``) as a stepped line on
    the bins of ``density_edges(spread)``, and N(0, 1) dashed black, in a plot area of
    ``plot_size`` = (width, height) pixels (a multiple of BINS wide, so every bin is as many
    whole columns). The legend goes inside at the upper right, the y axis reaching high enough
    that it covers no curve, or with ``legend_below`` under the axes, one line per entry.
    """
    if not groups or len(groups) > len(COLOURS):
        raise ValueError(f"1 to {len(COLOURS)} groups to draw, got {len(groups)}")
    width, height = plot_size
    if width % BINS:
        raise ValueError(f"the plot area's width must be a multiple of {BINS}, not {width}")
    edges = density_edges(spread)
    densities = [np.histogram(values, bins=edges, density=True)[0] for _, values in groups]
    entries = [(label, COLOURS[i]) for i, (label, _) in enumerate(groups)]
    entries.append((NORMAL_LABEL, NORMAL_COLOUR))
    legend_w = GAP + SAMPLE + GAP + text_width([label for label, _ in entries], LEGEND_SIZE) + GAP
    legend_h = ROW * len(entries) + GAP

    peak = max(max(float(d.max()) for d in densities), float(normal_density(0.0)))
    y_high = 1.05 * peak
    extent = float(edges[-1])
    if legend_below:
        box_left, box_top = LEFT, None  # placed under the x label below
    else:  # in the upper right corner: the axis goes high enough that the legend covers no curve
        box_left, box_top = LEFT + width - GAP - legend_w, TOP + GAP
        start = -extent + 2 * extent * (box_left - GAP // 2 - LEFT) / width  # value at its left
        under = max([float(d[edges[1:] > start].max(initial=0.0)) for d in densities]
                    + [float(normal_density(max(start, 0.0)))])
        free = 1 - (legend_h + 2 * GAP) / (height - 1)  # the part of the axis below the legend
        y_high = max(y_high, under / max(free, 0.1))
    plot = PlotArea(TOP, LEFT, height, width, (-extent, extent), (0.0, y_high))

    picture_h = TOP + height + X_LABEL_BELOW + font(LABEL_SIZE).size + GAP
    if legend_below:
        box_top = picture_h
        picture_h += legend_h
    picture_w = max(LEFT + width + RIGHT, box_left + legend_w + RIGHT)
    image = Image.new("RGB", (picture_w, picture_h), "white")
    draw = ImageDraw.Draw(image)

    _draw_axes(image, plot, x_label)
    edge_columns = [round(plot.column(edge)) for edge in edges]
    for density, (_, colour) in zip(densities, entries[:-1], strict=True):
        rows = [round(plot.row(value)) for value in density]
        draw.line([(x, y) for i, y in enumerate(rows) for x in edge_columns[i : i + 2]],
                  fill=colour, width=LINE_WIDTH)
    edge_values = plot.value_at_column(np.arange(LEFT - 0.5, LEFT + width))  # columns' edges
    _dashed(draw, np.arange(LEFT, LEFT + width), plot.row(normal_density(edge_values)),
            NORMAL_COLOUR)  # over the histograms, as matplotlib drew it

    # the legend: a white box with a grey frame inside the axes, or lines below them
    box = (box_left, box_top, box_left + legend_w, box_top + legend_h)
    if not legend_below:
        draw.rectangle(box, fill="white", outline=(200, 200, 200))
    legend = []
    for i, (label, colour) in enumerate(entries):
        y = box_top + GAP // 2 + ROW * i + ROW // 2
        sample = (box_left + GAP, y, box_left + GAP + SAMPLE, y + 1)  # 2 rows thick
        if colour == NORMAL_COLOUR:
            _dashed(draw, np.arange(sample[0], sample[2] + 1), np.full(SAMPLE + 2, float(y)),
                    colour)
        else:
            draw.line([(sample[0], y), (sample[2], y)], fill=colour, width=LINE_WIDTH)
        draw.text((sample[2] + GAP, y), drawable(label), font=font(LEGEND_SIZE), fill=INK,
                  anchor="lm")
        legend.append(LegendEntry(label, colour, sample))
    return Chart(np.asarray(image), plot=plot, legend=tuple(legend), legend_box=box)
