"""Figures and tables that show what is inside SD v1's VAE latents and CLIP's text encoder.

Every function is pure: tensors (or plain lists) in, a ``matplotlib.figure.Figure`` or table rows
out. Figures are built with the object-oriented API on their own Agg canvas, never through
pyplot, so nothing is kept in a global figure registry and a figure is freed once dropped.
Each figure is sized from its content (cells, labels, colour bar) and its axes are placed in
inches, because a layout engine would draw every figure twice and double the time to show it.

Conventions: heat maps of signed values use a diverging colour map centred on 0 (red positive,
blue negative); magnitudes use a sequential one. Layers are numbered from 1, and hidden state
``i`` is the output of layer ``i`` (hidden state 0 is the token + position embedding). In
attention maps rows are queries (the token that looks) and columns are keys (the token looked
at); CLIP's text encoder is causal, so the upper triangle (the future) is masked and drawn grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.textpath import text_to_path
from matplotlib.ticker import LogFormatter

from sd_parts.images import latent_to_numpy

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>; SD v1's tokenizer pads with the same token
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: BOS + at most 75 tokens + EOS, padded to 77

TOKEN_ROWS_HEADERS = ["position", "piece", "id", "kind"]

DIVERGING = "RdBu_r"
# Room for a colour bar to the right of a plot, in inches: gap, bar, then its ticks and label.
BAR_GAP, BAR_WIDTH, BAR_ROOM = 0.12, 0.15, 0.85
BAR_BLOCK = BAR_GAP + BAR_WIDTH + BAR_ROOM


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _new_figure(width: float, height: float) -> Figure:
    """A figure of this size in inches on its own Agg canvas (no pyplot, no layout engine)."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _add_axes(figure: Figure, left: float, bottom: float, width: float, height: float) -> Axes:
    """An axes placed in inches from the figure's bottom-left corner."""
    figure_width, figure_height = figure.get_size_inches()
    return figure.add_axes(
        (left / figure_width, bottom / figure_height, width / figure_width, height / figure_height)
    )


def _add_colorbar(
    figure: Figure,
    mappable: AxesImage | ScalarMappable,
    left: float,
    bottom: float,
    height: float,
    label: str,
    extend: str = "neither",
) -> None:
    """A vertical colour bar placed in inches; ``left`` is where the gap before the bar starts."""
    bar = _add_axes(figure, left + BAR_GAP, bottom, BAR_WIDTH, height)
    figure.colorbar(mappable, cax=bar, extend=extend)
    bar.set_ylabel(label, fontsize=8)
    bar.tick_params(labelsize=7)


def _text_width(texts: Sequence[str], fontsize: float) -> float:
    """Width in inches of the widest text at this font size, to leave room for tick labels."""
    font = FontProperties(size=fontsize)
    widths = [text_to_path.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts]
    return max(widths, default=0.0) / 72.0  # points to inches


def _cell_font(cell: float) -> float:
    """A tick label size in points that fits a cell of this many inches (5 to 9 pt)."""
    return min(max(cell * 72.0 * 0.7, 5.0), 9.0)


def _as_array(values: torch.Tensor | np.ndarray, ndim: int, what: str) -> np.ndarray:
    """A tensor or array as float64 numpy with the expected number of dimensions."""
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _plain(text: str) -> str:
    """Text shown literally: matplotlib would read a pair of '$' as a formula."""
    return text.replace("$", r"\$")


def _check_labels(labels: Sequence[str], count: int, what: str) -> list[str]:
    """The labels as literal strings, after checking there is one per position."""
    if len(labels) != count:
        raise ValueError(f"{what} has {count} positions but {len(labels)} labels were given")
    return [_plain(str(label)) for label in labels]


def _token_ticks(axes: Axes, labels: list[str], fontsize: float, x: bool, y: bool) -> None:
    """One token label on every column (x) and/or row (y) of a heat map; no ticks elsewhere."""
    positions = range(len(labels))
    if x:
        axes.set_xticks(positions, labels, rotation=90, fontsize=fontsize)
    else:
        axes.set_xticks([])
    if y:
        axes.set_yticks(positions, labels, fontsize=fontsize)
    else:
        axes.set_yticks([])


