"""Experiments on the image tab's latent: what one latent pixel reaches, what each channel
carries, and the way from one image's latent to another's.

Each experiment works on the latent the tab shows: the same upload, VAE, size and latent kind
(posterior mean or seeded sample). The latent and its plain decode are kept per visitor in a
``gr.State`` (removed after the cache age), keyed by those settings. The tab's own encode fills
it with what it made (``remember``), so an experiment only decodes what it changes; it encodes
only when the settings no longer match the tab's last encode (an API caller that skips the tab,
or settings changed since). Every picture comes from ``viz.experiments``.

Length: the three experiments share the cache, the checks of the tab's settings, the message
path and one accordion; a file per experiment would repeat those or import them back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import gradio as gr
import numpy as np
import torch

from ui.encoding import (
    EXAMPLE_IMAGES,
    Encoded,
    Source,
    decode,
    encode,
)
from ui.models import Models
from ui.shared import REFUSED, answer_once, failure
from viz import experiments, metrics, pixels, upload

ALL_CHANNELS = "all channels"
# what counts as a changed pixel: an absolute change, or one relative to the largest
THRESHOLDS = {"1 grey level (1/255, visible in an 8-bit image)": None,
              "1% of the largest change": 0.01,
              "10% of the largest change (the core)": 0.1}
MAX_AMOUNT = 10.0  # stds: further out, the decoder sees values it never met
MAX_EDIT = 10.0  # largest |scale| and |shift| in the channel table
TABLE_HEADERS = ["channel", "scale", "shift (x channel std)"]
MAX_POINTS = 11
INTRO = ("Experiments on the latent above (the same image, VAE, size and latent kind): each "
         "starts from the latent the tab made and decodes only what it changes.")
SLERP_NOTE = (
    "**Why two rows.** A Gaussian latent in d dimensions lies near a sphere of radius √d; the "
    "straight line between two independent ones cuts inside it (halfway it is only 1/√2 as "
    "long), through latents that a diffusion model, which starts from such noise, never sees. "
    "Spherical interpolation (slerp) turns from one direction to the other at a steady rate; "
    "for two latents of one length it keeps that length exactly (the great circle), for two "
    "lengths it stays near them. Both mixes are taken around the diffusion model's zero (the "
    "VAE's shift_factor). Under each frame, *rms* is the latent's root mean square in the model's "
    "space (about 1 for unit noise). Image latents are not independent noise (they share a mean "
    "and much of their direction), so the straight line loses less than that.")


STD_SOURCE = "the 'std' column of the per-channel statistics"
STD_INFO = ("A channel's std is its spread over this latent's positions, in the VAE's own units: "
            f"{STD_SOURCE} above. A VAE's shift_factor does not change it; the diffusion model "
            "sees it times the scaling_factor ('std in model space').")


@dataclass(frozen=True)
class Lab:
    """A visitor's cached encodes: the tab's image, and the second image of the interpolation."""

    first: Encoded | None = None
    second: Encoded | None = None


def remember(lab: Lab | None, encoded: Encoded) -> Lab:
    """The cache with the tab's own encode as the first image, so that the next experiment
    decodes only."""
    return replace(lab or Lab(), first=encoded)


def _number(value: float | None, name: str, low: float, high: float) -> float:
    if value is None or not math.isfinite(float(value)):
        raise ValueError(f"Fill in {name} with a number.")
    if not low <= float(value) <= high:
        raise ValueError(f"{name[0].upper()}{name[1:]} must be from {low:g} to {high:g}; got "
                       f"{float(value):g}.")
    return float(value)


def _in_stds(stds: torch.Tensor, steps: Sequence[float]) -> str:
    """What the channel stds are, in numbers: channel c moved by ``steps[c]`` of its stds."""
    moved = [(c, float(d)) for c, d in enumerate(steps) if d]
    if len(moved) > 1 and len({d for _, d in moved}) == 1:
        return (f"each channel by its own std over this latent, {float(stds.min()):.3g} to "
                f"{float(stds.max()):.3g} in the VAE's units: {STD_SOURCE}")
    return "; ".join(f"channel {c} {d:+g} std = {d * float(stds[c]):+.3g} in the VAE's units"
                     for c, d in moved) + f" (std over this latent: {STD_SOURCE})"


def _channel_index(channel: str | None, channels: int) -> int | None:
    """None for all channels, else the channel's number, checked against the latent."""
    if channel in (None, ALL_CHANNELS):
        return None
    number = channel.removeprefix("channel ").strip()
    if not number.isdigit() or int(number) >= channels:
        raise ValueError(f"{channel!r} is not a channel of this latent: it has {channels} "
                       f"(channel 0 to channel {channels - 1}), or choose {ALL_CHANNELS!r}.")
    return int(number)


