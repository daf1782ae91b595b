"""The prompt lab tab through gradio_client on the tiny app (its own server process), and its
view functions on a text encoder whose context mean can be restored."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

import sd_parts
from tests.helpers.serve import local_client
from ui.models import Models, Settings
from ui.shared import LABEL_ROOM
from ui.tabs import prompt_lab
from viz.heatmap import MASKED
from viz.prompt_lab import short as lab_short

MODELS = Models(Settings(weights="tiny"))


@pytest.fixture(scope="module")
def client(tiny_server):
    return local_client(tiny_server.url,
                  download_files=str(tiny_server.folder / "prompt-lab"))


def call(client: Client, api_name: str, names: tuple[str, ...], *args: object) -> dict:
    return dict(zip(names, client.predict(*args, api_name=api_name), strict=True))


def test_appending_words_changes_only_the_later_positions(client):
    a, b = "a photo of a cat", "a photo of a cat on a sofa"
    out = call(client, "/compare_prompts", prompt_lab.COMPARE_OUTPUTS, a, b, True)
    rows = out["compare_tokens"]["data"]
    assert len(rows) == 77
    assert rows[5] == [5, "cat</w>", "token", "cat</w>", "token", "same"]
    assert rows[6] == [6, "<|endoftext|>", "EOS", "on</w>", "token", "differs"]
    assert rows[9] == [9, "<|endoftext|>", "padding", "<|endoftext|>", "EOS", "same"]
    reading = out["compare_reading"]
    assert reading.startswith("Positions 0-5 unchanged (max L2 ")
    assert "positions 6-76 changed, padding included." in reading
    assert "The tokens differ at 6-8." in reading
    # the served map: positions 0-5 grey (unchanged) in every layer, 6 on coloured in each
    served = np.asarray(Image.open(out["compare_map"]).convert("RGB"))
    drawn = prompt_lab.compare_prompts(MODELS, a, b, True)["compare_map"]
    assert served.shape[0] == drawn.pixels.shape[0] + LABEL_ROOM
    for box in drawn.maps:
        cells = box.moved(LABEL_ROOM, 0).cells(served)
        assert cells.shape[:2] == (77, 4)  # positions x (emb, layer 1, layer 2, final)
        assert (cells[:6] == MASKED).all()
        assert not (cells[6:, 1:] == MASKED).all(axis=-1).any()
    without = call(client, "/compare_prompts", prompt_lab.COMPARE_OUTPUTS, a, b, False)
    assert len(without["compare_tokens"]["data"]) == 10  # up to EOS of the longer prompt
    assert "Positions 0-5 unchanged" in without["compare_reading"]
    assert "padding included" not in without["compare_reading"]


def test_words_past_the_cut_are_named_not_compared():
    long = " ".join(["cat"] * 80)
    reading = prompt_lab.compare_prompts(MODELS, long, long + " dog", False)["compare_reading"]
    assert reading.startswith("The two prompts give the same 77 tokens here.")
    assert "Prompt A: the prompt has 80 tokens but only 75 fit" in reading
    assert "Prompt B: the prompt has 81 tokens" in reading and "“dog”" in reading


def test_malformed_weighting_gives_notes_not_an_error(client):
    out = call(client, "/weighting", prompt_lab.WEIGHT_OUTPUTS, "a (cat:x1.3) in a hat]")
    notes = out["weight_notes"]
    assert "is not a weight" in notes and "closes no bracket" in notes
    # the tiny random CLIP's final LayerNorm has no bias: the mean is 0 and cannot be restored
    assert "cannot be applied" in notes and "mean is about 0" in notes
    weighted = {item["token"]: item["class_or_confidence"] for item in out["weight_tokens"]}
    assert weighted["cat</w> x1.1 "] == pytest.approx(np.log2(1.1))
    assert weighted["in</w> "] is None and weighted["]</w> "] is None
    assert out["weight_map"] is None and out["weight_table"]["data"] == []


def test_weighting_with_a_restorable_mean():
    """The normal path, on the tiny encoder with a final LayerNorm bias (a trained CLIP has one,
    which keeps the context's mean away from 0)."""
    torch.manual_seed(0)
    encoder = sd_parts.CLIPTextEncoder(sd_parts.TINY_CLIP).eval()
    with torch.no_grad():
        encoder.final_layer_norm.bias.uniform_(0.2, 0.6)
    views = prompt_lab.weighting_views(MODELS.tokenizer(), encoder, "a (red:1.5) car [street")
    rows = views["weight_table"]["data"]
    assert [row[1] for row in rows] == ["<|startoftext|>", "a</w>", "red</w>", "car</w>",
                                        "street</w>", "<|endoftext|>"]
    assert [row[2] for row in rows] == pytest.approx([1, 1, 1.5, 1, 1 / 1.1, 1])
    factor = rows[0][5]  # an unweighted position changes only by the mean-restoring factor
    assert factor != pytest.approx(1.0, abs=1e-4)
    assert [row[5] for row in rows] == pytest.approx([row[2] * factor for row in rows], rel=1e-4)
    assert r"'\[' at character 17 is never closed" in views["weight_notes"]  # Markdown-escaped
    assert f"multiplied by {factor:.4g}" in views["weight_notes"]
    assert views["weight_map"].maps[0].rows == 6


def test_a_300_word_prompt_is_split_quickly(client):
    words = " ".join(["lighthouse", "coast", "dusk", "waves", "clouds", "light"] * 50)
    start = time.monotonic()
    out = call(client, "/long_prompt", prompt_lab.LONG_OUTPUTS, words)
    elapsed = time.monotonic() - start
    assert elapsed < 3, f"{elapsed:.1f} s for a 300-word prompt"
    assert "The prompt has 300 tokens: SD v1 keeps the first 75 and drops 225" in (
        out["long_reading"])
    assert "77 x 4 = 308 context vectors (1, 308, 32)" in out["long_reading"]
    kinds = [item["class_or_confidence"] for item in out["long_cut"]]
    assert kinds.count("kept") == 75 and kinds.count("dropped") == 225
    markers = [item["token"] for item in out["long_chunks"]
               if item["class_or_confidence"] == "chunk"]
    assert markers == [f"chunk {c + 1}: context vectors {77 * c}-{77 * c + 76}" for c in range(4)]
    assert len(out["long_table"]["data"]) == 308
    # no comma, no BREAK: the web UI's rule cuts where the plain one does
    webui = [item["token"] for item in out["long_webui"] if item["class_or_confidence"] == "chunk"]
    assert webui == markers
    assert "The two rules cut this prompt alike." in out["long_reading"]
    # thousands of tokens: every chunk counted, the first dozen shown
    views = prompt_lab.long_prompt(MODELS, " ".join(["lighthouse"] * 5000))
    assert "77 x 67 = 5159 context vectors" in views["long_reading"]
    assert "The first 12 of 67 chunks are shown." in views["long_reading"]
    assert len(views["long_table"]["data"]) == 12 * 77
    assert views["long_chunks"][-1] == ("... 55 more chunks", "chunk")
    assert views["long_cut"][-1] == (f"... {5000 - 900} more tokens", "dropped")


def test_the_web_uis_chunks_are_shown_beside_the_plain_cut():
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10) + " BREAK tree"
    views = prompt_lab.long_prompt(MODELS, prompt)
    markers = [text for text, kind in views["long_webui"] if kind == "chunk"]
    assert markers == [f"chunk {c + 1}: context vectors {77 * c}-{77 * c + 76}" for c in range(3)]
    second = views["long_webui"].index((markers[1], "chunk"))
    assert views["long_webui"][second + 1: second + 3] == [("<|startoftext|>", "BOS"),
                                                          ("dog</w>", "token")]
    assert [kind for _, kind in views["long_chunks"]].count("chunk") == 2
    assert "AUTOMATIC1111's rule: 3 chunk(s) of 71, 10, 1 tokens." in views["long_reading"]
    example = prompt_lab.long_prompt(MODELS, prompt_lab.LONG_EXAMPLE)["long_reading"]
    assert "The plain cut: 2 chunk(s) of 75, 15 tokens. AUTOMATIC1111's rule: 2 chunk(s) of " \
        "69, 21 tokens." in example


