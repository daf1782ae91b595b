"""Tab "Prompt → UNet + scheduler → latent → image": watch Stable Diffusion make an image.

``generate`` runs the pipeline in the background (``ui/runs.py``) and yields the views of every
step as it finishes (the latent and the clean image it predicts, drawn by a linear colour map or
by TAESD; the latent's channels; the noise level), then the decoded image, the steps side by
side, guidance and the word maps. Stop, or a client that leaves, ends the run at the next step
and keeps what was made. The scrubber then spans the steps made; "decode this step" always uses
the full VAE. The samplers offered are those ``sd_parts.schedulers.SAMPLERS`` describes. A
finished run of each example prompt is kept on disk (``ui/sections/example_runs.py``), so the
tab opens on one and an example clicked again is shown at once. Below,
``ui/sections/forward.py`` shows the other direction.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import numpy as np
import torch

import sd_parts
from sd_parts.pipeline import check_arguments
from sd_parts.schedulers import SAMPLERS
from sd_parts.tokenizer import tokens_kept
from ui.encoding import MAX_PIXELS
from ui.models import Models
from ui.runs import (
    Failed,
    Finished,
    GenerationRequest,
    Preview,
    RunRecord,
    Started,
    Stepped,
    Stops,
    run_in_background,
)
from ui.sections import compare_runs, example_runs, forward, samplers, unet_inside
from ui.sections.steps import (
    StepsSection,
    latent_views,
    output_image,
    record_views,
    step_word,
)
from ui.shared import REFUSED, failure, mode_note, on_own_thread, on_zero_gpu, random_banner, send
from viz import diffusion, latents, pixels, upload

TITLE = "Prompt → UNet + scheduler → latent → image"
LABELS = {info.label: kind for kind, info in SAMPLERS.items()}  # what the menu shows -> kind
DEFAULT_SAMPLER = SAMPLERS["pndm"].label  # SD v1.5's own scheduler_config.json
MAX_SIDE = 1024  # pixels per side: 4x the work of SD v1's native 512 x 512
MAX_STEPS = 100
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
PREVIEW_INFO = ("TAESD draws each step's latent and x0 with a tiny distilled decoder (a run's "
                "status says what its previews cost here); the linear map only mixes the "
                "latent's channels into colours. The scrubber and the strip draw the same way.")


def parse_request(prompt: str | None, negative_prompt: str | None,
                  num_inference_steps: float | None, guidance_scale: float | None,
                  scheduler: str, use_karras_sigmas: bool, seed: float | None,
                  width: float | None, height: float | None, image: str | None,
                  strength: float | None, multiple: int, use_exponential_sigmas: bool = False,
                  use_beta_sigmas: bool = False, eta: float | None = None) -> GenerationRequest:
    """Check the form's values; a ValueError says what is wrong and what is allowed."""
    kind = LABELS.get(scheduler, scheduler if scheduler in SAMPLERS else None)
    if kind is None:
        raise ValueError(f"Unknown scheduler {scheduler!r}: choose one of {', '.join(LABELS)}.")
    eta = samplers.check_options(kind, use_karras_sigmas, use_exponential_sigmas,
                                 use_beta_sigmas, eta)
    numbers = {"steps": num_inference_steps, "guidance scale": guidance_scale, "seed": seed,
               "width": width, "height": height, "strength": 0.8 if strength is None else strength}
    missing = [name for name, value in numbers.items() if value is None]
    if missing:
        raise ValueError(f"Fill in {', '.join(missing)}.")
    if not all(np.isfinite(float(numbers[name])) for name in ("steps", "seed", "strength")):
        raise ValueError("Steps, seed and strength must be finite numbers.")
    if seed != int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"The seed must be a whole number from 0 to 2^63 - 1; got {seed:g}.")
    steps = num_inference_steps
    if steps != int(steps) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"Steps must be a whole number from 1 to {MAX_STEPS}; got {steps:g}.")
    if not np.isfinite(guidance_scale) or not 1 <= guidance_scale <= 20:
        raise ValueError(f"Guidance scale must be from 1 (no guidance) to 20; got "
                         f"{guidance_scale:g}.")
    for name, value in (("Width", width), ("Height", height)):
        if not np.isfinite(value) or value != int(value) or value % multiple or \
                not multiple <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {multiple} from {multiple} to "
                             f"{MAX_SIDE} pixels; got {value:g}.")
    return GenerationRequest(prompt or "", negative_prompt or "", int(steps),
                             float(guidance_scale), kind, bool(use_karras_sigmas), int(seed),
                             int(width), int(height), image or None, float(numbers["strength"]),
                             bool(use_exponential_sigmas), bool(use_beta_sigmas), eta)