def _attention_colormap() -> Colormap:
    """A sequential colour map that draws masked (future) positions in light grey."""
    return matplotlib.colormaps["viridis"].with_extremes(bad="0.85")


def _mask_future(weights: np.ndarray) -> np.ma.MaskedArray:
    """Hide what a causal model cannot see: keys after the query (last two axes are T x T)."""
    count = weights.shape[-1]
    future = np.triu(np.ones((count, count), dtype=bool), k=1)
    return np.ma.masked_array(weights, mask=np.broadcast_to(future, weights.shape))


def _panel_size(height: int, width: int, longer: float, shortest: float) -> tuple[float, float]:
    """Width and height in inches of a panel with the array's aspect ratio (within limits)."""
    scale = longer / max(height, width)
    return max(width * scale, shortest), max(height * scale, shortest)


# ---------------------------------------------------------------------------------------------
# Latent and reconstruction views


def _channel_grid(
    values: np.ndarray, cmap: str, centred: bool, shared_scale: bool, title: str, bar_label: str
) -> Figure:
    """A 2x2 grid of heat maps, one per channel, with one shared or four separate colour bars."""
    _, height, width = values.shape
    panel_w, panel_h = _panel_size(height, width, longer=3.0, shortest=0.6)
    column = panel_w if shared_scale else panel_w + BAR_BLOCK
    left, bottom, gap_x, gap_y, top = 0.45, 0.35, 0.3, 0.45, 0.8
    figure_width = left + 2 * column + gap_x + (BAR_BLOCK if shared_scale else 0.0)
    figure = _new_figure(figure_width, bottom + 2 * panel_h + gap_y + top)

    def limits(block: np.ndarray) -> tuple[float, float]:
        if centred:  # symmetric, so zero gets the neutral middle colour
            extent = max(float(np.abs(block).max()), 1e-8)
            return -extent, extent
        return min(float(block.min()), 0.0), max(float(block.max()), 1e-8)

    for channel in range(4):
        row, col = divmod(channel, 2)
        x, y = left + col * (column + gap_x), bottom + (1 - row) * (panel_h + gap_y)
        block = values[channel]
        low, high = limits(values if shared_scale else block)
        axes = _add_axes(figure, x, y, panel_w, panel_h)
        image = axes.imshow(
            block, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest"
        )
        # Pixel coordinates teach nothing here; the axis labels give the size instead.
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(
            f"channel {channel}: mean {block.mean():+.2f}, std {block.std():.2f}", fontsize=9
        )
        if row == 1:
            axes.set_xlabel(f"x: {width} latent pixels", fontsize=8)
        if col == 0:
            axes.set_ylabel(f"y: {height} latent pixels", fontsize=8)
        if not shared_scale:
            _add_colorbar(figure, image, x + panel_w, y, panel_h, bar_label)
    if shared_scale:
        _add_colorbar(
            figure, image, left + 2 * column + gap_x, bottom, 2 * panel_h + gap_y, bar_label
        )
    figure.suptitle(title, fontsize=11)
    return figure


def latent_channels_figure(latent: torch.Tensor, shared_scale: bool = True) -> Figure:
    """The 4 channels of an (unscaled) latent as heat maps, red positive, blue negative.

    With ``shared_scale`` one colour bar serves all four, so channels can be compared; otherwise
    each channel gets its own range and colour bar, which shows more detail in quiet channels.
    Axes: 5 with a shared scale, 8 without.
    """
    values = latent_to_numpy(latent)
    _, height, width = values.shape
    title = f"The 4 latent channels ({width}x{height}; 1 latent pixel = 8x8 image pixels)"
    return _channel_grid(values, DIVERGING, True, shared_scale, title, "latent value (unscaled)")


