"""The generation tab in a real browser: Playwright drives Debian's Chromium through what a person
does. Type a prompt, press Generate and watch the step preview change while the run goes; scrub
through the steps afterwards, on a scrubber that spans the steps made; see the word maps; stop a
long run part way.

Screenshots go to ``test-output/screenshots/``; with ``SD_PARTS_SCREENSHOTS=docs/screenshots``
the README's picture of the tab is written too. Without Chromium these tests skip on a
developer's machine and fail under ``CI=true``, as tests/browser/test_browser_image_prompt.py does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.helpers.browser import app_page, loaded_image, require_chromium, shot
from tests.helpers.serve import serve
from ui.tabs.generate import TITLE

STEPS = 8  # PNDM visits one timestep more: 9 updates, a few seconds with tiny weights
SIDE = 96  # pixels: big enough to see in the screenshot (the tiny app's default is 32)
# Every change of the step preview's picture, with the status shown at that moment.
WATCH_PREVIEWS = """() => {
    window.previews = [];
    const look = () => {
        const image = document.querySelector('#step-preview img');
        const status = document.querySelector('#generate-status');
        const src = image ? image.src : null;
        const last = window.previews[window.previews.length - 1];
        if (src && (!last || last.src !== src)) {
            window.previews.push({src, status: status ? status.innerText : ''});
        }
    };
    new MutationObserver(look).observe(document.body,
        {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_chromium()
    with serve(tmp_path_factory.mktemp("browser-generate")) as running:
        yield running


@pytest.fixture(scope="module")
def page(server) -> Iterator:
    """One page on the generation tab, in a fresh profile."""
    with app_page(server.url, TITLE) as page:
        page.locator("#generate-prompt textarea").wait_for()
        yield page


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def status(page, pattern: str) -> re.Match:
    """The status box's text once it matches ``pattern``; the match."""
    text = page.wait_for_function(
        "pattern => { const box = document.querySelector('#generate-status');"
        " const text = box ? box.innerText : ''; return new RegExp(pattern).test(text) && text; }",
        arg=pattern).json_value()
    return re.search(pattern, text)


def image_in(page, label: str) -> dict:
    """The picture of the image box labelled ``label``, once it has loaded."""
    block = page.locator(".block").filter(
        has=page.locator("[data-testid=block-label]",
                         has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))
    image = block.locator("img").first
    image.wait_for()
    image.scroll_into_view_if_needed()  # the pictures load lazily, once in view
    return image.evaluate(
        "i => new Promise(done => { const d = () => done({src: i.src, width: i.naturalWidth});"
        " i.complete && i.naturalWidth ? d() : i.addEventListener('load', d); })")


def scrubber_at_the_end(page, last: int) -> None:
    """Wait until the step scrubber spans steps 0 to ``last`` and stands at ``last``, and the
    word maps' range ends there."""
    page.wait_for_function(
        "last => { const r = document.querySelector('#step-scrubber input[type=range]');"
        " const to = document.querySelector('#word-maps-last input');"
        " return r !== null && r.max === String(last) && r.value === String(last)"
        " && to !== null && to.value === String(last); }", arg=last)


def test_the_tab_opens_on_a_finished_example_run(page):
    """Without pressing Generate: the first example's run, made once when the server started,
    with its image, x0 strip, word maps and a scrubber over its steps."""
    status(page, r"An example run, made when the app started: 21 UNet evaluations")
    assert image_in(page, "The image (VAE decoder)")["width"] == 32  # the tiny app's size
    image_in(page, "Chosen steps: the clean image predicted at each")
    image_in(page, "Where each word is looked at (cross-attention, summed over layers and steps)")
    scrubber_at_the_end(page, 21)  # PNDM: 20 steps, 21 UNet evaluations
    for output in ("#final-image", "#step-preview", "#word-maps"):  # none asks for an upload
        assert page.locator(output).get_by_text("Drop Image Here").count() == 0
    # help text under a control reads dark grey, not Gradio's pale #bbbbc2
    help_colour = page.locator(".info-text").first.evaluate("e => getComputedStyle(e).color")
    assert help_colour == "rgb(75, 75, 75)", help_colour
    shot(page, "generate-example-run")


def test_generate_shows_each_step_then_the_image(page):
    page.evaluate(WATCH_PREVIEWS)
    page.locator("#generate-prompt textarea").fill("a lighthouse on a cliff at dusk")
    set_number(page, "number input for Steps", STEPS)
    set_number(page, "Width", SIDE)
    set_number(page, "Height", SIDE)
    page.locator("#generate-button").click()
    done = status(page, r"Done: (\d+) steps, (\d+) UNet evaluations")
    # PNDM, the default sampler, evaluates its first timestep twice, and the page says so
    assert (int(done[1]), int(done[2])) == (STEPS, STEPS + 1)
    scrubber_at_the_end(page, STEPS + 1)
    final = loaded_image(page, "#final-image")
    assert (final["width"], final["height"]) == (SIDE, SIDE)
    previews = page.evaluate("window.previews")
    during = [p for p in previews if re.match(r"\s*UNet evaluation \d+ of", p["status"])]
    # the preview changed while the run went on, one picture per step shown
    assert len({p["src"] for p in during}) >= 2, previews
    steps_seen = [int(re.search(r"evaluation (\d+)", p["status"])[1]) for p in during]
    assert steps_seen == sorted(steps_seen)
    word_maps = loaded_image(page, "#word-maps")
    assert word_maps["width"] > 200  # a panel per word, not a placeholder
    shot(page, "generate-tab", readme=True)


def test_scrub_through_the_steps(page):
    set_number(page, "number input for Step (0: the start noise)", 3)
    page.get_by_text(re.compile(r"^After UNet evaluation 3 of \d+")).wait_for()
    third = image_in(page, "Latent")
    set_number(page, "number input for Step (0: the start noise)", 0)
    page.get_by_text("Step 0: the start latent", exact=False).wait_for()
    page.wait_for_function(
        "old => [...document.querySelectorAll('img')].every(i => i.src !== old)",
        arg=third["src"])
    start = image_in(page, "Latent")
    assert start["src"] != third["src"] and start["width"] == third["width"] == SIDE
    shot(page, "generate-scrubbed")


def test_stop_ends_a_long_run(page):
    set_number(page, "number input for Steps", 100)
    set_number(page, "Width", 32)
    set_number(page, "Height", 32)
    page.locator("#generate-button").click()
    status(page, r"UNet evaluation \d+ of 101")
    page.locator("#stop-button").click()
    stopped = status(page, r"Stopped after (\d+) of 101 UNet evaluations")  # PNDM: one more
    assert int(stopped[1]) < 100
    scrubber_at_the_end(page, int(stopped[1]))  # the last step made
    loaded_image(page, "#final-image")
    shot(page, "generate-stopped")
