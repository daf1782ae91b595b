"""The app in a real browser: Playwright drives Debian's Chromium through what a person does.

Each step saves a screenshot to ``test-output/screenshots/``. With ``SD_PARTS_SCREENSHOTS=DIR``
set, the screenshots of each tab that the README shows are also written to DIR:

    SD_PARTS_SCREENSHOTS=docs/screenshots python -m pytest tests/browser

Chromium comes from the system (``apt-get install chromium``), not from Playwright's download.
Without it these tests skip on a developer's machine and fail under ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image
from safetensors import safe_open

from tests.helpers.browser import (
    PROMPT_TAB,
    attention_map,
    changed_image,
    changed_map,
    chromium_page,
    clear_upload,
    inspect,
    loaded_image,
    open_tab,
    png_bytes,
    require_chromium,
    shot,
    status_text,
    upload,
)
from tests.helpers.corpus import IMG_ONERROR, SCRIPT
from tests.helpers.serve import ROOT


@pytest.fixture(scope="module")
def server(tiny_server):
    require_chromium()
    return tiny_server


@pytest.fixture(scope="module")
def page(server) -> Iterator:
    """One page for the whole walk-through, in a fresh profile; a JavaScript dialog fails it."""
    with chromium_page(accept_downloads=True) as page:
        page.dialogs = []  # alert(), confirm() ...: markup that ran as code
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        # the browser may fetch only from the app itself
        page.foreign = []
        page.on("request", lambda request: None if request.url.startswith(server.url)
                or request.url.startswith("data:") or request.url.startswith("blob:")
                else page.foreign.append(request.url))
        page.goto(server.url)
        page.locator("#image-input").wait_for()
        yield page
    assert page.dialogs == []
    assert page.foreign == []


# ---------------------------------------------------------------------------------------------
# Image → latent → image


def test_upload_shows_latent_channels_and_reconstruction(page):
    upload(page, "stripes-96x64.png", png_bytes((96, 64), (30, 120, 200)))
    reconstruction = loaded_image(page, "#reconstruction")
    assert (reconstruction["width"], reconstruction["height"]) == (96, 64)
    channels = loaded_image(page, "#latent-channels")
    assert channels["width"] > 200  # a figure, not a placeholder icon
    assert "PSNR" in page.get_by_text("PSNR").first.inner_text()
    shot(page, "1-upload")


def test_click_an_example(page):
    before = loaded_image(page, "#reconstruction")["src"]
    clear_upload(page)
    page.get_by_role("button", name="cat.png").click()
    reconstruction = changed_image(page, "#reconstruction", before)
    cat = Image.open(ROOT / "assets" / "cat.png")
    assert max(reconstruction["width"], reconstruction["height"]) <= 384  # the default size
    assert abs(reconstruction["width"] / reconstruction["height"] - cat.width / cat.height) < 0.1
    page.locator("#image-input").get_by_text("cat", exact=False).first.wait_for()
    shot(page, "image-tab", readme=True)


def test_switch_between_posterior_mean_and_sample(page):
    mean = loaded_image(page, "#reconstruction")["src"]
    page.locator("#latent-kind").get_by_text("seeded sample").click()
    sample = changed_image(page, "#reconstruction", mean)["src"]
    shot(page, "2-sample")
    page.locator("#latent-kind").get_by_text("posterior mean").click()
    again = changed_image(page, "#reconstruction", sample)["src"]
    # outputs are stored under a hash of their bytes: the same mean gives the same picture
    assert again.rsplit("/", 2)[-2] == mean.rsplit("/", 2)[-2]


def test_download_the_latent(page, tmp_path):
    link = page.locator("a[download$='latent.safetensors']").first
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "latent.safetensors"
    download.value.save_as(saved)
    reconstruction = loaded_image(page, "#reconstruction")
    with safe_open(str(saved), framework="pt") as f:
        latent = f.get_tensor("latent")
        metadata = f.metadata()
    # tiny weights downsample by 2 (SD v1 by 8)
    assert latent.shape == (1, 4, reconstruction["height"] // 2, reconstruction["width"] // 2)
    assert float(metadata["scaling_factor"]) > 0


def test_non_image_upload_shows_one_readable_message(page):
    upload(page, "notes.png", b"this is a text file with an image's name\n")
    message = status_text(page, "notes.png")
    assert "'notes.png' is not an image Pillow can read" in message
    assert "Traceback" not in message
    # one message, not an "Error" badge on every output box
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator("[data-testid=toast-body]").count() == 0
    shot(page, "3-not-an-image")


def test_markup_in_a_file_name_is_shown_as_text(page):
    """Gradio drops < and > from uploaded names; entities would still become markup unescaped."""
    upload(page, f"&lt;b&gt;bold&lt;i&gt; {IMG_ONERROR}.png", b"not an image either")
    message = status_text(page, "onerror")
    assert "'&lt;b&gt;bold&lt;i&gt; img src=x onerror=alert(1).png' is not an image" in message
    assert page.locator("#image-status :is(b, i), img[src=x]").count() == 0
    assert page.dialogs == []
    clear_upload(page)


# ---------------------------------------------------------------------------------------------
# Prompt → tokens → attention


def test_prompt_shows_tokens_and_an_attention_map(page):
    open_tab(page, PROMPT_TAB)
    # every example is labelled, the empty prompt too
    empty = "(empty: what guidance's unconditional branch reads)"
    page.get_by_role("button", name=empty).wait_for()
    # opening the tab answers the prompt filled in: tokens and a map before any click
    page.locator("#token-view").get_by_text("horse", exact=False).first.wait_for()
    assert "horse</w>" in attention_map(page)
    inspect(page, "a photograph of an astronaut riding a zebra")
    tokens = page.locator("#token-view")
    tokens.get_by_text("zebra", exact=False).first.wait_for()
    text = tokens.inner_text()
    assert "<|startoftext|>" in text and "astronaut" in text
    attention = attention_map(page)
    assert "zebra</w>" in attention and "<|startoftext|>" in attention
    assert page.locator("#attention-picture a[download]").first.get_attribute(
        "download").endswith(".png")  # the same map as a picture
    shot(page, "prompt-tab", readme=True)


def test_layer_and_head_change_the_map(page):
    first = attention_map(page)
    page.get_by_label("Head").click()
    page.get_by_role("option", name="head 2", exact=True).click()
    by_head = changed_map(page, first)
    layer = page.get_by_label("number input for Layer")
    layer.fill("2")
    layer.press("Tab")  # the slider reports its "release" when the number box loses focus
    by_layer = changed_map(page, by_head)
    assert "Layer 1, head 2" in by_head and "Layer 2, head 2" in by_layer
    shot(page, "4-layer-2-head-2")


def test_emoji_tokens_are_readable(page):
    before = attention_map(page)
    inspect(page, "a cat 🐱 on the moon 🌕")
    changed_map(page, before)
    text = page.locator("#token-view").inner_text()
    assert "🐱</w>" in text and "<byte 4/4 of 🌕></w>" in text and "ðŁ" not in text


def test_markup_in_a_prompt_is_shown_as_text(page):
    """In the tokens, and in the note that names the words cut off after 75 tokens."""
    before = attention_map(page)
    inspect(page, f"{SCRIPT} {IMG_ONERROR} " + "cat " * 70 + IMG_ONERROR)
    changed_map(page, before)
    tokens = page.locator("#token-view")
    tokens.get_by_text("alert", exact=False).first.wait_for()
    assert "script" in tokens.inner_text() and "<" in tokens.inner_text()
    note = page.get_by_text("never sees these words", exact=False)
    assert "“<”, “img”, “src”, “=”, “x”, “onerror”" in note.inner_text()
    assert page.locator("script:not([src]):not([type])").evaluate_all(
        "scripts => scripts.filter(s => s.textContent.includes('alert(1)')).length") == 0
    assert page.locator("img[src=x], img[onerror]").count() == 0
    assert page.dialogs == []
    shot(page, "5-markup-prompt")


def test_how_it_works_tab(page):
    open_tab(page, "How it works")
    page.get_by_text("How Stable Diffusion v1 makes an image").wait_for()
    shot(page, "how-it-works-tab", readme=True)
