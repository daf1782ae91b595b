"""Euler: the probability-flow ODE in sigma space, one Euler step per noise level.

Karras, Aittala, Aila and Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (2022), Algorithm 1 without its noise injection ("churn"), as diffusers' default.

What it changes from DDPM (see ddpm.py). Divide x_t by sqrt(abar_t) and the forward process reads

    x = x_0 + sigma eps,     sigma = sqrt((1 - abar_t) / abar_t)

a "variance exploding" process whose only parameter is the noise level sigma. Sampling follows the
ODE whose solution has the same marginals at every sigma (eq. 3 with sigma(t) = t):

    dx/dsigma = (x - x0_hat(x, sigma)) / sigma  = eps_theta
    x0_hat    = x - sigma eps_theta

and an Euler step from sigma_i to sigma_{i+1} is x <- x + (sigma_{i+1} - sigma_i) dx/dsigma. No
noise is added: deterministic, first order. The last noise level is 0, so the last step lands on
x0_hat itself.

The UNet was trained on x_t = sqrt(abar_t) x, so its input is scaled by
sqrt(abar_t) = 1 / sqrt(sigma^2 + 1) (``scale_model_input``), and the starting noise has standard
deviation sigma_max (sqrt(sigma_max^2 + 1) with "leading" spacing, a diffusers convention).
Timesteps can be fractional: with "linspace" spacing sigma is interpolated linearly between
training timesteps; with Karras sigmas each sigma gets the timestep where log sigma lies between
two training ones. The UNet gets the fractional t either way.

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
    interpolate_sigmas,
    karras_sigmas,
    np_linspace,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)


class EulerDiscreteScheduler(SigmaScheduler):
    default_spacing = "linspace"

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

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float32
        sigmas = interpolate_sigmas(train_sigmas, timesteps)
        if self.config.use_karras_sigmas:
            # the same range, re-spaced; each sigma gets the fractional timestep it lies at
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), len(timesteps))
            timesteps = sigma_to_timestep(sigmas, train_sigmas.log())
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()

    def scale_model_input(self, sample: torch.Tensor,
                          timestep: torch.Tensor | float) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1) = sqrt(abar_t) x, the variable the UNet was trained on."""
        sigma = self.sigmas[self._init_step_index(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

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

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor | float) -> torch.Tensor:
        """x_0 + sigma noise: the forward process in this sampler's (unscaled) variable."""
        t = torch.as_tensor(timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        sigma = sigmas[self._sigma_indices(t)]
        return original_samples + noise * batch_view(sigma, original_samples)