def test_clip_skip_and_nearest_tokens_answer_in_shape(client):
    out = call(client, "/clip_skip", prompt_lab.SKIP_OUTPUTS, "a photo of a cat")
    table = out["skip_table"]
    # the tiny encoder has 2 layers, so only one can be skipped
    assert table["headers"] == ["position", "text", "cosine, 1 skipped", "L2, 1 skipped"]
    assert [row[1] for row in table["data"]] == ["<|startoftext|>", "a</w>", "photo</w>",
                                                 "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert all(row[2] > 0 and row[3] > 0 for row in table["data"])
    assert "at most 1 can be skipped" in out["skip_reading"]
    assert Image.open(out["skip_map"]).width > 200
    # the numbers are the distances between the library's own clip_skip outputs
    ids = MODELS.tokenizer()(["a photo of a cat"])
    with torch.inference_mode():
        final, skipped = (MODELS.text_encoder()(ids, clip_skip=k).last_hidden_state[0, :7]
                          for k in (0, 1))
    assert [row[3] for row in table["data"]] == pytest.approx(
        (final - skipped).norm(dim=1).tolist(), abs=1e-5)
    length = lab_short(float(final.norm(dim=1).mean()))  # the scale of those distances
    assert f"embeddings are {length} long on average" in out["skip_reading"]

    out = call(client, "/nearest_tokens", prompt_lab.NEAREST_OUTPUTS, "a photo of a cat", 5, 8)
    rows = out["nearest_table"]["data"]
    assert [row[0] for row in rows] == list(range(1, 9))
    assert 2368 not in [row[3] for row in rows]  # "cat</w>" itself is left out
    scores = [row[2] for row in rows]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert "“cat&lt;/w&gt;” (position 5, id 2368)" in out["nearest_notes"]
    out = call(client, "/nearest_tokens", prompt_lab.NEAREST_OUTPUTS, "a photo of a cat", 9, 8)
    assert "from 0 (BOS) to 6 (EOS)" in out["nearest_notes"]
    assert out["nearest_table"]["data"] == []


def test_opening_the_lab_answers_the_prompts_already_there(tiny_server):
    """In Chromium: opening the lab, then an experiment, shows its result before any click; on
    a phone-wide page the pictures' buttons sit above them, not over their titles."""
    from tests.helpers.browser import chromium_page, require_chromium, shot

    require_chromium()
    with chromium_page() as page:
        page.goto(tiny_server.url)
        page.get_by_role("tab", name=prompt_lab.TITLE).click()
        page.locator("#lab-compare-map img").wait_for()
        assert "Positions 0-5 unchanged" in page.get_by_text("Positions 0-5").inner_text()
        shot(page, "prompt-lab-tab", readme=True)
        page.get_by_role("tab", name="CLIP skip", exact=True).click()
        page.locator("#lab-skip-map img").wait_for()
        assert page.get_by_text("Compared with the last layer's embeddings").is_visible()
        assert page.get_by_role("button", name="Measure").is_visible()  # nothing was clicked
        page.get_by_role("tab", name="Nearest tokens", exact=True).click()
        page.get_by_text("rows of CLIP's 49408 x 32 token embedding table nearest to").wait_for()
        token = page.get_by_label("Token")
        assert token.input_value() == "1: a</w>"  # the first real token
        token.click()
        page.get_by_role("option", name="5: cat</w>").click()
        page.get_by_text("nearest to “cat</w>” (position 5").wait_for()
        page.get_by_role("tab", name="CLIP skip", exact=True).click()
        page.get_by_role("tab", name="Nearest tokens", exact=True).click()  # the choice stays
        page.get_by_text("nearest to “cat</w>” (position 5").wait_for()
        page.wait_for_timeout(1000)
        assert token.input_value() == "5: cat</w>"
        page.get_by_role("tab", name="CLIP skip", exact=True).click()
        page.set_viewport_size({"width": 400, "height": 900})
        image = page.locator("#lab-skip-map img")
        image.scroll_into_view_if_needed()
        buttons = page.locator("#lab-skip-map .icon-button-wrapper").bounding_box()
        assert buttons["y"] + buttons["height"] <= image.bounding_box()["y"] + 1
        assert page.locator("#lab-skip-map label:not(.sr-only)").count() == 0  # no label over it
