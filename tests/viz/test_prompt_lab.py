"""Prompt lab views: every heat map holds the numbers it claims, and every sentence reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sd_parts
from viz import prompt_lab as lab
from viz.heatmap import MASKED, Box, colorize
from viz.plot import DIVERGING, SEQUENTIAL

TOKENIZER = sd_parts.load_tokenizer()


def states(count: int, first_change: int, layers: int, seed: int) -> tuple[list, list]:
    """Two prompts' emb, layer and final states: equal before ``first_change``, then not (up to
    float noise of 1e-7 everywhere, which must still read as unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn(count, 16, generator=generator) * (i + 1) for i in range(layers + 2)]
    b = [state + 1e-7 * torch.randn(count, 16, generator=generator) for state in a]
    b[0][first_change] += torch.rand(16, generator=generator)  # emb: only the token that differs
    for state in b[1:]:
        state[first_change:] += torch.rand(count - first_change, 16, generator=generator)
    return a, b


def corner_cells(pixels: np.ndarray, box: Box) -> np.ndarray:
    """The colour of every cell read one pixel in from its top-left corner, clear of its number."""
    ys = box.top + np.arange(box.rows) * box.cell_height + 1
    xs = box.left + np.arange(box.columns) * box.cell_width + 1
    return pixels[np.ix_(ys, xs)]


def test_comparison_map_colours_changed_cells_and_greys_the_rest() -> None:
    a, b = states(count=9, first_change=4, layers=3, seed=0)
    comparison = lab.compare_states(a, b)
    assert comparison.columns == ["emb", "1", "2", "3", "final"]
    expected_changed = np.zeros((9, 5), dtype=bool)
    expected_changed[4, 0] = True  # at the embeddings only the position whose token differs
    expected_changed[4:, 1:] = True  # after a layer, every later position
    np.testing.assert_array_equal(comparison.changed, expected_changed)
    cosine = 1 - torch.nn.functional.cosine_similarity(a[2], b[2], dim=1).double().numpy()
    np.testing.assert_allclose(comparison.cosine[:, 2], np.clip(cosine, 0, 2), atol=1e-6)
    np.testing.assert_allclose(comparison.l2[:, 2], (a[2] - b[2]).norm(dim=1).numpy(), rtol=1e-5)

    picture = lab.comparison_view(comparison, [f"p{i}" for i in range(9)])
    assert len(picture.maps) == 2
    for box, values in zip(picture.maps, (comparison.cosine, comparison.l2), strict=True):
        logs = np.log10(np.maximum(values, 1e-30))  # exact zeros are grey anyway
        low, high = logs[expected_changed].min(), logs[expected_changed].max()
        expected = colorize(logs, SEQUENTIAL, low, high, ~expected_changed)
        np.testing.assert_array_equal(box.cells(picture.pixels), expected)
    cells = picture.maps[0].cells(picture.pixels)
    assert (cells[:4] == MASKED).all() and not (cells[5, 1:] == MASKED).all(axis=-1).any()


def test_a_whole_context_map_keeps_its_row_labels_readable() -> None:
    """77 positions in about 620 px would be 8 px rows and 7 px labels: rows stay 14 px."""
    a, b = states(count=77, first_change=6, layers=2, seed=2)
    picture = lab.comparison_view(lab.compare_states(a, b), [f"p{i}" for i in range(77)])
    assert all(box.cell_height == 14 and box.rows == 77 for box in picture.maps)
    assert picture.pixels.shape[0] >= 77 * 14


