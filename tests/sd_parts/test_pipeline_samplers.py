"""The pipeline drives every kind of sampler as diffusers does: two-evaluation steps (Heun, DPM2),
fresh noise from the seed (Euler a, DPM++ SDE, TCD), re-spaced sigmas, image to image part way
down a two-evaluation schedule; and a guidance-distilled UNet as LatentConsistencyModelPipeline."""

from __future__ import annotations

import pytest
import torch

from sd_parts import SAMPLERS
from sd_parts.pipeline import StableDiffusionPipeline, load_pipeline
from tests.helpers.references import save_tiny_pipeline

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 32  # pixels; the tiny VAE halves it once, so the latent is 16 x 16
DIFFUSERS = {"heun": "HeunDiscreteScheduler", "dpm2": "KDPM2DiscreteScheduler",
             "euler_a": "EulerAncestralDiscreteScheduler",
             "dpm++2m_sde": "DPMSolverMultistepScheduler",
             "dpm++3m_sde": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
             "lcm": "LCMScheduler", "tcd": "TCDScheduler"}
@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, StableDiffusionPipeline]:
    import diffusers

    folder = tmp_path_factory.mktemp("tiny_sd")
    save_tiny_pipeline(folder)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return reference, load_pipeline(str(folder))


@pytest.fixture(scope="module")
def lcm_pipes(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, StableDiffusionPipeline]:
    import diffusers

    folder = tmp_path_factory.mktemp("tiny_lcm")
    save_tiny_pipeline(folder, distilled=True)
    reference = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return reference, load_pipeline(str(folder))


def run_reference(pipe_class: type, components: dict, seed: int, **kwargs) -> tuple:
    """diffusers' images and the latents after each of its loop's iterations."""
    steps: list[torch.Tensor] = []

    def keep(pipe, index, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    pipe = pipe_class(**components)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(generator=torch.Generator().manual_seed(seed), output_type="pt",
                  callback_on_step_end=keep, **kwargs).images
    return images, steps


def run_ours(pipe: StableDiffusionPipeline, seed: int, **kwargs) -> tuple:
    steps: list[torch.Tensor] = []
    result = pipe(generator=torch.Generator().manual_seed(seed),
                  callback=lambda i, t, state: steps.append(state.latents.clone()), **kwargs)
    return result.images, steps


def assert_same_run(expected: tuple, actual: tuple, calls: int) -> None:
    images, steps = expected
    our_images, our_steps = actual
    assert len(our_steps) == len(steps) == calls
    for ours, theirs in zip(our_steps, steps, strict=True):
        # float32 rounding grows with the latents' size (a random tiny UNet's reach 20 and more),
        # so each step is compared in units of its own spread
        spread = theirs.std()
        torch.testing.assert_close(ours / spread, theirs / spread, atol=TOL, rtol=TOL)
    torch.testing.assert_close(our_images, images, atol=TOL, rtol=0)


def reference_scheduler(reference: object, kind: str, schedule: str | None) -> object:
    import diffusers

    settings = dict(SAMPLERS[kind].fixed)
    if schedule is not None:
        settings[f"use_{schedule}_sigmas"] = True
    return getattr(diffusers, DIFFUSERS[kind]).from_config(reference.scheduler.config, **settings)


@pytest.mark.parametrize("kind, schedule, eta, n", [
    ("heun", None, None, 4),
    ("heun", "exponential", None, 4),
    ("dpm2", "karras", None, 4),
    ("euler_a", None, None, 4),
    ("dpm++2m_sde", None, None, 4),
    ("dpm++3m_sde", None, None, 6),  # orders 1, 2, 3, 3, 2, 1
    ("tcd", None, 0.3, 4),  # on a plain UNet, with ordinary guidance
])
def test_text_to_image_matches_diffusers(pipes, kind, schedule, eta, n):
    import diffusers

    from sd_parts import unet_evaluations

    reference, ours = pipes
    args = dict(prompt=PROMPT, num_inference_steps=n, guidance_scale=7.5, height=SIZE,
                width=SIZE)
    extra = {} if eta is None else {"eta": eta}  # diffusers' pipeline passes eta=0 otherwise
    components = reference.components | {"scheduler": reference_scheduler(reference, kind,
                                                                          schedule)}
    expected = run_reference(diffusers.StableDiffusionPipeline, components, seed=3, **args,
                             **extra)
    flags = {} if schedule is None else {f"use_{schedule}_sigmas": True}
    actual = run_ours(ours, seed=3, scheduler=kind, **args, **flags, **extra)
    assert_same_run(expected, actual, unet_evaluations(kind, n))


def test_image_to_image_with_two_evaluations_per_step(pipes):
    """Strength 0.6 of 5 Heun steps: 3 steps from timesteps[2 * 2], as diffusers' img2img."""
    import diffusers

    reference, ours = pipes
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    args = dict(prompt=PROMPT, num_inference_steps=5, strength=0.6, guidance_scale=7.5,
                image=image)
    components = reference.components | {"scheduler": reference_scheduler(reference, "heun",
                                                                          None)}
    expected = run_reference(diffusers.StableDiffusionImg2ImgPipeline, components, seed=4,
                             **args)
    assert_same_run(expected, run_ours(ours, seed=4, scheduler="heun", **args), calls=5)


def test_guidance_distilled_unet_matches_latent_consistency_pipeline(lcm_pipes):
    """An LCM: guidance embedded as timestep_cond, one UNet pass per step on the prompt alone."""
    import diffusers

    reference, ours = lcm_pipes
    assert ours.unet.config.time_cond_proj_dim == 16
    args = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=8.5, height=SIZE,
                width=SIZE)
    expected = run_reference(diffusers.LatentConsistencyModelPipeline, reference.components,
                             seed=2, **args)
    calls = []
    unet_forward = ours.unet.forward

    def counting(latents, *rest, **kwargs):
        calls.append((latents.shape[0], kwargs.get("timestep_cond")))
        return unet_forward(latents, *rest, **kwargs)

    ours.unet.forward = counting
    try:
        actual = run_ours(ours, seed=2, scheduler="lcm", **args)
    finally:
        del ours.unet.forward
    assert_same_run(expected, actual, calls=4)
    assert all(batch == 1 and cond.shape == (1, 16) for batch, cond in calls)
    with pytest.raises(ValueError, match="no unconditional prediction"):
        ours(PROMPT, negative_prompt="blurry", num_inference_steps=2, height=SIZE, width=SIZE,
             scheduler="lcm")
