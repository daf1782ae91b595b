"""Euler and Euler ancestral: the probability-flow ODE in sigma space, one step per noise level.

Karras, Aittala, Aila and Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (2022), Algorithm 1 without its noise injection ("churn"), as diffusers' default; the
ancestral variant is k-diffusion's ``sample_euler_ancestral`` (Crowson, 2022).

What it changes from DDPM (see ddpm.py). Divide x_t by sqrt(abar_t) and the forward process reads

    x = x_0 + sigma eps,     sigma = sqrt((1 - abar_t) / abar_t)

a "variance exploding" process whose only parameter is the noise level sigma. Sampling follows the
ODE whose solution has the same marginals at every sigma (eq. 3 with sigma(t) = t):

    dx/dsigma = (x - x0_hat(x, sigma)) / sigma  = eps_theta
    x0_hat    = x - sigma eps_theta

and an Euler step from sigma_i to sigma_{i+1} is x <- x + (sigma_{i+1} - sigma_i) dx/dsigma. No
noise is added: deterministic, first order. The last noise level is 0, so the last step lands on
x0_hat itself.

Euler ancestral ("Euler a") splits each step into a deterministic step down to sigma_down and fresh
noise back up to sigma_{i+1}, so that a step from sigma to sigma' is DDPM's posterior draw:

    sigma_up   = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)     (the posterior's std)
    sigma_down = sqrt(sigma'^2 - sigma_up^2)
    x <- x + (sigma_down - sigma) dx/dsigma + sigma_up z,    z ~ N(0, I)

The noise forgets part of the past at every step: the image keeps changing with the step count
and never converges to one picture as Euler does.

The UNet was trained on x_t = sqrt(abar_t) x, so its input is scaled by
sqrt(abar_t) = 1 / sqrt(sigma^2 + 1) (``scale_model_input``), and the starting noise has standard
deviation sigma_max (sqrt(sigma_max^2 + 1) with "leading" spacing, a diffusers convention).
Timesteps can be fractional: with "linspace" spacing sigma is interpolated linearly between
training timesteps; with re-spaced sigmas (Karras, exponential, beta: sigmas.py) each sigma gets
the timestep where log sigma lies between two training ones. The UNet gets the fractional t.

State: ``step_index``, the position in ``sigmas``, set by the first ``scale_model_input`` or
``step`` call (from the timestep, or ``begin_at``) and advanced by each step.
"""

from __future__ import annotations

import torch

from .schedule import (
    Generator,
    SigmaScheduler,
    StepOutput,
    batch_view,
    random_normal,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .sigmas import (
    SIGMA_SCHEDULES,
    interpolate_sigmas,
    np_linspace,
    respace_sigmas,
    sigma_to_timestep,
)


class KDiffusionScheduler(SigmaScheduler):
    """What the samplers written after k-diffusion share (Euler, Euler a, LMS, Heun, DPM2): they
    walk x = x_0 + sigma eps from sigma_max down to 0, so the UNet's input is x / sqrt(sigma^2 + 1)
    and the forward process is x_0 + sigma noise. The n noise levels are those of the spaced
    timesteps, or their range re-spaced."""

    default_spacing = "linspace"
    sigma_schedules = SIGMA_SCHEDULES

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max().item()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def _make_timesteps(self, n: int) -> torch.Tensor:
        c = self.config
        if c.timestep_spacing == "linspace":
            # fractional timesteps, rounded to float32 as diffusers makes them
            return np_linspace(0, c.num_train_timesteps - 1, n).float().flip(0).double()
        return spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)

    def _noise_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The n noise levels (float64) of the spaced timesteps and the timesteps they are at:
        the same timesteps, or with a sigma schedule the fractional timesteps of the re-spaced
        levels, which span the same range."""
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float32
        sigmas = interpolate_sigmas(train_sigmas, timesteps)
        schedule = self.config.sigma_schedule
        if schedule is not None:
            sigmas = respace_sigmas(schedule, sigmas[-1].item(), sigmas[0].item(), len(timesteps))
            timesteps = sigma_to_timestep(sigmas, train_sigmas.log())
        return sigmas, timesteps

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        sigmas, timesteps = self._noise_levels(timesteps)
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()

    def scale_model_input(self, sample: torch.Tensor,
                          timestep: torch.Tensor | float) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1) = sqrt(abar_t) x, the variable the UNet was trained on."""
        sigma = self.sigmas[self._init_step_index(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor | float) -> torch.Tensor:
        """x_0 + sigma noise: the forward process in this sampler's (unscaled) variable."""
        t = torch.as_tensor(timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        sigma = sigmas[self._sigma_indices(t)]
        return original_samples + noise * batch_view(sigma, original_samples)


class EulerDiscreteScheduler(KDiffusionScheduler):
    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One Euler step from sigma_i to sigma_{i+1}. Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.float()  # the update is done in float32 whatever the model's dtype
        x0 = x - sigma * model_output
        derivative = (x - x0) / sigma  # dx/dsigma
        prev_sample = (x + derivative * (sigma_next - sigma)).to(model_output.dtype)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)


class EulerAncestralDiscreteScheduler(KDiffusionScheduler):
    sigma_schedules = ()  # diffusers' EulerAncestralDiscreteScheduler walks the spaced levels only

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """An Euler step down to sigma_down, then noise z from ``generator`` up to sigma_{i+1}
        (drawn at every step, also the last, where sigma_up = 0, as diffusers draws)."""
        i = self._step_position(model_output, timestep, sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.float()
        x0 = x - sigma * model_output
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        prev_sample = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = random_normal(model_output.shape, generator, model_output.device,
                              model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)
