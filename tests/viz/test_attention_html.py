"""The attention map as HTML: read back with the standard library's parser, it holds every value
in the right row and column, in the picture's colours, an empty causal triangle, and token text
that stays text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.html_reader import MapReader
from viz.attention_html import SCRIPT, attention_html
from viz.heatmap import colorize
from viz.text_encoder import ATTENTION

LABELS = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "$5</w>", "🐱</w>",
          "<|endoftext|>"]
KINDS = ["BOS", "token", "token", "token", "token", "token", "EOS"]


def causal_attention(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(count, count, generator=generator)
    future = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def hex_colours(rgb: np.ndarray) -> np.ndarray:
    return np.array([[f"background:#{r:02x}{g:02x}{b:02x}" for r, g, b in row] for row in rgb])


def test_every_value_sits_in_its_row_and_column_in_the_pictures_colour() -> None:
    weights = causal_attention(len(LABELS), 0).double().numpy()
    read = MapReader(attention_html(weights, LABELS, KINDS, "Layer 3, head 5"))
    count = len(LABELS)
    future = np.triu(np.ones((count, count), dtype=bool), k=1)
    colours = hex_colours(colorize(weights, ATTENTION, 0.0, weights.max(), future))
    assert [(c.index, c.text, c.kind) for c in read.columns] == list(
        zip(range(count), LABELS, KINDS, strict=True))
    assert [(r.label.index, r.label.text, r.label.kind) for r in read.rows] == list(
        zip(range(count), LABELS, KINDS, strict=True))
    for q, row in enumerate(read.rows):
        assert [int(cell["data-k"]) for cell in row.cells] == list(range(count))
        for k, cell in enumerate(row.cells):
            if k > q:  # the future: no value, no colour
                assert cell.get("class") == "future"
                assert "data-v" not in cell and "style" not in cell
            else:
                assert float(cell["data-v"]) == pytest.approx(weights[q, k], rel=5e-3)
                assert cell["style"] == colours[q, k]
    assert "Layer 3, head 5" in "".join(read.texts)


def test_full_context_with_padding() -> None:
    """77 x 77 as the tab shows it with padding: 77 * 78 / 2 values, the rest empty."""
    count = 77
    weights = causal_attention(count, 1)
    kinds = ["BOS"] + ["token"] * 10 + ["EOS"] + ["padding"] * 65
    labels = ["<|startoftext|>"] + [f"w{i}</w>" for i in range(10)] + ["<|endoftext|>"] * 66
    read = MapReader(attention_html(weights, labels, kinds, "Layer 1, mean over 12 heads"))
    cells = [cell for row in read.rows for cell in row.cells]
    assert len(read.rows) == len(read.columns) == count and len(cells) == count * count
    values = [float(cell["data-v"]) for cell in cells if "data-v" in cell]
    assert len(values) == count * (count + 1) // 2
    expected = weights[~torch.triu(torch.ones(count, count, dtype=torch.bool), 1)]
    np.testing.assert_allclose(values, expected.numpy(), rtol=5e-3)
    assert [row.label.kind for row in read.rows] == kinds
    # as the title says, each row's written weights add up to 1 (3 significant digits each)
    assert "each row's weights add up to 1" in "".join(read.texts)
    for row in read.rows:
        assert sum(float(cell["data-v"]) for cell in row.cells if "data-v" in cell) == (
            pytest.approx(1.0, abs=0.01))


def test_token_text_is_escaped_everywhere() -> None:
    labels = ["<|startoftext|>", "<script>alert(1)</script>", "&amp;</w>", "\"'</w>",
              "<img src=x onerror=alert(1)>", "<|endoftext|>"]
    kinds = ["BOS", "token", "token", "token", "token", "EOS"]
    markup = attention_html(causal_attention(6, 2), labels, kinds, "<b>Layer</b> & 'head'")
    read = MapReader(markup)
    assert [c.text for c in read.columns] == labels == [r.label.text for r in read.rows]
    assert "<b>Layer</b> & 'head'" in "".join(read.texts)
    assert read.tags == {"div", "p", "strong", "span", "table", "thead", "tbody", "tr", "th",
                         "td"}  # no script, img or b element came from the text
    assert "<script" not in markup and "<img" not in markup


def test_the_script_writes_text_not_markup() -> None:
    # token text reaches the readout through textContent, never parsed as HTML
    assert "textContent" in SCRIPT and "innerHTML" not in SCRIPT and "<script" not in SCRIPT
    assert "watch('value'" in SCRIPT  # a pinned choice is shown again on a new map


def test_bad_input_is_named() -> None:
    weights = causal_attention(3, 3)
    with pytest.raises(ValueError, match="square"):
        attention_html(weights[:2], LABELS[:2], KINDS[:2], "t")
    with pytest.raises(ValueError, match="3 positions but 2 labels and 3 kinds"):
        attention_html(weights, LABELS[:2], KINDS[:3], "t")
    with pytest.raises(ValueError, match=r"unknown token kinds \['word'\]"):
        attention_html(weights, LABELS[:3], ["BOS", "word", "EOS"], "t")
