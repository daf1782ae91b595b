"""One attention map as HTML a person can point at: rows are queries, columns are keys.

A picture shows the pattern of an attention map but cannot answer "how much does *cat* attend to
*a*?", nor show that one token plays two parts: its row is what it attends to (as the query), its
column is who attends to it (as the key). Here the map is a table whose cells carry their values,
and ``SCRIPT``, run once by the page, lights up a token's row and column and reads the value out
when a cell or a token label is pointed at or tapped.

The markup, which ``SCRIPT`` and the app's style sheet (``ui/style.css``) rely on:

- ``<tr data-q="i">`` per query, starting with its label ``<th data-q="i">``;
- ``<th data-k="j">`` per key in the header row, and ``<td data-k="j" data-v="0.412">`` per cell,
  coloured exactly as ``viz.text_encoder.attention_view`` colours the picture;
- cells in the future of their query (the causal mask's upper triangle) are ``<td data-k="j"
  class="future">``: no value, no colour, so the triangle is visibly empty;
- labels carry the token's kind as a class (``kind-BOS``, ``kind-EOS``, ``kind-padding``,
  ``kind-token``), coloured as the prompt tab marks kinds.

The script listens on the component's root element, not on the cells, so it keeps working when
the map is replaced for another layer, head or prompt; a tapped (pinned) choice is shown again on
the new map, which makes comparing heads for one token a matter of changing the head.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import torch

from viz.heatmap import colorize, colormap_table
from viz.plot import as_array
from viz.text_encoder import ATTENTION
from viz.tokens import TOKEN_KINDS

MAP_WIDTH = 760  # pixels for the cells: the page's column holds this and the row labels
HINT = ("Point at or tap a cell or a token. Its row (what it attends to) and its column (who "
        "attends to it) light up; a tap keeps the choice, a second tap lets it go.")
SCALE_STOPS = 9  # colours in the legend's gradient: enough for viridis to look smooth


def cell_size(count: int) -> int:
    """Pixels per cell: the map fills about MAP_WIDTH, within 10 px (still a target for a
    pointer) and 36 px (a short prompt need not look bloated)."""
    return int(min(max(MAP_WIDTH // max(count, 1), 10), 36))


def _hex(rgb: np.ndarray) -> list[str]:
    channels = rgb.astype(np.int64)
    packed = (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]
    return [f"#{value:06x}" for value in packed.ravel().tolist()]


def _label(axis: str, index: int, text: str, kind: str) -> str:
    """A token's label: ``axis`` "q" heads its row, "k" its column."""
    scope = "row" if axis == "q" else "col"
    return f'<th data-{axis}="{index}" class="kind-{kind}" scope="{scope}">{text}</th>'


def attention_html(
    attention: torch.Tensor | np.ndarray, labels: Sequence[str], kinds: Sequence[str], title: str
) -> str:
    """The (T, T) causal attention map ``attention`` as an HTML fragment for ``SCRIPT``.

    ``labels`` are the T tokens as shown to a person (escaped here, so any text is safe);
    ``kinds`` their kinds, each one of ``viz.tokens.TOKEN_KINDS``. ``title`` heads the map, e.g.
    "Layer 3, head 5". Each cell's value is written with 3 significant digits.
    """
    weights = as_array(attention, 2, "attention")
    count = weights.shape[0]
    if weights.shape != (count, count):
        raise ValueError(f"attention must be square (T, T), got {weights.shape}")
    if len(labels) != count or len(kinds) != count:
        raise ValueError(f"attention has {count} positions but {len(labels)} labels and "
                         f"{len(kinds)} kinds were given")
    unknown = sorted({str(kind) for kind in kinds} - set(TOKEN_KINDS))
    if unknown:
        raise ValueError(f"unknown token kinds {unknown}; use {', '.join(TOKEN_KINDS)}")
    future = np.triu(np.ones((count, count), dtype=bool), k=1)  # keys after their query
    high = max(float(weights[~future].max(initial=0.0)), 1e-8)
    colours = _hex(colorize(weights, ATTENTION, 0.0, high, future))
    values = [f"{value:.3g}" for value in weights.ravel().tolist()]
    names = [html.escape(str(label)) for label in labels]
    size = cell_size(count)
    font = min(max(size - 2, 9), 14)  # label text fits in the row it names

    header = "".join(_label("k", j, f"<span>{names[j]}</span>", kinds[j])
                     for j in range(count))
    rows = []
    for i in range(count):
        cells = [f'<td data-k="{j}" data-v="{values[i * count + j]}" '
                 f'style="background:{colours[i * count + j]}"></td>' for j in range(i + 1)]
        cells += [f'<td data-k="{j}" class="future"></td>' for j in range(i + 1, count)]
        label = _label("q", i, names[i], kinds[i])
        rows.append(f'<tr data-q="{i}">{label}{"".join(cells)}</tr>')

    stops = _hex(colormap_table(ATTENTION)[np.linspace(0, 255, SCALE_STOPS).round().astype(int)])
    return (
        f'<div class="attention-html" style="--cell:{size}px;--label:{font}px">'
        f'<p class="attention-title"><strong>{html.escape(title)}</strong>: rows are the query '
        "(the token attending), columns the key (the token attended to); each row's weights add "
        "up to 1 (a softmax); the empty triangle is the future, hidden by the causal mask.</p>"
        f'<p class="attention-readout" aria-live="polite" data-hint="{html.escape(HINT)}">'
        f"{html.escape(HINT)}</p>"
        f'<div class="attention-scroll"><table class="attention-map">'
        f'<thead><tr><th class="corner"></th>{header}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
        f'<p class="attention-scale">0 <span style="background:linear-gradient(to right,'
        f'{",".join(stops)})"></span> {high:.3g} attention weight</p></div>'
    )