def test_comparison_reading_names_the_runs_and_the_padding() -> None:
    a, b = states(count=12, first_change=5, layers=2, seed=1)
    comparison = lab.compare_states(a, b)
    ids_a = [1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 9, 9]
    ids_b = [1, 2, 3, 4, 5, 7, 9, 9, 9, 9, 9, 9]
    reading = lab.comparison_reading(comparison, ids_a, ids_b, padding_from=7)
    largest = lab.short(float(comparison.l2[:5].max()))
    assert reading.startswith(f"Positions 0-4 unchanged (max L2 {largest}): causal attention")
    assert "positions 5-11 changed, padding included." in reading
    assert "The tokens differ at 5. At the embeddings (column emb) only the positions whose " \
           "tokens differ change: 5;" in reading
    assert "In the final embeddings 7 of 12 positions differ." in reading
    same = lab.compare_states(a, a)
    assert lab.comparison_reading(same, ids_a, ids_a, 7) == (
        "The two prompts give the same 12 tokens here. Positions 0-11 unchanged (max L2 0).")


def test_small_helpers() -> None:
    assert lab.short(3.2e-7) == "3e-7" and lab.short(0.01234) == "0.0123" and lab.short(0) == "0"
    assert lab.ranges([6, 7, 8, 12]) == "6-8, 12" and lab.ranges([]) == ""
    assert lab.runs([False, False, True]) == [(0, 1, False), (2, 2, True)]
    with pytest.raises(ValueError, match="one shape"):
        lab.distances(torch.zeros(3, 4), torch.zeros(3, 5))


def test_clip_skip_view_shows_both_numberings_and_the_distances() -> None:
    generator = torch.Generator().manual_seed(2)
    final = torch.randn(6, 8, generator=generator)
    skipped = [final + s * torch.randn(6, 8, generator=generator) for s in (0.3, 0.8)]
    cosine, l2 = lab.clip_skip_distances(final, skipped)
    assert cosine.shape == l2.shape == (6, 2)
    np.testing.assert_allclose(l2[:, 1], (final - skipped[1]).norm(dim=1).numpy(), rtol=1e-5)
    assert lab.skip_label(1) == "CLIP skip 2 / clip_skip=1"  # the web UIs' and diffusers' numbers
    picture = lab.clip_skip_view(cosine, l2, [f"t{i}" for i in range(6)])
    for box, values in zip(picture.maps, (cosine, l2), strict=True):
        corners = corner_cells(picture.pixels, box)  # each cell's centre carries its number
        np.testing.assert_array_equal(corners, colorize(values, SEQUENTIAL, 0.0, values.max()))
    table = lab.clip_skip_table(cosine, l2, [f"t{i}" for i in range(6)])
    assert table["headers"] == ["position", "text", "cosine, 1 skipped", "L2, 1 skipped",
                                "cosine, 2 skipped", "L2, 2 skipped"]
    assert table["data"][3][5] == pytest.approx(l2[3, 1], abs=1e-6)
    reading = lab.clip_skip_reading(cosine, l2, n_layers=12, length=27.6)
    assert "skipping 1 (the output of layer 11 of 12" in reading
    assert reading.endswith("the last layer's embeddings are 27.6 long on average (L2 norm).")
    assert f"cosine distance of {lab.short(float(cosine[:, 1].mean()))}" in reading


def test_long_prompt_in_chunks_follows_the_library() -> None:
    # 74 one-token words, then "artstation" (art + station) across the 75-token boundary
    prompt = " ".join(["cat"] * 74 + ["artstation"] + ["dog"] * 84)
    pieces = TOKENIZER.tokenize(prompt)
    ids = TOKENIZER.convert_tokens_to_ids(pieces)
    layout = lab.chunk_layout(pieces, ids, TOKENIZER.bos_token_id, TOKENIZER.eos_token_id,
                              TOKENIZER.pad_token_id)
    assert len(layout) == 3 and all(len(chunk) == 77 for chunk in layout)
    library = sd_parts.chunk_ids(TOKENIZER, prompt)
    assert [[token for _, token, _ in chunk] for chunk in layout] == library.tolist()
    assert [kind for _, _, kind in layout[2]] == (
        ["BOS"] + ["token"] * (len(pieces) - 150) + ["EOS"] + ["padding"] * (225 - len(pieces)))
    items = lab.chunk_items(layout)
    assert items[0] == ("chunk 1: context vectors 0-76", "chunk")
    assert ("chunk 3: context vectors 154-230", "chunk") in items
    assert items[-1] == (f"<|endoftext|> x{225 - len(pieces)}", "padding")
    rows = lab.chunk_table(layout)
    assert len(rows) == 231 and rows[77][:3] == [2, 0, 77] and rows[77][5] == "BOS"
    cut = lab.cut_items(pieces)
    assert [kind for _, kind in cut].count("kept") == 75 and cut[75][1] == "dropped"
    reading = lab.long_reading(pieces, len(layout), 768)
    assert f"The prompt has {len(pieces)} tokens: SD v1 keeps the first 75 and drops" in reading
    assert "77 x 3 = 231 context vectors (1, 231, 768)" in reading
    assert pieces[74:76] == ["art", "station</w>"] and len(pieces) == 160
    assert "A chunk boundary splits “artstation” (chunks 1-2)." in reading


