"""Heun and DPM2 (with its ancestral variant): second-order steps that call the UNet twice.

Karras et al. (2022), Algorithm 1 (Heun's method, deterministic); DPM2 is k-diffusion's
``sample_dpm_2`` (Crowson, 2022), the midpoint rule of Lu et al.'s DPM-Solver-2 written in sigma,
and ``sample_dpm_2_ancestral`` its ancestral form. As diffusers' Heun/KDPM2(Ancestral)Discrete.

What they change from Euler (see euler.py). Euler's slope d(x_i, sigma_i) is taken at the start of
the step only. A second-order method evaluates the model again inside the step:

  Heun     Euler to sigma_{i+1} gives x'; the step is redone from x_i with the average slope,
               x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d(x_i, sigma_i) + d(x', sigma_{i+1})) / 2
  DPM2     Euler to the geometric midpoint sigma_mid = sqrt(sigma_i sigma_{i+1}) gives x'; the
           step is redone from x_i with the midpoint's slope,
               x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x', sigma_mid)
  DPM2 a   as DPM2, but to sigma_down and then fresh noise up to sigma_{i+1}, the split of
           Euler a (see euler.py); the midpoint is sqrt(sigma_i sigma_down)

Both evaluations are listed in ``timesteps`` (diffusers' ``order = 2``), so the pipeline's loop
runs unchanged and calls the UNet once per entry: [t_0, t_1', t_1, t_2', t_2, ...] with t' the
second evaluation of each step (Heun: t_{i+1} itself; DPM2: the midpoint's fractional
timestep). The last step, to sigma = 0, has no second evaluation (the slope at 0 is undefined)
and lands on x0_hat: n steps make 2n - 1 UNet calls.

State: the step's start (``sample``), and for Heun its first slope and length, between the two
halves; ``step_index``.
"""

from __future__ import annotations

import torch

from .euler import KDiffusionScheduler
from .schedule import Generator, StepOutput, random_normal, sigmas_from_alphas_cumprod
from .sigmas import sigma_to_timestep


def doubled(values: torch.Tensor) -> torch.Tensor:
    """[v0, v1, v2, ..., vn] -> [v0, v1, v1, v2, v2, ..., vn, vn, vn]: one entry per timestep of
    a two-evaluation run (DPM2 keeps one spare at the end, as diffusers)."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


class HeunDiscreteScheduler(KDiffusionScheduler):
    order = 2

    def _reset(self) -> None:
        super()._reset()
        self.sample: torch.Tensor | None = None  # x_i, while the step is half done
        self.prev_derivative: torch.Tensor | None = None
        self.dt: torch.Tensor | None = None

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        sigmas, timesteps = self._noise_levels(timesteps)
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()
        # each inner level twice: the end of one step and the start of the next
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).float()

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """The Euler half of a step, or the correction with the average slope. Deterministic:
        ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        sigma = self.sigmas[i]  # where the model was run: the start, or the end of the step
        x0 = sample - sigma * model_output
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        derivative = (sample - x0) / sigma
        if self.dt is None:  # the first half
            self.sample, self.prev_derivative = sample, derivative
            self.dt = self.sigmas[i + 1] - self.sigmas[i]
            prev_sample = sample + derivative * self.dt
        else:
            average = (self.prev_derivative + derivative) / 2
            prev_sample = self.sample + average * self.dt
            self.sample = self.prev_derivative = self.dt = None
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)


class KDPM2DiscreteScheduler(KDiffusionScheduler):
    order = 2

    def _reset(self) -> None:
        super()._reset()
        self.sample: torch.Tensor | None = None  # x_i, while the step is half done

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        sigmas, timesteps = self._noise_levels(timesteps)
        if self.config.sigma_schedule == "karras":
            timesteps = timesteps.round()  # diffusers rounds DPM2's Karras timesteps only
        elif self.config.sigma_schedule is None:
            timesteps = timesteps.float()
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()
        # midpoints sqrt(sigma_i sigma_{i-1}), taken in log space; the first is not used
        midpoints = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
        self._set_pairs(sigmas, midpoints, timesteps, midpoints[1:-1])

    def _set_pairs(self, sigmas: torch.Tensor, midpoints: torch.Tensor, timesteps: torch.Tensor,
                   used_midpoints: torch.Tensor) -> None:
        """Store the levels per timestep and interleave each step's midpoint timestep."""
        self.sigmas, self.sigmas_interpol = doubled(sigmas), doubled(midpoints)
        log_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod).log()
        midpoint_timesteps = sigma_to_timestep(used_midpoints, log_sigmas).to(timesteps.dtype)
        pairs = torch.stack([midpoint_timesteps, timesteps[1:]], dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], pairs])

    def scale_model_input(self, sample: torch.Tensor,
                          timestep: torch.Tensor | float) -> torch.Tensor:
        i = self._init_step_index(timestep)
        sigma = self.sigmas[i] if self.sample is None else self._midpoint(i)
        return sample / (sigma**2 + 1) ** 0.5

    def _midpoint(self, i: int) -> torch.Tensor:
        """The midpoint level of the step whose second evaluation is at position i."""
        return self.sigmas_interpol[i]

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """The Euler half to the midpoint, or the full step with the midpoint's slope.
        Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        if self.sample is None:
            sigma = self.sigmas[i]
            x0 = sample - sigma * model_output
            self.sample = sample
            prev_sample = sample + (sample - x0) / sigma * (self.sigmas_interpol[i + 1] - sigma)
        else:
            sigma, midpoint = self.sigmas[i - 1], self.sigmas_interpol[i]
            x0 = sample - midpoint * model_output
            prev_sample = self.sample + (sample - x0) / midpoint * (self.sigmas[i] - sigma)
            self.sample = None
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        sigmas, timesteps = self._noise_levels(timesteps)
        if self.config.sigma_schedule == "karras":
            timesteps = timesteps.round()
        elif self.config.sigma_schedule is None:
            timesteps = timesteps.float()
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()
        nexts = sigmas.roll(-1)
        nexts[-1] = 0.0
        # the split of each step into a deterministic part (down) and fresh noise (up)
        ups = (nexts**2 * (sigmas**2 - nexts**2) / sigmas**2) ** 0.5
        downs = (nexts**2 - ups**2) ** 0.5
        downs[-1] = 0.0
        midpoints = sigmas.log().lerp(downs.log(), 0.5).exp()  # sqrt(sigma_i sigma_down_i)
        midpoints[-2:] = 0.0  # the last step goes straight to 0
        self.sigmas_up, self.sigmas_down = doubled(ups), doubled(downs)
        self._set_pairs(sigmas, midpoints, timesteps, midpoints[:-2])

    def _midpoint(self, i: int) -> torch.Tensor:
        return self.sigmas_interpol[i - 1]

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """The Euler half to the midpoint, or the step to sigma_down with the midpoint's slope
        plus noise from ``generator`` up to sigma_{i+1} (drawn in the second halves only)."""
        i = self._step_position(model_output, timestep, sample)
        if self.sample is None:
            sigma, midpoint = self.sigmas[i], self.sigmas_interpol[i]
            x0 = sample - sigma * model_output
            self.sample = sample
            prev_sample = sample + (sample - x0) / sigma * (midpoint - sigma)
        else:
            sigma, midpoint = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            x0 = sample - midpoint * model_output
            step_down = self.sigmas_down[i - 1] - sigma
            prev_sample = self.sample + (sample - x0) / midpoint * step_down
            self.sample = None
            noise = random_normal(model_output.shape, generator, model_output.device,
                                  model_output.dtype)
            prev_sample = prev_sample + noise * self.sigmas_up[i - 1]
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)