def example_request(size: int) -> GenerationRequest:
    """The first example prompt with the form's defaults: the run a newcomer sees first."""
    prompt, negative_prompt, guidance_scale = EXAMPLE_PROMPTS[0]
    return GenerationRequest(prompt, negative_prompt, 20, guidance_scale, "pndm", False, 0, size,
                             size, None, 0.8)


def evaluations_note(request: GenerationRequest, evaluations: int) -> str:
    """Steps and UNet evaluations, which differ for some samplers, and why."""
    steps = request.num_inference_steps
    if request.image:  # image to image runs the last int(steps x strength) of the schedule
        steps = min(int(steps * request.strength), steps)
    if evaluations == steps:
        return f"{steps} steps"
    note = SAMPLERS[request.scheduler].note.rstrip(".")
    return f"{steps} steps, {evaluations} UNet evaluations{f' ({note})' if note else ''}"


def previewer(models: Models, preview: str, request: GenerationRequest, exact: bool
              ) -> Preview:
    """How a run draws a model-space latent (C, h, w) at the request's size: the linear map on
    the CPU, or SD v1's TAESD where the run is, which may be a GPU. A REFUSED error says why a
    preview cannot be drawn for this model."""
    if preview not in PREVIEWS:
        raise ValueError(f"Unknown preview {preview!r}: choose one of {', '.join(PREVIEWS)}.")
    vae = models.generation_vae(exact)
    config, size = vae.config, (request.width, request.height)
    if preview == LINEAR_PREVIEW:
        rgb_map = latents.rgb_map_for(config.latent_channels, config.scaling_factor)
        if rgb_map is None:
            raise ValueError(f"No RGB preview map is known for {config.latent_channels}-channel "
                             f"latents scaled by {config.scaling_factor:g}; choose TAESD.")
        matrix = rgb_map.matrix()
        return lambda latent: diffusion.latent_preview(latent.cpu(), matrix, size)
    tiny_vae = models.generation_tiny_vae(exact)
    if (tiny_vae.config.latent_channels, tiny_vae.downscale) != (config.latent_channels,
                                                                vae.downscale):
        raise ValueError("TAESD does not fit this model's latents; choose the linear RGB map "
                         "preview.")
    return lambda latent: diffusion.taesd_preview(tiny_vae, latent)


def prepare(models: Models, request: GenerationRequest, exact: bool, preview: str
            ) -> tuple[sd_parts.StableDiffusionPipeline, torch.Tensor | None, RunRecord]:
    """The pipeline, the start image (image to image) and an empty record for ``request``; a
    REFUSED error says what is missing or wrong."""
    pipe = models.pipeline(exact)
    show = previewer(models, preview, request, exact)
    init = None
    if request.image:
        image = upload.load_image(request.image, MAX_PIXELS).resize((request.width,
                                                                     request.height))
        init = (pixels.image_to_tensor(image) + 1) / 2  # [0, 1], as the pipeline takes it
    check_arguments(1, 1, request.num_inference_steps, request.guidance_scale, request.height,
                    request.width, pipe.latent_downscale, init, request.strength)
    return pipe, init, RunRecord(request, preview, show, pipe.vae.config.scaling_factor, exact)


