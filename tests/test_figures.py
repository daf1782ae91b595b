"""Figures (right kind, right number of axes, render, no leaks) and the token tables."""

from __future__ import annotations

import gc
import io
import time
import weakref
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from sd_parts.figures import (
    BOS_ID,
    BOS_TEXT,
    EOS_ID,
    EOS_TEXT,
    TOKEN_ROWS_HEADERS,
    abs_error_figure,
    attention_figure,
    attention_heads_grid_figure,
    cosine_similarity_figure,
    embedding_heatmap_figure,
    eos_attention_figure,
    hidden_state_norms_figure,
    latent_channels_figure,
    latent_histogram_figure,
    positions_used,
    std_map_figure,
    token_count_note,
    token_rows,
    truncation_note,
)

SCALE = 0.18215
PIECES = [BOS_TEXT, "a</w>", "photo</w>", "of</w>", "$5</w>", "$x$</w>", "mo", "on</w>", EOS_TEXT]


def _causal_attention(heads: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, count, count, generator=generator)
    future = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    torch.manual_seed(0)
    labels = PIECES + [EOS_TEXT] * (77 - len(PIECES))
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    real = _causal_attention(12, 77, 0)[:, : len(PIECES), : len(PIECES)]
    noise = rng.integers(-6, 7, original.shape)
    return {
        "latent": torch.randn(4, 48, 64) * 5,
        "std": torch.rand(4, 48, 64) * 0.1,
        "original": original,
        "reconstruction": np.clip(original.astype(int) + noise, 0, 255).astype(np.uint8),
        "labels": labels,
        "hidden": torch.randn(77, 768),
        "states": [torch.randn(77, 768) * (layer + 1) for layer in range(13)],
        "attention": _causal_attention(12, 77, 0),
        "layers": [_causal_attention(12, 77, seed) for seed in range(12)],
        # What the app shows for real tokens only: the first rows and columns, renormalised.
        "real": real / real.sum(dim=-1, keepdim=True),
    }


N_REAL = len(PIECES)

