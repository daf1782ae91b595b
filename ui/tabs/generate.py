"""Tab "Prompt → UNet + scheduler → latent → image": watch Stable Diffusion make an image.

``generate`` runs the pipeline in a worker thread and yields the views of every step as the
step finishes (the latent and the clean image it predicts, drawn by a linear colour map or by
TAESD; the latent's channels; the noise level), then the decoded image, the steps side by side,
guidance and the word maps. A Stop button, or a client that leaves, ends the run at the next step
and keeps what was made. The scrubber then spans the steps made and draws them as the run did
(linear map or TAESD); "decode this step" always uses the full VAE. Below it,
``ui/tabs/forward.py`` shows the other direction. Every picture comes from ``viz.diffusion``.

Length: about 560 lines, because the run, the record it leaves and the controls that read that
record (scrubber, word maps, decode) share one state and one layout; the forward process, which
shares neither, has its own file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
import torch

import sd_parts
from sd_parts.pipeline import GenerationResult, StepState, check_arguments
from sd_parts.tokenizer import tokens_kept
from ui.encoding import MAX_PIXELS, latent_space
from ui.models import Models
from ui.sections import forward
from ui.shared import (
    REFUSED,
    PictureFiles,
    failure,
    mode_note,
    on_zero_gpu,
    output_path,
    random_banner,
)
from viz import diffusion, latents, pixels, upload
from viz.heatmap import Picture

Preview = Callable[[torch.Tensor], np.ndarray]  # a model-space latent (C, h, w) -> RGB picture

TITLE = "Prompt → UNet + scheduler → latent → image"
SCHEDULERS = {"PNDM (PLMS)": "pndm", "DDIM": "ddim", "Euler": "euler",
              "DPM-Solver++ 2M": "dpm++2m", "DDPM": "ddpm"}
KARRAS_KINDS = ("euler", "dpm++2m")
MAX_SIDE = 1024  # pixels per side: 4x the work of SD v1's native 512 x 512
EXAMPLE_PROMPTS = [
    ["a photograph of an astronaut riding a horse", "", 7.5],
    ["a watercolour painting of a lighthouse at dusk", "blurry, low quality", 7.5],
    ["a bowl of ramen, studio lighting, 35mm photo", "", 5.0],
]
# the order of the API's answer
OUTPUTS = ("status", "step_preview", "x0_preview", "chart", "channels", "final", "strip",
           "guidance", "word_maps", "downloads")
# How the streamed latent and its x0 are drawn: the fixed linear map from latent channels to RGB
# (colours only, free), or SD v1's TAESD, a 2.4 M-parameter decoder that draws the picture.
LINEAR_PREVIEW, TAESD_PREVIEW = "linear RGB map", "TAESD"
PREVIEWS = (LINEAR_PREVIEW, TAESD_PREVIEW)
# Measured at 256 px with full-size random weights on a 2-core CPU (AMD EPYC, bfloat16): the two
# TAESD decodes of a step take 0.09 s beside a 0.81 s UNet step (0.16 s and 1.6 s in float32);
# a 10-step run took 3-9% longer than with the linear map, as decoding overlaps the next step.
PREVIEW_INFO = ("TAESD draws each step's latent and x0 with a tiny distilled decoder: 0.09 s per "
                "step at 256 px on a 2-core CPU, beside a 0.8 s step; a run takes 3-9% longer. "
                "The scrubber and the strip of steps draw with the same choice.")
# seconds per UNet call per latent pixel, measured by the runs on this machine: the estimate
# shown before a run starts
_measured_rate: dict[str, float] = {}
_stop_events: dict[str, threading.Event] = {}  # session -> the Stop button of its current run


@dataclass
class RunRecord:
    """What a finished run leaves for the scrubber and the word-map controls."""

    latents: list[torch.Tensor]  # the start noise, then the latent after each step
    pred_original: list[torch.Tensor]
    noise_uncond: list[torch.Tensor | None]
    noise_text: list[torch.Tensor]
    timesteps: list[float]
    noise_levels: list[float]
    guidance: float
    size: tuple[int, int]  # (width, height) in pixels
    scaling_factor: float  # the VAE's: latents here are in model space, the channel view is raw
    show: Preview  # how this run draws a latent or x0 (the Preview chosen for it), here and after
    step_maps: list[torch.Tensor] = field(default_factory=list)  # (77, 16, 16) per step
    word_maps: torch.Tensor | None = None  # (77, h, w)
    pieces: list[str] = field(default_factory=list)
    image: np.ndarray | None = None  # the final image, (H, W, 3) uint8

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass
class Request:
    """The run's settings, checked; ``settings()`` is what the PNG and the latents file keep."""

    prompt: str
    negative: str
    steps: int
    guidance: float
    scheduler: str
    karras: bool
    seed: int
    width: int
    height: int
    init_image: str | None
    strength: float

    def settings(self) -> dict[str, object]:
        return {"prompt": self.prompt, "negative_prompt": self.negative, "steps": self.steps,
                "guidance_scale": self.guidance, "scheduler": self.scheduler,
                "karras": self.karras, "seed": self.seed, "width": self.width,
                "height": self.height, "strength": self.strength if self.init_image else None}


