"""The with-and-without views and a learned token's views read back the numbers they draw: each
word's share map in both runs and their difference, a word one run lacks in grey; the image
difference; a vector's nearest vocabulary rows and its length among the vocabulary's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from viz import addons as view
from viz.diffusion import WORD_MAP_CMAP
from viz.experiments import CHANGE_CMAP
from viz.heatmap import MASKED, colorize
from viz.plot import DIVERGING


def test_word_maps_of_both_runs_and_their_difference():
    generator = torch.Generator().manual_seed(0)
    without, with_addon = torch.rand(6, 4, 5, generator=generator), torch.rand(6, 4, 5,
                                                                                generator=generator)
    # "cat" is positions 1-2 in both; "<tok>" only with the add-on (position 3), "tok" only
    # without (positions 3-4)
    groups_without = [("<start>", [0]), ("cat", [1, 2]), ("tok", [3, 4])]
    groups_with = [("<start>", [0]), ("cat", [1, 2]), ("<tok>", [3])]
    picture = view.word_map_comparison(groups_without, groups_with, without, with_addon,
                                       ("without", "with"))
    assert len(picture.maps) == 3 * 4  # rows: <start>, cat, <tok>, tok
    cells = [box.cells(picture.pixels) for box in picture.maps]

    def shares(maps: torch.Tensor, positions: list[int]) -> np.ndarray:
        summed = maps[positions].double().sum(dim=0).numpy()
        return summed / summed.sum()

    cat_a, cat_b = shares(without, [1, 2]), shares(with_addon, [1, 2])
    present = [shares(without, [0]), shares(with_addon, [0]), cat_a, cat_b,
               shares(with_addon, [3]), shares(without, [3, 4])]
    top = max(m.max() for m in present)
    extent = max(np.abs(cat_b - cat_a).max(), np.abs(present[1] - present[0]).max())
    np.testing.assert_array_equal(cells[3], colorize(cat_a, WORD_MAP_CMAP, 0.0, top))
    np.testing.assert_array_equal(cells[4], colorize(cat_b, WORD_MAP_CMAP, 0.0, top))
    np.testing.assert_array_equal(cells[5], colorize(cat_b - cat_a, DIVERGING, -extent, extent))
    for missing in (6, 8, 10, 11):  # <tok> without, its difference; tok with, its difference
        assert (cells[missing] == MASKED).all()
    np.testing.assert_array_equal(cells[7], colorize(present[4], WORD_MAP_CMAP, 0.0, top))
    np.testing.assert_array_equal(cells[9], colorize(present[5], WORD_MAP_CMAP, 0.0, top))


def test_the_image_difference_is_the_largest_channel_change():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[2, 3] = (0, 40, 10)
    picture = view.difference_view(a, b, ("without", "with"))
    change = np.zeros((8, 8))
    change[2, 3] = 40
    np.testing.assert_array_equal(picture.maps[0].cells(picture.pixels),
                                  colorize(change, CHANGE_CMAP, 0.0, 40.0))


def test_a_learned_vectors_neighbours_and_length():
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(50, 8, generator=generator)
    vectors = torch.stack([table[7] * 3 + 0.01, -table[2]])
    rows = view.embedding_neighbours(table, vectors, ["<a>", "<a>_1"],
                                     [f"p{i}</w>" for i in range(50)], 3)
    assert [row[:2] for row in rows] == [["<a>", 1], ["<a>", 2], ["<a>", 3],
                                         ["<a>_1", 1], ["<a>_1", 2], ["<a>_1", 3]]
    cosine = torch.nn.functional.cosine_similarity(table, vectors[0][None])
    best = cosine.topk(3)
    assert [row[4] for row in rows[:3]] == best.indices.tolist() and rows[0][4] == 7
    assert rows[0][3] == pytest.approx(float(best.values[0]), abs=1e-4)
    assert rows[0][2] == "p7</w>"
    norms = table.norm(dim=1)
    percent = view.norm_percentiles(table, vectors)
    assert percent[0] == pytest.approx(100 * float((norms < vectors[0].norm()).float().mean()))
    assert view.embedding_norms_figure(table, vectors, ["<a>", "<a>_1"]).axes