# Each figure with a typical input (from the data fixture) and the number of axes it should have.
CASES: dict[str, tuple[Callable[[dict], Figure], int]] = {
    "channels shared": (lambda d: latent_channels_figure(d["latent"]), 5),
    "channels separate": (lambda d: latent_channels_figure(d["latent"], False), 8),
    "std map": (lambda d: std_map_figure(d["std"]), 5),
    "histogram": (lambda d: latent_histogram_figure(d["latent"], SCALE), 1),
    "histogram pooled": (lambda d: latent_histogram_figure(d["latent"], SCALE, False), 1),
    "abs error": (lambda d: abs_error_figure(d["original"], d["reconstruction"]), 2),
    "embedding 77": (lambda d: embedding_heatmap_figure(d["hidden"], d["labels"], N_REAL), 2),
    "norms legend": (lambda d: hidden_state_norms_figure(d["states"], d["labels"], N_REAL), 1),
    "norms colour bar": (lambda d: hidden_state_norms_figure(d["states"], d["labels"], 40), 2),
    "cosine real": (lambda d: cosine_similarity_figure(d["hidden"][:N_REAL], PIECES), 2),
    "cosine 77": (lambda d: cosine_similarity_figure(d["hidden"], d["labels"]), 2),
    "attention real": (lambda d: attention_figure(d["real"][0], PIECES, "Layer 1, head 1"), 2),
    "attention 77": (lambda d: attention_figure(d["attention"][0], d["labels"], "all 77"), 2),
    "heads real": (lambda d: attention_heads_grid_figure(d["real"], PIECES, 3), 13),
    "heads 77": (lambda d: attention_heads_grid_figure(d["attention"], d["labels"], 3), 13),
    "heads 6": (lambda d: attention_heads_grid_figure(d["real"][:6], PIECES, 1), 7),
    "eos real": (lambda d: eos_attention_figure([d["real"]] * 12, N_REAL - 1, PIECES), 2),
    "eos 77": (lambda d: eos_attention_figure(d["layers"], N_REAL - 1, d["labels"]), 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_figure_builds_renders_and_has_its_axes(data: dict, name: str) -> None:
    build, n_axes = CASES[name]
    start = time.perf_counter()
    figure = build(data)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    elapsed = time.perf_counter() - start
    assert isinstance(figure, Figure)
    assert len(figure.axes) == n_axes
    assert buffer.getvalue().startswith(b"\x89PNG")
    assert elapsed < 3.0  # typically 0.1-0.5 s, build and render, on a busy 2-core machine
    assert plt.get_fignums() == []  # nothing went through pyplot's global registry


def test_figures_do_not_modify_inputs_or_leak(data: dict) -> None:
    copies = {key: value.clone() for key, value in data.items() if isinstance(value, torch.Tensor)}
    references = []
    for build, _ in CASES.values():
        figure = build(data)
        references.append(weakref.ref(figure))
        del figure
    gc.collect()
    assert all(reference() is None for reference in references)  # freed once dropped
    for key, value in copies.items():
        assert torch.equal(data[key], value)


def test_dollar_signs_in_labels_are_shown_literally(data: dict) -> None:
    n = len(PIECES)
    figure = cosine_similarity_figure(data["hidden"][:n], PIECES)
    figure.savefig(io.BytesIO(), format="png")  # a '$x$' label would otherwise be a formula
    texts = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert r"\$x\$</w>" in texts


def test_figures_check_their_inputs(data: dict) -> None:
    with pytest.raises(ValueError, match="labels"):
        attention_figure(data["attention"][0], ["too", "few"], "title")
    with pytest.raises(ValueError, match="square"):
        attention_figure(data["attention"][0, :5], data["labels"][:5], "title")
    with pytest.raises(ValueError, match="n_real"):
        embedding_heatmap_figure(data["hidden"], data["labels"], 78)
    with pytest.raises(ValueError, match="eos_index"):
        eos_attention_figure(data["layers"], 77, data["labels"])


# ---------------------------------------------------------------------------------------------
# Token tables


def _prompt(n_tokens: int) -> tuple[list[int], list[str]]:
    """A synthetic prompt of n tokens: two-piece words "wa" + "b</w>", ids from 1000 up."""
    pieces = [f"w{i // 2}a" if i % 2 == 0 else f"b{i // 2}</w>" for i in range(n_tokens)]
    return list(range(1000, 1000 + n_tokens)), pieces


@pytest.mark.parametrize("n_tokens", [0, 1, 10, 75, 76, 77, 78, 200])
@pytest.mark.parametrize("with_markers", [False, True])
def test_token_rows_are_what_sd_v1_sees(n_tokens: int, with_markers: bool) -> None:
    ids, pieces = _prompt(n_tokens)
    if with_markers:
        ids, pieces = [BOS_ID, *ids, EOS_ID], [BOS_TEXT, *pieces, EOS_TEXT]
    rows = token_rows(ids, pieces)
    kept = min(n_tokens, 75)
    assert len(rows) == 77 and all(len(row) == len(TOKEN_ROWS_HEADERS) for row in rows)
    assert [row[0] for row in rows] == list(range(77))
    kinds = [row[3] for row in rows]
    assert kinds == ["BOS"] + ["token"] * kept + ["EOS"] + ["padding"] * (75 - kept)
    assert rows[0][1:3] == [BOS_TEXT, BOS_ID] and rows[kept + 1][1:3] == [EOS_TEXT, EOS_ID]
    assert [row[2] for row in rows[1 : kept + 1]] == list(range(1000, 1000 + kept))
    assert all(row[1:3] == [EOS_TEXT, EOS_ID] for row in rows[kept + 2 :])
    assert positions_used(n_tokens) == kept + 2


def test_token_rows_keep_pieces_as_text() -> None:
    rows = token_rows([1, 2], ["<b>bold</w>", "&amp;</w>"], max_length=6)
    assert [row[1] for row in rows[1:3]] == ["<b>bold</w>", "&amp;</w>"] and len(rows) == 6


@pytest.mark.parametrize("n_tokens", [0, 10, 75])
def test_truncation_note_is_empty_when_the_prompt_fits(n_tokens: int) -> None:
    assert truncation_note(_prompt(n_tokens)[1]) == ""
    assert truncation_note([BOS_TEXT, *_prompt(n_tokens)[1], EOS_TEXT]) == ""


def test_truncation_note_names_the_cut_words() -> None:
    # 76 tokens: the 76th is "b37</w>", the second half of word 37, so that word is cut partly.
    note = truncation_note(_prompt(76)[1])
    assert "76 tokens" in note and "only 75 fit" in note and "last 1 " in note
    assert "“w37ab37 (partly)”" in note and "w36ab36" not in note
    note = truncation_note(_prompt(78)[1])  # words 37 (partly) and 38 (whole) are cut
    assert "“w37ab37 (partly)”, “w38ab38”" in note
    note = truncation_note(_prompt(200)[1])  # 63 words cut: 40 named, then a count
    assert "“w99ab99”" not in note and "and 23 more" in note


def test_token_count_note() -> None:
    assert token_count_note(_prompt(10)[1]) == (
        "12 of 77 positions used (BOS + 10 tokens + EOS); 65 are padding."
    )
    assert token_count_note([BOS_TEXT, "cat</w>", EOS_TEXT]).startswith(
        "3 of 77 positions used (BOS + 1 token + EOS)"
    )
    assert token_count_note(_prompt(80)[1]) == (
        "77 of 77 positions used (BOS + 75 tokens + EOS); 5 more tokens were cut."
    )
