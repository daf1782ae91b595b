"""The generation tab's views of a finished (or stopped) run, read from its ``RunRecord``: the
image, the x0 of chosen steps side by side, guidance, the word maps over any range of steps,
and the scrubber over every step (with the full VAE's decode of any step). A run kept on disk
(an example) is shown by the same functions, so it looks as the run did.
"""

from __future__ import annotations

import gradio as gr
import numpy as np

from sd_parts.schedulers.registry import unet_evaluations
from ui.models import Models
from ui.runs import RunRecord
from ui.shared import output_path, send
from viz import diffusion, latents
from viz.heatmap import Picture


def step_word(request) -> str:
    """What the progress counts: steps, or UNet evaluations for a sampler whose differ."""
    steps = request.num_inference_steps
    return "step" if unet_evaluations(request.scheduler, steps) == steps else "UNet evaluation"


MAX_EVALUATIONS = 100  # the form's most steps; a two-evaluation sampler makes up to twice
SCRUB_OUTPUTS = ("scrub_note", "scrub_latent", "scrub_x0", "scrub_guidance")


def latent_views(record: RunRecord, latent, x0, levels: list[float], index: int,
                 downscale: int) -> dict[str, object]:
    """The latent after step ``index`` (model space) and its x0 as the run draws them, the
    latent's channels, and the noise level chart with that step marked."""
    return {
        "step_preview": record.show(latent),
        "x0_preview": record.show(x0),
        "channels": latents.latent_channels_view(latent.cpu() / record.scaling_factor,
                                                 downscale),
        # a Picture, so the file gets a strip on top for the label Gradio draws over it
        "chart": Picture(diffusion.step_chart(levels, index)),
    }


def record_views(models: Models, record: RunRecord, downscale: int) -> dict[str, object]:
    """Everything a finished run shows, from its record alone (a cached example's too)."""
    max_age = models.settings.output_max_age
    settings = record.request.settings()
    png = diffusion.save_png_with_settings(record.image, settings, output_path("image.png",
                                                                              max_age))
    steps_file = diffusion.save_step_latents([x[None] for x in record.trace.latents],
                                             record.trace.timesteps, settings,
                                             output_path("latents.safetensors", max_age))
    views = {"final": record.image, "downloads": [str(png), str(steps_file)],
             "strip": strip(record) if record.steps else None}
    if record.steps:
        last = record.steps - 1
        views |= latent_views(record, record.trace.latents[-1], record.trace.pred_original[last],
                              record.trace.noise_levels, last, downscale) | {
            "guidance": guidance(record, last),
            "word_maps": word_maps(record, 1, record.steps, "latent grid"),
        }
    return views


def strip(record: RunRecord) -> object:
    chosen = diffusion.strip_steps(record.steps)
    previews = [record.show(record.trace.pred_original[i]) for i in chosen]
    return diffusion.step_strip(previews, [f"step {i + 1}: x0" for i in chosen])


def guidance(record: RunRecord, index: int) -> object:
    if record.noise_uncond[index] is None:
        return None  # guidance 1: the UNet ran without the unconditional branch
    return diffusion.guidance_view(record.noise_uncond[index], record.noise_text[index],
                                   record.request.guidance_scale)


def word_maps(record: RunRecord | None, first: float | None, last: float | None,
              resolution: str) -> object:
    """The word maps over steps first..last (1-based): at the latent grid for the whole run,
    else from the per-step 16 x 16 maps."""
    if record is None or record.image is None or not record.trace.step_maps:
        return None
    first = max(1, int(first)) if first is not None and np.isfinite(first) else 1
    last = min(record.steps, int(last)) if last is not None and np.isfinite(last) else \
        record.steps
    first, last = sorted((first, last))
    if resolution == "latent grid" and (first, last) == (1, record.steps) and \
            record.trace.word_maps is not None:
        maps = record.trace.word_maps
    else:
        maps = sum(record.trace.step_maps[first - 1:last])
    groups = diffusion.word_groups(record.pieces, maps.shape[0])
    return diffusion.word_maps_view(maps, groups, record.image)


def scrub(record: RunRecord | None, step: float | None) -> dict[str, object]:
    """The views of step ``step`` (0: the start noise) of the finished run, drawn as the run
    drew its steps."""
    if record is None or not record.steps:
        return {"scrub_latent": None, "scrub_x0": None, "scrub_guidance": None,
                "scrub_note": "Generate an image first; then every step can be seen here."}
    step = min(max(int(step or 0), 0), record.steps)
    latent = record.show(record.trace.latents[step])
    if step == 0:
        return {"scrub_latent": latent, "scrub_x0": None, "scrub_guidance": None,
                "scrub_note": "Step 0: the start latent, before the UNet has run."}
    return {
        "scrub_latent": latent,
        "scrub_x0": record.show(record.trace.pred_original[step - 1]),
        "scrub_guidance": guidance(record, step - 1),
        "scrub_note": (f"After {step_word(record.request)} {step} of "
                       f"{record.steps} (timestep "
                       f"{record.trace.timesteps[step - 1]:g}, noise level σ = "
                       f"{record.trace.noise_levels[step - 1]:.3g})."),
    }