# ---------------------------------------------------------------------------------------------
# The three experiments: each returns its views by name and the visitor's updated cache


def receptive_field(models: Models, lab: Lab, source: Source, x: float | None, y: float | None,
                    channel: str | None, amount: float | None, threshold: str
                    ) -> tuple[dict[str, object], Lab]:
    """Move one latent pixel, decode, and show where the image changed and how far."""
    if x is None or y is None:
        raise ValueError("Click a point of the latent preview (or fill in x and y) first.")
    first = encode(models, source, lab.first)
    lab = replace(lab, first=first)
    width, height = first.fitted.size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"The point ({x:g}, {y:g}) is outside the {width}x{height} preview: "
                       f"click inside it (x from 0 to {width - 1}, y from 0 to {height - 1}).")
    if threshold not in THRESHOLDS:
        raise ValueError(f"Choose a threshold among: {', '.join(THRESHOLDS)}.")
    steps = _number(amount, "the change", -MAX_AMOUNT, MAX_AMOUNT)
    channels = first.latent.shape[0]
    index = _channel_index(channel, channels)
    ds = first.downscale
    row, column = int(y) // ds, int(x) // ds
    nudged = experiments.nudge_latent(first.latent, row, column, steps, index)
    after = decode(models, source, first, nudged)
    change = experiments.change_map(experiments.to_levels(first.decoded),
                                    experiments.to_levels(after))
    largest, relative = float(change.max()), THRESHOLDS[threshold]
    # a positive level in both cases: with no change at all, any finds no pixel
    level = 1.0 if relative is None or largest == 0.0 else relative * largest
    region = experiments.measure_change(change, level)
    block = experiments.block_of(row, column, ds)
    which = f"all {channels} channels" if index is None else f"channel {index}"
    moves = [steps if index in (None, c) else 0.0 for c in range(channels)]
    units = _in_stds(experiments.channel_stds(first.latent), moves)
    what = (f"Latent pixel (row {row}, column {column}), which stands for the {ds} x {ds} block at "
            f"x {block[1]}-{block[3]}, y {block[0]}-{block[2]}: {which} moved by {steps:+g} std "
            f"({units}).")
    found = experiments.describe_change(region, block, ds, first.fitted.size)
    title = (f"Where the image changed: latent pixel (row {row}, column {column}), {which} "
             f"{steps:+g} std\nchanged region {region.width} x {region.height} px (blue), the "
             f"block {ds} x {ds} (green)")
    view = experiments.receptive_field_view(first.reconstruction, change, region, block, title)
    return {"rf_status": f"{what} {found}", "rf_view": view}, lab


def parse_table(table: Sequence[Sequence[object]] | None, channels: int
                ) -> tuple[list[float], list[float]]:
    """The scales and shifts of the channel table, one row per channel, checked."""
    rows = [list(row) for row in (table or [])]
    if len(rows) != channels:
        raise ValueError(f"The table has {len(rows)} rows but this latent has {channels} channels: "
                       "press Reset to get one row per channel.")
    scales, shifts = [], []
    for index, row in enumerate(rows):
        if len(row) != len(TABLE_HEADERS):
            raise ValueError(f"Row {index} of the table needs {len(TABLE_HEADERS)} values "
                           f"({', '.join(TABLE_HEADERS)}).")
        for column, target in ((1, scales), (2, shifts)):
            name = f"the {TABLE_HEADERS[column].split()[0]} of channel {index}"
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                raise ValueError(f"Fill in {name} with a number; got {row[column]!r}.") from None
            target.append(_number(value, name, -MAX_EDIT, MAX_EDIT))
    return scales, shifts


