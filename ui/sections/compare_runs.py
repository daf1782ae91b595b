"""Compare runs: two to four runs of the generation form's prompt that differ in one setting
(sampler, sigma schedule, steps, guidance scale, seed or negative prompt), side by side.

The runs go one after another on the machine the generation tab uses (they queue with its runs),
each through ``ui.runs.run_in_background``. Before the first starts, every run's sampler is set
up, so its noise levels are known: the chart of the runs' sigma schedules comes at once, and the
noise levels at which their x0 are compared (``viz.compare_runs.matched_levels``) are fixed. As
each run finishes, its row of x0 (drawn by TAESD, a few milliseconds each), its image, its
difference from run 1 and its line of the table (UNet evaluations, seconds) are added. Stop ends
the current run at its next step and starts no other; what was made stays.

The views are pure functions in ``viz/compare_runs.py``; the form's values are checked by the
generation tab's own ``parse_request`` (handed in), so a bad value gets the tab's message with
the run it belongs to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import gradio as gr
import torch
from safetensors.torch import save_file

from sd_parts.pipeline import check_arguments
from sd_parts.schedulers import SAMPLERS
from ui.models import Models
from ui.runs import (
    Failed,
    Finished,
    GenerationRequest,
    Started,
    Stepped,
    StopFlag,
    Stops,
    run_in_background,
)
from ui.sections.steps import output_image
from ui.shared import REFUSED, failure, literal, on_zero_gpu, output_path, send
from viz import compare_runs as viz_runs
from viz import pixels
from viz.compare import side_by_side

# what a comparison varies -> (the form's setting it replaces, the values it starts with)
VARIED = {
    "sampler": ("scheduler", "Euler | Euler a | DPM++ 2M | LCM"),
    "sigma schedule": ("sigma schedule", "default | Karras | exponential | beta"),
    "steps": ("num_inference_steps", "4 | 10 | 20 | 30"),
    "guidance scale": ("guidance_scale", "1 | 3 | 7.5 | 12"),
    "seed": ("seed", "0 | 1 | 2 | 3"),
    "negative prompt": ("negative_prompt", " | blurry | low quality, jpeg artifacts"),
}
SCHEDULES = ("default", "karras", "exponential", "beta")
# the generation form's settings a comparison starts from, in the endpoint's order
FORM = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler",
        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "seed", "width",
        "height", "eta")
OUTPUTS = ("status", "x0_grid", "images", "differences", "sigma_chart", "table", "downloads")
TAESD = "TAESD"  # the generation tab's name of the TAESD preview
# the "Compare runs" button: open the section, then bring it into view once it has opened
SCROLL_JS = ("() => { setTimeout(() => document.getElementById('compare-runs')"
             "?.scrollIntoView({behavior: 'smooth'}), 300); return []; }")
Parse = Callable[..., GenerationRequest]  # the form's values (diffusers' names) -> a request
ShowFor = Callable[[str, GenerationRequest, bool], Callable]  # preview, request, exact -> show


class RunStop(StopFlag):
    """One run of a comparison. It stops when the visitor presses Stop (the comparison's flag)
    or when ``run_in_background`` ends it (its own file, set as every run ends), which leaves the
    comparison's flag, and so the later runs, alone."""

    def __init__(self, comparison: StopFlag, index: int) -> None:
        super().__init__(comparison.path.with_name(f"{comparison.path.stem}-{index}.stop"))
        self.comparison = comparison

    def is_set(self) -> bool:
        return self.comparison.is_set() or super().is_set()


def _kind(value: str) -> str | None:
    return next((kind for kind, info in SAMPLERS.items() if value in (kind, info.label)), None)


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of {what}.") from None


def run_setting(form: dict[str, object], vary: str, value: str) -> tuple[dict[str, object], str]:
    """The form's values with ``vary`` set to ``value``, and the run's label."""
    changed = dict(form)
    if vary == "sampler":
        kind = _kind(value)
        changed["scheduler"] = value
        label = value
        if kind is not None:  # the form's sigma schedule and eta, where this sampler takes them
            offered = SAMPLERS[kind].sigma_schedules
            for name in ("karras", "exponential", "beta"):
                if name not in offered:
                    changed[f"use_{name}_sigmas"] = False
                elif changed[f"use_{name}_sigmas"]:
                    label += f" ({name})"
            if "eta" not in SAMPLERS[kind].options:
                changed["eta"] = None
        return changed, label
    if vary == "sigma schedule":
        schedule = value.lower()
        if schedule not in SCHEDULES:
            raise ValueError(f"{value!r} is not a sigma schedule: use {', '.join(SCHEDULES)}.")
        changed |= {f"use_{name}_sigmas": schedule == name for name in SCHEDULES[1:]}
        return changed, f"{schedule} sigmas"
    if vary == "negative prompt":
        changed["negative_prompt"] = value
        return changed, f"negative prompt “{value}”" if value else "no negative prompt"
    setting = VARIED[vary][0]
    changed[setting] = _number(value, vary if vary != "seed" else "a seed")
    return changed, f"{vary} {value}"


def run_requests(parse: Parse, form: dict[str, object], vary: str, values: str | None
                 ) -> list[tuple[str, GenerationRequest]]:
    """(label, checked request) of every run; a ValueError names the run and what is wrong."""
    if vary not in VARIED:
        raise ValueError(f"Unknown setting {vary!r} to vary: choose one of {', '.join(VARIED)}.")
    pieces = [piece.strip() for piece in (values or "").split("|")]
    if not 2 <= len(pieces) <= viz_runs.MAX_RUNS:
        raise ValueError(f"Give 2 to {viz_runs.MAX_RUNS} values of the {vary}, separated by |; "
                         f"got {len(pieces)}.")
    runs = []
    for index, piece in enumerate(pieces):
        try:
            if not piece and vary != "negative prompt":
                raise ValueError("the value is empty.")
            changed, label = run_setting(form, vary, piece)
            runs.append((label, parse(**changed)))
        except ValueError as exc:
            raise ValueError(f"Run {index + 1} ({piece or 'empty'}): {exc}") from None
    return runs


def compare(models: Models, runs: list[tuple[str, GenerationRequest]], vary: str, exact: bool,
            stop: StopFlag, show_for: ShowFor) -> Iterator[dict[str, object]]:
    """The comparison's views, keyed by OUTPUTS: the schedules at once, each run's status as it
    goes, everything made so far as each run finishes."""
    try:
        pipe = models.pipeline(exact)
        show = show_for(TAESD, runs[0][1], exact)
    except REFUSED as exc:
        yield failure(OUTPUTS, "status", str(exc))
        return
    schedules = []
    for index, (label, request) in enumerate(runs):
        try:
            check_arguments(1, 1, request.num_inference_steps, request.guidance_scale,
                            request.height, request.width, pipe.latent_downscale, None, 1.0)
            sampler, timesteps, _ = pipe.plan(request.num_inference_steps, request.scheduler,
                                              **request.sampler_options())
        except REFUSED as exc:
            yield failure(OUTPUTS, "status", f"Run {index + 1} ({label}): {exc}")
            return
        schedules.append([sampler.noise_level(t) for t in timesteps])
    labels = [viz_runs.run_label(i, label) for i, (label, _) in enumerate(runs)]
    targets = viz_runs.matched_levels(schedules)
    picks = [viz_runs.nearest_steps(levels, targets) for levels in schedules]
    state = {name: None for name in OUTPUTS} | {
        "sigma_chart": viz_runs.sigma_chart(schedules, labels),
        "table": {"headers": viz_runs.table_headers(vary), "data": []}}
    rows, images, saved = [], [], {}
    for index, (label, request) in enumerate(runs):
        wanted, x0s, start = set(picks[index]), {}, None
        run_stop = RunStop(stop, index)
        try:
            for event in run_in_background(pipe, request, run_stop):
                if isinstance(event, Failed):
                    yield state | {"status": literal(f"Run {index + 1} ({label}) failed: "
                                                     f"{event.error}")}
                    return
                if isinstance(event, Started):
                    start = event.latents[0].cpu()
                elif isinstance(event, Stepped):
                    step = event.state
                    if step.index in wanted:
                        x0s[step.index] = step.pred_original[0].cpu()
                    yield {"status": literal(f"Run {index + 1} of {len(runs)} ({label}): UNet "
                                             f"evaluation {step.index + 1} of {step.total}. "
                                             "Stop ends the comparison here.")}
                elif isinstance(event, Finished):
                    stopped = stop.is_set()  # the visitor's Stop, not the end of this run
                    result = event.result
                    image = pixels.images_to_pixels(result.images * 2 - 1)
                    cells = [(f"step {i + 1}, σ {schedules[index][i]:.3g}",
                              show(x0s[i]) if i in x0s else None) for i in picks[index]]
                    rows.append((labels[index], cells))
                    images.append((labels[index], image))
                    difference = viz_runs.mean_difference(images[0][1], image) if index else None
                    state["table"]["data"].append(viz_runs.table_row(
                        index, label, request.num_inference_steps, result.steps_done,
                        event.seconds, difference))
                    saved |= {f"run{index + 1}_start": start, f"run{index + 1}_final":
                              result.latents[0].cpu()} | {
                        f"run{index + 1}_x0_step{i + 1}": x0 for i, x0 in x0s.items()}
                    saved[f"run{index + 1}_noise_levels"] = torch.tensor(schedules[index])
        finally:
            run_stop.remove()
        done = f"{index + 1} of {len(runs)} runs made"
        state |= {"x0_grid": viz_runs.x0_grid(targets, rows), "images": side_by_side(images),
                  "differences": viz_runs.differences_view(images),
                  "status": f"Stopped: {done}." if stopped else
                  (f"{done}; the next is running." if index + 1 < len(runs) else
                   f"Done: {len(runs)} runs of the same prompt, differing in {vary}.")}
        if stopped or index + 1 == len(runs):
            state["downloads"] = [save_runs(models, saved, runs, targets)]
        yield state
        if stopped:
            return


def save_runs(models: Models, tensors: dict[str, torch.Tensor],
              runs: list[tuple[str, GenerationRequest]], targets: list[float]) -> str:
    """Every run's start latent, its x0 at the matched levels, its final latent and its noise
    levels in one .safetensors, the runs' settings in its metadata."""
    path = output_path("compare-runs.safetensors", models.settings.output_max_age)
    metadata = {"runs": json.dumps([request.settings() | {"label": label}
                                    for label, request in runs]),
                "matched_noise_levels": json.dumps(targets)}
    # clones: an LCM run's final latent is its last x0, one tensor, which safetensors refuses
    save_file({name: value.clone() for name, value in tensors.items()}, str(path),
              metadata=metadata)
    return str(path)


class CompareRuns:
    """The section's layout and events, under the generation form whose values it starts from."""

    def __init__(self, models: Models, form: dict[str, gr.components.Component],
                 exact: gr.Checkbox, parse: Parse, show_for: ShowFor) -> None:
        with gr.Accordion("Compare runs: one prompt, one setting changed, side by side",
                          open=False, elem_id="compare-runs") as self.accordion:
            gr.Markdown("The runs start from the form above and change one setting. Their clean-"
                        "image predictions are compared at the same noise levels σ, not at the "
                        "same step number: a 4-step run and a 30-step run pass σ = 1 at very "
                        "different steps.")
            with gr.Row():
                vary = gr.Radio(list(VARIED), value="guidance scale", label="Vary",
                                elem_id="compare-vary")
                values = gr.Textbox(VARIED["guidance scale"][1],
                                    label=f"Values, 2 to {viz_runs.MAX_RUNS}, separated by |",
                                    elem_id="compare-values")
            with gr.Row():
                run = gr.Button("Compare", variant="primary", elem_id="compare-button")
                stop = gr.Button("Stop", elem_id="compare-stop")
            out = {"status": gr.Markdown(elem_classes="status", elem_id="compare-status")}
            out["sigma_chart"] = output_image("The runs' noise levels", elem_id="compare-sigmas",
                                              elem_classes="titled")
            out["table"] = gr.Dataframe(headers=viz_runs.table_headers("setting"),
                                        interactive=False, elem_id="compare-table")
            out["x0_grid"] = output_image("x0 at matching noise levels", elem_id="compare-x0",
                                          elem_classes="titled")
            out["images"] = output_image("The images (VAE decoder)", elem_id="compare-images",
                                         elem_classes="titled")
            out["differences"] = output_image("Differences from run 1",
                                              elem_id="compare-differences",
                                              elem_classes="titled")
            out["downloads"] = gr.File(label="Download: every run's start latent, x0 at the "
                                       "matched levels and final latent (.safetensors)",
                                       file_count="multiple", interactive=False)
        stops = Stops()

        def compare_runs(prompt, negative_prompt, num_inference_steps, guidance_scale,
                         scheduler, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
                         seed, width, height, exact, vary, values, eta=None,
                         request: gr.Request = None):
            """Run the prompt 2 to 4 times, changing one setting, and compare the runs.

            Args:
                prompt: what to draw, in every run.
                negative_prompt: what guidance pushes away from ("" for nothing).
                num_inference_steps: denoising steps, 1 to 100.
                guidance_scale: classifier-free guidance, 1 (none) to 20.
                scheduler: the sampler, as the generation tab's menu names it.
                use_karras_sigmas: Karras noise levels, where the sampler offers them.
                use_exponential_sigmas: noise levels evenly spaced in log sigma.
                use_beta_sigmas: Beta-distributed noise levels.
                seed: the seed of the start noise.
                width: in pixels, a multiple of the VAE's downscale.
                height: in pixels, a multiple of the VAE's downscale.
                exact: float32 numerics (else bfloat16 where the CPU is fast at it).
                vary: the setting the runs differ in: "sampler", "sigma schedule", "steps",
                    "guidance scale", "seed" or "negative prompt".
                values: its 2 to 4 values, separated by | (e.g. "1 | 3 | 7.5 | 12").
                eta: fresh noise per step for DDIM and TCD; None: the sampler's own.
            """
            settings = dict(zip(FORM, (prompt, negative_prompt, num_inference_steps,
                                       guidance_scale, scheduler, use_karras_sigmas,
                                       use_exponential_sigmas, use_beta_sigmas, seed, width,
                                       height, eta), strict=True))
            session = request.session_hash if request is not None else ""
            # made here, in the web server's process, as the generation tab's (ZeroGPU)
            flag = stops.begin(session)
            try:
                yield from run_on_gpu(flag, settings, exact, vary, values)
            finally:
                stops.end(session, flag)

        @on_zero_gpu
        def run_on_gpu(flag, settings, is_exact, varied, chosen):
            try:
                runs = run_requests(parse, settings, varied, chosen)
            except ValueError as exc:
                answers = [failure(OUTPUTS, "status", str(exc))]
            else:
                answers = compare(models, runs, varied, bool(is_exact), flag, show_for)
            yield from send(answers, out)

        def request_stop(request: gr.Request) -> str:
            """Stop this visitor's comparison after the current step."""
            stopping = stops.request(request.session_hash if request is not None else "")
            return "Stopping after this step..." if stopping else "Nothing is running."

        inputs = [*(form[name] for name in FORM[:-1]), exact, vary, values, form["eta"]]
        run.click(compare_runs, inputs, [out[name] for name in OUTPUTS],
                  api_name="compare_runs", concurrency_id="generate", concurrency_limit=1)
        stop.click(request_stop, None, out["status"], api_name="stop_compare_runs", queue=False)
        vary.input(lambda varied: VARIED[varied][1], vary, values, api_visibility="private",
                   queue=False, show_progress="hidden")
