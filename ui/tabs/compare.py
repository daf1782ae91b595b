"""Tab "Compare VAEs": every chosen VAE encodes and decodes the same image, side by side.

``compare_vaes`` does the work and yields the views by output name after each VAE, so results
appear as they are ready; ``crop_region`` enlarges one region of the original and of every
reconstruction kept from the last comparison (no VAE runs again). ``build`` lays the tab out and
maps names to components. Every picture, table and metric comes from ``viz``.

Two kinds of VAE are compared. The KL autoencoders (SD v1 and its fine-tunes, SDXL, SD3, FLUX)
give a Gaussian per latent value: its mean is decoded, and the diffusion model sees it as
(mean - shift) x scale. The TAESD family gives latents already in the diffusion model's space.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch
from PIL import Image

import sd_parts
from ui.encoding import EXAMPLE_IMAGES, MAX_PIXELS
from ui.loading import ModelUnavailable, fixes, split_fix, with_one_fix
from ui.models import Models
from ui.shared import (
    PictureFiles,
    failure,
    literal,
    mode_note,
    on_own_thread,
    output_path,
    random_banner,
)
from viz import compare, latents, metrics, pixels, upload

TITLE = "Compare VAEs"
SIZES = [256, 384, 512]
OUTPUTS = ("status", "original", "reconstructions", "errors", "table", "csv", "histogram", "crop",
           "crop_x", "crop_y", "crop_status")
TAESD_SPACE = "as encoded (TAESD)"
# pixels per column of the table, 780 in all: on a wide page every column is in view (names and
# notes wrap), on a narrow one the table scrolls sideways rather than squeezing its numbers
TABLE_WIDTHS = [140, 100, 86, 110, 64, 72, 72, 72, 64]
INTRO = (
    "Every ticked VAE encodes the same image into its latent and decodes it back. **PSNR** (in "
    "dB; higher is closer, and 6 dB more means half the RMS error) and **SSIM** (1: the same "
    "structure) measure each reconstruction against the original; the error maps show where each "
    "VAE errs, all on one colour scale. **latent space** says how the diffusion model's latent is "
    "made from the encoder's output z (for a KL VAE, the mean of its Gaussian); the histogram "
    "sets that latent beside N(0, 1), the noise that diffusion starts from. Times are measured on "
    "this machine.")


@dataclass(frozen=True)
class RoundTrip:
    """One VAE's answer for the image: the reconstruction, the latent in the diffusion model's
    space (C, h, w), how that space is made, and the seconds each half took."""

    reconstruction: np.ndarray
    model_latent: np.ndarray
    space: str
    encode_s: float
    decode_s: float


def round_trip(vae: torch.nn.Module, image: Image.Image) -> RoundTrip:
    """Encode ``image`` and decode the latent: the KL VAE's posterior mean, TAESD's latent."""
    x = pixels.image_to_tensor(image)
    start = time.perf_counter()
    if isinstance(vae, sd_parts.AutoencoderKL):
        latent = vae.encode(x).mean
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor
        model_latent = latents.model_space(latent, scale, shift)
        space = latents.latent_space_text(scale, shift)
    else:  # the TAESD family: the encoder's output is the diffusion model's latent
        latent = vae.encode(x)
        model_latent, space = latents.latent_to_numpy(latent), TAESD_SPACE
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    images = vae.decode(latent)
    decode_s = time.perf_counter() - start
    return RoundTrip(pixels.images_to_pixels(images), model_latent, space, encode_s, decode_s)


def _load(models: Models, choice: str, exact: bool) -> torch.nn.Module:
    if choice in models.settings.tiny_vae_choices:
        return models.tiny_vae(choice, exact)
    return models.vae(choice, exact)


def compare_vaes(models: Models, path: str | None, max_side: int, choices: Sequence[str] | None,
                 exact: bool, crop_side: int) -> Iterator[dict[str, object]]:
    """Yield every view, keyed by OUTPUTS plus "record", after each VAE has run.

    The record (the original and every reconstruction) is what ``crop_region`` reads.
    """
    chosen = list(dict.fromkeys(choices or []))
    if not path:
        yield failure(OUTPUTS, "status", "Upload an image or click one of the examples first.")
        return
    if not chosen:
        yield failure(OUTPUTS, "status", "Tick at least one VAE to compare.")
        return
    try:
        image = upload.load_image(path, MAX_PIXELS)
    except upload.ImageInputError as exc:
        yield failure(OUTPUTS, "status", str(exc))
        return
    loaded, rows, problems = {}, {}, []
    for number, choice in enumerate(chosen, 1):
        # the first answer clears the last comparison's views
        yield {name: None for name in OUTPUTS if number == 1} | {
            "status": f"Loading {literal(choice)} ({number} of {len(chosen)})..."}
        try:
            loaded[choice] = on_own_thread(lambda choice=choice: _load(models, choice, exact))
        except (ModelUnavailable, ValueError) as exc:  # that VAE's row says why; others run
            problems.append(str(exc))
            rows[choice] = compare.failure_row(choice, split_fix(str(exc))[0])
    if not loaded:
        yield failure(OUTPUTS, "status", "None of the chosen VAEs could be loaded: "
                      + with_one_fix(problems)) | {"table": [rows[c] for c in chosen]}
        return
    # one original for all: its sides a multiple of every chosen VAE's downscale
    multiple = math.lcm(*(vae.downscale for vae in loaded.values()))
    fitted, size_note = pixels.fit_for_vae(image, int(max_side), multiple, mode="crop")
    if min(fitted.size) < metrics.GAUSSIAN_SSIM_SIDE:  # SSIM's window would not fit
        side = metrics.GAUSSIAN_SSIM_SIDE
        yield failure(OUTPUTS, "status", f"{size_note} {fitted.width}x{fitted.height} pixels are "
                      f"too few to compare: SSIM needs at least {side}x{side}. Upload a larger "
                      "image, or one less long and thin.")
        return
    original = np.asarray(fitted)
    done: dict[str, RoundTrip] = {}
    for number, (choice, vae) in enumerate(loaded.items(), 1):
        yield {"status": f"Running {literal(choice)} ({number} of {len(loaded)})...",
               "original": fitted}
        try:
            result = on_own_thread(lambda vae=vae: round_trip(vae, fitted))
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the row says so
            rows[choice] = compare.failure_row(choice, f"failed while running: {exc}")
            continue
        done[choice] = result
        rows[choice] = _row(choice, original, result)
        views = _views(models, chosen, original, done, rows, crop_side)
        drawn_for = (len(done), len(rows))  # what those views show
        yield views | {"status": f"{number} of {len(loaded)} VAEs done..."}
    if not done:
        yield failure(OUTPUTS, "status", "Every chosen VAE failed: see the table.") | {
            "table": [rows[c] for c in chosen]}
        return
    failed = len(chosen) - len(done)
    status = (f"{size_note} Compared {len(done)} VAE{'s' * (len(done) > 1)} on "
              f"{fitted.width}x{fitted.height} pixels. {mode_note(exact)} Click the original to "
              f"enlarge a region of every reconstruction.")
    if failed:
        status += f" {failed} VAE{'s' * (failed > 1)} could not run: its row says why."
        status = f"{status} {fixes(problems)}".strip()
    if drawn_for != (len(done), len(rows)):  # a VAE failed after the last views were drawn
        views = _views(models, chosen, original, done, rows, crop_side)
    # the same picture objects as the last answer: PictureFiles writes none of them again
    yield views | {"status": status, "original": fitted}


def _row(choice: str, original: np.ndarray, result: RoundTrip) -> list:
    psnr = metrics.psnr(original, result.reconstruction)
    ssim = metrics.ssim_gaussian(original / 255.0, result.reconstruction / 255.0, data_range=1.0)
    return compare.table_row(choice, result.model_latent.shape, result.space, psnr, ssim,
                             result.encode_s, result.decode_s)


def _views(models: Models, chosen: list[str], original: np.ndarray, done: dict[str, RoundTrip],
           rows: dict[str, list], crop_side: int) -> dict[str, object]:
    """Every view of the VAEs done so far, and the record the crop reads."""
    table = [rows[c] for c in chosen if c in rows]
    reconstructions = [(choice, result.reconstruction) for choice, result in done.items()]
    record = {"original": original, "reconstructions": reconstructions}
    height, width = original.shape[:2]
    x, y = width // 2, height // 2  # the first crop: the centre, also written into the x, y boxes
    csv_file = compare.table_to_csv(table, output_path("vae-comparison.csv",
                                                       models.settings.output_max_age))
    return {
        "reconstructions": compare.side_by_side([("original", original), *reconstructions]),
        "errors": compare.error_maps_view(original, reconstructions),
        "table": table,
        "csv": str(csv_file),
        "histogram": compare.latent_histograms_view(
            [(choice, result.model_latent) for choice, result in done.items()]),
        "crop": crop_region(record, x, y, crop_side)[1],
        "crop_x": x,
        "crop_y": y,
        "crop_status": "",  # a message about an earlier crop no longer holds
        "record": record,
    }


def crop_region(record: dict | None, x: float | None, y: float | None, side: int
                ) -> tuple[str, compare.Picture | None]:
    """(status, picture): the square of ``side`` pixels around (x, y) in the original and in
    every reconstruction of the last comparison, enlarged side by side."""
    if not record:
        return "Run a comparison first, then click the original to choose a region.", None
    if x is None or y is None:
        return "Click the original (or give the x and y of a pixel) to choose a region.", None
    height, width = record["original"].shape[:2]
    try:
        box = compare.crop_box(float(x), float(y), (width, height), int(side))
    except ValueError as exc:
        return str(exc), None
    pictures = [("original", record["original"]), *record["reconstructions"]]
    return "", compare.crop_view(pictures, box)


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks``."""
    settings = models.settings
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    gr.Markdown(INTRO)
    choices = settings.vae_choices + settings.tiny_vae_choices
    # ticked at first: one of each kind, SD v1's VAE, the last KL one (16 channels), and TAESD
    ticked = list(dict.fromkeys([settings.vae_choices[0], settings.vae_choices[-1],
                                 *settings.tiny_vae_choices[:1]]))
    with gr.Row():
        with gr.Column(scale=1):
            image_file = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)",
                                 file_types=upload.accepted_file_types(), elem_id="compare-input")
            examples = gr.Examples(EXAMPLE_IMAGES, inputs=image_file, label="Examples")
            max_side = gr.Dropdown(SIZES, value=max(s for s in SIZES
                                                    if s <= max(settings.default_size, SIZES[0])),
                                   label="Longer side at most (px)")
            chosen = gr.CheckboxGroup(choices, value=ticked, label="VAEs to compare",
                                      elem_id="compare-choices")
            exact = gr.Checkbox(sd_parts.fast_dtype("cpu") == torch.float32,
                                label="Exact mode (float32)")
            gr.Markdown(mode_note(False))
            run = gr.Button("Compare", variant="primary", elem_id="compare-button")
        with gr.Column(scale=2):
            out = {"status": gr.Markdown(elem_classes="status", elem_id="compare-status")}
            out["original"] = gr.Image(label="Original: click a pixel to enlarge that region",
                                       format="png", elem_id="compare-original",
                                       interactive=False)
            with gr.Row():
                out["crop_x"] = crop_x = gr.Number(None, label="Region centre x (px)",
                                                   precision=0)
                out["crop_y"] = crop_y = gr.Number(None, label="Region centre y (px)",
                                                   precision=0)
                crop_side = gr.Dropdown(list(compare.CROP_SIDES), value=64,
                                        label="Region side (px)")
            out["crop_status"] = crop_status = gr.Markdown(elem_id="compare-crop-status")
            # these pictures carry their own titles; a label would cover the top of a wide
            # picture shown scaled down
            out["crop"] = gr.Image(label="The region, enlarged (nearest neighbour)",
                                   format="png", elem_id="compare-crop", show_label=False,
                                   elem_classes="titled")
            out["reconstructions"] = gr.Image(label="Reconstructions", format="png",
                                              elem_id="compare-reconstructions", show_label=False,
                                              elem_classes="titled")
            out["errors"] = gr.Image(label="Where each VAE errs", format="png",
                                     elem_id="compare-errors", show_label=False,
                                     elem_classes="titled")
            out["table"] = gr.Dataframe(headers=compare.TABLE_HEADERS, label="Numbers",
                                        interactive=False, elem_id="compare-table", wrap=True,
                                        column_widths=TABLE_WIDTHS)
            out["csv"] = gr.File(label="The table (.csv)")
            out["histogram"] = gr.Image(label="Each latent in the diffusion model's space vs "
                                        "N(0, 1)", format="png")
    # the last comparison's pictures, for the crop; kept for a while, not for the session
    record = gr.State(None, time_to_live=settings.cache_max_age)

    def run_compare(image, size, vaes, exact, region_side, progress=gr.Progress(track_tqdm=True)):
        files = PictureFiles()
        for views in compare_vaes(models, image, size, vaes, bool(exact), region_side):
            answer = files.answer({out[name]: views[name] for name in OUTPUTS if name in views})
            if "record" in views:
                answer[record] = views["record"]
            yield answer

    def show_crop(comparison, x, y, region_side):
        status, picture = crop_region(comparison, x, y, region_side)
        return {crop_status: literal(status),
                out["crop"]: PictureFiles()(picture)}

    def clicked(event: gr.SelectData):
        return event.index[0], event.index[1]

    inputs = [image_file, max_side, chosen, exact, crop_side]
    outputs = [*(out[name] for name in OUTPUTS), record]
    run.click(run_compare, inputs, outputs, api_name="compare", concurrency_id="models",
              concurrency_limit=1)
    examples.load_input_event.then(run_compare, inputs, outputs, api_visibility="private",
                                   concurrency_id="models", concurrency_limit=1)
    crop_inputs, crop_outputs = [record, crop_x, crop_y, crop_side], [crop_status, out["crop"]]
    out["original"].select(clicked, None, [crop_x, crop_y], queue=False,
                           api_visibility="private").then(
        show_crop, crop_inputs, crop_outputs, api_name="compare_crop", show_progress="hidden")
    gr.on([crop_x.submit, crop_y.submit, crop_side.input], show_crop, crop_inputs, crop_outputs,
          api_visibility="private", show_progress="hidden")