def scrubber_after_run(record: RunRecord | None) -> dict[str, object]:
    """After a run, finished or stopped: the scrubber spans the steps it made and stands at the
    last, with that step's views, and the word maps' range ends there. Without a run that made
    steps, nothing changes."""
    if record is None or not record.steps:
        return {name: gr.skip() for name in ("scrubber", "last_step", *SCRUB_OUTPUTS)}
    return {"scrubber": gr.Slider(maximum=record.steps, value=record.steps),
            "last_step": gr.Number(record.steps)} | scrub(record, record.steps)


def decode_step(models: Models, record: RunRecord | None, step: float | None, exact: bool
                ) -> np.ndarray | None:
    """The full VAE's image of the latent after step ``step``, whichever preview the run drew
    with (the slow, exact view of a step)."""
    if record is None or not record.steps:
        return None
    step = min(max(int(step or 0), 0), record.steps)
    return diffusion.vae_image(models.generation_vae(exact), record.trace.latents[step][None])


def output_image(label: str, **options: object) -> gr.Image:
    """A picture the app draws: no upload, webcam or clipboard buttons on it."""
    return gr.Image(label=label, format="png", interactive=False, **options)


class StepsSection:
    """The finished run's components, under the live views, and their events."""

    def __init__(self, models: Models, record: gr.State, exact: gr.Checkbox) -> None:
        self.models = models
        self.outputs = {
            "channels": output_image("The latent channels"),
            "final": output_image("The image (VAE decoder)", elem_id="final-image"),
            "strip": output_image("Chosen steps: the clean image predicted at each"),
            "guidance": output_image("Guidance at the last step: the two noise predictions "
                                     "and their difference"),
        }
        with gr.Group(elem_classes="word-maps"):
            self.outputs["word_maps"] = output_image(
                "Where each word is looked at (cross-attention, summed over layers and steps)",
                elem_id="word-maps")
            with gr.Row():
                first_step = gr.Number(1, precision=0, label="From step", minimum=1)
                # the run's last step once there is one (the start value only bounds the box)
                last_step = gr.Number(1, precision=0, label="To step", minimum=1,
                                      elem_id="word-maps-last")
                resolution = gr.Radio(["latent grid", "16 x 16"], value="latent grid",
                                      label="Resolution")
        with gr.Accordion("Every step", open=True):
            # its range is the run's once there is one; until then, the most any run can make
            scrubber = gr.Slider(0, 2 * MAX_EVALUATIONS, value=0, step=1,
                                 label="Step (0: the start noise)",
                                 elem_id="step-scrubber")
            scrub_out = {"scrub_note": gr.Markdown()}
            with gr.Row():
                scrub_out["scrub_latent"] = output_image("Latent")
                scrub_out["scrub_x0"] = output_image("Predicted x0")
                decoded = output_image("Decoded by the full VAE")
            scrub_out["scrub_guidance"] = output_image("Guidance at this step")
            decode = gr.Button("Decode this step with the full VAE (exact, whichever Preview)")
        self.outputs["downloads"] = gr.File(
            label="Downloads: the image (PNG with its settings), the latents of every step "
            "(.safetensors)", file_count="multiple", interactive=False)
        self.follow = scrub_out | {"scrubber": scrubber, "last_step": last_step}

        def show_step(run_record, step):
            yield from send([scrub(run_record, step)], scrub_out)

        def show_word_maps(run_record, first_step, last_step, resolution):
            views = {"word_maps": word_maps(run_record, first_step, last_step, resolution)}
            yield from send([views], self.outputs)

        scrubber.change(show_step, [record, scrubber], list(scrub_out.values()),
                        api_name="scrub", show_progress="hidden")
        decode.click(lambda run_record, step, is_exact: decode_step(models, run_record, step,
                                                                     is_exact),
                     [record, scrubber, exact], decoded, api_name="decode_step",
                     concurrency_id="generate", concurrency_limit=1)
        gr.on([first_step.change, last_step.change, resolution.change], show_word_maps,
              [record, first_step, last_step, resolution], self.outputs["word_maps"],
              api_name="word_maps")

    def follow_run(self, run_record: RunRecord | None):
        """After a run, or an example shown: the scrubber over its steps (see
        scrubber_after_run)."""
        yield from send([scrubber_after_run(run_record)], self.follow)
