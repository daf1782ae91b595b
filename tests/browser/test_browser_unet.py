"""The "Inside the UNet" section in a real browser: after a tiny run, open the section, click a
block of the diagram and then another, click a position of the image and then another; each
click brings the pictures of what was clicked. Screenshots at 1280 and 400 pixels wide go to
``test-output/screenshots/``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import sd_parts
from tests.helpers.browser import app_page, changed_image, loaded_image, require_chromium, shot
from tests.helpers.serve import serving
from tests.helpers.unet_section import MODELS, section_page
from ui.shared import LABEL_ROOM
from viz import unet

SIDE = 96  # pixels: the image, a 48 x 48 latent with the tiny VAE


@pytest.fixture(scope="module")
def page() -> Iterator:
    require_chromium()  # before the page is built and served
    with serving(section_page(size=SIDE)) as url, app_page(url) as page:
        page.locator("#make-run").click()
        page.locator("#make-status").filter(has_text="A run of").wait_for()
        page.get_by_text("Inside the UNet: one step's call").click()  # opening it runs the call
        yield page


def block_slots() -> dict[str, unet.Slot]:
    """The diagram's geometry for the page's run: the blocks' output shapes at its latent."""
    model = MODELS.unet(True)
    blocks = sd_parts.unet_blocks(model.config)
    probe = sd_parts.UNetProbe([b.path for b in blocks])
    context = torch.zeros(1, 77, model.config.cross_attention_dim)
    model(torch.zeros(1, model.config.in_channels, SIDE // 2, SIDE // 2), 500, context,
          probe=probe)
    shapes = {p: tuple(v.shape[1:]) for p, v in probe.outputs.items()}
    return {s.path: s for s in unet.diagram_slots(blocks, shapes)}


def click_block(page, path: str) -> None:
    """Click the middle of ``path``'s picture in the diagram, scaled as the page shows it."""
    image = loaded_image(page, "#unet-diagram")
    box = page.locator("#unet-diagram img").bounding_box()
    target = block_slots()[path].box
    x = target.left + target.columns * target.cell_width / 2
    y = target.top + target.rows * target.cell_height / 2 + LABEL_ROOM
    scale = box["width"] / image["width"]
    page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)


def test_clicked_blocks_and_positions_bring_their_pictures(page):
    loaded_image(page, "#unet-diagram")
    click_block(page, "mid_block")
    page.locator("#unet-block-note").filter(has_text="mid_block").wait_for()
    first = loaded_image(page, "#unet-channels")
    click_block(page, "up_blocks.1")
    page.locator("#unet-block-note").filter(has_text="up_blocks.1").wait_for()
    assert "comes across the skip" in page.locator("#unet-block-note").inner_text()
    changed_image(page, "#unet-channels", first["src"])

    image = page.locator("#unet-image img")
    loaded_image(page, "#unet-image")
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 0.2, "y": box["height"] * 0.3})
    note = page.locator("#unet-self-note").filter(has_text="Latent position")
    note.wait_for()
    before = note.inner_text()
    maps = loaded_image(page, "#unet-self")
    image.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.7})
    page.wait_for_function("old => { const n = document.querySelector('#unet-self-note');"
                           " return n && n.innerText !== old; }", arg=before)
    changed_image(page, "#unet-self", maps["src"])
    row, col = (int(v) for v in page.locator("#unet-self-note").inner_text()
                .split("(row ")[1].split(")")[0].replace("col ", "").split(", "))
    assert (row, col) == (int(0.7 * SIDE) // 2, int(0.8 * SIDE) // 2)  # the tiny VAE halves
    shot(page, "unet-inside", readme=True)
    page.set_viewport_size({"width": 400, "height": 900})
    page.wait_for_timeout(300)
    shot(page, "unet-inside-400")