def edit_channels(models: Models, lab: Lab, source: Source,
                  table: Sequence[Sequence[object]] | None) -> tuple[dict[str, object], Lab]:
    """Scale and shift whole channels, decode, and compare with the plain reconstruction."""
    first = encode(models, source, lab.first)
    lab = replace(lab, first=first)
    scales, shifts = parse_table(table, first.latent.shape[0])
    edited = experiments.edit_channels(first.latent, scales, shifts, first.space[1])
    picture = pixels.tensor_to_image(decode(models, source, first, edited))
    plain = first.reconstruction
    changed = [str(c) for c, (k, d) in enumerate(zip(scales, shifts, strict=True))
               if (k, d) != (1.0, 0.0)]
    if not changed:
        status = "No channel is edited (every scale 1, every shift 0): this is the plain decode."
    else:
        psnr = metrics.psnr(plain, picture)
        status = (f"Edited channel{'s' if len(changed) > 1 else ''} {', '.join(changed)}. "
                  f"Against the plain decode: PSNR "
                  f"{'∞ (identical)' if psnr == math.inf else f'{psnr:.2f} dB'}. Scales are "
                  f"taken around the model's zero, the VAE's shift_factor {first.space[1]:g}: "
                  "a scale of 0 sets a channel to it.")
        if any(shifts):
            stds = experiments.channel_stds(first.latent)
            status += f" Shifts: {_in_stds(stds, shifts)}."
    return {"edit_status": status, "edited": picture, "plain": plain,
            "difference": experiments.difference_view(plain, np.asarray(picture))}, lab


def interpolate(models: Models, lab: Lab, source: Source, second_path: str | None,
                points: float | None, on_frame: Callable[[int, int], object] | None = None
                ) -> tuple[dict[str, object], Lab]:
    """Mix the tab's latent with a second image's, linearly and spherically, and decode;
    ``on_frame(done, total)`` is told of each frame as it is decoded."""
    count = int(_number(points, "the number of points", 2, MAX_POINTS))
    first = encode(models, source, lab.first)
    lab = replace(lab, first=first)
    if not second_path:
        raise ValueError("Upload a second image (or click one of its examples) to mix with.")
    second = encode(models, replace(source, path=second_path), lab.second, first.fitted.size)
    lab = replace(lab, second=second)
    a, b = first.latent, second.latent
    scale, shift = first.space
    rows: list[list[np.ndarray]] = [[], []]
    captions: list[list[str]] = [[], []]
    middle = {}
    for i in range(count):
        t = i / (count - 1)
        for row, mix in enumerate((experiments.lerp(a, b, t),
                                   experiments.slerp(a, b, t, centre=shift))):
            # the ends are the two latents themselves, whose decodes are cached
            cached = second if torch.equal(mix, b) else first
            rows[row].append(np.asarray(pixels.tensor_to_image(
                decode(models, source, cached, mix))))
            size = experiments.rms(mix, scale, shift)
            captions[row].append(f"t = {t:.2f}\nrms {size:#.3g}")
            if on_frame is not None:
                on_frame(2 * i + row + 1, 2 * count)
            if i == (count - 1) // 2:
                middle[row] = (t, size)
    strip = experiments.strip_picture(rows, ["linear", "spherical"], captions)
    status = (f"Second image: {second.note}. At t = {middle[0][0]:.2f} the linear mix has rms "
              f"{middle[0][1]:#.3g} and the spherical one {middle[1][1]:#.3g}; the ends have "
              f"{experiments.rms(a, scale, shift):#.3g} and "
              f"{experiments.rms(b, scale, shift):#.3g}."
              f"\n\n{SLERP_NOTE}")
    return {"mix_status": status, "strip": strip}, lab


# ---------------------------------------------------------------------------------------------
# Layout


def default_table(channels: int) -> list[list[float]]:
    return [[c, 1.0, 0.0] for c in range(channels)]