def test_weighting_view_shows_weights_and_the_restored_lengths() -> None:
    generator = torch.Generator().manual_seed(3)
    before = torch.randn(5, 8, generator=generator) + 0.4  # a mean away from 0
    weights = [1.0, 1.5, 1.0, 1 / 1.1, 1.0]
    after = sd_parts.apply_weights(before[None], weights)[0]
    factor = float(before.mean() / (before * torch.tensor(weights)[:, None]).mean())
    ratio = after.norm(dim=1) / before.norm(dim=1)
    np.testing.assert_allclose(ratio.numpy(), np.array(weights) * factor, rtol=1e-5)
    picture = lab.weighting_view(weights, before, after, [f"t{i}" for i in range(5)])
    (box,) = picture.maps
    logs = np.log2(np.stack([weights, ratio.double().numpy()], axis=1))
    extent = np.abs(logs).max()
    np.testing.assert_array_equal(corner_cells(picture.pixels, box),
                                  colorize(logs, DIVERGING, -extent, extent))
    rows = lab.weighting_table(weights, before, after, [f"t{i}" for i in range(5)])
    assert rows[1][2] == 1.5 and rows[1][5] == pytest.approx(1.5 * factor, rel=1e-5)
    reading = lab.weighting_reading(weights, before, after)
    assert f"multiplied by {factor:.4g}" in reading and "weighted 1.5 ends" in reading
    items = lab.weight_items(["a</w>", "red</w>", "[</w>"], [1.0, 2.5, 1 / 1.1])
    assert items[0] == ("a</w> ", None) and items[1] == ("red</w> x2.5 ", 1.0)
    assert items[2][0] == "[</w> x0.909 " and items[2][1] == pytest.approx(np.log2(1 / 1.1))


def test_a_weight_of_zero_or_below_is_drawn_and_read_as_what_it_does() -> None:
    """(word:-1) flips a token's vector and (word:0) erases it: lengths stay positive numbers,
    the colours keep the scale of the positive factors, and nothing is NaN."""
    generator = torch.Generator().manual_seed(5)
    before = torch.randn(5, 8, generator=generator) + 0.4
    weights = [1.0, -1.0, 1.0, 0.0, 1.5]
    after = sd_parts.apply_weights(before[None], weights)[0]
    factor = float(before.mean() / (before * torch.tensor(weights)[:, None]).mean())
    items = lab.weight_items(["a</w>", "cat</w>", "in</w>", "hat</w>", "red</w>"], weights)
    assert items[1] == ("cat</w> x-1 ", -1.0) and items[3] == ("hat</w> x0 ", -1.0)
    reading = lab.weighting_reading(weights, before, after)
    assert (f"a position weighted -1 ends {factor:.4g} times as long, pointing the opposite "
            "way") in reading
    picture = lab.weighting_view(weights, before, after, [f"t{i}" for i in range(5)])
    (box,) = picture.maps
    ratio = (after.norm(dim=1) / before.norm(dim=1)).double().numpy()
    factors = np.stack([weights, ratio], axis=1)
    extent = np.abs(np.log2(factors[factors > 0])).max()  # about 0.6, not 100
    logs = np.where(factors > 0, np.log2(np.where(factors > 0, factors, 1)), -extent)
    np.testing.assert_array_equal(corner_cells(picture.pixels, box),
                                  colorize(logs, DIVERGING, -extent, extent))
    assert extent < 1