def parse_request(prompt: str | None, negative: str | None, steps: float | None,
                  guidance: float | None, scheduler: str, karras: bool, seed: float | None,
                  width: float | None, height: float | None, init_image: str | None,
                  strength: float | None, multiple: int) -> Request:
    """Check the form's values; a ValueError says what is wrong and what is allowed."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
    kind = SCHEDULERS[scheduler]
    if karras and kind not in KARRAS_KINDS:
        raise ValueError(f"Karras sigmas apply to Euler and DPM-Solver++ 2M, not to {scheduler}.")
    numbers = {"steps": steps, "guidance": guidance, "seed": seed, "width": width,
               "height": height, "strength": 0.8 if strength is None else strength}
    missing = [name for name, value in numbers.items() if value is None]
    if missing:
        raise ValueError(f"Fill in {', '.join(missing)}.")
    if not all(np.isfinite(float(numbers[name])) for name in ("steps", "seed", "strength")):
        raise ValueError("Steps, seed and strength must be finite numbers.")
    if seed != int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"The seed must be a whole number from 0 to 2^63 - 1; got {seed:g}.")
    if float(steps) != int(steps) or not 1 <= steps <= 100:
        raise ValueError(f"Steps must be a whole number from 1 to 100; got {steps:g}.")
    if not np.isfinite(guidance) or not 1 <= guidance <= 20:
        raise ValueError(f"Guidance scale must be from 1 (no guidance) to 20; got {guidance}.")
    for name, value in (("Width", width), ("Height", height)):
        if not np.isfinite(value) or value != int(value) or value % multiple or \
                not multiple <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {multiple} from {multiple} to "
                             f"{MAX_SIDE} pixels; got {value:g}.")
    return Request(prompt or "", negative or "", int(steps), float(guidance), kind,
                   bool(karras), int(seed), int(width), int(height), init_image or None,
                   float(numbers["strength"]))


def estimate(steps: int, request: Request, multiple: int) -> str:
    """The time the run will take, from the step time measured on this machine so far."""
    calls = 2 if request.guidance > 1 else 1
    grid = (request.width // multiple) * (request.height // multiple)
    rate = _measured_rate.get(str(calls))
    if rate is None:
        return "The time per step is measured during the first step."
    return f"Estimated {rate * grid * steps:.0f} s ({rate * grid:.2f} s per step)."


def _load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    image = upload.load_image(path, MAX_PIXELS).resize((width, height))
    return (pixels.image_to_tensor(image) + 1) / 2  # [0, 1], as the pipeline takes it


def previewer(tiny_vae: sd_parts.AutoencoderTiny | None, rgb_matrix: np.ndarray,
              size: tuple[int, int]) -> Preview:
    """How a run draws a model-space latent (C, h, w) at ``size`` = (width, height): the linear
    map on the CPU, or TAESD (``tiny_vae``) where it lives, which may be the run's GPU."""
    if tiny_vae is None:
        return lambda latent: diffusion.latent_preview(latent.cpu(), rgb_matrix, size)
    return lambda latent: diffusion.taesd_preview(tiny_vae, latent)


