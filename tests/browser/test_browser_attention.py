"""The prompt tab's attention map in a real browser: point at a token and its row (what it attends
to) and column (who attends to it) light up with the value read out; a tap keeps the choice, which
moves with the next tap and stays on the new map when the head changes; 77 x 77 with padding.

The page can be touched (``has_touch``), so taps are real touch events, and it can still hover.
Screenshots go to ``test-output/screenshots/``. Without Chromium these tests skip on a
developer's machine and fail under ``CI=true``, as tests/browser/test_browser_image_prompt.py does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.browser import (
    PROMPT_TAB,
    SHOTS,
    app_page,
    attention_map,
    changed_map,
    inspect,
    shot,
)
from viz.attention_html import HINT

MAP = "#attention-map"
PROMPT = "a photo of a cat"  # BOS, 5 tokens, EOS: "cat</w>" is position 5
COUNT = 7


@pytest.fixture(scope="module")
def page(tiny_server) -> Iterator:
    with app_page(tiny_server.url, PROMPT_TAB, has_touch=True) as page:
        inspect(page, PROMPT)
        attention_map(page)
        yield page


def readout(page) -> str:
    return page.locator(f"{MAP} .attention-readout").inner_text()


def lit(page, selector: str) -> int:
    return page.locator(f"{MAP} {selector}").count()


def value(page, q: int, k: int) -> str:
    return page.locator(f'{MAP} tr[data-q="{q}"] td[data-k="{k}"]').get_attribute("data-v")


def strongest_key(page, q: int) -> str:
    """How the readout names the key that query q attends to most, and the value."""
    k = max(range(q + 1), key=lambda k: float(value(page, q, k)))
    label = page.locator(f'{MAP} th[data-q="{k}"]').inner_text()
    return f"“{label}” (position {k}): {value(page, q, k)}"


def row_and_column_lit(page, q: int, k: int) -> bool:
    """Exactly row q and column k are lit, with their labels."""
    return (lit(page, f'tr[data-q="{q}"] td.lit') == COUNT
            and lit(page, f'td[data-k="{k}"].lit') == COUNT
            and lit(page, "td.lit") == 2 * COUNT - 1
            and lit(page, f'th[data-q="{q}"].lit') == lit(page, f'th[data-k="{k}"].lit') == 1)


def test_point_at_a_token_then_a_cell(page):
    assert readout(page) == HINT
    page.locator(f'{MAP} th[data-q="5"]').hover()
    assert row_and_column_lit(page, 5, 5)
    assert readout(page).startswith(
        "“cat</w>” (position 5): its row is what it attends to, most of all "
        f"{strongest_key(page, 5)};")
    page.locator(f'{MAP} tr[data-q="5"] td[data-k="0"]').hover()
    assert row_and_column_lit(page, 5, 0) and lit(page, "td.crossing") == 1
    assert readout(page) == (f"“cat</w>” (position 5) attends to “<|startoftext|>” (position 0): "
                             f"{value(page, 5, 0)}")
    page.locator(f'{MAP} tr[data-q="1"] td[data-k="4"]').hover()
    assert "“a</w>” (position 1) cannot attend to “a</w>” (position 4)" in readout(page)
    page.locator("#prompt-input").hover()  # off the map: nothing was tapped, nothing stays
    assert readout(page) == HINT and lit(page, ".lit") == 0
    shot(page, "attention-hover")


def test_a_tap_keeps_the_choice_and_the_next_moves_it(page):
    page.locator(f'{MAP} tr[data-q="6"] td[data-k="2"]').tap()
    page.locator("#prompt-input").hover()
    assert row_and_column_lit(page, 6, 2)
    assert readout(page) == (f"“<|endoftext|>” (position 6) attends to “photo</w>” "
                             f"(position 2): {value(page, 6, 2)}")
    page.locator(f'{MAP} th[data-k="3"]').tap()  # a column label: that token's row and column
    page.locator("#prompt-input").hover()
    assert row_and_column_lit(page, 3, 3) and lit(page, 'tr[data-q="6"] td.lit') == 1
    assert readout(page).startswith("“of</w>” (position 3): its row")
    shot(page, "attention-tap")


def test_the_choice_stays_when_the_head_changes(page):
    before = attention_map(page)
    old = readout(page)
    page.get_by_label("Head").click()
    page.get_by_role("option", name="head 2", exact=True).click()
    assert "Layer 1, head 2" in changed_map(page, before)
    assert row_and_column_lit(page, 3, 3)  # shown again on the new map, with its values
    assert readout(page).startswith("“of</w>” (position 3): its row is what it attends to, "
                                    f"most of all {strongest_key(page, 3)};")
    assert readout(page) != old
    page.locator(f'{MAP} th[data-q="3"]').tap()  # the same token again lets it go
    page.locator("#prompt-input").hover()
    assert readout(page) == HINT and lit(page, ".lit") == 0


def test_77_by_77_with_padding(page):
    before = attention_map(page)
    page.get_by_label("Include padding positions").check()
    changed_map(page, before)
    assert lit(page, "tbody tr") == 77 and lit(page, "td") == 77 * 77
    assert lit(page, "td[data-v]") == 77 * 78 // 2
    page.locator(f'{MAP} tr[data-q="76"] td[data-k="70"]').hover()
    assert readout(page) == (f"“<|endoftext|>” (position 76) attends to “<|endoftext|>” "
                             f"(position 70): {value(page, 76, 70)}")
    assert lit(page, 'tr[data-q="76"] td.lit') == lit(page, 'td[data-k="70"].lit') == 77
    page.locator(f"{MAP} .attention-html").screenshot(path=str(SHOTS / "attention-77.png"))
    # on a phone the map scrolls sideways and the row labels stay in view
    page.set_viewport_size({"width": 400, "height": 900})
    scroll = page.locator(f"{MAP} .attention-scroll")
    scroll.evaluate("s => { s.scrollLeft = s.scrollWidth; }")
    assert scroll.evaluate("s => s.scrollLeft") > 300
    label, view = page.locator(f'{MAP} th[data-q="76"]').bounding_box(), scroll.bounding_box()
    assert view["x"] - 1 <= label["x"] and label["x"] + label["width"] <= view["x"] + 200
    # the readout holds the hint and a token's reading without a scroll bar of its own
    box = page.locator(f"{MAP} .attention-readout")
    assert box.evaluate("r => r.scrollHeight <= r.clientHeight"), readout(page)
    page.locator(f'{MAP} th[data-q="5"]').tap()
    assert readout(page).startswith("“cat</w>” (position 5): its row")
    assert box.evaluate("r => r.scrollHeight <= r.clientHeight"), readout(page)
    page.locator(f"{MAP} .attention-html").screenshot(path=str(SHOTS / "attention-77-phone.png"))
    page.locator(f'{MAP} th[data-q="5"]').tap()  # let go
    page.set_viewport_size({"width": 1280, "height": 900})