def std_map_figure(std: torch.Tensor, shared_scale: bool = True) -> Figure:
    """The encoder's uncertainty: the posterior's standard deviation per channel and pixel.

    The VAE encoder outputs a mean and a std for every latent value; a sample is
    mean + std x noise. Small values mean the encoder is sure. Axes: 5 shared, 8 separate.
    """
    values = latent_to_numpy(std)
    title = "Posterior std per channel (sample = mean + std x noise)"
    return _channel_grid(values, "viridis", False, shared_scale, title, "standard deviation")


def latent_histogram_figure(
    latent: torch.Tensor, scaling_factor: float, per_channel: bool = True
) -> Figure:
    """Histogram (density) of the scaled latent against the standard normal N(0, 1). One axes.

    The VAE's raw latent has a std of about 5; multiplying by the scaling factor (0.18215 for SD
    v1) brings it to roughly unit variance, the scale the diffusion model's noise schedule assumes.
    One line per channel, or one for all values with ``per_channel=False``.
    """
    scaled = latent_to_numpy(latent) * scaling_factor
    extent = max(4.0, float(np.quantile(np.abs(scaled), 0.999)))
    edges = np.linspace(-extent, extent, 101)
    figure = _new_figure(7.5, 4.4)
    axes = _add_axes(figure, 0.75, 0.6, 6.5, 3.05)
    groups = [(f"channel {c}", scaled[c]) for c in range(4)] if per_channel else [("all", scaled)]
    for label, group in groups:
        density, _ = np.histogram(group, bins=edges, density=True)
        axes.stairs(density, edges, label=f"{label} (std {group.std():.2f})", linewidth=1.5)
    x = np.linspace(-extent, extent, 400)
    axes.plot(x, np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi), "k--", label="N(0, 1)")
    axes.set_xlabel(f"latent value x {scaling_factor:g}")
    axes.set_ylabel("density")
    axes.legend(fontsize=8)
    axes.set_title(
        f"Scaled latent (x {scaling_factor:g}) vs a standard normal: overall std "
        f"{scaled.std():.2f}\nThe factor brings latents to roughly unit variance, the scale the "
        "diffusion model was trained on",
        fontsize=9,
    )
    return figure