# Run once by the page with ``element``, the component's root, and ``watch``, which calls back
# after each new value is drawn (Gradio's gr.HTML ``js_on_load``). Text goes in by textContent,
# so a token's text is never read as markup.
SCRIPT = r"""
const root = element;
let pinned = null;  // the cell or token chosen by a click or tap: kept when the pointer leaves

const spot = (target) => {
  const hit = target.closest ? target.closest('td[data-k], th[data-q], th[data-k]') : null;
  if (!hit || !root.contains(hit)) return null;
  if (hit.tagName === 'TD') {
    return {q: Number(hit.parentElement.dataset.q), k: Number(hit.dataset.k), token: false};
  }
  const i = Number(hit.dataset.q ?? hit.dataset.k);
  return {q: i, k: i, token: true};
};
const same = (a, b) => a && b && a.q === b.q && a.k === b.k && a.token === b.token;

const name = (table, i) => {
  const label = table.querySelector(`th[data-q="${i}"]`);
  return `“${label ? label.textContent : '?'}” (position ${i})`;
};
const strongest = (cells) => {
  let best = null;
  for (const cell of cells) {
    if (cell.dataset.v !== undefined && (!best || Number(cell.dataset.v) > Number(best.dataset.v)))
      best = cell;
  }
  return best;
};

const show = (choice) => {
  const table = root.querySelector('.attention-map');
  const readout = root.querySelector('.attention-readout');
  if (!table || !readout) return false;
  root.querySelectorAll('.lit, .crossing').forEach((e) => e.classList.remove('lit', 'crossing'));
  table.classList.remove('picking');
  const row = choice && table.querySelector(`tr[data-q="${choice.q}"]`);
  const column = choice ? table.querySelectorAll(`[data-k="${choice.k}"]`) : [];
  if (!row || column.length === 0) {
    readout.textContent = readout.dataset.hint;
    return false;
  }
  table.classList.add('picking');
  row.querySelectorAll('td, th').forEach((e) => e.classList.add('lit'));
  column.forEach((e) => e.classList.add('lit'));
  const who = name(table, choice.q);
  if (choice.token) {
    const most = strongest(row.querySelectorAll('td'));
    const by = strongest(table.querySelectorAll(`td[data-k="${choice.k}"]`));
    readout.textContent = `${who}: its row is what it attends to, most of all ` +
      `${name(table, most.dataset.k)}: ${most.dataset.v}; its column is who attends to it, ` +
      `most of all ${name(table, by.parentElement.dataset.q)}: ${by.dataset.v}.`;
    return true;
  }
  const cell = row.querySelector(`td[data-k="${choice.k}"]`);
  cell.classList.add('crossing');
  const whom = name(table, choice.k);
  readout.textContent = cell.dataset.v === undefined
    ? `${who} cannot attend to ${whom}: a later position, hidden by the causal mask.`
    : `${who} attends to ${whom}: ${cell.dataset.v}`;
  return true;
};

root.addEventListener('pointerover', (event) => {
  const choice = spot(event.target);
  if (choice) show(choice);
});
root.addEventListener('pointerleave', () => show(pinned));
root.addEventListener('click', (event) => {
  const choice = spot(event.target);
  if (!choice) return;
  pinned = same(choice, pinned) ? null : choice;
  show(pinned);  // let go: the hint again, also on a touch screen, where no pointer leaves
});
watch('value', () => {
  if (!show(pinned)) pinned = null;  // a pinned position the new map lacks is let go
});
"""
