"""What CLIP's text encoder does with a prompt: its embeddings, how they grow and relate, and where
every layer and head attends.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021).
Layers are numbered from 1, and hidden state ``i`` is the output of layer ``i`` (hidden state 0
is the token + position embedding). In attention maps rows are queries (the token that looks)
and columns are keys (the token looked at); the text encoder is causal, so the upper triangle
(the future) is masked and drawn grey. Every view is a labelled heat map drawn from the arrays
(``viz.heatmap``), which keeps the prompt tab about as fast as the text encoder itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from viz.heatmap import Picture, add_colorbar, add_title, arrange, heatmap
from viz.plot import DIVERGING, SEQUENTIAL, as_array

ATTENTION = "viridis"
MAP_SIDE = 620  # pixels: about the width of the page's column, so labels are read at 1:1


def _check_labels(labels: Sequence[str], count: int, what: str) -> list[str]:
    if len(labels) != count:
        raise ValueError(f"{what} has {count} positions but {len(labels)} labels were given")
    return [str(label) for label in labels]


def _future(count: int) -> np.ndarray:
    """True where a key comes after its query: what a causal model cannot see."""
    return np.triu(np.ones((count, count), dtype=bool), k=1)


def _cell(count: int, side: int = MAP_SIDE, low: int = 8, high: int = 34) -> int:
    return int(min(max(side // max(count, 1), low), high))


def embedding_view(hidden: torch.Tensor, labels: Sequence[str], n_real: int) -> Picture:
    """Every position's vector as a row of colours: positions x hidden dimensions.

    ``hidden`` is (T, D), e.g. 77 x 768; rows from ``n_real`` on are padding and are faded (the
    UNet still reads them). The colour range ends at the 99th percentile of |value| because a few
    dimensions of CLIP's states are far larger than the rest and would wash everything out.
    """
    values = as_array(hidden, 2, "hidden")
    count, dims = values.shape
    names = _check_labels(labels, count, "hidden")
    if not 0 <= n_real <= count:
        raise ValueError(f"n_real must be between 0 and {count}, got {n_real}")
    extent = max(float(np.quantile(np.abs(values), 0.99)), 1e-8)
    width = max(1, MAP_SIDE // dims)
    ticks = [str(d) if d % 128 == 0 else "" for d in range(dims)]
    picture = heatmap(values, DIVERGING, (-extent, extent), (9, width), names, ticks,
                      fade_from=n_real)
    picture = add_colorbar(picture, DIVERGING, (-extent, extent), "value (clipped at the 99th %)")
    padding = f"; faded below the line: padding, positions {n_real}-{count - 1}"
    return add_title(picture, f"Text embeddings: {count} positions x {dims} hidden dimensions"
                              f"{padding if n_real < count else ''}")


def norms_view(
    hidden_states: Sequence[torch.Tensor], labels: Sequence[str], n_real: int
) -> Picture:
    """Each real token's vector length (L2 norm) after every layer: numbers on a log colour scale.

    ``hidden_states`` is the list of L + 1 (T, D) tensors (13 for SD v1: the embeddings, then each
    layer's output); the first ``n_real`` positions get a row each.
    """
    if len(hidden_states) < 2:
        raise ValueError("need the embeddings and at least one layer's hidden states")
    stacked = np.stack([as_array(state, 2, "each hidden state") for state in hidden_states])
    count = stacked.shape[1]
    names = _check_labels(labels, count, "hidden_states")
    if not 1 <= n_real <= count:
        raise ValueError(f"n_real must be between 1 and {count}, got {n_real}")
    norms = np.linalg.norm(stacked[:, :n_real], axis=2).T  # (n_real, L + 1)
    logs = np.log10(np.maximum(norms, 1e-12))  # the BOS token's norm can be many times the rest
    low, high = float(logs.min()), max(float(logs.max()), float(logs.min()) + 1e-6)
    columns = ["emb"] + [str(i) for i in range(1, len(hidden_states))]
    # colours follow the logarithm, the numbers written in the cells are the norms themselves
    picture = heatmap(logs, SEQUENTIAL, (low, high), (_cell(n_real, 500, 16, 26), 46),
                      names[:n_real], columns, annotate="{:.3g}", numbers=norms)
    picture = add_colorbar(picture, SEQUENTIAL, (low, high), "log10 of the norm")
    return add_title(picture, "How long each token's vector is after every layer (L2 norm)\n"
                              "columns: emb = token + position embedding, i = after layer i")


def cosine_view(hidden: torch.Tensor, labels: Sequence[str]) -> Picture:
    """Token-to-token cosine similarity of (T, D) hidden states, on a fixed -1 to 1 scale.

    1 means the two vectors point the same way. Up to 12 tokens, each cell shows its number.
    """
    values = as_array(hidden, 2, "hidden")
    count = values.shape[0]
    names = _check_labels(labels, count, "hidden")
    unit = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    cell = _cell(count, 480, 8, 44)
    picture = heatmap(similarity, DIVERGING, (-1.0, 1.0), (cell, cell), names, names,
                      annotate="{:.2f}" if count <= 12 else "")
    picture = add_colorbar(picture, DIVERGING, (-1.0, 1.0), "cosine similarity")
    return add_title(picture, "How alike the token vectors are (cosine similarity)")


def attention_view(attention: torch.Tensor, labels: Sequence[str], title: str) -> Picture:
    """One (T, T) causal attention map: rows are queries, columns are keys.

    Each row sums to 1 over the positions that query may see; the future is grey. ``title`` is
    shown as given, e.g. "Layer 3, head 5".
    """
    weights = as_array(attention, 2, "attention")
    count = weights.shape[0]
    if weights.shape != (count, count):
        raise ValueError(f"attention must be square (T, T), got {weights.shape}")
    names = _check_labels(labels, count, "attention")
    limits = (0.0, max(float(weights.max()), 1e-8))
    cell = _cell(count)
    picture = heatmap(weights, ATTENTION, limits, (cell, cell), names, names, mask=_future(count))
    picture = add_colorbar(picture, ATTENTION, limits, "attention weight")
    return add_title(picture, f"{title}\nrows: the query (the token attending), "
                              "columns: the key (the token attended to)")


def heads_view(attention: torch.Tensor, labels: Sequence[str], layer: int) -> Picture:
    """All heads of one layer side by side (3 rows of 4 for 12 heads) on one colour scale.

    ``attention`` is (H, T, T); ``layer`` only labels the title (numbered from 1). Tokens label
    the outer maps when T <= 16.
    """
    weights = as_array(attention, 3, "attention")
    heads, count, _ = weights.shape
    if weights.shape != (heads, count, count):
        raise ValueError(f"attention must be (H, T, T), got {weights.shape}")
    names = _check_labels(labels, count, "attention")
    columns = min(4, heads)
    limits = (0.0, max(float(weights.max()), 1e-8))
    small = count <= 16  # token names fit on the outer maps only for short prompts
    cell = _cell(count, 150, 2, 18)
    panels = []
    for head in range(heads):
        first_column, last_row = head % columns == 0, head + columns >= heads
        panels.append(heatmap(
            weights[head], ATTENTION, limits, (cell, cell),
            names if small and first_column else (), names if small and last_row else (),
            title=f"head {head + 1}", mask=_future(count)))
    picture = add_colorbar(arrange(panels, columns), ATTENTION, limits, "attention weight")
    return add_title(picture, f"Layer {layer}: all {heads} heads (rows: query, columns: key)")


def eos_view(attentions: Sequence[torch.Tensor], eos_index: int, labels: Sequence[str]) -> Picture:
    """What the EOS token attends to in every layer, averaged over heads: layers x keys.

    ``attentions`` holds one (H, T, T) tensor per layer; ``eos_index`` is EOS's position and
    ``labels`` names the T keys. CLIP reads its pooled text embedding at EOS; SD v1's UNet,
    by contrast, uses all 77 positions.
    """
    if not attentions:
        raise ValueError("need at least one layer's attention")
    rows = []
    for weights in attentions:
        array = as_array(weights, 3, "each layer's attention")
        if not 0 <= eos_index < array.shape[1]:
            raise ValueError(f"eos_index {eos_index} is outside 0..{array.shape[1] - 1}")
        rows.append(array[:, eos_index, :].mean(axis=0))
    table = np.stack(rows)  # (L, T)
    layers, count = table.shape
    names = _check_labels(labels, count, "attention keys")
    limits = (0.0, max(float(table.max()), 1e-8))
    future = np.broadcast_to(np.arange(count) > eos_index, table.shape)
    picture = heatmap(table, ATTENTION, limits, (18, _cell(count, MAP_SIDE, 8, 40)),
                      [f"layer {i + 1}" for i in range(layers)], names, mask=future)
    picture = add_colorbar(picture, ATTENTION, limits, "weight (mean over heads)")
    return add_title(picture, "What the EOS token attends to in each layer\n(CLIP's pooled "
                              "embedding is read at EOS; SD v1 uses all 77 positions)")
