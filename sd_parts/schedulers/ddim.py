"""DDIM: the DDPM model sampled by a non-Markovian process, deterministic with eta = 0.

Song, Meng and Ermon, "Denoising Diffusion Implicit Models" (2021).

What it changes from DDPM (see ddpm.py). The same x0_hat and eps_theta, but the step from t to t'
is chosen so that every x_t' still has the marginal q(x_t' | x_0) of training, whatever the noise
added (eq. 12):

    x_t' = sqrt(abar_t') x0_hat  +  sqrt(1 - abar_t' - s^2) eps_theta  +  s z,     z ~ N(0, I)
    s    = eta * sqrt( (1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t') )     (eq. 16)

Read it as: put the predicted clean latent back at the noise level of t', pointing the same noise
direction eps_theta. eta = 1 gives DDPM's variance (an ancestral sampler again); eta = 0 adds no
noise, so the whole run is a deterministic map from the starting noise to the image (and can be
inverted), and it stays good with 20-50 steps instead of 1000.

The jump t -> t' is t' = t - T // n, as in diffusers and the DDIM code: that is the next timestep
for "leading" spacing but not always for "trailing" and "linspace", whose timesteps are not
exactly T // n apart. After t' < 0 comes abar = abar_0 (``set_alpha_to_one=False``, SD's
setting) or 1.

State: none besides the timesteps. ``eta`` is fixed when the sampler is made.
"""

from __future__ import annotations

import torch

from .schedule import Generator, Scheduler, SchedulerConfig, StepOutput, random_normal


class DDIMScheduler(Scheduler):
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig = SchedulerConfig(), eta: float = 0.0):
        super().__init__(config)
        if not 0 <= eta <= 1:  # also refuses NaN
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), "
                             f"got {eta!r}")
        self.eta = float(eta)
        # abar after the final step: 1 = fully clean; SD v1 uses abar_0
        self.final_alpha_cumprod = (torch.tensor(1.0) if config.set_alpha_to_one
                                    else self.alphas_cumprod[0])

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """x_t -> x_t' by eq. 12; with eta > 0 the noise z is drawn from ``generator``."""
        n = self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        self._check_timestep_range(torch.as_tensor(timestep))
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // n
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0 = (sample - (1 - abar_t) ** 0.5 * model_output) / abar_t**0.5
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        # eq. 16: the DDPM posterior variance of the jump t -> t', scaled by eta
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        std = self.eta * variance**0.5
        direction = (1 - abar_prev - std**2) ** 0.5 * model_output  # "pointing to x_t"
        prev_sample = abar_prev**0.5 * x0 + direction
        if self.eta > 0:
            noise = random_normal(model_output.shape, generator, model_output.device,
                                  model_output.dtype)
            prev_sample = prev_sample + std * noise
        return StepOutput(prev_sample, x0)
