"""The UNet as a denoiser of a given image: equal to the same computation written out with
diffusers' AutoencoderKL, UNet2DConditionModel and DDPMScheduler.add_noise; stopping; bad input."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from sd_parts.pipeline import StableDiffusionPipeline, load_pipeline
from tests.helpers.references import save_tiny_pipeline

SIZE = 32  # pixels; the tiny VAE halves it once, so the latent is 16 x 16
PROMPTS = ["a photograph of an astronaut riding a horse", "a bowl of fruit", ""]
TIMESTEPS = [0, 250, 999]
@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, StableDiffusionPipeline]:
    """diffusers' tiny SD v1 pipeline, and ours loaded from the files it writes."""
    folder: Path = tmp_path_factory.mktemp("tiny_sd_loss")
    reference = save_tiny_pipeline(folder, "DDPMScheduler")
    return reference, load_pipeline(str(folder))


def image(seed: int = 5) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def reference_losses(reference, picture: torch.Tensor, seed: int, shift: float = 0.0):
    """The computation written out with diffusers' parts."""
    with torch.no_grad():
        vae, unet, scheduler = reference.vae, reference.unet, reference.scheduler
        latents = (vae.encode(picture * 2 - 1).latent_dist.mean - shift) \
            * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        context = reference.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        losses = torch.empty(len(PROMPTS), len(TIMESTEPS))
        for j, t in enumerate(TIMESTEPS):
            noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
            for i in range(len(PROMPTS)):
                eps = unet(noisy, t, encoder_hidden_states=context[i:i + 1]).sample
                losses[i, j] = torch.nn.functional.mse_loss(eps, noise)
    return losses


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_matches_diffusers(pipes, shift):
    """With a VAE whose latents are shifted (SD3's and FLUX's kind), the shift is taken off."""
    reference, pipe = pipes
    if shift:
        pipe = copy.copy(pipe)
        pipe.vae = copy.copy(pipe.vae)
        pipe.vae.config = dataclasses.replace(pipe.vae.config, shift_factor=shift)
    picture = image()
    done = []
    losses = pipe.denoising_loss(picture, PROMPTS, TIMESTEPS,
                                 generator=torch.Generator().manual_seed(7),
                                 callback=lambda i, n: done.append((i, n)))
    assert losses.shape == (3, 3) and losses.dtype == torch.float32
    torch.testing.assert_close(losses, reference_losses(reference, picture, 7, shift),
                               rtol=1e-4, atol=1e-6)
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert not torch.allclose(losses[0], losses[1])  # the prompt changes the prediction


def test_stopping_leaves_nan(pipes):
    _, pipe = pipes
    losses = pipe.denoising_loss(image(), PROMPTS[:2], TIMESTEPS, callback=lambda i, n: i < 2,
                                 generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(losses[:, :2]).all() and torch.isnan(losses[:, 2]).all()
    assert pipe.denoising_loss(image(), PROMPTS[0], torch.tensor([10])).shape == (1, 1)


@pytest.mark.parametrize("arguments, message", [
    (dict(prompts=[]), "at least one prompt"),
    (dict(timesteps=[]), "at least one timestep"),
    (dict(timesteps=[1000]), r"whole numbers in \[0, 1000\); got 1000"),
    (dict(timesteps=[-1]), r"got -1"),
    (dict(timesteps=[2.5]), r"got 2.5"),
    (dict(timesteps=torch.zeros(2, 2, dtype=torch.long)), "a tensor of shape"),
    (dict(image=torch.rand(2, 3, SIZE, SIZE)), r"\(1, 3, H, W\) .* got \(2, 3, 32, 32\)"),
    (dict(image=torch.rand(1, 3, SIZE + 1, SIZE)), "multiples of 2"),
    (dict(image=torch.full((1, 3, SIZE, SIZE), 1.5)), r"in \[0, 1\]"),
    (dict(image=torch.full((1, 3, SIZE, SIZE), math.nan)), "finite"),
])
def test_bad_arguments_are_refused(pipes, arguments, message):
    _, pipe = pipes
    call = dict(image=image(), prompts=PROMPTS, timesteps=TIMESTEPS) | arguments
    with pytest.raises(ValueError, match=message):
        pipe.denoising_loss(**call)
