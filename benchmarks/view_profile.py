"""Where the time of an answer goes: the models, each view's drawing, and each picture's encoding.

``benchmarks/views.py`` times whole answers through Gradio; this script opens them up, in this
process and without a server: the image tab at ``--size`` px (fast mode where the CPU has it),
the prompt tab on a new prompt, and the comparison of three VAEs, with full-size random weights
(the same arithmetic as the real ones). For each tab it prints the model's time, the time of
every view function (drawing and colour mapping), and the time to write every picture as the tab
writes it (``ui.shared.PictureFiles``) beside the other encodings it could use: PNG at zlib
levels 1 and 0, and lossless WebP. What is left of a tab's time in ``views.py`` after the model
and these is Gradio's own work: its queue, copying each file into its cache, and the transfer.

    python benchmarks/view_profile.py            # ~1 minute on 2 cores
    python benchmarks/view_profile.py --rounds 5 --size 512
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the pictures written here go to a folder of this run, removed when it ends
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="sd-parts-benchmark-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

import sd_parts  # noqa: E402
from benchmarks.unet import cpu_description  # noqa: E402
from ui import encoding  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.shared import LABEL_ROOM, PictureFiles  # noqa: E402
from ui.tabs import compare, image, prompt  # noqa: E402
from viz import compare as compare_views  # noqa: E402
from viz import heatmap, latents, metrics, pixels, text_encoder, upload  # noqa: E402
from viz.heatmap import Picture, pad  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def machine() -> str:
    """The CPU, its bfloat16 flags and torch's threads, the cores and the load average."""
    return (f"{cpu_description()}; {os.cpu_count()} cores; load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def median_ms(run: Callable[[], object], rounds: int) -> float:
    """Median milliseconds of ``run()`` over ``rounds`` rounds, after one untimed warm-up."""
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def as_image(value: object) -> Image.Image:
    """A view as the RGB image that is written: a Picture (the histograms' charts too) with its
    label strip, or an array."""
    if isinstance(value, Picture):
        return Image.fromarray(pad(value, top=LABEL_ROOM).pixels)
    return value if isinstance(value, Image.Image) else Image.fromarray(value)


def encodings(picture: Image.Image) -> dict[str, Callable[[], int]]:
    """Each way of encoding ``picture`` into memory, returning the number of bytes."""
    def encoder(**options: object) -> Callable[[], int]:
        def run() -> int:
            buffer = io.BytesIO()
            picture.save(buffer, **options)
            return buffer.tell()
        return run
    return {"png 1": encoder(format="PNG", compress_level=1),
            "png 0": encoder(format="PNG", compress_level=0),
            "webp lossless": encoder(format="WEBP", lossless=True, quality=0, method=0)}


@functools.lru_cache(maxsize=16)
def plain_font(size: int) -> ImageFont.FreeTypeFont:
    """The font as the views had it before ``RememberingFont``: every text rendered anew."""
    return ImageFont.truetype(str(heatmap.FONT_FILE), size)


def drawn_ms(draw: Callable[[], object], rounds: int, remembering: bool) -> float:
    """Median milliseconds of ``draw()`` with a font that renders every text anew, or with the
    views' own font, its masks forgotten before each round (one answer: nothing kept from the
    answers before it)."""
    def run() -> object:
        heatmap.font.cache_clear()  # a new RememberingFont per size: no masks kept
        return draw()
    if remembering:
        return median_ms(run, rounds)
    with contextlib.ExitStack() as stack:  # every view module that imported the font
        for module in list(sys.modules.values()):
            if module.__name__.startswith("viz.") and getattr(module, "font", None) is \
                    heatmap.font:
                stack.enter_context(patch.object(module, "font", plain_font))
        return median_ms(draw, rounds)


def report(title: str, model_ms: float, views: dict[str, Callable[[], object]], rounds: int
           ) -> None:
    """One table: the model, then each view's drawing before and now, the tab's own writing of
    it, and the other encodings of the same pixels. The first view is the whole answer's
    drawing, the others its parts."""
    print(f"\n### {title}\n")
    print("| view | size | drawn, plain font | drawn now | written now (tab) | png 1 | png 0 | "
          "webp lossless |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    before = {"drawn": 0.0, "written": 0.0}
    now = {"drawn": 0.0, "written": 0.0}
    for number, (name, draw) in enumerate(views.items()):
        plain, remembered = drawn_ms(draw, rounds, False), drawn_ms(draw, rounds, True)
        value = draw()
        if isinstance(value, Picture | np.ndarray | Image.Image):
            files = PictureFiles()

            def write(value: object = value, files: PictureFiles = files) -> None:
                files._written.clear()  # every round writes the picture anew
                files(value)
            written = median_ms(write, rounds)
            picture = as_image(value)
            timed = {name: (median_ms(run, rounds), run() // 1024)
                     for name, run in encodings(picture).items()}
            cells = [f"{ms:.1f} ms, {kb} kB" for ms, kb in timed.values()]
            size = f"{picture.width}x{picture.height}"
            png_before = timed["png 1"][0]  # before: every picture was written as PNG, level 1
        else:
            written, png_before, cells, size = 0.0, 0.0, ["-"] * 3, "-"
        if number == 0:  # the whole answer's drawing: its parts follow
            before["drawn"], now["drawn"] = plain, remembered
        else:
            before["written"] += png_before
            now["written"] += written
        print(f"| {name} | {size} | {plain:.1f} ms | {remembered:.1f} ms | {written:.1f} ms | "
              f"{' | '.join(cells)} |")
    for when, total in (("before", before), ("now", now)):
        print(f"\nviews {when}: drawn {total['drawn']:.0f} ms + written {total['written']:.0f} ms "
              f"= {sum(total.values()):.0f} ms, {100 * sum(total.values()) / model_ms:.0f}% of "
              f"the model's {model_ms:.0f} ms", end="")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=384, help="the image's longer side")
    args = parser.parse_args()
    print(machine())
    settings = Settings(weights="random")
    models = Models(settings)
    exact = bool(torch.float32 == sd_parts.fast_dtype("cpu"))

    # the image tab: the views of _latent_views and of the last answer
    vae = models.vae(settings.vae_choices[0], exact)
    space = encoding.latent_space(vae.config)
    fitted, _ = pixels.fit_for_vae(upload.load_image(encoding.ASSETS / "astronaut.png",
                                                     encoding.MAX_PIXELS), args.size,
                                   vae.downscale)
    tensor = pixels.image_to_tensor(fitted)
    vae_ms = median_ms(lambda: vae.decode(vae.encode(tensor).mean), args.rounds)
    posterior = vae.encode(tensor)
    latent = posterior.mean[0]
    reconstruction = pixels.tensor_to_image(vae.decode(latent[None])[0])
    matrix = latents.rgb_map_for(latent.shape[0], space[0]).matrix()
    def image_answer() -> list[object]:
        fitted_map = latents.fit_rgb_map(latent, fitted, *space)
        return [image._latent_views(latent, posterior.std[0], fitted, "", space, vae.downscale,
                                    True),
                latents.enlarge_to(latents.apply_rgb_map(latent, fitted_map, *space),
                                   fitted.size),
                metrics.error_view(fitted, reconstruction), image._quality(fitted, reconstruction)]
    report(f"image tab, {fitted.width}x{fitted.height}, {'exact' if exact else 'fast'}", vae_ms, {
        "the answer's views": image_answer,
        "what the encoder sees": lambda: fitted,
        "instant preview": lambda: latents.enlarge_to(
            latents.apply_rgb_map(latent, matrix, *space), fitted.size),
        "channels": lambda: latents.latent_channels_view(latent, vae.downscale, True),
        "stats table": lambda: latents.channel_stats(latent, *space),
        "histogram": lambda: latents.latent_histogram_view(latent, *space),
        "posterior std": lambda: latents.std_view(posterior.std[0], True),
        "fitted map": lambda: latents.enlarge_to(latents.apply_rgb_map(
            latent, latents.fit_rgb_map(latent, fitted, *space), *space), fitted.size),
        "reconstruction": lambda: reconstruction,
        "error": lambda: metrics.error_view(fitted, reconstruction),
        "PSNR and SSIM": lambda: image._quality(fitted, reconstruction),
    }, args.rounds)

    # the prompt tab: a new prompt's views
    read = prompt.read_tokens(models.tokenizer(), PROMPT)
    encoder = models.text_encoder()
    ids = torch.tensor([read.ids])

    def encode_text() -> sd_parts.CLIPTextOutput:
        with torch.inference_mode():
            return encoder(ids, output_hidden_states=True, output_attentions=True)
    text_ms = median_ms(encode_text, args.rounds)
    output = encode_text()
    last = output.last_hidden_state[0]
    attention = prompt.attention_views(read, output, 1, prompt.MEAN_OVER_HEADS, False)
    def prompt_answer() -> list[object]:
        return [prompt.token_views(PROMPT, read),
                prompt.attention_views(read, output, 1, prompt.MEAN_OVER_HEADS, False),
                text_encoder.embedding_view(last, read.labels, read.n_real),
                text_encoder.norms_view([h[0] for h in output.hidden_states], read.labels,
                                        read.n_real),
                text_encoder.cosine_view(last[: read.n_real], read.labels[: read.n_real])]
    report("prompt tab, a new prompt", text_ms, {
        "the answer's views": prompt_answer,
        "tokens": lambda: prompt.token_views(PROMPT, read),
        "attention views (4)": lambda: prompt.attention_views(read, output, 1,
                                                              prompt.MEAN_OVER_HEADS, False),
        "attention": lambda: attention["attention"],
        "heads": lambda: attention["heads"],
        "eos": lambda: attention["eos"],
        "embeddings": lambda: text_encoder.embedding_view(last, read.labels, read.n_real),
        "norms": lambda: text_encoder.norms_view([h[0] for h in output.hidden_states],
                                                 read.labels, read.n_real),
        "cosine": lambda: text_encoder.cosine_view(last[: read.n_real],
                                                   read.labels[: read.n_real]),
    }, args.rounds)

    # the comparison: three VAEs, the views of its last answer
    ticked = [settings.vae_choices[0], settings.vae_choices[-1], settings.tiny_vae_choices[0]]
    vaes = [models.vae(c, exact) for c in ticked[:2]] + [models.tiny_vae(ticked[2], exact)]
    vaes_ms = median_ms(lambda: [compare.round_trip(v, fitted) for v in vaes], args.rounds)
    done = {c: compare.round_trip(v, fitted) for c, v in zip(ticked, vaes, strict=True)}
    original = np.asarray(fitted)
    rows = {c: compare._row(c, original, r) for c, r in done.items()}
    last_views = compare._views(models, ticked, original, done, rows, 64)
    report(f"compare tab, {len(ticked)} VAEs", vaes_ms, {
        "the last answer's views": lambda: ([compare._row(c, original, r) for c, r in
                                             done.items()],
                                            compare._views(models, ticked, original, done, rows,
                                                           64)),
        "reconstructions": lambda: last_views["reconstructions"],
        "errors": lambda: last_views["errors"],
        "histogram": lambda: compare_views.latent_histograms_view(
            [(c, r.model_latent) for c, r in done.items()]),
        "crop": lambda: last_views["crop"],
    }, args.rounds)
    print(f"\nafter: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
