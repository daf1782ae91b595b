"""The forward process, in the generation tab: an image's latent noised to any timestep t, and
what one UNet call thinks the image was.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020): training noises a clean latent in
one jump, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and teaches the UNet to find eps. No
sampler is involved, only the schedule's abar_t.
"""

from __future__ import annotations

import gradio as gr
import numpy as np
import torch

import sd_parts
from ui.encoding import EXAMPLE_IMAGES, MAX_PIXELS
from ui.loading import ModelUnavailable
from ui.models import Models
from ui.shared import REFUSED, PictureFiles, failure, literal
from viz import diffusion, pixels, upload


def forward_noise(models: Models, path: str | None, t: float, seed: float, ask_unet: bool,
                  exact: bool) -> dict[str, object]:
    """The image's latent noised to timestep ``t`` (0 = clean) and decoded; with ``ask_unet``
    the x0 that one UNet call (empty prompt) predicts from it."""
    names = ("forward_status", "forward_noisy", "forward_schedule", "forward_x0")
    if not path:
        return failure(names, "forward_status", "Choose an image first.")
    if seed is None or not np.isfinite(seed) or seed != int(seed) or not 0 <= seed < 2**63:
        return failure(names, "forward_status",
                       "The noise seed must be a whole number from 0 to 2^63 - 1.")
    try:
        vae = models.generation_vae(exact)
        schedule = sd_parts.load_scheduler(models.scheduler_config(), kind="ddpm")
        image = upload.load_image(path, MAX_PIXELS)
    except REFUSED as exc:
        return failure(names, "forward_status", str(exc))
    t = int(min(max(t or 0, 0), 1000))
    device = next(vae.parameters()).device
    fitted, _ = pixels.fit_for_vae(image, models.settings.generate_size, vae.downscale)
    scaling = vae.config.scaling_factor
    latent = vae.encode(pixels.image_to_tensor(fitted).to(device)).mean * scaling
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(seed)))
    noise = noise.to(device)
    x_t = diffusion.forward_noise(latent, noise, schedule.alphas_cumprod, t)
    views = {
        "forward_status": ("t = 0: the clean latent, decoded (the VAE's reconstruction)."
                           if t == 0 else
                           f"t = {t}: x_t keeps {schedule_signal(schedule.alphas_cumprod, t)} "
                           "of the image's latent; the rest is noise."),
        "forward_noisy": diffusion.vae_image(vae, x_t),
        "forward_schedule": diffusion.schedule_figure(schedule.alphas_cumprod, t),
        "forward_x0": None,
    }
    if ask_unet and t > 0:
        try:
            pipe = models.pipeline(exact)
        except ModelUnavailable as exc:
            return views | {"forward_status": literal(str(exc))}
        context = pipe.encode_prompt([""])
        eps = pipe.unet(x_t, t - 1, context)
        x0 = diffusion.predicted_original(x_t, eps, schedule.alphas_cumprod, t)
        views["forward_x0"] = diffusion.vae_image(vae, x0)
    return views


def schedule_signal(alphas_cumprod: torch.Tensor, t: int) -> str:
    share = 1.0 if t == 0 else float(alphas_cumprod[t - 1].sqrt())
    return f"sqrt(ᾱ) = {share:.3f}"


def build(models: Models, exact: gr.Checkbox) -> None:
    """The section's layout and events, inside the generation tab's ``gr.Blocks``."""
    with gr.Accordion("The forward process: noise added to an image, and the UNet's guess",
                      open=False):
        gr.Markdown("Training noises a clean latent x_0 to any timestep t in one jump, "
                    "x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, and teaches the UNet to find ε. "
                    "t = 0 is the clean latent; t = 1 … 1000 are the training steps "
                    "(diffusers numbers them 0 … 999).")
        with gr.Row():
            with gr.Column(scale=1):
                # a File, as in the image tab: its examples are served without naming a path
                forward_image = gr.File(label="Image", file_types=upload.accepted_file_types())
                gr.Examples(EXAMPLE_IMAGES, inputs=forward_image, label="Examples")
                t_slider = gr.Slider(0, 1000, value=500, step=1, label="Timestep t")
                forward_seed = gr.Number(0, precision=0, label="Noise seed")
                ask_unet = gr.Checkbox(True, label="Ask the UNet what the image was")
                forward_button = gr.Button("Add noise")
            with gr.Column(scale=2):
                fwd = {"forward_status": gr.Markdown()}
                with gr.Row():
                    fwd["forward_noisy"] = gr.Image(label="x_t, decoded", format="png")
                    fwd["forward_x0"] = gr.Image(label="The UNet's x0 from x_t", format="png")
                fwd["forward_schedule"] = gr.Image(label="The schedule, t marked", format="png")

    def noise_image(image, timestep, seed, ask_unet, exact):
        files = PictureFiles()
        views = forward_noise(models, image, timestep, seed, ask_unet, bool(exact))
        return files.answer({fwd[k]: v for k, v in views.items()})

    gr.on([forward_button.click, t_slider.release], noise_image,
          [forward_image, t_slider, forward_seed, ask_unet, exact], list(fwd.values()),
          api_name="forward_noise", concurrency_id="generate", concurrency_limit=1)
