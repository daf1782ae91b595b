"""What an add-on does to a run, and where a learned token sits among CLIP's vocabulary.

The same prompt, seed and sampler run twice, without and with the add-on (or base and
fine-tune): the difference of the final images, their predicted clean images step by step, and
the word maps (DAAM's cross-attention per word, Tang et al. 2023) of both with their difference,
so that one sees which words the add-on moves. A word's map is drawn as its *share* of the word's
attention over the image (the map divided by its sum), so two runs compare where a word looks,
not how loud its attention is.

A textual inversion (Gal et al., 2022) adds rows to the token embedding table; its vectors are
compared with the table's: their nearest vocabulary tokens by cosine similarity
(``viz.prompt_lab.nearest_tokens``) and their lengths against the vocabulary's lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from viz.diffusion import WORD_MAP_CMAP
from viz.experiments import CHANGE_CMAP, change_map, strip_picture
from viz.heatmap import Picture, add_colorbar, add_title, arrange, heatmap
from viz.plot import DIVERGING, add_axes, new_figure
from viz.prompt_lab import nearest_tokens
from viz.tokens import readable_pieces

NEIGHBOUR_HEADERS = ["token", "rank", "nearest vocabulary token", "cosine similarity", "id"]
MAP_SIDE = 96  # pixels: the side a word map is enlarged to (at most)


def difference_view(without: np.ndarray, with_addon: np.ndarray, names: Sequence[str]
                    ) -> Picture:
    """Per pixel, the largest |with - without| over R, G, B of two (H, W, 3) uint8 images, in
    grey levels; ``names`` = (without, with) for the title."""
    change = change_map(without, with_addon)
    height, width = change.shape
    top = max(float(change.max()), 1.0)
    cell = max(1, 256 // max(height, width))
    picture = heatmap(change, CHANGE_CMAP, (0.0, top), (cell, cell))
    picture = add_colorbar(picture, CHANGE_CMAP, (0.0, top),
                           f"|{names[1]} - {names[0]}| (grey levels)")
    return add_title(picture, f"{names[1]} minus {names[0]}: mean {change.mean():.2f}, largest "
                              f"{change.max():.0f} grey levels")


def strip_pair(rows: Sequence[Sequence[np.ndarray]], names: Sequence[str],
               captions: Sequence[str]) -> Picture:
    """The predicted clean images x0 of the same steps of both runs, one row each."""
    picture = strip_picture(rows, names, [list(captions)] * len(rows))
    return add_title(picture, "What each run predicted the clean image to be, step by step")


def attention_shares(maps: torch.Tensor, positions: Sequence[int]) -> np.ndarray:
    """A word's map (its positions' maps summed, ``maps``: (T, h, w)) divided by its sum: where
    the word looks, as shares of 1. A map of zeros stays zeros."""
    summed = maps[list(positions)].double().sum(dim=0).cpu().numpy()
    total = summed.sum()
    return summed / total if total > 0 else summed


def word_map_comparison(groups_without: Sequence[tuple[str, list[int]]],
                        groups_with: Sequence[tuple[str, list[int]]],
                        maps_without: torch.Tensor, maps_with: torch.Tensor,
                        names: Sequence[str]) -> Picture:
    """One row per word (matched by its text; the run with the add-on's order, then the words
    only the other run has): its share map without, with, and with - without. A word one run
    does not have (a learned token is one token with it, several pieces without) is grey there
    and in the difference. The runs' maps share one scale; the difference is centred on 0.
    ``maps_*``: (T, h, w) summed over layers and steps. ``maps``: three boxes per row."""
    without, with_addon = dict(groups_without), dict(groups_with)
    labels = list(with_addon) + [label for label in without if label not in with_addon]
    shares = [(attention_shares(maps_without, without[label]) if label in without else None,
               attention_shares(maps_with, with_addon[label]) if label in with_addon else None)
              for label in labels]
    present = [m for pair in shares for m in pair if m is not None]
    if not present:
        raise ValueError("no word to compare")
    top = max(float(m.max()) for m in present) or 1.0
    extent = max((float(np.abs(b - a).max()) for a, b in shares
                  if a is not None and b is not None), default=0.0) or 1e-9
    height, width = present[0].shape
    cell = max(1, MAP_SIDE // max(height, width))
    absent = np.ones((height, width), dtype=bool)

    def panel(values: np.ndarray | None, cmap: str, limits: tuple[float, float], title: str
              ) -> Picture:
        if values is None:
            return heatmap(np.zeros((height, width)), cmap, limits, (cell, cell),
                           title=f"{title} (not a word here)", mask=absent)
        return heatmap(values, cmap, limits, (cell, cell), title=title)

    pictures = []
    for label, (a, b) in zip(labels, shares, strict=True):
        difference = None if a is None or b is None else b - a
        pictures += [panel(a, WORD_MAP_CMAP, (0.0, top), f"{label}: {names[0]}"),
                     panel(b, WORD_MAP_CMAP, (0.0, top), names[1]),
                     panel(difference, DIVERGING, (-extent, extent), f"{names[1]} - {names[0]}")]
    grid = add_colorbar(arrange(pictures, 3), DIVERGING, (-extent, extent),
                        f"difference of shares (maps: 0 to {top:.3g})")
    return add_title(grid, "Where each word looks: its share of the word's cross-attention per "
                           "latent pixel\n(red: more with the add-on, blue: less; grey: not a "
                           "word of that run)")


# ---------------------------------------------------------------------------------------------
# A learned token


def embedding_neighbours(table: torch.Tensor, vectors: torch.Tensor, tokens: Sequence[str],
                         pieces_of: Sequence[str], k: int) -> list[list[object]]:
    """Rows for NEIGHBOUR_HEADERS: for each learned vector (``vectors`` (n, D), named
    ``tokens``), the ``k`` rows of the vocabulary's table (V, D) nearest by cosine similarity.
    ``pieces_of`` maps a vocabulary id to its BPE piece."""
    rows = []
    table = table.detach().float().cpu()  # the model's table may be on a GPU
    for token, vector in zip(tokens, vectors, strict=True):
        extended = torch.cat([table, vector.detach().float().cpu()[None]])
        ids, scores = nearest_tokens(extended, table.shape[0], k)  # the vector, left out
        for rank, (token_id, score) in enumerate(zip(ids, scores, strict=True), start=1):
            rows.append([token, rank, readable_pieces([pieces_of[token_id]])[0],
                         round(score, 4), token_id])
    return rows


def norm_percentiles(table: torch.Tensor, vectors: torch.Tensor) -> list[float]:
    """For each vector, the percentage of vocabulary rows shorter than it (L2 norm)."""
    norms = table.detach().float().cpu().norm(dim=1)
    return [float((norms < v.norm()).double().mean() * 100)
            for v in vectors.detach().float().cpu()]


def embedding_norms_figure(table: torch.Tensor, vectors: torch.Tensor, tokens: Sequence[str]
                           ) -> Figure:
    """A histogram of the vocabulary rows' L2 norms, each learned vector's norm a red line."""
    norms = table.detach().float().cpu().norm(dim=1).numpy()
    figure = new_figure(6.4, 2.8)
    axes = add_axes(figure, 0.7, 0.55, 5.5, 1.9)
    axes.hist(norms, bins=80, color="#7a8fb8")
    for token, vector in zip(tokens, vectors.detach().float().cpu(), strict=True):
        norm = float(vector.norm())
        axes.axvline(norm, color="#c0392b", linewidth=1.5)
        axes.annotate(token, (norm, axes.get_ylim()[1] * 0.9), rotation=90, fontsize=8,
                      ha="right", va="top", color="#c0392b")
    axes.set_xlabel("L2 norm of a token embedding")
    axes.set_ylabel("vocabulary rows")
    axes.set_title(f"The learned vectors (red) among the {len(norms)} vocabulary rows",
                   fontsize=10)
    return figure