def zero_row(table: Sequence[Sequence[object]] | None, channel: str | None
             ) -> list[list[object]]:
    """The table with one channel's scale and shift set to 0 (the channel at the model's zero)."""
    rows = [list(row) for row in (table or [])]
    try:
        index = _channel_index(channel, len(rows))
    except REFUSED as exc:
        raise gr.Error(str(exc)) from None
    if index is None:
        return [[row[0], 0.0, 0.0] for row in rows]
    return [[row[0], 0.0, 0.0] if i == index else row for i, row in enumerate(rows)]


def build(models: Models, source: Sequence[gr.components.Component], preview: gr.Image,
          stats: gr.Dataframe) -> gr.State:
    """The experiments, inside an open ``gr.Blocks`` under the image tab; returns the visitor's
    cache (a ``Lab``), for the tab's encode to fill with ``remember``.

    ``source`` is the tab's image, VAE choice, longer side, fit, latent kind, seed and exact
    mode, in the order of ``Source``; ``preview`` is the latent preview, shown again here for
    the visitor to click, and ``stats`` the per-channel table, whose row count gives the channel
    table its rows.
    """
    settings = models.settings
    lab = gr.State(None, time_to_live=settings.cache_max_age)
    channel_choices = [ALL_CHANNELS] + [f"channel {c}" for c in range(models.max_latent_channels)]
    with gr.Accordion("Experiments on this latent: receptive field, channel edits, "
                      "interpolation", open=False, elem_id="latent-lab"):
        gr.Markdown(INTRO)
        with gr.Tab("Receptive field"):
            with gr.Row():
                with gr.Column(scale=1):
                    target = gr.Image(label="Click a latent pixel (the instant preview)",
                                      format="png", interactive=False, elem_id="lab-target")
                    with gr.Row():
                        x = gr.Number(None, precision=0, label="x (px)", elem_id="lab-x",
                                      placeholder="click the preview")
                        y = gr.Number(None, precision=0, label="y (px)", elem_id="lab-y",
                                      placeholder="click the preview")
                    channel = gr.Dropdown(channel_choices, value=ALL_CHANNELS,
                                          label="Channel to change")
                    amount = gr.Slider(-4, 4, value=2, step=0.5,
                                       label="Change, in units of the channel's std",
                                       info=STD_INFO)
                    threshold = gr.Radio(list(THRESHOLDS), value=next(iter(THRESHOLDS)),
                                         label="A pixel counts as changed when it moved by")
                    rf_button = gr.Button("Change this latent pixel")
                with gr.Column(scale=2):
                    rf = {"rf_status": gr.Markdown(elem_id="lab-rf-status"),
                          "rf_view": gr.Image(label="Where the decoded image changed",
                                              format="png")}
        with gr.Tab("Channel edits"):
            with gr.Row():
                with gr.Column(scale=1):
                    table = gr.Dataframe(default_table(4), headers=TABLE_HEADERS,
                                         datatype="number", type="array", interactive=True,
                                         static_columns=[0], label="Per channel: scale around "
                                         "the model's zero (0 flattens the channel to it, 1 keeps "
                                         "it, -1 flips it) and shift")
                    gr.Markdown(STD_INFO)
                    with gr.Row():
                        zero_channel = gr.Dropdown(channel_choices[1:], value="channel 0",
                                                   label="Channel")
                        zero_button = gr.Button("Zero it")
                    with gr.Row():
                        reset_button = gr.Button("Reset")
                        edit_button = gr.Button("Decode the edited latent", variant="primary")
                with gr.Column(scale=2):
                    edit = {"edit_status": gr.Markdown(elem_id="lab-edit-status")}
                    with gr.Row():
                        edit["edited"] = gr.Image(label="Edited latent, decoded", format="png")
                        edit["plain"] = gr.Image(label="Plain reconstruction", format="png")
                    edit["difference"] = gr.Image(label="Difference", format="png")
        with gr.Tab("Interpolation"):
            with gr.Row():
                with gr.Column(scale=1):
                    second = gr.File(label="Second image", file_types=upload.accepted_file_types(),
                                     elem_id="lab-second")
                    gr.Examples(EXAMPLE_IMAGES, inputs=second, label="Examples")
                    points = gr.Slider(2, MAX_POINTS, value=5, step=1,
                                       label="Points from the first image (0) to the second (1)")
                    mix_button = gr.Button("Interpolate", variant="primary")
                with gr.Column(scale=2):
                    mix = {"mix_status": gr.Markdown(elem_id="lab-mix-status"),
                           "strip": gr.Image(label="Linear (top) and spherical (bottom)",
                                             format="png")}

    def answer(experiment, outputs: dict, lab_value, values: tuple) -> Iterator[dict]:
        """The experiment's views, or all empty but a message; the cache is kept either way."""
        new_lab = lab_value or Lab()
        try:
            views, new_lab = experiment(models, new_lab, *values)
        except REFUSED as exc:
            views = failure(outputs, next(iter(outputs)), str(exc))
        yield from answer_once({
            outputs[name]: views.get(name) for name in outputs} | {lab: new_lab})

    def run_receptive_field(experiments, image, vae, size, fit, latent_kind, seed, exact,
                            x, y, channel, amount, threshold):
        source = Source(image, vae, size, fit, latent_kind, seed, exact)
        yield from answer(receptive_field, rf, experiments,
                          (source, x, y, channel, amount, threshold))

    def run_edit_channels(experiments, image, vae, size, fit, latent_kind, seed, exact,
                          table):
        source = Source(image, vae, size, fit, latent_kind, seed, exact)
        yield from answer(edit_channels, edit, experiments, (source, table))

    def run_interpolate(experiments, image, vae, size, fit, latent_kind, seed, exact,
                        second_image, points, progress=gr.Progress()):
        source = Source(image, vae, size, fit, latent_kind, seed, exact)

        def frames(done: int, total: int) -> None:
            progress((done, total), desc="Decoding the frames")

        yield from answer(interpolate, mix, experiments, (source, second_image, points, frames))

    def clicked(evt: gr.SelectData) -> tuple[int, int]:
        return evt.index[0], evt.index[1]

    def channels_changed(table_now):
        """One table row and one channel choice per channel of the new latent."""
        if table_now is None or len(table_now) < 2:  # no latent yet
            return gr.skip(), gr.skip(), gr.skip()
        names = [f"channel {c}" for c in range(len(table_now) - 1)]  # the last row is "all"
        return (default_table(len(names)), gr.Dropdown(choices=[ALL_CHANNELS] + names),
                gr.Dropdown(choices=names, value=names[0]))

    inputs = [lab, *source]
    busy = {"concurrency_id": "models", "concurrency_limit": 1}
    rf_inputs, rf_outputs = [*inputs, x, y, channel, amount, threshold], [*rf.values(), lab]
    rf_button.click(run_receptive_field, rf_inputs, rf_outputs, api_name="receptive_field",
                    **busy)
    target.select(clicked, None, [x, y], queue=False, api_visibility="private").then(
        run_receptive_field, rf_inputs, rf_outputs, api_visibility="private", **busy)
    # the tab's preview is copied here in the browser, without a trip to the server
    preview.change(None, preview, target, js="(value) => value", api_visibility="private")
    stats.change(channels_changed, stats, [table, channel, zero_channel], queue=False,
                 api_visibility="private")

    edit_inputs, edit_outputs = [*inputs, table], [*edit.values(), lab]
    edit_button.click(run_edit_channels, edit_inputs, edit_outputs, api_name="edit_channels",
                      **busy)
    zero_button.click(zero_row, [table, zero_channel], table, queue=False,
                      api_visibility="private").then(
        run_edit_channels, edit_inputs, edit_outputs, api_visibility="private", **busy)
    reset_button.click(lambda rows: default_table(len(rows or [])), table, table, queue=False,
                       api_visibility="private").then(
        run_edit_channels, edit_inputs, edit_outputs, api_visibility="private", **busy)

    mix_button.click(run_interpolate, [*inputs, second, points], [*mix.values(), lab],
                     api_name="interpolate", **busy)
    return lab
