"""Headless Chromium, driven by Playwright, for the browser tests: a page, screenshots, and
waiting for what the app draws.

Chromium comes from the system (``apt-get install chromium``), not from Playwright's download.
Without it the browser tests skip on a developer's machine and fail under ``CI=true``.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.serve import ROOT

CHROMIUM = os.environ.get("SD_PARTS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SHOTS = ROOT / "test-output" / "screenshots"
README_SHOTS = os.environ.get("SD_PARTS_SCREENSHOTS")
WAIT_MS = 60_000  # one tiny-weights round trip takes a few seconds on 2 busy cores
IMAGE_TAB = "Image → latent → image"
PROMPT_TAB = "Prompt → tokens → embeddings → attention"


@contextmanager
def chromium_page(**options: object) -> Iterator:
    """A page of headless Chromium in a fresh profile, with the tests' wait; closed after."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, **options)
        context.set_default_timeout(WAIT_MS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@contextmanager
def app_page(url: str, tab: str = "", **options: object) -> Iterator:
    """A page of the app at ``url`` (opened on ``tab``, if given) in a fresh Chromium profile; a
    JavaScript error the page raised meanwhile fails the test that used it."""
    require_chromium()
    errors: list[str] = []
    with chromium_page(**options) as page:
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        if tab:
            open_tab(page, tab)
        yield page
    assert errors == [], errors


def require_chromium() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -r requirements-dev.txt)"
    if problem is None and not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        problem = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run in CI: {problem}", pytrace=False)
        pytest.skip(problem)


def shot(page, name: str, readme: bool = False) -> None:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    if readme and README_SHOTS:
        # the README's copy: 128 colours keep a full page to a few hundred KB
        folder = Path(README_SHOTS)
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.open(path).convert("RGB").quantize(128, method=Image.Quantize.FASTOCTREE,
                                                         dither=Image.Dither.NONE)
        small.save(folder / f"{name}.png", optimize=True)


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    for x in range(size[0] // 4):  # a diagonal stripe, so the picture is not flat
        image.putpixel((x, x * size[1] // size[0]), (255, 255, 255))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def loaded_image(page, selector: str) -> dict:
    """Wait until the <img> in ``selector`` has a decoded picture; return its src and size."""
    image = page.locator(f"{selector} img").first
    image.wait_for(state="attached")
    image.scroll_into_view_if_needed()
    page.wait_for_function(
        "s => { const i = document.querySelector(s + ' img'); return i && i.complete"
        " && i.naturalWidth > 0; }", arg=selector)
    return image.evaluate("i => ({src: i.src, width: i.naturalWidth, height: i.naturalHeight})")


def changed_image(page, selector: str, old_src: str) -> dict:
    page.wait_for_function(
        "([s, old]) => { const i = document.querySelector(s + ' img');"
        " return i && i.src !== old && i.complete && i.naturalWidth > 0; }",
        arg=[selector, old_src])
    return loaded_image(page, selector)


def clear_upload(page) -> None:
    clear = page.locator("#image-input button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.locator("#image-input input[type=file]").wait_for(state="attached")


def upload(page, name: str, data: bytes, mime: str = "image/png") -> None:
    clear_upload(page)
    page.locator("#image-input input[type=file]").set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}])


def status_text(page, naming: str) -> str:
    """The text of the image tab's status box once it names ``naming``."""
    status = page.locator("#image-status").filter(has_text=naming)
    status.wait_for()
    return status.inner_text()


def open_tab(page, name: str) -> None:
    """Open the page's tab ``name``; one the tab bar has no room for is in its "More tabs" menu."""
    tab = page.get_by_role("tab", name=name)
    page.get_by_role("tablist").first.wait_for()  # the page's tab bar is drawn
    if tab.count():
        tab.click()
        return
    page.get_by_role("button", name="More tabs").first.click()
    page.locator(".overflow-dropdown button", has_text=name).first.click()


def inspect(page, prompt: str) -> None:
    box = page.locator("#prompt-input textarea")
    box.fill(prompt)
    box.press("Enter")


# What the attention map shows: its title, its labels and every value (not the highlight).
MAP_CONTENT = """() => {
    const map = document.querySelector('#attention-map .attention-html');
    if (!map || !map.querySelector('td[data-v]')) return null;
    const texts = [...map.querySelectorAll('.attention-title, th')].map(e => e.textContent);
    const values = [...map.querySelectorAll('td[data-v]')].map(e => e.dataset.v);
    return texts.join('|') + '#' + values.join(',');
}"""


def attention_map(page) -> str:
    """The attention map's content once it is drawn."""
    page.wait_for_function(f"({MAP_CONTENT})() !== null")
    return page.evaluate(MAP_CONTENT)


def changed_map(page, old: str) -> str:
    """The attention map's content once it differs from ``old``."""
    page.wait_for_function(f"old => {{ const now = ({MAP_CONTENT})(); "
                           "return now !== null && now !== old; }", arg=old)
    return page.evaluate(MAP_CONTENT)