def test_nearest_tokens_are_the_closest_rows_by_cosine() -> None:
    generator = torch.Generator().manual_seed(4)
    table = torch.randn(500, 24, generator=generator)
    table[7] = 3 * table[3] + 0.01 * torch.randn(24, generator=generator)  # same direction
    table[9] = -table[3]  # opposite: the farthest
    ids, scores = lab.nearest_tokens(table, 3, 5)
    similarity = torch.nn.functional.cosine_similarity(table, table[3:4], dim=1)
    similarity[3] = -2
    assert ids == similarity.topk(5).indices.tolist() and ids[0] == 7 and 3 not in ids
    assert scores == pytest.approx(similarity.topk(5).values.tolist(), abs=1e-6)
    assert scores == sorted(scores, reverse=True)
    assert lab.nearest_tokens(table, 3, 499)[0][-1] == 9
    for bad_id, bad_k, message in ((500, 5, "outside"), (3, 0, "k must"), (3, 500, "k must")):
        with pytest.raises(ValueError, match=message):
            lab.nearest_tokens(table, bad_id, bad_k)
    pieces = TOKENIZER.convert_ids_to_tokens([2368, 22979])
    rows = lab.nearest_rows([2368, 22979], [0.5, 0.25], pieces)
    assert rows == [[1, "cat</w>", 0.5, 2368, "cat</w>"], [2, "🐱</w>", 0.25, 22979, "ðŁĲ±</w>"]]
    assert lab.NEAREST_HEADERS[:3] == ["rank", "text", "cosine similarity"]


def test_the_web_uis_chunks_beside_the_plain_cut() -> None:
    """Hand-worked: 70 cats, a comma, 10 dogs, BREAK, tree. The plain cut takes 75 tokens (the
    comma and 4 dogs in the first chunk) and reads BREAK as a word; the web UI's cut moves back
    to just after the comma (5 tokens before the end: within 20), and BREAK ends a chunk."""
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10) + " BREAK tree"
    runs, _ = sd_parts.prompt_runs(TOKENIZER, prompt, False, "webui")
    layout = lab.run_layout([(TOKENIZER.convert_ids_to_tokens(ids), ids) for ids, _ in runs],
                            TOKENIZER.bos_token_id, TOKENIZER.eos_token_id,
                            TOKENIZER.pad_token_id)
    assert [len(chunk) for chunk in layout] == [77, 77, 77]
    texts = [[text for text, _, kind in chunk if kind == "token"] for chunk in layout]
    assert texts == [["cat</w>"] * 70 + [",</w>"], ["dog</w>"] * 10, ["tree</w>"]]
    assert [kind for _, _, kind in layout[2][:4]] == ["BOS", "token", "EOS", "padding"]
    assert [token for _, token, _ in layout[1][:2]] == [TOKENIZER.bos_token_id,
                                                        TOKENIZER.vocab["dog</w>"]]
    items = lab.chunk_items(layout)
    assert ("chunk 3: context vectors 154-230", "chunk") in items
    pieces = TOKENIZER.tokenize(prompt)
    plain = lab.chunk_layout(pieces, TOKENIZER.convert_tokens_to_ids(pieces),
                             TOKENIZER.bos_token_id, TOKENIZER.eos_token_id,
                             TOKENIZER.pad_token_id)
    plain_sizes = [sum(kind == "token" for _, _, kind in chunk) for chunk in plain]
    assert plain_sizes == [75, 8]
    reading = lab.chunking_reading(plain_sizes, [len(ids) for ids, _ in runs])
    assert reading == ("The plain cut: 2 chunk(s) of 75, 8 tokens. AUTOMATIC1111's rule: 3 "
                       "chunk(s) of 71, 10, 1 tokens.")