def abs_error_figure(original: np.ndarray, reconstruction: np.ndarray) -> Figure:
    """Where the VAE loses detail: |original - reconstruction| averaged over R, G, B per pixel.

    Takes two (H, W, 3) uint8 arrays (or RGB images). The colour bar is in 0-255 units and ends
    at the 99.5th percentile so typical errors are visible; an arrow marks larger ones. 2 axes.
    """
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(reconstruction, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (H, W, 3) images of one shape, got {a.shape}, {b.shape}")
    error = np.abs(a - b).mean(axis=2)
    height, width = error.shape
    top = max(float(np.quantile(error, 0.995)), 1.0)
    panel_w, panel_h = _panel_size(height, width, longer=5.0, shortest=0.8)
    left, bottom, title = 0.45, 0.35, 0.5
    figure = _new_figure(left + panel_w + BAR_BLOCK, bottom + panel_h + title)
    axes = _add_axes(figure, left, bottom, panel_w, panel_h)
    # Default interpolation, not "nearest": it averages when a large image is drawn smaller.
    image = axes.imshow(error, cmap="magma", vmin=0.0, vmax=top, aspect="auto")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_xlabel(f"x: {width} pixels", fontsize=8)
    axes.set_ylabel(f"y: {height} pixels", fontsize=8)
    extend = "max" if error.max() > top else "neither"
    _add_colorbar(
        figure, image, left + panel_w, bottom, panel_h, "mean |error| over R, G, B (0-255)", extend
    )
    axes.set_title(
        f"Reconstruction error: mean {error.mean():.2f}, max {error.max():.0f} (of 255)",
        fontsize=10,
    )
    return figure


# ---------------------------------------------------------------------------------------------
# Token tables


def _content(pieces: Sequence[str]) -> list[str]:
    """The prompt's own pieces: a leading BOS and a trailing EOS marker are dropped if present."""
    items = list(pieces)
    if items and items[0] == BOS_TEXT:
        items = items[1:]
    if items and items[-1] == EOS_TEXT:
        items = items[:-1]
    return items


def positions_used(n_tokens: int, max_length: int = MAX_LENGTH) -> int:
    """How many of the positions are real (BOS + kept tokens + EOS); the rest are padding."""
    return min(n_tokens, max_length - 2) + 2


def token_rows(
    ids: Sequence[int],
    pieces: Sequence[str],
    max_length: int = MAX_LENGTH,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
) -> list[list]:
    """The ``max_length`` positions SD v1's text encoder sees, as rows for ``TOKEN_ROWS_HEADERS``.

    ``ids`` and ``pieces`` are the prompt's full, untruncated tokens, with or without the BOS and
    EOS markers (a leading BOS id and a trailing EOS id are recognised). The result is BOS, at
    most ``max_length - 2`` tokens, EOS, then padding up to ``max_length`` (SD v1's tokenizer pads
    with the EOS token itself): rows [position, piece, id, kind] with kind one of "BOS", "token",
    "EOS", "padding". Pieces are returned exactly as given (CLIP marks a word's end with "</w>"),
    never as HTML.
    """
    if len(ids) != len(pieces):
        raise ValueError(f"{len(ids)} ids but {len(pieces)} pieces")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
    pairs = list(zip(ids, pieces, strict=True))
    if pairs and pairs[0][0] == bos_id:
        pairs = pairs[1:]
    if pairs and pairs[-1][0] == eos_id:
        pairs = pairs[:-1]
    kept = pairs[: max_length - 2]
    rows = [[0, BOS_TEXT, bos_id, "BOS"]]
    rows += [[i + 1, piece, int(token), "token"] for i, (token, piece) in enumerate(kept)]
    rows.append([len(rows), EOS_TEXT, eos_id, "EOS"])
    rows += [[i, EOS_TEXT, eos_id, "padding"] for i in range(len(rows), max_length)]
    return rows


def _words(pieces: Sequence[str]) -> list[tuple[str, int, int]]:
    """Words rebuilt from BPE pieces: (word, first piece index, end piece index)."""
    words, start = [], 0
    for index, piece in enumerate(pieces):
        if piece.endswith("</w>") or index == len(pieces) - 1:
            text = "".join(p.removesuffix("</w>") for p in pieces[start : index + 1])
            words.append((text, start, index + 1))
            start = index + 1
    return words


def truncation_note(pieces_full: Sequence[str], max_length: int = MAX_LENGTH) -> str:
    """A sentence naming the words the text encoder never sees; empty when the prompt fits.

    ``pieces_full`` are the prompt's BPE pieces, untruncated, with or without BOS/EOS. A word cut
    in the middle is named with "(partly)".
    """
    pieces = _content(pieces_full)
    room = max_length - 2
    if len(pieces) <= room:
        return ""
    cut = []
    for word, start, end in _words(pieces):
        if end > room:
            cut.append(word if start >= room else f"{word} (partly)")
    shown = ", ".join(f"“{word}”" for word in cut[:40])
    more = f" and {len(cut) - 40} more" if len(cut) > 40 else ""
    return (
        f"The prompt has {len(pieces)} tokens but only {room} fit between BOS and EOS, so the last "
        f"{len(pieces) - room} are cut and the text encoder never sees these words: {shown}{more}."
    )


def token_count_note(pieces_full: Sequence[str], max_length: int = MAX_LENGTH) -> str:
    """For example "12 of 77 positions used (BOS + 10 tokens + EOS); 65 are padding."."""
    n_tokens = len(_content(pieces_full))
    kept = min(n_tokens, max_length - 2)
    used = positions_used(n_tokens, max_length)
    noun = "token" if kept == 1 else "tokens"
    note = f"{used} of {max_length} positions used (BOS + {kept} {noun} + EOS)"
    if n_tokens > kept:
        return f"{note}; {n_tokens - kept} more tokens were cut."
    return f"{note}; {max_length - used} are padding."


# ---------------------------------------------------------------------------------------------
# Text encoder views


def embedding_heatmap_figure(hidden: torch.Tensor, labels: Sequence[str], n_real: int) -> Figure:
    """Every position's vector as a row of colours: tokens x hidden dimensions. 2 axes.

    ``hidden`` is (T, D), e.g. 77 x 768; rows from ``n_real`` on are padding and are faded.
    The colour range ends at the 99th percentile of |value| because a few dimensions of CLIP's
    states are far larger than the rest and would wash everything else out.
    """
    values = _as_array(hidden, 2, "hidden")
    count, dims = values.shape
    names = _check_labels(labels, count, "hidden")
    if not 0 <= n_real <= count:
        raise ValueError(f"n_real must be between 0 and {count}, got {n_real}")
    extent = max(float(np.quantile(np.abs(values), 0.99)), 1e-8)
    row = min(max(6.0 / count, 0.11), 0.3)
    fontsize = _cell_font(row)
    plot_w, plot_h = 8.0, max(row * count, 1.2)
    left = _text_width(names, fontsize) + 0.45  # tick labels, then the axis label
    bottom, top = 0.6, 0.45
    figure = _new_figure(left + plot_w + BAR_BLOCK, bottom + plot_h + top)
    axes = _add_axes(figure, left, bottom, plot_w, plot_h)
    image = axes.imshow(
        values, cmap=DIVERGING, vmin=-extent, vmax=extent, aspect="auto", interpolation="nearest"
    )
    axes.set_yticks(range(count), names, fontsize=fontsize)
    if n_real < count:
        # A white wash fades the padding rows without hiding them: the U-Net still reads them.
        axes.axhspan(n_real - 0.5, count - 0.5, facecolor=(1.0, 1.0, 1.0, 0.55), linewidth=0)
        axes.axhline(n_real - 0.5, color="black", linewidth=1.0)
        axes.text(
            dims / 2,
            (n_real + count) / 2 - 0.5,
            f"padding: positions {n_real}-{count - 1}",
            ha="center",
            va="center",
            fontsize=10,
            bbox={"facecolor": "white", "alpha": 0.9, "linewidth": 0},
        )
    _add_colorbar(figure, image, left + plot_w, bottom, plot_h, "value", "both")
    axes.set_xlabel(f"hidden dimension (0-{dims - 1})")
    axes.set_ylabel("position: token")
    axes.set_title(f"Text embeddings: {count} positions x {dims} dimensions", fontsize=10)
    return figure


def hidden_state_norms_figure(
    hidden_states: Sequence[torch.Tensor], labels: Sequence[str], n_real: int
) -> Figure:
    """Each real token's vector length (L2 norm) through the hidden states, on a log scale.

    ``hidden_states`` is the list of L + 1 (T, D) tensors (13 for SD v1: the embeddings, then each
    layer's output); ``labels`` has one label per position T, and the first ``n_real`` positions
    are drawn, one line each, coloured from dark (first) to yellow (last). Up to 20 tokens get a
    legend (1 axes); more get a colour bar of positions (2 axes).
    """
    if len(hidden_states) < 2:
        raise ValueError("need the embeddings and at least one layer's hidden states")
    stacked = np.stack([_as_array(state, 2, "each hidden state") for state in hidden_states])
    count = stacked.shape[1]
    names = _check_labels(labels, count, "hidden_states")
    if not 1 <= n_real <= count:
        raise ValueError(f"n_real must be between 1 and {count}, got {n_real}")
    norms = np.linalg.norm(stacked[:, :n_real], axis=2)  # (L + 1, n_real)
    legend = n_real <= 20
    entries = [f"{token}: {names[token]}" for token in range(n_real)]
    right = _text_width(entries, 7) + 0.75 if legend else BAR_BLOCK
    left, bottom, plot_w, plot_h, top = 0.8, 0.6, 6.0, 3.6, 0.45
    figure = _new_figure(left + plot_w + right, bottom + plot_h + top)
    axes = _add_axes(figure, left, bottom, plot_w, plot_h)
    layers = np.arange(len(hidden_states))
    colours = matplotlib.colormaps["viridis"]
    for token in range(n_real):
        shade = token / max(n_real - 1, 1)
        axes.plot(
            layers,
            norms[:, token],
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=colours(shade),
            label=entries[token],
        )
    axes.set_yscale("log")  # the BOS token's norm can be many times the others'
    # Plain numbers (200, not 2 x 10^2) read more easily and skip matplotlib's formula layout.
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
    axes.set_xticks(layers, ["emb"] + [str(layer) for layer in layers[1:]])
    axes.set_xlabel("hidden state (emb = token + position embedding, i = after layer i)")
    axes.set_ylabel("L2 norm (log scale)")
    axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        scale = ScalarMappable(norm=Normalize(0, n_real - 1), cmap=colours)
        _add_colorbar(figure, scale, left + plot_w, bottom, plot_h, "token position")
    axes.set_title("How long each token's vector is after every layer", fontsize=10)
    return figure


def _square_map(
    matrix: np.ma.MaskedArray | np.ndarray,
    names: list[str],
    cmap: str | Colormap,
    limits: tuple[float, float],
    bar_label: str,
) -> tuple[Figure, Axes]:
    """A T x T heat map with a token name on every row and column, and a colour bar."""
    count = len(names)
    side = min(max(0.3 * count, 2.5), 9.0)
    fontsize = _cell_font(side / count)
    margin = _text_width(names, fontsize) + 0.4  # tick labels, then the axis label
    top = 0.45
    figure = _new_figure(margin + side + BAR_BLOCK, margin + side + top)
    axes = _add_axes(figure, margin, margin, side, side)
    image = axes.imshow(
        matrix, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto", interpolation="nearest"
    )
    _token_ticks(axes, names, fontsize, x=True, y=True)
    _add_colorbar(figure, image, margin + side, margin, side, bar_label)
    return figure, axes


def cosine_similarity_figure(hidden: torch.Tensor, labels: Sequence[str]) -> Figure:
    """Token-to-token cosine similarity of (T, D) hidden states, on a fixed -1 to 1 scale. 2 axes.

    1 means the two vectors point the same way. Up to 12 tokens, each cell shows its number.
    """
    values = _as_array(hidden, 2, "hidden")
    count = values.shape[0]
    names = _check_labels(labels, count, "hidden")
    unit = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    figure, axes = _square_map(similarity, names, DIVERGING, (-1.0, 1.0), "cosine similarity")
    if count <= 12:
        for row in range(count):
            for column in range(count):
                value = similarity[row, column]
                axes.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(value) > 0.6 else "black",
                )
    axes.set_xlabel("token")
    axes.set_ylabel("token")
    axes.set_title("How alike the token vectors are (cosine similarity)", fontsize=10)
    return figure


