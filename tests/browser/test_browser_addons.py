"""The "What changed" tab in a real browser: upload a LoRA file, press Load, see the UNet's
blocks coloured by their change (the served picture is the one ``weight_changes`` draws), run
with and without, move the scale and see the run again. Screenshots at 1280 and 400 pixels wide
go to ``test-output/screenshots/``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd_parts
from tests.helpers.addons import base_pipeline, kohya_lora
from tests.helpers.browser import (
    app_page,
    changed_image,
    loaded_image,
    shot,
)
from ui.addons import AddOn
from ui.shared import LABEL_ROOM
from ui.tabs import addons as tab


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kohya_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def page(tiny_server) -> Iterator:
    with app_page(tiny_server.url, tab.TITLE) as page:
        page.locator("#addon-load").wait_for()
        yield page


def upload(page, path: Path) -> None:
    """Upload ``path`` and wait for the finished upload's file row. (Its text is "style
    .safetensors": the name and the extension are separate spans. The name as written is only
    in the progress line shown while the upload runs, gone at once when it is quick.)"""
    page.locator("#addon-upload input[type=file]").set_input_files(str(path))
    page.locator("#addon-upload").get_by_label(path.name, exact=True).wait_for()


def served(page, selector: str) -> np.ndarray:
    data = page.request.get(loaded_image(page, selector)["src"]).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[LABEL_ROOM:]


def test_a_lora_is_loaded_measured_and_run(page, lora_file):
    upload(page, lora_file)
    page.locator("#addon-load").click()
    page.locator("#addon-status").filter(has_text="Loaded LoRA").wait_for()
    page.locator("#addon-reading").filter(has_text="5 of").wait_for()
    # the diagram the page shows is the one drawn here from the same file and models
    base = base_pipeline(False)
    layers, _, _ = sd_parts.read_lora(base, lora_file)
    pipe = tab.addons.session_pipeline(base)
    summary = sd_parts.load_lora_weights(pipe, lora_file)
    addon = AddOn("LoRA", summary.name, pipe, base, False, str(summary), lora=summary,
                  layers=layers)
    expected = tab.weight_views(addon, 1.0)["unet_changes"].pixels
    np.testing.assert_array_equal(served(page, "#addon-unet"), expected)
    loaded_image(page, "#addon-text")
    assert page.locator("#addon-largest").filter(has_text="resblock conv").count() == 1

    page.locator("#addon-run").click()
    page.locator("#addon-run-status").filter(has_text="without and with LoRA").wait_for()
    first = loaded_image(page, "#addon-with")
    for selector in ("#addon-without", "#addon-difference", "#addon-strips",
                     "#addon-word-maps"):
        loaded_image(page, selector)
    shot(page, "addons-tab", readme=True)
    # a new scale measures and runs again
    number = page.get_by_label("number input for LoRA scale")
    number.fill("0.5")
    number.press("Tab")  # the slider reports its "release" when the number box loses focus
    page.locator("#addon-run-status").filter(has_text="with LoRA at scale 0.5").wait_for()
    changed_image(page, "#addon-with", first["src"])
    page.set_viewport_size({"width": 400, "height": 900})
    page.wait_for_timeout(300)
    shot(page, "addons-400")
    page.set_viewport_size({"width": 1280, "height": 900})


def test_a_learned_token_shows_its_neighbours_instead_of_weight_changes(page, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    vectors = torch.randn(1, sd_parts.TINY_CLIP.hidden_size, generator=torch.Generator()
                          .manual_seed(5))
    save_file({"<my-style>": vectors}, path)
    page.locator("#addon-upload button[aria-label=Clear]").click()
    upload(page, path)
    page.get_by_role("radio", name="textual inversion").check()
    page.locator("#addon-load").click()
    page.locator("#addon-status").filter(has_text="Loaded textual inversion").wait_for()
    page.locator("#addon-reading").filter(has_text="changes no weight").wait_for()
    page.locator("#addon-neighbours").filter(has_text="<my-style>").first.wait_for()
    loaded_image(page, "#addon-token-norms")
    assert not page.locator("#addon-unet").is_visible()
    used = page.locator("#addon-token-use").inner_text()
    assert "<my-style>" in used
    assert page.locator("#addon-prompt textarea").input_value().endswith(", <my-style>")
    shot(page, "addons-token-1280")