def generate(models: Models, request: GenerationRequest, exact: bool, stop,
             preview: str = LINEAR_PREVIEW) -> Iterator[dict[str, object]]:
    """Yield the views of every step as it finishes, then everything, keyed by OUTPUTS; the
    last also holds "record", the RunRecord the scrubber and the word maps read."""
    try:
        # the models' work on threads of their own (ui.shared.on_own_thread): a Gradio thread
        # that ran torch would keep an OpenMP team, and slow the next run's every step
        pipe, init, record = on_own_thread(lambda: prepare(models, request, exact, preview))
    except REFUSED as exc:
        yield failure(OUTPUTS, "status", str(exc))
        return
    sampler, timesteps, _ = pipe.plan(request.num_inference_steps, request.scheduler,
                                      strength=request.strength if init is not None else 1.0,
                                      **request.sampler_options())
    levels = [sampler.noise_level(t) for t in timesteps]
    plan = example_runs.estimate(request, len(timesteps), pipe.latent_downscale)
    for event in run_in_background(pipe, request, stop, init, trace=True):
        if isinstance(event, Failed):
            yield failure(OUTPUTS, "status", f"The run failed: {event.error}")
            return
        if isinstance(event, Started):  # the start latent, shown before the first UNet call
            yield {"status": f"Running {evaluations_note(request, len(timesteps))}. {plan} "
                             f"{mode_note(exact)}", "step_preview": record.show(event.latents[0])}
        elif isinstance(event, Stepped):
            state = event.state
            record.add_step(state)
            example_runs.measured(request, event.seconds, pipe.latent_downscale)
            counted = step_word(request).replace("step", "Step")
            status = (f"{counted} {state.index + 1} of {state.total} · "
                      f"timestep "
                      f"{state.timestep:g} · noise level σ = {levels[state.index]:.3g} · "
                      f"{event.seconds:.2f} s. Stop keeps what is made so far.")
            yield {"status": status} | latent_views(record, state.latents[0],
                                                    state.pred_original[0], levels, state.index,
                                                    pipe.latent_downscale)
        elif isinstance(event, Finished):
            yield on_own_thread(lambda event=event: final_views(models, record, event, pipe,
                                                                exact, len(timesteps)))


