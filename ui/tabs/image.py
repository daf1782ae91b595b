"""Tab "Image → latent → image": the VAE encodes an upload into a latent and decodes it back.

``encode_image`` does the work and yields the views by output name: the latent first (with the
instant preview), then the reconstruction. ``build`` lays the tab out and maps names to
components. Every picture comes from ``viz``; the VAE's channels and downscale come from its
config, so any VAE the app loads is shown right. The latent and its decode are handed to the
experiments under the tab (``ui/tabs/latent_lab.py``) as an ``Encoded``, so they start from the
tab's latent instead of encoding the image again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gradio as gr
import torch
from PIL import Image

import sd_parts
from ui.encoding import (
    EXAMPLE_IMAGES,
    MAX_PIXELS,
    MEAN,
    SAMPLE,
    SIZES,
    Encoded,
    Source,
    choose_latent,
    latent_space,
    uses_tiles,
)
from ui.models import Models
from ui.sections import latent_lab
from ui.shared import (
    REFUSED,
    PictureFiles,
    failure,
    mode_note,
    on_own_thread,
    output_path,
    random_banner,
)
from viz import export, latents, metrics, pixels, upload

TITLE = "Image → latent → image"
OUTPUTS = ("status", "size", "vae_input", "preview", "fitted_preview", "channels", "stats",
           "histogram", "std", "original", "reconstruction", "error", "metrics", "downloads")


def encode_image(models: Models, path: str | None, choice: str, max_side: int, fit: str,
                 latent_kind: str, seed: int, shared_scale: bool, exact: bool
                 ) -> Iterator[dict[str, object]]:
    """Yield the latent's views, then all views with the reconstruction, keyed by OUTPUTS; the
    last also holds "encoded", the ``Encoded`` the latent experiments start from.

    Tensors stay float32 here: the VAE casts to its own dtype (bfloat16 in fast mode) and back.
    """
    if not path:
        yield failure(OUTPUTS, "status", "Upload an image or click one of the examples first.")
        return
    try:
        loaded = upload.load_image_with_notes(path, MAX_PIXELS)  # notes: what was done to it
        image = loaded.image
        vae = on_own_thread(lambda: models.vae(choice, bool(exact)))
    except REFUSED as exc:
        yield failure(OUTPUTS, "status", str(exc))
        return
    space = latent_space(vae.config)
    fitted, size_note = pixels.fit_for_vae(image, int(max_side), vae.downscale, mode=fit)
    size_note = " ".join(filter(None, [loaded.note, size_note]))
    tiled = uses_tiles(fitted)
    start = time.perf_counter()
    posterior = on_own_thread(lambda: vae.encode(pixels.image_to_tensor(fitted), tiled=tiled))
    latent = choose_latent(posterior, latent_kind, seed)
    encode_s = time.perf_counter() - start
    latent_views = _latent_views(latent, posterior.std[0], fitted, size_note, space,
                                 vae.downscale, shared_scale)
    yield latent_views | {"metrics": f"Encoded in {encode_s:.2f} s. Decoding..."}

    start = time.perf_counter()
    decoded = on_own_thread(lambda: vae.decode(latent[None], tiled=tiled)[0])
    reconstruction = pixels.tensor_to_image(decoded)
    decode_s = time.perf_counter() - start
    max_age = models.settings.output_max_age
    latent_file = export.latent_to_safetensors(latent, space[0], fitted.size,
                                               output_path("latent.safetensors", max_age),
                                               shift_factor=space[1])
    png_file = output_path("reconstruction.png", max_age)
    reconstruction.save(png_file, compress_level=1)  # the same pixels in a third of the time
    fitted_rgb = latents.apply_rgb_map(latent, latents.fit_rgb_map(latent, fitted, *space),
                                       *space)
    timing = (f"encoded in {encode_s:.2f} s, decoded in {decode_s:.2f} s"
              f"{' (tiled)' if tiled else ''}. {mode_note(bool(exact))}")
    # the last yield carries every output, so an API client gets the complete result
    yield latent_views | {
        "original": fitted,
        "reconstruction": reconstruction,
        "fitted_preview": latents.enlarge_to(fitted_rgb, fitted.size),
        "error": metrics.error_view(fitted, reconstruction),
        "metrics": f"{_quality(fitted, reconstruction)} · {timing}",
        "downloads": [str(latent_file), str(png_file)],
        "encoded": Encoded(Source(path, choice, max_side, fit, latent_kind, seed, exact), None,
                           latent, decoded, fitted, size_note, vae.downscale, space, tiled),
    }


def _latent_views(latent: torch.Tensor, std: torch.Tensor, fitted: Image.Image, size_note: str,
                  space: tuple[float, float], downscale: int, shared_scale: bool
                  ) -> dict[str, object]:
    """Everything shown before the decoder runs: size, preview, channels, numbers, histogram."""
    channels, height, width = latent.shape
    pixel_values = 3 * fitted.width * fitted.height
    size = (f"{size_note} The latent is {channels}x{height}x{width} (channels x height x width, "
            f"1 latent pixel per {downscale}x{downscale} pixels): {latent.numel():,} numbers for "
            f"{pixel_values:,} pixel values, {pixel_values / latent.numel():.0f}x fewer.")
    rgb_map = latents.rgb_map_for(channels, space[0])
    if rgb_map is None:  # no published map for this family: the best map for this image
        matrix = latents.fit_rgb_map(latent, fitted, *space)
        size += (f" No published RGB map fits a {channels}-channel latent scaled by "
                 f"{space[0]:g}, so the instant preview uses the map fitted to this image.")
    else:
        matrix = rgb_map.matrix()
    return {
        "status": None,
        "size": size,
        "vae_input": fitted,
        "preview": latents.enlarge_to(latents.apply_rgb_map(latent, matrix, *space),
                                      fitted.size),
        "channels": latents.latent_channels_view(latent, downscale, shared_scale),
        "stats": latents.channel_stats(latent, *space),
        "histogram": latents.latent_histogram_view(latent, *space),
        "std": latents.std_view(std, shared_scale),
    }


def _quality(original: Image.Image, reconstruction: Image.Image) -> str:
    psnr = metrics.psnr(original, reconstruction)
    psnr_text = "∞ (identical)" if psnr == float("inf") else f"{psnr:.2f} dB"
    if min(original.size) < metrics.SSIM_MIN_SIDE:
        return f"**PSNR** {psnr_text} · **SSIM** needs at least 7x7 pixels"
    return f"**PSNR** {psnr_text} · **SSIM** {metrics.ssim(original, reconstruction):.4f}"


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks``."""
    settings = models.settings
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    with gr.Row():
        with gr.Column(scale=1):
            image_file = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)",
                                 file_types=upload.accepted_file_types(), elem_id="image-input")
            examples = gr.Examples(EXAMPLE_IMAGES, inputs=image_file, label="Examples")
            choice = gr.Dropdown(settings.vae_choices, value=settings.vae_choices[0],
                                 label="VAE weights")
            max_side = gr.Dropdown(SIZES, value=settings.default_size,
                                   label="Longer side at most (px)")
            fit = gr.Radio(["crop", "pad"], value="crop",
                           label="To make the sides multiples of the VAE's downscale")
            latent_kind = gr.Radio([MEAN, SAMPLE], value=MEAN, label="Latent to decode",
                                   elem_id="latent-kind")
            seed = gr.Number(0, precision=0, label="Seed for the sample")
            shared_scale = gr.Checkbox(True, label="One colour scale for all channels")
            exact = gr.Checkbox(sd_parts.fast_dtype("cpu") == torch.float32,
                                label="Exact mode (float32)")
            gr.Markdown(mode_note(False))
            run = gr.Button("Encode and decode", variant="primary")
        with gr.Column(scale=2):
            out = {"status": gr.Markdown(elem_classes="status", elem_id="image-status"),
                   "size": gr.Markdown()}
            with gr.Row():
                out["vae_input"] = gr.Image(label="What the encoder sees", format="png")
                out["preview"] = gr.Image(label="Instant preview: the latent's RGB map",
                                          format="png", interactive=False)
                out["fitted_preview"] = gr.Image(label="Map fitted to this image", format="png")
            out["channels"] = gr.Image(label="The latent channels", format="png",
                                       elem_id="latent-channels")
            out["stats"] = gr.Dataframe(headers=latents.CHANNEL_STATS_HEADERS,
                                        label="Per-channel statistics", interactive=False)
            # full width: the histogram is shown at its own size, so its legend stays readable
            out["histogram"] = gr.Image(label="The latent in model space vs N(0, 1)",
                                        format="png")
            out["std"] = gr.Image(label="Posterior std (how uncertain each value is)",
                                  format="png")
            with gr.Row():
                out["original"] = gr.Image(label="Original (as encoded)", format="png")
                out["reconstruction"] = gr.Image(label="Reconstruction", format="png",
                                                 elem_id="reconstruction")
            out["error"] = gr.Image(label="Absolute error", format="png")
            out["metrics"] = gr.Markdown()
            out["downloads"] = gr.File(label="Downloads: latent (.safetensors), reconstruction "
                                       "(.png)", file_count="multiple")

    # built first: the tab's encode fills the experiments' cache (a gr.State) with its latent
    lab = latent_lab.build(models, [image_file, choice, max_side, fit, latent_kind, seed, exact],
                           out["preview"], out["stats"])

    def encode(image, vae, size, fit, latent_kind, seed, shared_colour_scale, exact, experiments,
               progress=gr.Progress(track_tqdm=True)):  # track_tqdm: Hub downloads show here
        files = PictureFiles()
        for views in encode_image(models, image, vae, size, fit, latent_kind, seed,
                                  shared_colour_scale, exact):
            answer = files.answer({out[name]: views.get(name) for name in OUTPUTS})
            if "encoded" in views:
                answer[lab] = latent_lab.remember(experiments, views["encoded"])
            yield answer

    inputs = [image_file, choice, max_side, fit, latent_kind, seed, shared_scale, exact, lab]
    outputs = [*(out[name] for name in OUTPUTS), lab]
    gr.on([run.click, image_file.upload, latent_kind.change], encode, inputs, outputs,
          api_name="encode_image", concurrency_id="models", concurrency_limit=1)
    examples.load_input_event.then(encode, inputs, outputs, api_visibility="private",
                                   concurrency_id="models", concurrency_limit=1)