def attention_figure(attention: torch.Tensor, labels: Sequence[str], title: str) -> Figure:
    """One (T, T) causal attention map: rows are queries, columns are keys. 2 axes.

    Each row sums to 1 over the positions that query may see; the future (upper triangle) is
    masked and grey. ``title`` is shown as given, e.g. "Layer 3, head 5".
    """
    weights = _as_array(attention, 2, "attention")
    count = weights.shape[0]
    if weights.shape != (count, count):
        raise ValueError(f"attention must be square (T, T), got {weights.shape}")
    names = _check_labels(labels, count, "attention")
    top = max(float(weights.max()), 1e-8)
    figure, axes = _square_map(
        _mask_future(weights), names, _attention_colormap(), (0.0, top), "attention weight"
    )
    axes.set_xlabel("key: the token attended to")
    axes.set_ylabel("query: the token attending")
    axes.set_title(_plain(title), fontsize=10)
    return figure


def attention_heads_grid_figure(
    attention: torch.Tensor, labels: Sequence[str], layer: int
) -> Figure:
    """All heads of one layer side by side (3x4 for 12 heads) on one shared colour scale.

    ``attention`` is (H, T, T); ``layer`` only labels the title (numbered from 1). Tokens label
    the outer axes when T <= 16. Axes: H heat maps + 1 colour bar.
    """
    weights = _as_array(attention, 3, "attention")
    heads, count, _ = weights.shape
    if weights.shape != (heads, count, count):
        raise ValueError(f"attention must be (H, T, T), got {weights.shape}")
    names = _check_labels(labels, count, "attention")
    columns = min(4, heads)
    rows = math.ceil(heads / columns)
    panel, gap_x, gap_y, top = 2.2, 0.12, 0.35, 0.85
    small = count <= 16  # token names fit on the outer axes only for short prompts
    fontsize = _cell_font(panel / count)
    margin = (_text_width(names, fontsize) if small else 0.0) + 0.4
    grid_w = columns * panel + (columns - 1) * gap_x
    grid_h = rows * panel + (rows - 1) * gap_y
    figure = _new_figure(margin + grid_w + BAR_BLOCK, margin + grid_h + top)
    masked = _mask_future(weights)
    highest = max(float(weights.max()), 1e-8)
    for head in range(heads):
        row, col = divmod(head, columns)
        x = margin + col * (panel + gap_x)
        y = margin + (rows - 1 - row) * (panel + gap_y)
        axes = _add_axes(figure, x, y, panel, panel)
        image = axes.imshow(
            masked[head],
            cmap=_attention_colormap(),
            vmin=0.0,
            vmax=highest,
            aspect="auto",
            interpolation="nearest",
        )
        axes.set_title(f"head {head + 1}", fontsize=9)
        last_row, first_column = head + columns >= heads, col == 0
        _token_ticks(axes, names, fontsize, x=small and last_row, y=small and first_column)
        if last_row:
            axes.set_xlabel("key")
        if first_column:
            axes.set_ylabel("query")
    _add_colorbar(figure, image, margin + grid_w, margin, grid_h, "attention weight")
    figure.suptitle(
        f"Layer {layer}: all {heads} heads (rows: query token, columns: key token)", fontsize=11
    )
    return figure


