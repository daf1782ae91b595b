"""The "Compare VAEs" tab in a real browser: Playwright drives Debian's Chromium through what a
person does. Upload a picture, tick three VAEs, press Compare; click a pixel of the original and
see that region enlarged in the original and all three reconstructions; click elsewhere and see
it move.

Screenshots go to ``test-output/screenshots/``; with ``SD_PARTS_SCREENSHOTS=docs/screenshots``
the README's picture of the tab is written too. Without Chromium these tests skip on a
developer's machine and fail under ``CI=true``, as tests/browser/test_browser_image_prompt.py does.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.helpers.browser import app_page, loaded_image, shot
from ui.models import Settings
from ui.shared import LABEL_ROOM
from ui.tabs.compare import TITLE
from viz import compare

SETTINGS = Settings(weights="tiny")
CHOICES = (SETTINGS.vae_choices + SETTINGS.tiny_vae_choices)[-3:]  # 4 and 16 channels, TAESD
SIZE = (160, 120)  # width, height of the upload: encoded as it is, every side a multiple of 8


@pytest.fixture(scope="module")
def page(tiny_server) -> Iterator:
    with app_page(tiny_server.url, TITLE) as page:
        page.locator("#compare-input").wait_for()
        yield page


def picture() -> np.ndarray:
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    return np.stack([x * 1.5, y * 2.0, (x // 8 + y // 8) % 2 * 200], axis=2).astype(np.uint8)


def served(page, selector: str) -> np.ndarray:
    """The picture an image box shows, as the server sent it, without Gradio's label strip."""
    source = loaded_image(page, selector)["src"]
    data = page.request.get(source).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[LABEL_ROOM:]


def click_original(page, x: int, y: int) -> None:
    """Click pixel (x, y) of the original, wherever the page has drawn it and at whatever size."""
    image = page.locator("#compare-original img")
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    # the picture is fitted inside its element ("object-fit: contain") and centred
    natural = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    scale = min(box["width"] / natural[0], box["height"] / natural[1])
    left = box["x"] + (box["width"] - natural[0] * scale) / 2
    top = box["y"] + (box["height"] - natural[1] * scale) / 2
    page.mouse.click(left + (x + 0.5) * scale, top + (y + 0.5) * scale)


def centre(page) -> tuple[int, int]:
    return tuple(int(page.get_by_label(f"Region centre {axis} (px)").input_value())
                 for axis in "xy")


def test_click_enlarges_the_region_in_every_reconstruction(page):
    buffer = io.BytesIO()
    Image.fromarray(picture()).save(buffer, "PNG")
    page.locator("#compare-input input[type=file]").set_input_files(
        files=[{"name": "checks.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    for label in SETTINGS.vae_choices + SETTINGS.tiny_vae_choices:
        page.locator("#compare-choices").get_by_label(label, exact=True).set_checked(
            label in CHOICES)
    # a region chosen before any comparison says what to do first; the comparison clears that
    crop_status = page.locator("#compare-crop-status")
    page.get_by_label("Region side (px)").click()
    page.get_by_role("option", name="32", exact=True).click()
    crop_status.filter(has_text="Run a comparison first").wait_for()
    page.get_by_label("Region side (px)").click()
    page.get_by_role("option", name="64", exact=True).click()
    page.locator("#compare-button").click()
    page.locator("#compare-status").filter(
        has_text=f"Compared {len(CHOICES)} VAEs on {SIZE[0]}x{SIZE[1]} pixels").wait_for()
    assert crop_status.inner_text().strip() == ""
    original = picture()
    layout = compare.side_by_side([(label, original) for label in ["original", *CHOICES]])
    composite = served(page, "#compare-reconstructions")
    shown = [box.cells(composite) for box in layout.maps]
    np.testing.assert_array_equal(shown[0], original)
    labelled = list(zip(["original", *CHOICES], shown, strict=True))
    table = page.locator("#compare-table").inner_text()
    assert all(label in table for label in CHOICES), table  # a row per VAE
    assert SETTINGS.vae_choices[0] not in table  # and none for the one not ticked
    # every column in view on a wide page: none of the numbers hides off to the right
    assert page.locator("#compare-table").evaluate(
        "t => { const view = t.querySelector('.virtual-table-viewport').getBoundingClientRect();"
        " return [...t.querySelectorAll('th')].every("
        "  h => h.getBoundingClientRect().right <= view.right + 1); }")

    # the first crop is the centre, and the region's x and y say so
    assert centre(page) == (SIZE[0] // 2, SIZE[1] // 2)

    seen = []
    for x, y in [(30, 25), (130, 100)]:
        before = loaded_image(page, "#compare-crop")["src"]
        click_original(page, x, y)
        page.wait_for_function(
            "old => { const i = document.querySelector('#compare-crop img');"
            " return i && i.src !== old && i.complete && i.naturalWidth > 0; }", arg=before)
        clicked = centre(page)
        assert abs(clicked[0] - x) <= 1 and abs(clicked[1] - y) <= 1
        box = compare.crop_box(*clicked, SIZE, 64)
        expected = compare.crop_view(labelled, box)  # the region of all four, enlarged 4x
        crop = served(page, "#compare-crop")
        np.testing.assert_array_equal(crop, expected.pixels)
        assert len(expected.maps) == len(CHOICES) + 1
        assert all(panel.cell_height == 4 for panel in expected.maps)
        seen.append(crop)
    assert not np.array_equal(seen[0], seen[1])  # the second click moved the region
    shot(page, "compare-tab", readme=True)

    # on a phone the strips keep their own size and scroll sideways, so their drawn titles stay
    # readable, and no label floats over a title
    page.set_viewport_size({"width": 400, "height": 900})
    for picture_id in ("#compare-crop", "#compare-reconstructions", "#compare-errors"):
        shown, natural = page.locator(f"{picture_id} img").evaluate(
            "i => [i.getBoundingClientRect().width, i.naturalWidth]")
        assert abs(shown - natural) <= 1, (picture_id, shown, natural)
        # wider than the page: its frame scrolls sideways to the rest of it
        frame = page.locator(f"{picture_id} .image-container")
        assert frame.evaluate("f => f.scrollWidth > f.clientWidth"), picture_id
        frame.evaluate("f => { f.scrollLeft = f.scrollWidth; }")
        assert frame.evaluate("f => f.scrollLeft > 0"), picture_id
        frame.evaluate("f => { f.scrollLeft = 0; }")
    assert page.locator("#compare-original label[data-testid=block-label]").evaluate(
        "l => getComputedStyle(l).position") == "static"
    shot(page, "compare-tab-400")
    page.set_viewport_size({"width": 1280, "height": 900})


def test_no_vae_ticked_says_so(page):
    for label in SETTINGS.vae_choices + SETTINGS.tiny_vae_choices:
        page.locator("#compare-choices").get_by_label(label, exact=True).set_checked(False)
    page.locator("#compare-button").click()
    page.locator("#compare-status").filter(
        has_text=re.compile("Tick at least one VAE")).wait_for()
