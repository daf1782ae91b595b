"""Prompt habits of the web UIs, measured on CLIP's embeddings: two prompts compared position by
position through every layer, CLIP skip, prompts past 75 tokens, the weighting syntax, and the
vocabulary entries nearest to a token.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021).
The rules themselves live in ``sd_parts``: ``CLIPTextEncoder(clip_skip=...)`` (diffusers'
numbering), ``sd_parts.prompts`` (chunks of 75 tokens, ``(word:1.3)``). These functions only turn
what those rules produce into tables, sentences and labelled heat maps (``viz.heatmap``), so that
every number on the page can be read back from the picture.

The text encoder is causal: position t sees positions 0..t only. Two prompts that agree up to
position k therefore give the same vectors at 0..k-1 in every layer, and a change at k reaches
every later position from the first layer on, the padding included (the UNet attends to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sd_parts.prompts import chunk
from sd_parts.tokenizer import BOS_TOKEN, EOS_TOKEN, MAX_LENGTH
from viz.heatmap import Picture, add_colorbar, add_title, arrange, heatmap
from viz.plot import DIVERGING, SEQUENTIAL, as_array
from viz.tokens import readable_pieces, words

# A position counts as unchanged when its L2 distance is below this fraction of the longer
# vector's norm: float32 rounding through 12 layers stays orders of magnitude below, and any
# real change (another token anywhere before it) orders of magnitude above.
UNCHANGED = 1e-5
ALIGNED_HEADERS = ["position", "prompt A", "kind A", "prompt B", "kind B", "token"]
CHUNK_HEADERS = ["chunk", "position in chunk", "context vector", "text", "id", "kind"]
WEIGHT_HEADERS = ["position", "text", "weight", "norm before", "norm after", "after / before"]
# the similarity beside the text, so a narrow page shows both before it scrolls sideways
NEAREST_HEADERS = ["rank", "text", "cosine similarity", "id", "piece"]
MAX_RUNS = 6  # runs of changed / unchanged positions a reading names before summing up


def short(value: float) -> str:
    """A number for a sentence: 3 significant digits, or ``3e-7`` for the very small."""
    if value == 0:
        return "0"
    if abs(value) >= 1e-3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def span(start: int, end: int) -> str:
    """Positions start..end (inclusive) in words."""
    return f"position {start}" if start == end else f"positions {start}-{end}"


def ranges(positions: Sequence[int]) -> str:
    """Sorted positions as runs: ``[6, 7, 8, 12]`` reads "6-8, 12"."""
    chosen = set(positions)
    flags = [p in chosen for p in range(max(chosen, default=-1) + 1)]
    return ", ".join(f"{a}-{b}" if a < b else f"{a}" for a, b, flag in runs(flags) if flag)


def distances(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row by row of two (T, D) arrays: cosine distance (1 - cos), L2 distance, and whether the
    row changed (L2 above ``UNCHANGED`` times the longer row's norm)."""
    x, y = as_array(a, 2, "a"), as_array(b, 2, "b")
    if x.shape != y.shape:
        raise ValueError(f"the two arrays must have one shape, got {x.shape} and {y.shape}")
    norm_x, norm_y = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    cosine = (x * y).sum(axis=1) / np.maximum(norm_x * norm_y, 1e-30)
    l2 = np.linalg.norm(x - y, axis=1)
    changed = l2 > UNCHANGED * np.maximum(np.maximum(norm_x, norm_y), 1e-30)
    return np.clip(1.0 - cosine, 0.0, 2.0), l2, changed


# ---------------------------------------------------------------------------------------------
# Two prompts through every layer


def layer_columns(n_layers: int) -> list[str]:
    """emb (token + position embedding), each layer's output 1..L, final (after the final
    LayerNorm: what the UNet receives)."""
    return ["emb", *[str(i) for i in range(1, n_layers + 1)], "final"]


