"""The attention map's HTML read back with the standard library's parser."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Label:
    index: int
    kind: str
    text: str = ""


@dataclass
class Row:
    label: Label
    cells: list[dict[str, str | None]] = field(default_factory=list)


class MapReader(HTMLParser):
    """The map's column labels, its rows (label and cells) and every other text, as parsed."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.columns: list[Label] = []
        self.rows: list[Row] = []
        self.texts: list[str] = []  # text outside the labels: title, readout, scale
        self.tags: set[str] = set()
        self._open: Label | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        found = dict(attrs)
        kind = (found.get("class") or "").removeprefix("kind-")
        if tag == "th" and "data-k" in found:
            self._open = Label(int(found["data-k"]), kind)
            self.columns.append(self._open)
        elif tag == "th" and "data-q" in found:
            self._open = Label(int(found["data-q"]), kind)
            self.rows.append(Row(self._open))
        elif tag == "td":
            self.rows[-1].cells.append(found)

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open.text += data
        else:
            self.texts.append(data)
