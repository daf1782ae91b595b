"""Compare runs and the few-steps preset in a real browser (Playwright driving Debian's
Chromium), on the tiny app: the generation tab's button opens the section, a comparison of three
seeds streams its runs into the table and ends with the x0 grid, the images, their differences
and the sigma chart; the preset fills the form and says the UNet is not LCM-distilled. The
section is shot at 1280 and 400 px wide.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.browser import app_page, loaded_image, shot
from tests.helpers.serve import serve
from ui.tabs.generate import TITLE

# Gradio's table draws its rows as ARIA grid rows (the <tbody> holds one row, for measuring)
TABLE_ROWS = "() => document.querySelectorAll('#compare-table [role=row][data-index]').length"
FIRST_ROW = ("() => [...document.querySelectorAll('#compare-table [data-testid^=\"cell-0-\"]')]"
             ".map(cell => cell.innerText.trim())")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Iterator:
    with serve(tmp_path_factory.mktemp("browser-compare-runs")) as server, \
            app_page(server.url, TITLE) as page:
        page.locator("#generate-prompt textarea").wait_for()
        yield page


def compare_status(page, pattern: str) -> str:
    return page.wait_for_function(
        "pattern => { const box = document.querySelector('#compare-status');"
        " const text = box ? box.innerText : ''; return new RegExp(pattern).test(text) && text; }",
        arg=pattern).json_value()


def test_compare_three_seeds_side_by_side(page):
    steps = page.get_by_label("number input for Steps", exact=True)
    steps.fill("4")
    steps.press("Tab")
    assert not page.locator("#compare-button").is_visible()  # the section starts closed
    page.locator("#to-compare-runs").click()
    page.locator("#compare-button").wait_for(state="visible")
    page.locator("#compare-vary label", has_text="seed").click()
    values = page.locator("#compare-values textarea")
    page.wait_for_function("() => document.querySelector('#compare-values textarea').value"
                           " === '0 | 1 | 2 | 3'")  # the setting's own example values
    values.fill("0 | 1 | 2")
    page.locator("#compare-button").click()
    compare_status(page, r"^Done: 3 runs of the same prompt, differing in seed\.")
    assert page.evaluate(TABLE_ROWS) == 3
    # PLMS, the form's sampler: 4 steps, 5 UNet evaluations
    assert page.evaluate(FIRST_ROW)[:4] == ["1", "seed 0", "4", "5"]
    for picture in ("#compare-x0", "#compare-images", "#compare-differences",
                    "#compare-sigmas"):
        assert loaded_image(page, picture)["width"] > 100, picture
    page.locator("#compare-runs").scroll_into_view_if_needed()
    shot(page, "compare-runs", readme=True)
    page.set_viewport_size({"width": 400, "height": 900})
    try:
        # narrow: the drawn pictures keep their size and scroll sideways
        grid = page.locator("#compare-x0 .image-container")
        assert grid.evaluate("e => e.scrollWidth > e.clientWidth")
        shot(page, "compare-runs-400")
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_the_few_steps_preset_fills_the_form_and_says_why_it_may_blur(page):
    page.locator("#few-steps-button").click()
    note = page.locator("#few-steps-note")
    note.get_by_text("This UNet is not LCM-distilled").wait_for()
    assert "LCM-LoRA" in note.inner_text() and "--unet" in note.inner_text()
    assert page.get_by_label("Scheduler").input_value() == "LCM"
    assert page.get_by_label("number input for Steps", exact=True).input_value() == "4"
    assert page.get_by_label("Width", exact=True).input_value() == "512"
    # LCM takes no sigma schedule and no eta: their boxes are not shown; Euler's are, TCD's eta
    page.locator("#sigma-schedules").wait_for(state="hidden")
    assert not page.locator("#sampler-eta").is_visible()
    for sampler, shown in (("Euler", "#sigma-schedules"), ("TCD", "#sampler-eta")):
        menu = page.get_by_label("Scheduler")
        menu.click()
        menu.fill(sampler)
        page.keyboard.press("Enter")
        page.locator(shown).wait_for(state="visible")
