"""Text encoder views: each heat map holds exactly the data it claims to show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from viz.heatmap import MASKED, colorize
from viz.plot import DIVERGING, SEQUENTIAL
from viz.text_encoder import (
    ATTENTION,
    attention_view,
    cosine_view,
    embedding_view,
    eos_view,
    heads_view,
    norms_view,
)

LABELS = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "$5</w>", "🐱</w>",
          "<|endoftext|>"]
N_REAL = len(LABELS)


def causal_attention(heads: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, count, count, generator=generator)
    future = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def future(count: int) -> np.ndarray:
    return np.triu(np.ones((count, count), dtype=bool), k=1)


def test_attention_view_shows_the_given_weights() -> None:
    weights = causal_attention(1, N_REAL, 0)[0].double()
    picture = attention_view(weights, LABELS, "Layer 3, head 5")
    (box,) = picture.maps
    expected = colorize(weights.numpy(), ATTENTION, 0.0, weights.max().item(), future(N_REAL))
    np.testing.assert_array_equal(box.cells(picture.pixels), expected)
    assert (box.cells(picture.pixels)[0, 1:] == MASKED).all()  # BOS sees only itself


def test_heads_view_shows_each_head_in_order() -> None:
    weights = causal_attention(12, N_REAL, 1).double()
    picture = heads_view(weights, LABELS, layer=4)
    assert len(picture.maps) == 12
    top = weights.max().item()
    for head, box in enumerate(picture.maps):
        expected = colorize(weights[head].numpy(), ATTENTION, 0.0, top, future(N_REAL))
        np.testing.assert_array_equal(box.cells(picture.pixels), expected)


def test_eos_view_averages_the_heads_of_each_layer() -> None:
    layers = [causal_attention(4, N_REAL, seed) for seed in range(3)]
    picture = eos_view(layers, N_REAL - 1, LABELS)
    table = np.stack([layer[:, N_REAL - 1].double().mean(0).numpy() for layer in layers])
    (box,) = picture.maps
    assert (box.rows, box.columns) == (3, N_REAL)
    np.testing.assert_array_equal(box.cells(picture.pixels),
                                  colorize(table, ATTENTION, 0.0, table.max()))
    with pytest.raises(ValueError, match="eos_index"):
        eos_view(layers, N_REAL, LABELS)


def test_embedding_view_rows_are_the_vectors() -> None:
    hidden = torch.randn(77, 768, generator=torch.Generator().manual_seed(2)).double()
    labels = LABELS + ["<|endoftext|>"] * (77 - N_REAL)
    picture = embedding_view(hidden, labels, N_REAL)
    (box,) = picture.maps
    assert (box.rows, box.columns) == (77, 768)
    extent = np.quantile(np.abs(hidden.numpy()), 0.99)
    cells = box.cells(picture.pixels)
    expected = colorize(hidden.numpy(), DIVERGING, -extent, extent)
    np.testing.assert_array_equal(cells[:N_REAL], expected[:N_REAL])
    washed = (expected[N_REAL:] * 0.45 + 255 * 0.55).astype(np.uint8)  # padding: towards white
    np.testing.assert_array_equal(cells[N_REAL:], washed)
    with pytest.raises(ValueError, match="n_real"):
        embedding_view(hidden, labels, 78)


def test_norms_view_colours_the_log_norms() -> None:
    states = [torch.randn(77, 32, generator=torch.Generator().manual_seed(s)) * (s + 1)
              for s in range(3)]
    labels = LABELS + ["<|endoftext|>"] * (77 - N_REAL)
    picture = norms_view(states, labels, N_REAL)
    norms = np.stack([s[:N_REAL].double().norm(dim=1).numpy() for s in states]).T
    logs = np.log10(norms)
    (box,) = picture.maps
    assert (box.rows, box.columns) == (N_REAL, 3)
    # each cell holds its number; the colour is read from the cell's top-left corner
    corner = picture.pixels[box.top + np.arange(N_REAL)[:, None] * box.cell_height,
                            box.left + np.arange(3)[None] * box.cell_width]
    np.testing.assert_array_equal(corner, colorize(logs, SEQUENTIAL, logs.min(), logs.max()))


def test_cosine_view_is_on_a_fixed_scale() -> None:
    hidden = torch.randn(N_REAL, 64, generator=torch.Generator().manual_seed(3)).double()
    picture = cosine_view(hidden, LABELS)
    unit = hidden / hidden.norm(dim=1, keepdim=True)
    similarity = (unit @ unit.T).numpy()
    (box,) = picture.maps
    corner = picture.pixels[box.top + np.arange(N_REAL)[:, None] * box.cell_height,
                            box.left + np.arange(N_REAL)[None] * box.cell_width]
    np.testing.assert_array_equal(corner, colorize(similarity, DIVERGING, -1.0, 1.0))


def test_views_check_their_inputs() -> None:
    weights = causal_attention(1, N_REAL, 0)[0]
    with pytest.raises(ValueError, match="labels"):
        attention_view(weights, ["too", "few"], "title")
    with pytest.raises(ValueError, match="square"):
        attention_view(weights[:3], LABELS[:3], "title")
    with pytest.raises(ValueError, match="hidden states"):
        norms_view([torch.zeros(3, 4)], ["a", "b", "c"], 3)


def test_views_do_not_modify_their_inputs() -> None:
    hidden = torch.randn(N_REAL, 16)
    weights = causal_attention(4, N_REAL, 4)
    before = hidden.clone(), weights.clone()
    embedding_view(hidden, LABELS, N_REAL)
    cosine_view(hidden, LABELS)
    heads_view(weights, LABELS, 1)
    attention_view(weights[0], LABELS, "t")
    assert torch.equal(hidden, before[0]) and torch.equal(weights, before[1])