def eos_attention_figure(
    attentions: Sequence[torch.Tensor], eos_index: int, labels: Sequence[str]
) -> Figure:
    """What the EOS token attends to in every layer, averaged over heads: layers x keys. 2 axes.

    ``attentions`` holds one (H, T, T) tensor per layer; ``eos_index`` is EOS's position and
    ``labels`` names the T keys. CLIP reads its pooled text embedding at EOS; SD v1's U-Net,
    by contrast, uses all 77 positions.
    """
    if not attentions:
        raise ValueError("need at least one layer's attention")
    rows = []
    for weights in attentions:
        array = _as_array(weights, 3, "each layer's attention")
        if not 0 <= eos_index < array.shape[1]:
            raise ValueError(f"eos_index {eos_index} is outside 0..{array.shape[1] - 1}")
        rows.append(array[:, eos_index, :].mean(axis=0))
    table = np.stack(rows)  # (L, T)
    layers, count = table.shape
    names = _check_labels(labels, count, "attention keys")
    layer_names = [f"layer {layer + 1}" for layer in range(layers)]
    plot_w = min(max(0.45 * count, 5.0), 10.0)
    plot_h = 0.25 * layers
    fontsize = _cell_font(plot_w / count)
    left = _text_width(layer_names, 8) + 0.2
    bottom = _text_width(names, fontsize) + 0.45
    top = 0.7
    figure = _new_figure(left + plot_w + BAR_BLOCK, bottom + plot_h + top)
    axes = _add_axes(figure, left, bottom, plot_w, plot_h)
    future = np.broadcast_to(np.arange(count) > eos_index, table.shape)
    image = axes.imshow(
        np.ma.masked_array(table, mask=future),
        cmap=_attention_colormap(),
        vmin=0.0,
        vmax=max(float(table.max()), 1e-8),
        aspect="auto",
        interpolation="nearest",
    )
    _token_ticks(axes, names, fontsize, x=True, y=False)
    axes.set_yticks(range(layers), layer_names, fontsize=8)
    _add_colorbar(figure, image, left + plot_w, bottom, plot_h, "weight (mean over heads)")
    axes.set_xlabel("key: the token EOS attends to")
    axes.set_title(
        "What the EOS token attends to in each layer\n(CLIP's pooled embedding is read at EOS; "
        "SD v1 uses all 77 positions)",
        fontsize=10,
    )
    return figure