@dataclass(frozen=True)
class Comparison:
    """Two prompts' vectors compared at every position (rows) and layer (columns)."""

    cosine: np.ndarray  # (T, C) cosine distance, 0 for vectors pointing the same way
    l2: np.ndarray  # (T, C) Euclidean distance
    changed: np.ndarray  # (T, C) bool, see distances()
    columns: list[str]  # layer_columns(): emb, 1..L, final


def compare_states(states_a: Sequence[torch.Tensor], states_b: Sequence[torch.Tensor]
                   ) -> Comparison:
    """``states_*``: the L + 2 (T, D) tensors emb, layers 1..L, final of one prompt each."""
    if len(states_a) != len(states_b) or len(states_a) < 3:
        raise ValueError(f"need emb, at least one layer and final for both prompts, got "
                         f"{len(states_a)} and {len(states_b)} states")
    columns = [distances(a, b) for a, b in zip(states_a, states_b, strict=True)]
    cosine, l2, changed = (np.stack([c[i] for c in columns], axis=1) for i in range(3))
    return Comparison(cosine, l2, changed, layer_columns(len(states_a) - 2))


def row_height(rows: int) -> int:
    """A map's row height in pixels: about 620 px for the whole map, but never so thin that its
    label falls under 12 px (a 77-position map is then about 1,100 px tall, and scrolls)."""
    return int(min(max(620 // max(rows, 1), 14), 22))


def _log_map(values: np.ndarray, changed: np.ndarray, cell: tuple[int, int], rows: Sequence[str],
             columns: Sequence[str], what: str) -> Picture:
    """Changed cells coloured by log10 of the value; unchanged ones grey."""
    logs = np.log10(np.maximum(values, 1e-30))
    shown = logs[changed]
    low, high = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    high = max(high, low + 1e-6)
    picture = heatmap(logs, SEQUENTIAL, (low, high), cell, rows, columns, mask=~changed)
    return add_title(add_colorbar(picture, SEQUENTIAL, (low, high), f"log10 of the {what}"), what)


def comparison_view(comparison: Comparison, labels: Sequence[str]) -> Picture:
    """Positions x layers, twice: the cosine distance and the L2 distance between the prompts'
    vectors, colours on a log scale; grey cells are unchanged. Padding rows keep their colours:
    the UNet reads them too."""
    count = comparison.l2.shape[0]
    if len(labels) != count:
        raise ValueError(f"{count} positions but {len(labels)} labels")
    cell = (row_height(count), 30)
    panels = [
        _log_map(comparison.cosine, comparison.changed, cell, labels, comparison.columns,
                 "cosine distance"),
        _log_map(comparison.l2, comparison.changed, cell, (), comparison.columns, "L2 distance"),
    ]
    return add_title(arrange(panels, 2), "How far apart the two prompts' vectors are, position "
                                         "by position, after every layer (grey: unchanged)\n"
                                         "columns: emb = token + position embedding, i = after "
                                         "layer i, final = after the final LayerNorm")


def aligned_rows(rows_a: Sequence[Sequence], rows_b: Sequence[Sequence], count: int
                 ) -> list[list]:
    """The first ``count`` positions of two prompts side by side, from ``tokens.token_rows``."""
    return [[a[0], a[1], a[4], b[1], b[4], "same" if a[3] == b[3] else "differs"]
            for a, b in zip(rows_a[:count], rows_b[:count], strict=True)]


def runs(flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """(first, last, flag) of each run of equal flags."""
    found: list[tuple[int, int, bool]] = []
    for index, flag in enumerate(flags):
        if found and found[-1][2] == flag:
            found[-1] = (found[-1][0], index, flag)
        else:
            found.append((index, index, bool(flag)))
    return found


def comparison_reading(comparison: Comparison, ids_a: Sequence[int], ids_b: Sequence[int],
                       padding_from: int) -> str:
    """Sentences that read the comparison: which positions changed, why the others did not.

    ``padding_from`` is the first position that is padding in both prompts.
    """
    count = comparison.l2.shape[0]
    moved = comparison.changed.any(axis=1)
    differ = [p for p in range(count) if ids_a[p] != ids_b[p]]
    parts = []
    for first, last, flag in runs(moved)[:MAX_RUNS]:
        if flag:
            padding = ", padding included" if last >= padding_from else ""
            parts.append(f"{span(first, last)} changed{padding}")
            continue
        largest = short(float(comparison.l2[first: last + 1].max()))
        why = ""
        if first == 0 and differ:
            why = (": causal attention, each position sees only itself and the positions "
                   "before it, and up to there the tokens are the same")
        parts.append(f"{span(first, last)} unchanged (max L2 {largest}){why}")
    if len(runs(moved)) > MAX_RUNS:
        parts.append(f"and {len(runs(moved)) - MAX_RUNS} more runs")
    reading = "; ".join(parts)
    reading = reading[0].upper() + reading[1:] + "."
    if not differ:
        return f"The two prompts give the same {count} tokens here. {reading}"
    emb = [p for p in range(count) if comparison.changed[p, 0]]
    at_emb = ("only the positions whose tokens differ change" if emb == differ
              else "these positions change")
    final = int(comparison.changed[:, -1].sum())
    return (f"{reading} The tokens differ at {ranges(differ)}. At the embeddings (column "
            f"emb) {at_emb}: {ranges(emb) or 'none'}; the layers carry a "
            f"difference to every later position. In the final embeddings {final} of {count} "
            "positions differ.")


# ---------------------------------------------------------------------------------------------
# CLIP skip


def skip_label(skip: int) -> str:
    """Both numberings: diffusers counts the layers left out, the web UIs count from 1."""
    return f"CLIP skip {skip + 1} / clip_skip={skip}"


def clip_skip_distances(final: torch.Tensor, skipped: Sequence[torch.Tensor]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(T, K) cosine and L2 distances between the final embeddings (no layer skipped) and those
    with 1..K layers skipped."""
    pairs = [distances(final, other)[:2] for other in skipped]
    return (np.stack([p[0] for p in pairs], axis=1), np.stack([p[1] for p in pairs], axis=1))


def clip_skip_view(cosine: np.ndarray, l2: np.ndarray, labels: Sequence[str]) -> Picture:
    """Per token, how far the embeddings move when 1..K layers are skipped: cosine distance and
    L2 side by side on linear scales, each cell with its number when there is room."""
    count, skips = cosine.shape
    columns = [skip_label(k) for k in range(1, skips + 1)]
    cell = (row_height(count), 64)
    annotate = "{:.3g}" if count <= 40 else ""
    panels = []
    for values, what, rows in ((cosine, "cosine distance", labels), (l2, "L2 distance", ())):
        limits = (0.0, max(float(values.max()), 1e-8))
        picture = heatmap(values, SEQUENTIAL, limits, cell, rows, columns, annotate=annotate)
        panels.append(add_title(add_colorbar(picture, SEQUENTIAL, limits, what), what))
    return add_title(arrange(panels, 2), "How far each token's embedding moves when the last "
                                         "layers are skipped (compared with none skipped)\n"
                                         "columns: the web UIs' CLIP skip n = diffusers' "
                                         "clip_skip=n-1 = n-1 layers skipped")


def clip_skip_table(cosine: np.ndarray, l2: np.ndarray, labels: Sequence[str]) -> dict:
    """Rows for a table: position, text, then cosine and L2 distance for each skip."""
    headers = ["position", "text"]
    for k in range(1, cosine.shape[1] + 1):
        headers += [f"cosine, {k} skipped", f"L2, {k} skipped"]
    data = [[p, labels[p], *[round(float(v), 6) for pair in zip(cosine[p], l2[p], strict=True)
                             for v in pair]] for p in range(len(labels))]
    return {"headers": headers, "data": data}


def clip_skip_reading(cosine: np.ndarray, l2: np.ndarray, n_layers: int, length: float
                      ) -> str:
    """The mean move over the tokens for each skip, and which layer each one reads; ``length``,
    the final embeddings' mean L2 norm, gives the L2 distances a scale."""
    parts = [f"skipping {k} (the output of layer {n_layers - k} of {n_layers}, then the final "
             f"LayerNorm) moves them by a cosine distance of {short(float(cos.mean()))} and an L2 "
             f"distance of {short(float(dist.mean()))} on average"
             for k, (cos, dist) in enumerate(zip(cosine.T, l2.T, strict=True), start=1)]
    return ("Compared with the last layer's embeddings, " + "; ".join(parts) + ". For scale: "
            f"the last layer's embeddings are {short(length)} long on average (L2 norm).")


# ---------------------------------------------------------------------------------------------
# Long prompts


def cut_items(pieces: Sequence[str], max_length: int = MAX_LENGTH) -> list[tuple[str, str]]:
    """Each piece, readable, as "kept" (the first max_length - 2) or "dropped" by SD v1."""
    room = max_length - 2
    return [(text, "kept" if i < room else "dropped")
            for i, text in enumerate(readable_pieces(pieces))]


def chunk_layout(pieces: Sequence[str], ids: Sequence[int], bos_id: int, eos_id: int,
                 pad_id: int, max_length: int = MAX_LENGTH
                 ) -> list[list[tuple[str, int, str]]]:
    """The prompt in chunks as ``sd_parts.prompts.chunk`` cuts it: (text, id, kind) per position,
    each chunk BOS + up to max_length - 2 tokens + EOS + padding."""
    texts = chunk(readable_pieces(pieces), BOS_TOKEN, EOS_TOKEN, EOS_TOKEN, max_length)
    id_rows = chunk(list(ids), bos_id, eos_id, pad_id, max_length)
    kinds = chunk(["token"] * len(pieces), "BOS", "EOS", "padding", max_length)
    return [list(zip(t, i, k, strict=True)) for t, i, k in zip(texts, id_rows, kinds, strict=True)]


def run_layout(runs: Sequence[tuple[Sequence[str], Sequence[int]]], bos_id: int, eos_id: int,
               pad_id: int, max_length: int = MAX_LENGTH) -> list[list[tuple[str, int, str]]]:
    """Chunks as ``chunk_layout`` gives them, from runs of (pieces, ids) cut by another rule
    (``sd_parts.prompt_runs``, the web UI's): BOS, the run, EOS, then padding to max_length."""
    return [[(BOS_TOKEN, bos_id, "BOS"),
             *zip(readable_pieces(pieces), ids, ["token"] * len(ids), strict=True),
             (EOS_TOKEN, eos_id, "EOS")] + [(EOS_TOKEN, pad_id, "padding")] * (
                 max_length - 2 - len(ids)) for pieces, ids in runs]


def chunking_reading(plain: Sequence[int], webui: Sequence[int]) -> str:
    """The two rules' chunks compared, by the number of tokens in each chunk."""
    same = " The two rules cut this prompt alike." if list(plain) == list(webui) else ""
    return (f"The plain cut: {len(plain)} chunk(s) of {', '.join(map(str, plain))} tokens. "
            f"AUTOMATIC1111's rule: {len(webui)} chunk(s) of {', '.join(map(str, webui))} "
            f"tokens.{same}")


def chunk_items(layout: Sequence[Sequence[tuple[str, int, str]]]) -> list[tuple[str, str]]:
    """Highlighted-text items: a marker before each chunk naming its context vectors, then its
    positions, the padding of a chunk written once with its count."""
    items: list[tuple[str, str]] = []
    for index, positions in enumerate(layout):
        first = index * len(positions)
        items.append((f"chunk {index + 1}: context vectors {first}-{first + len(positions) - 1}",
                      "chunk"))
        items += [(text, kind) for text, _, kind in positions if kind != "padding"]
        padding = sum(kind == "padding" for _, _, kind in positions)
        if padding:
            items.append((f"{EOS_TOKEN} x{padding}", "padding"))
    return items


def chunk_table(layout: Sequence[Sequence[tuple[str, int, str]]]) -> list[list]:
    """Rows for CHUNK_HEADERS: every position of every chunk."""
    size = len(layout[0]) if layout else 0
    return [[c + 1, p, c * size + p, text, token, kind]
            for c, positions in enumerate(layout)
            for p, (text, token, kind) in enumerate(positions)]


def long_reading(pieces: Sequence[str], n_chunks: int, hidden_size: int,
                 max_length: int = MAX_LENGTH) -> str:
    """How many tokens SD v1 keeps, how many chunks the workaround needs, and which words a chunk
    boundary splits."""
    room = max_length - 2
    vectors = n_chunks * max_length
    kept = (f"The prompt has {len(pieces)} tokens: all fit in SD v1's {room}"
            if len(pieces) <= room else
            f"The prompt has {len(pieces)} tokens: SD v1 keeps the first {room} and drops "
            f"{len(pieces) - room}")
    chunks = (f"In chunks of {room}: {n_chunks} chunk{'s' if n_chunks > 1 else ''}, each with "
              f"its own BOS, EOS and padding, encoded separately and put side by side, so the "
              f"UNet's cross-attention gets {max_length} x {n_chunks} = {vectors} context vectors "
              f"(1, {vectors}, {hidden_size}) instead of {max_length}.")
    split = [f"“{word}” (chunks {start // room + 1}-{(end - 1) // room + 1})"
             for word, start, end in words(pieces) if start // room != (end - 1) // room]
    boundary = (" A chunk boundary splits " + ", ".join(split) + "." if split else "")
    alone = (" No chunk sees another: the first words of a chunk are encoded without the words "
             "before them." if n_chunks > 1 else "")
    return f"{kept}. {chunks}{boundary}{alone}"


# ---------------------------------------------------------------------------------------------
# Weighting


def weight_items(pieces: Sequence[str], weights: Sequence[float]) -> list[tuple[str, float | None]]:
    """Highlighted-text items: each readable piece with its weight written after it when it is
    not 1, and a colour score log2(weight) clipped to [-1, 1] (x2: full red, x0.5: full blue; a
    weight of 0 or below, which erases or flips the token, full blue too).
    Each text ends in a space, which keeps unweighted neighbours apart on the page."""
    items: list[tuple[str, float | None]] = []
    for text, weight in zip(readable_pieces(pieces), weights, strict=True):
        if weight == 1.0:
            items.append((f"{text} ", None))
        else:
            score = float(np.clip(np.log2(weight), -1.0, 1.0)) if weight > 0 else -1.0
            items.append((f"{text} x{weight:.3g} ", score))
    return items


def weighting_view(weights: Sequence[float], before: torch.Tensor, after: torch.Tensor,
                   labels: Sequence[str]) -> Picture:
    """Each position's weight beside what weighting did to its vector's length (norm after /
    norm before: the weight times the mean-restoring factor), on one log2 colour scale."""
    old, new = as_array(before, 2, "before"), as_array(after, 2, "after")
    ratio = np.linalg.norm(new, axis=1) / np.maximum(np.linalg.norm(old, axis=1), 1e-30)
    values = np.stack([np.asarray(weights, dtype=np.float64), ratio], axis=1)  # (T, 2)
    if len(labels) != len(values):
        raise ValueError(f"{len(values)} positions but {len(labels)} labels")
    positive = values > 0
    logs = np.log2(np.where(positive, values, 1.0))
    extent = max(float(np.abs(logs).max()), 0.1)
    logs = np.where(positive, logs, -extent)  # 0 or below (erased, flipped): the blue end
    cell = (row_height(len(values)), 70)
    picture = heatmap(logs, DIVERGING, (-extent, extent), cell, labels,
                      ["weight", "norm after / before"], annotate="{:.3g}", numbers=values)
    what = "log2 of the factor" + ("" if positive.all() else " (0 or below: blue end)")
    picture = add_colorbar(picture, DIVERGING, (-extent, extent), what)
    return add_title(picture, "Weights and what they do to each vector's length\n(after "
                              "weighting, the mean is restored: every position is rescaled)")


def weighting_table(weights: Sequence[float], before: torch.Tensor, after: torch.Tensor,
                    labels: Sequence[str]) -> list[list]:
    """Rows for WEIGHT_HEADERS."""
    old = np.linalg.norm(as_array(before, 2, "before"), axis=1)
    new = np.linalg.norm(as_array(after, 2, "after"), axis=1)
    return [[p, labels[p], round(float(w), 6), round(float(o), 6), round(float(n), 6),
             round(float(n / max(o, 1e-30)), 6)]
            for p, (w, o, n) in enumerate(zip(weights, old, new, strict=True))]


def weighting_reading(weights: Sequence[float], before: torch.Tensor, after: torch.Tensor) -> str:
    """The mean-restoring factor and what it means for weighted and unweighted positions."""
    old, new = as_array(before, 2, "before"), as_array(after, 2, "after")
    weight = np.asarray(weights, dtype=np.float64)
    factor = float(new.mean() / (old * weight[:, None]).mean())
    # the weight furthest from 1 on a log scale; one of 0 or below (erased, flipped) first
    distance = np.where(weight > 0, np.abs(np.log(np.where(weight > 0, weight, 1.0))), np.inf)
    heaviest = int(np.argmax(distance))
    return (f"To restore the context's mean ({short(float(old.mean()))}), every position was "
            f"multiplied by {factor:.4g} after weighting: a position weighted "
            f"{weight[heaviest]:.3g} ends {_times_as_long(weight[heaviest] * factor)}, an "
            f"unweighted one (BOS, EOS, padding, plain words) {_times_as_long(factor)}. The "
            "weight acts on the encoder's output: the other tokens were encoded without knowing "
            "it.")


def _times_as_long(scale: float) -> str:
    """What multiplying a vector by ``scale`` does to it, in words: a length is never negative."""
    if scale < 0:
        return f"{-scale:.4g} times as long, pointing the opposite way"
    return f"{scale:.4g} times as long" + (": erased" if scale == 0 else "")


# ---------------------------------------------------------------------------------------------
# Nearest vocabulary entries


def nearest_tokens(table: torch.Tensor, token_id: int, k: int) -> tuple[list[int], list[float]]:
    """The ids of the ``k`` rows of the token embedding table (V, D) closest to row ``token_id``
    by cosine similarity, best first, without the row itself; and their similarities."""
    if not 0 <= token_id < table.shape[0]:
        raise ValueError(f"token id {token_id} is outside the table's {table.shape[0]} rows")
    if not 1 <= k < table.shape[0]:
        raise ValueError(f"k must be from 1 to {table.shape[0] - 1}, got {k}")
    rows = table.detach().float()
    query = rows[token_id]
    similarity = (rows @ query) / (rows.norm(dim=1) * query.norm()).clamp_min(1e-30)  # (V,)
    similarity[token_id] = -float("inf")  # the token itself is trivially the closest
    scores, ids = similarity.topk(k)
    return ids.tolist(), scores.tolist()


def nearest_rows(ids: Sequence[int], scores: Sequence[float], pieces: Sequence[str]
                 ) -> list[list]:
    """Rows for NEAREST_HEADERS; each piece made readable on its own."""
    return [[rank + 1, readable_pieces([piece])[0], round(score, 4), token, piece]
            for rank, (token, score, piece) in enumerate(zip(ids, scores, pieces, strict=True))]