def generate(models: Models, request: Request, exact: bool, stop: threading.Event,
             preview: str = LINEAR_PREVIEW) -> Iterator[dict[str, object]]:
    """Yield the views of every step as it finishes, then everything; keyed by OUTPUTS.

    ``preview`` says how the latent and x0 previews are drawn (one of PREVIEWS)."""
    if preview not in PREVIEWS:
        yield failure(OUTPUTS, "status", f"Unknown preview {preview!r}: choose one of "
                      f"{', '.join(PREVIEWS)}.")
        return
    try:
        pipe = models.pipeline(exact)
        tiny_vae = models.generation_tiny_vae(exact) if preview == TAESD_PREVIEW else None
        init = None
        if request.init_image:
            init = _load_init_image(request.init_image, request.width, request.height)
        check_arguments(1, 1, request.steps, request.guidance, request.height, request.width,
                        pipe.latent_downscale, init, request.strength)
    except REFUSED as exc:
        yield failure(OUTPUTS, "status", str(exc))
        return
    multiple = pipe.latent_downscale
    scale, _ = latent_space(pipe.vae.config)
    sampler, timesteps, _ = pipe.plan(request.steps, request.scheduler, request.karras or None,
                                      request.strength if init is not None else 1.0)
    levels = [sampler.noise_level(t) for t in timesteps]
    rgb_map = latents.rgb_map_for(pipe.unet.config.in_channels, scale)
    if rgb_map is None:
        yield failure(OUTPUTS, "status", f"No RGB preview map is known for "
                      f"{pipe.unet.config.in_channels}-channel latents scaled by {scale:g}.")
        return
    if tiny_vae is not None and (tiny_vae.config.latent_channels, tiny_vae.downscale) != \
            (pipe.vae.config.latent_channels, multiple):
        yield failure(OUTPUTS, "status", "TAESD does not fit this model's latents; choose the "
                      "linear RGB map preview.")
        return
    size = (request.width, request.height)
    updates: queue.Queue = queue.Queue()
    calls = 2 if request.guidance > 1 else 1
    grid = (request.width // multiple) * (request.height // multiple)
    last = [time.perf_counter()]

    def on_step(index: int, t: float, state: StepState) -> bool:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        _measured_rate[str(calls)] = seconds / grid
        updates.put(("step", state, seconds))
        return not stop.is_set()

    def on_start(start_latents: torch.Tensor) -> None:
        last[0] = time.perf_counter()
        updates.put(("start", start_latents))

    def run() -> None:
        try:
            result = pipe(request.prompt, request.negative, request.steps, request.guidance,
                          request.height, request.width,
                          torch.Generator().manual_seed(request.seed), request.scheduler,
                          request.karras or None, init, request.strength, on_step, trace=True,
                          on_start=on_start)
            updates.put(("done", result))
        except Exception as exc:  # noqa: BLE001 - shown in the status box, the thread ends
            updates.put(("error", exc))

    plan = estimate(len(timesteps), request, multiple)
    started = time.perf_counter()
    worker = threading.Thread(target=run, name="generate", daemon=True)
    worker.start()
    show = previewer(tiny_vae, rgb_map.matrix(), size)
    record = RunRecord([], [], [], [], [], [], request.guidance, size, scale, show)

    try:
        while True:
            item = updates.get()
            if item[0] == "error":
                yield failure(OUTPUTS, "status", f"The run failed: {item[1]}")
                return
            if item[0] == "done":
                break
            if item[0] == "start":  # the start latent, shown before the first UNet call
                yield {"status": f"Running {len(timesteps)} steps. {plan} {mode_note(exact)}",
                       "step_preview": show(item[1][0])}
                continue
            _, state, seconds = item
            record.pred_original.append(state.pred_original[0].cpu())
            record.noise_text.append(state.noise_text[0].cpu())
            record.noise_uncond.append(None if state.noise_uncond is None
                                       else state.noise_uncond[0].cpu())
            yield _step_views(record, state, seconds, levels, pipe, show)
    finally:  # a client that left closes this generator: the worker stops at its next step,
        stop.set()  # and the next run waits for it, so two runs never share the machine
        worker.join()
    result: GenerationResult = item[1]
    yield _final_views(models, record, result, len(timesteps), request, pipe, exact,
                       time.perf_counter() - started, show)


def _step_views(record: RunRecord, state: StepState, seconds: float, levels: list[float],
                pipe: sd_parts.StableDiffusionPipeline, show: Preview) -> dict[str, object]:
    status = (f"Step {state.index + 1} of {state.total} · timestep {state.timestep:g} · "
              f"noise level σ = {levels[state.index]:.3g} · {seconds:.2f} s for this step. "
              "Stop keeps what is made so far.")
    # the previews read the step's tensors where they are (a GPU's, for TAESD there)
    return {"status": status} | _latent_views(record, state.latents[0], state.pred_original[0],
                                              levels, state.index, pipe.latent_downscale, show)


def _latent_views(record: RunRecord, latent: torch.Tensor, x0: torch.Tensor,
                  levels: list[float], index: int, downscale: int, show: Preview
                  ) -> dict[str, object]:
    """The latent after step ``index`` (model space) and its x0 as ``show`` draws them, the
    latent's channels, and the noise level chart with that step marked."""
    return {
        "step_preview": show(latent),
        "x0_preview": show(x0),
        "channels": latents.latent_channels_view(latent.cpu() / record.scaling_factor,
                                                 downscale),
        "chart": _chart(levels, index),
    }


def _final_views(models: Models, record: RunRecord, result: GenerationResult, planned: int,
                 request: Request,
                 pipe: sd_parts.StableDiffusionPipeline, exact: bool, total_s: float,
                 show: Preview) -> dict[str, object]:
    trace = result.trace
    record.latents = [x[0] for x in trace.latents]
    record.timesteps, record.noise_levels = trace.timesteps, trace.noise_levels
    record.step_maps = [m[0] for m in trace.step_maps]
    record.word_maps = None if trace.word_maps is None else trace.word_maps[0]
    pieces = pipe.tokenizer.tokenize(request.prompt)
    record.pieces = pieces[:tokens_kept(len(pieces), pipe.tokenizer.model_max_length)]
    image = pixels.images_to_pixels(result.images * 2 - 1)
    record.image = image
    max_age = models.settings.output_max_age
    settings = request.settings()
    png = diffusion.save_png_with_settings(image, settings, output_path("image.png", max_age))
    steps_file = diffusion.save_step_latents(trace.latents, record.timesteps, settings,
                                             output_path("latents.safetensors", max_age))
    ended = (f"Stopped after {result.steps_done} of {planned} steps" if result.stopped
             else f"Done: {result.steps_done} steps")
    views = {
        "status": f"{ended} in {total_s:.1f} s. {mode_note(exact)}",
        "final": image,
        "strip": _strip(record) if record.steps else None,
        "downloads": [str(png), str(steps_file)],
        "record": record,
    }
    if record.steps:
        last = record.steps - 1
        views |= _latent_views(record, record.latents[-1], record.pred_original[last],
                               record.noise_levels, last, pipe.latent_downscale, show) | {
            "guidance": _guidance(record, last),
            "word_maps": word_maps(record, 1, record.steps, "latent grid"),
        }
    return views


def _chart(levels: list[float], index: int) -> Picture:
    # a Picture, so the file gets a strip on top for the label Gradio draws over it
    return Picture(diffusion.step_chart(levels, index))


def _strip(record: RunRecord) -> object:
    chosen = diffusion.strip_steps(record.steps)
    previews = [record.show(record.pred_original[i]) for i in chosen]
    return diffusion.step_strip(previews, [f"step {i + 1}: x0" for i in chosen])


def _guidance(record: RunRecord, index: int) -> object:
    if record.noise_uncond[index] is None:
        return None  # guidance 1: the UNet ran without the unconditional branch
    return diffusion.guidance_view(record.noise_uncond[index], record.noise_text[index],
                                   record.guidance)


def word_maps(record: RunRecord, first: int, last: int, resolution: str) -> object:
    """The word maps over steps first..last (1-based): at the latent grid for the whole run,
    else from the per-step 16 x 16 maps."""
    if record.image is None or not record.step_maps:
        return None
    first = max(1, int(first)) if first is not None and np.isfinite(first) else 1
    last = min(record.steps, int(last)) if last is not None and np.isfinite(last) else \
        record.steps
    if first > last:
        first, last = last, first
    if resolution == "latent grid" and (first, last) == (1, record.steps) and \
            record.word_maps is not None:
        maps = record.word_maps
    else:
        maps = sum(record.step_maps[first - 1:last])
    groups = diffusion.word_groups(record.pieces, maps.shape[0])
    return diffusion.word_maps_view(maps, groups, record.image)


def scrub(record: RunRecord | None, step: float) -> dict[str, object]:
    """The views of step ``step`` (0: the start noise) of the finished run, drawn as the run
    drew its steps."""
    if record is None or not record.steps:
        return {"scrub_latent": None, "scrub_x0": None, "scrub_guidance": None,
                "scrub_note": "Generate an image first; then every step can be seen here."}
    step = min(max(int(step), 0), record.steps)
    latent = record.show(record.latents[step])
    if step == 0:
        return {"scrub_latent": latent, "scrub_x0": None, "scrub_guidance": None,
                "scrub_note": "Step 0: the start latent, before the UNet has run."}
    return {
        "scrub_latent": latent,
        "scrub_x0": record.show(record.pred_original[step - 1]),
        "scrub_guidance": _guidance(record, step - 1),
        "scrub_note": (f"After step {step} of {record.steps} (timestep "
                       f"{record.timesteps[step - 1]:g}, noise level σ = "
                       f"{record.noise_levels[step - 1]:.3g})."),
    }


def scrubber_after_run(record: RunRecord | None) -> dict[str, object]:
    """After a run, finished or stopped: the scrubber spans the steps it made and stands at the
    last, with that step's views (the run before may have had as many steps, so the scrubber's
    own change would not redraw them), and the word maps' range ends there. Nothing changes
    without a run that made steps."""
    if record is None or not record.steps:
        return {}
    return {"scrubber": gr.Slider(maximum=record.steps, value=record.steps),
            "last_step": gr.Number(record.steps)} | scrub(record, record.steps)


def decode_step(models: Models, record: RunRecord | None, step: float, exact: bool
                ) -> np.ndarray | None:
    """The full VAE's image of the latent after step ``step``, whichever Preview the run drew
    with (the slow, exact view of a step)."""
    if record is None or not record.steps:
        return None
    step = min(max(int(step or 0), 0), record.steps)
    return diffusion.vae_image(models.generation_vae(exact), record.latents[step][None])


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks``."""
    settings = models.settings
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    multiple = models.generation_downscale
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", elem_id="generate-prompt", lines=2,
                                placeholder="a photograph of an astronaut riding a horse")
            negative = gr.Textbox(label="Negative prompt (what guidance pushes away from)")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                stop = gr.Button("Stop", elem_id="stop-button")
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
            guidance = gr.Slider(1, 20, value=7.5, step=0.5,
                                 label="Guidance scale (1: no guidance)")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="PNDM (PLMS)", label="Scheduler")
            karras = gr.Checkbox(False, label="Karras sigmas (Euler, DPM-Solver++ 2M)")
            seed = gr.Number(0, precision=0, label="Seed")
            with gr.Row():
                width = gr.Number(settings.generate_size, precision=0, minimum=multiple,
                                  maximum=MAX_SIDE, step=multiple, label="Width")
                height = gr.Number(settings.generate_size, precision=0, minimum=multiple,
                                   maximum=MAX_SIDE, step=multiple, label="Height")
            with gr.Accordion("Image to image", open=False):
                init_image = gr.Image(type="filepath", label="Start from this image (optional)",
                                      sources=["upload"])
                strength = gr.Slider(0, 1, value=0.8, step=0.05,
                                     label="Strength (0: the image as it is, 1: ignore it)")
            exact = gr.Checkbox(sd_parts.fast_dtype(models.device) == torch.float32,
                                label="Exact mode (float32)")
            gr.Examples(EXAMPLE_PROMPTS, inputs=[prompt, negative, guidance], label="Examples")
        with gr.Column(scale=2):
            out = {"status": gr.Markdown(elem_classes="progress", elem_id="generate-status")}
            preview = gr.Radio(list(PREVIEWS), value=LINEAR_PREVIEW, label="Preview",
                               info=PREVIEW_INFO, elem_id="preview-choice")
            with gr.Row():
                out["step_preview"] = gr.Image(label="The latent now (as Preview draws it)",
                                               format="png", elem_id="step-preview")
                out["x0_preview"] = gr.Image(label="The clean image this step predicts (x0)",
                                             format="png")
                out["chart"] = gr.Image(label="Noise level", format="png")
            out["channels"] = gr.Image(label="The latent channels", format="png")
            out["final"] = gr.Image(label="The image (VAE decoder)", format="png",
                                    elem_id="final-image")
            out["strip"] = gr.Image(label="Chosen steps: the clean image predicted at each",
                                    format="png")
            out["guidance"] = gr.Image(label="Guidance at the last step: the two noise "
                                       "predictions and their difference", format="png")
            with gr.Group():
                out["word_maps"] = gr.Image(label="Where each word is looked at (cross-attention"
                                            ", summed over layers and steps)", format="png",
                                            elem_id="word-maps")
                with gr.Row():
                    first_step = gr.Number(1, precision=0, label="From step")
                    last_step = gr.Number(100, precision=0, label="To step",
                                          elem_id="word-maps-last")
                    resolution = gr.Radio(["latent grid", "16 x 16"], value="latent grid",
                                          label="Resolution")
            with gr.Accordion("Every step", open=True):
                scrubber = gr.Slider(0, 100, value=0, step=1, label="Step (0: the start noise)",
                                     elem_id="step-scrubber")
                scrub_out = {"scrub_note": gr.Markdown()}
                with gr.Row():
                    scrub_out["scrub_latent"] = gr.Image(label="Latent", format="png")
                    scrub_out["scrub_x0"] = gr.Image(label="Predicted x0", format="png")
                    decoded = gr.Image(label="Decoded by the full VAE", format="png")
                scrub_out["scrub_guidance"] = gr.Image(label="Guidance at this step",
                                                       format="png")
                decode_button = gr.Button("Decode this step with the full VAE (exact, "
                                          "whichever Preview)")
            out["downloads"] = gr.File(label="Downloads: the image (PNG with its settings), the "
                                       "latents of every step (.safetensors)",
                                       file_count="multiple")
    forward.build(models, exact)
    # a finished run's record (every step's latents and predictions, ~19 MB at 512 px and 50
    # steps) is kept for the scrubber for a while, not for as long as Gradio keeps the session
    record = gr.State(None, time_to_live=settings.cache_max_age)

    def start(prompt_text, negative_text, n, g, kind, use_karras, seed_value, w, h, init,
              amount, is_exact, preview_kind, request: gr.Request):
        files = PictureFiles(settings.output_max_age)
        session = request.session_hash if request is not None else ""
        stop_event = threading.Event()
        _stop_events[session] = stop_event
        try:
            try:
                parsed = parse_request(prompt_text, negative_text, n, g, kind, use_karras,
                                       seed_value, w, h, init, amount, multiple)
            except ValueError as exc:
                yield {out[k]: v for k, v in failure(OUTPUTS, "status", str(exc)).items()}
                return
            for views in generate(models, parsed, bool(is_exact), stop_event, preview_kind):
                answer = {out[k]: files(views.get(k)) for k in OUTPUTS}
                if "record" in views:
                    answer[record] = views["record"]
                yield answer
        finally:
            if _stop_events.get(session) is stop_event:
                del _stop_events[session]
            files.remove()

    def request_stop(request: gr.Request) -> str:
        event = _stop_events.get(request.session_hash if request is not None else "")
        if event is None:
            return "Nothing is running."
        event.set()
        return "Stopping after this step..."

    start = on_zero_gpu(start)
    generate_inputs = [prompt, negative, steps, guidance, scheduler, karras, seed, width, height,
                       init_image, strength, exact, preview]

    def follow_run(run_record):
        files = PictureFiles(settings.output_max_age)
        parts = scrub_out | {"scrubber": scrubber, "last_step": last_step}
        return {parts[k]: files(v) for k, v in scrubber_after_run(run_record).items()}

    gr.on([run.click, prompt.submit], start, generate_inputs,
          [*(out[name] for name in OUTPUTS), record], api_name="generate",
          concurrency_id="generate", concurrency_limit=1).then(
        follow_run, record, [scrubber, last_step, *scrub_out.values()], api_visibility="private",
        show_progress="hidden")
    stop.click(request_stop, None, out["status"], api_name="stop", queue=False)

    def show_step(run_record, step):
        files = PictureFiles(settings.output_max_age)
        views = scrub(run_record, step)
        return {scrub_out[k]: files(v) for k, v in views.items()}

    scrubber.change(show_step, [record, scrubber], list(scrub_out.values()),
                    api_name="scrub", show_progress="hidden")
    decode_button.click(lambda r, s, e: decode_step(models, r, s, e), [record, scrubber, exact],
                        decoded, api_name="decode_step", concurrency_id="generate",
                        concurrency_limit=1)
    def show_word_maps(run_record, first, last, res):
        return PictureFiles(settings.output_max_age)(word_maps(run_record, first, last, res))

    gr.on([first_step.change, last_step.change, resolution.change], show_word_maps,
          [record, first_step, last_step, resolution], out["word_maps"], api_name="word_maps")