def final_views(models: Models, record: RunRecord, finished: Finished,
                pipe: sd_parts.StableDiffusionPipeline, exact: bool, planned: int
                ) -> dict[str, object]:
    """The finished run's views; ``planned``: the UNet evaluations the run was to make."""
    result = finished.result
    pieces = pipe.tokenizer.tokenize(record.request.prompt)
    image = pixels.images_to_pixels(result.images * 2 - 1)
    record.finish(result, pieces[:tokens_kept(len(pieces), pipe.tokenizer.model_max_length)],
                  image)
    ended = (f"Stopped after {result.steps_done} of {planned} "
             f"{step_word(record.request)}s" if result.stopped
             else f"Done: {evaluations_note(record.request, result.steps_done)}")
    example_runs.finished(models, record, finished.seconds, pipe.latent_downscale,
                          EXAMPLE_PROMPTS, result.stopped)
    return record_views(models, record, pipe.latent_downscale) | {
        "status": f"{ended} in {finished.seconds:.1f} s. {mode_note(exact)}", "record": record}


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks``."""
    settings = models.settings
    multiple = models.generation_downscale
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    with gr.Row():
        with gr.Column(scale=1):
            # the first example, whose run the tab opens on: Generate then shows it at once
            prompt = gr.Textbox(EXAMPLE_PROMPTS[0][0], label="Prompt", elem_id="generate-prompt",
                                lines=2)
            negative_prompt = gr.Textbox(label="Negative prompt (what guidance pushes away from)")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                stop = gr.Button("Stop", elem_id="stop-button")
            with gr.Row():
                preset = gr.Button("Few steps: LCM, 4 steps, 512 px", size="sm",
                                   elem_id="few-steps-button")
                to_compare = gr.Button("Compare runs ↓", size="sm", elem_id="to-compare-runs")
            preset_note = gr.Markdown(elem_id="few-steps-note")
            steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
            guidance_scale = gr.Slider(1, 20, value=7.5, step=0.5,
                                       label="Guidance scale (1: no guidance)")
            scheduler = gr.Dropdown(list(LABELS), value=DEFAULT_SAMPLER, label="Scheduler")
            options = samplers.SamplerOptions(LABELS[DEFAULT_SAMPLER])
            karras = options.karras
            seed = gr.Number(0, precision=0, label="Seed")
            with gr.Row():
                width = gr.Number(settings.generate_size, precision=0, minimum=multiple,
                                  maximum=MAX_SIDE, step=multiple, label="Width")
                height = gr.Number(settings.generate_size, precision=0, minimum=multiple,
                                   maximum=MAX_SIDE, step=multiple, label="Height")
            with gr.Accordion("Image to image", open=False):
                # a File: Gradio's Image would open (and convert) the upload itself first
                image = gr.File(label="Start from this image (optional)",
                                file_types=upload.accepted_file_types())
                strength = gr.Slider(0, 1, value=0.8, step=0.05,
                                     label="Strength (0: the image as it is, 1: ignore it)")
            exact = gr.Checkbox(sd_parts.fast_dtype(models.device) == torch.float32,
                                label="Exact mode (float32)")
            gr.Examples(EXAMPLE_PROMPTS, inputs=[prompt, negative_prompt, guidance_scale],
                        label="Examples", elem_id="generate-examples")
        with gr.Column(scale=2):
            out = {"status": gr.Markdown(elem_classes="status", elem_id="generate-status")}
            preview = gr.Radio(list(PREVIEWS), value=LINEAR_PREVIEW, label="Preview",
                               info=PREVIEW_INFO, elem_id="preview-choice")
            with gr.Row():
                out["step_preview"] = output_image("The latent now (as Preview draws it)",
                                                   elem_id="step-preview")
                out["x0_preview"] = output_image("The clean image this step predicts (x0)")
                out["chart"] = output_image("Noise level")
            # a finished run's record (every step's latents and predictions, ~19 MB at 512 px
            # and 50 steps) is kept for a while, not for as long as Gradio keeps the session
            record = gr.State(None, time_to_live=settings.cache_max_age)
            shown = StepsSection(models, record, exact)
            out |= shown.outputs
    form = {"prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
            "guidance_scale": guidance_scale, "scheduler": scheduler,
            "use_karras_sigmas": karras, "use_exponential_sigmas": options.exponential,
            "use_beta_sigmas": options.beta, "eta": options.eta, "seed": seed, "width": width,
            "height": height}
    comparison = compare_runs.CompareRuns(models, form, exact, lambda **values: parse_request(
        **values, image=None, strength=1.0, multiple=multiple), lambda *args: previewer(
        models, *args))
    forward.build(models, exact)
    unet_inside.build(models, record, exact, shown.follow["scrubber"])
    stops = Stops()

    def show_for(preview: str, request: GenerationRequest, is_exact: bool) -> Preview:
        return previewer(models, preview, request, is_exact)

    default_exact = sd_parts.fast_dtype(models.device) == torch.float32
    first = example_runs.FirstExample(models, example_request(settings.generate_size),
                                      default_exact, LINEAR_PREVIEW, show_for, multiple)

    def start(prompt, negative_prompt, num_inference_steps, guidance_scale, scheduler,
              use_karras_sigmas, seed, width, height, image, strength, exact, preview,
              use_exponential_sigmas=False, use_beta_sigmas=False, eta=None,
              request: gr.Request = None):
        """Generate an image, streaming every step's views.

        Args:
            prompt: what to draw.
            negative_prompt: what guidance pushes away from ("" for nothing).
            num_inference_steps: denoising steps, 1 to 100.
            guidance_scale: classifier-free guidance, 1 (none) to 20.
            scheduler: the sampler, as the menu names it (e.g. "DDIM", "Euler a").
            use_karras_sigmas: Karras noise levels, for the samplers that walk sigmas.
            seed: the seed of the start noise.
            width: in pixels, a multiple of the VAE's downscale.
            height: in pixels, a multiple of the VAE's downscale.
            image: image to image starts from this image (None: text to image).
            strength: how much of the schedule image to image runs (0: the image as it is).
            exact: float32 numerics (else bfloat16 where the CPU is fast at it).
            preview: how each step's latent is drawn, "linear RGB map" or "TAESD".
            use_exponential_sigmas: noise levels evenly spaced in log sigma (as use_karras_sigmas).
            use_beta_sigmas: Beta-distributed noise levels (as use_karras_sigmas).
            eta: fresh noise per step for DDIM (default 0) and TCD (0.3); None: the default.
        """
        session = request.session_hash if request is not None else ""
        # made here, in the web server's process: on ZeroGPU the run goes to another process,
        # and Stop, pressed here, sets this flag, a file both see
        stop = stops.begin(session)
        try:
            yield from run_on_gpu(stop, prompt, negative_prompt, num_inference_steps,
                                  guidance_scale, scheduler, use_karras_sigmas, seed, width,
                                  height, image, strength, exact, preview,
                                  use_exponential_sigmas, use_beta_sigmas, eta)
        finally:
            stops.end(session, stop)

    @on_zero_gpu
    def run_on_gpu(stop, *values):
        try:
            parsed = parse_request(*values[:11], multiple, *values[13:])
        except ValueError as exc:
            answers = [failure(OUTPUTS, "status", str(exc))]
        else:
            exact, preview = values[11:13]
            answers = example_runs.answers(models, parsed, bool(exact), preview, stop, generate,
                                           show_for, multiple)
        for answer in send(answers, out | {"record": record}):
            yield {component: answer.get(component) for component in outputs}

    def request_stop(request: gr.Request) -> str:
        """Stop this visitor's run after its current step."""
        stopping = stops.request(request.session_hash if request is not None else "")
        return "Stopping after this step..." if stopping else "Nothing is running."

    def open_example(run_record):
        """The example run kept on disk, for a visitor who has none of their own."""
        answers = first.views(run_record)
        sent = False
        for answer in send(answers, out | {"record": record}):
            sent = True
            yield answer
        if not sent:  # the visitor's own run stays as it is
            yield {component: gr.skip() for component in outputs}

    inputs = [prompt, negative_prompt, steps, guidance_scale, scheduler, karras, seed, width,
              height, image, strength, exact, preview, options.exponential, options.beta,
              options.eta]
    outputs = [*(out[name] for name in OUTPUTS), record]
    follow = list(shown.follow.values())
    gr.on([run.click, prompt.submit], start, inputs, outputs,
          api_name="generate", concurrency_id="generate", concurrency_limit=1).then(
        shown.follow_run, record, follow, api_visibility="private", show_progress="hidden")
    stop.click(request_stop, None, out["status"], api_name="stop", queue=False)
    tab.select(open_example, record, outputs, api_visibility="private", concurrency_limit=None,
               show_progress="hidden").then(shown.follow_run, record, follow,
                                            api_visibility="private", show_progress="hidden")
    first.start_after_launch(generate)
    options.wire(scheduler)
    preset_outputs = {"scheduler": scheduler, "num_inference_steps": steps, "width": width,
                      "height": height, "guidance_scale": guidance_scale,
                      "negative_prompt": negative_prompt, "note": preset_note}
    preset.click(lambda is_exact: {preset_outputs[name]: value for name, value in
                                   samplers.few_steps(models, is_exact, multiple).items()},
                 exact, list(preset_outputs.values()), api_visibility="private")
    to_compare.click(lambda: gr.Accordion(open=True), None, comparison.accordion,
                     js=compare_runs.SCROLL_JS, api_visibility="private", queue=False)
