"""LCM and TCD: samplers for consistency-distilled UNets, which jump to x_0 in one evaluation.

Luo, Tan, Huang, Li and Zhao, "Latent Consistency Models: Synthesizing High-Resolution Images
with Few-Step Inference" (2023), Algorithm 1 (multistep consistency sampling); Zheng, Yang, Zhao,
Wu, Liang and Xu, "Trajectory Consistency Distillation" (2024), its strategic stochastic sampling.

What they change from DDPM (see ddpm.py). A consistency model f(x_t, t) is distilled so that every
point of one ODE trajectory maps to the same x_0. It is parametrised on top of the UNet's x0_hat
with a boundary condition that makes f(x, t) = x at t = 0:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat,   with s = t * timestep_scaling (10), sigma_d = 0.5
    c_skip = sigma_d^2 / (s^2 + sigma_d^2),         c_out = s / sqrt(s^2 + sigma_d^2)

(c_skip is below 1e-5 from t = 19 on, so f is x0_hat in practice.) LCM samples in a few steps by
denoising to x_0 and noising back to the next timestep with fresh noise, as the forward process
(add_noise) would, so every step is a new draw:

    x_t' = sqrt(abar_t') f(x_t, t) + sqrt(1 - abar_t') z,   z ~ N(0, I);    the last step: f

TCD goes only part of the way back: with gamma (``eta``, 0.3) in [0, 1] it predicts the point at
s = floor((1 - gamma) t') on the trajectory, x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_theta,
and noises that to t' (for gamma = 0 it is DDIM; for gamma = 1 LCM without the boundary term):

    x_t' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z;   the last step: x_s

Timesteps: the distillation used ``original_inference_steps`` (50) evenly spaced timesteps
19, 39, ..., 999; a run of n <= 50 steps takes n of them, evenly spread from 999 down, so 4 steps
are 999, 759, 499, 259. ``timestep_spacing`` does not apply.

A plain UNet can be sampled this way too (the steps are DDIM-like), but it was not trained to
predict x_0 from few steps: the images are blurry. The pipeline runs these samplers with
ordinary guidance on a plain UNet, and with guidance embedded in the timestep on a distilled one.

State: ``step_index``.
"""

from __future__ import annotations

import torch

from .schedule import (
    Generator,
    SchedulerConfig,
    SigmaScheduler,
    StepOutput,
    random_normal,
    sigmas_from_alphas_cumprod,
)
from .sigmas import np_linspace

SIGMA_DATA = 0.5  # the data's standard deviation in the boundary condition (as in EDM)


class LCMScheduler(SigmaScheduler):
    spacings = ()  # the distillation's timesteps, whatever timestep_spacing says
    timestep_dtype = torch.int64

    def _make_timesteps(self, n: int) -> torch.Tensor:
        c = self.config
        original = c.original_inference_steps
        if n > original:
            raise ValueError(f"{type(self).__name__} takes at most original_inference_steps "
                             f"({original}) steps, the timesteps the model was distilled on; "
                             f"got {n}")
        k = c.num_train_timesteps // original
        distilled = torch.arange(original, 0, -1, dtype=torch.float64) * k - 1  # 999, ..., 19
        # n of them, evenly spread from the noisiest (numpy's linspace without its endpoint)
        picks = np_linspace(0, original, n + 1)[:-1].floor().long()
        return distilled[picks]

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        self.timesteps = timesteps.long()
        # the noise level at each timestep, and 0 after the last step, which returns x_0
        levels = sigmas_from_alphas_cumprod(self.alphas_cumprod)[self.timesteps]
        self.sigmas = torch.cat([levels, torch.zeros(1)])

    def _neighbours(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
                    sample: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """This step's position, its timestep and the next one (None after the last)."""
        i = self._step_position(model_output, timestep, sample)
        t = self.timesteps[i]
        next_t = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else None
        return i, t, next_t

    def _x0(self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
            clip: bool = True) -> torch.Tensor:
        abar_t = self.alphas_cumprod[t]
        x0 = (sample - (1 - abar_t).sqrt() * model_output) / abar_t.sqrt()
        if clip and self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """f(x_t, t), then noised to the next timestep with z from ``generator`` (every step but
        the last). ``pred_original_sample`` is f(x_t, t), diffusers' ``denoised``."""
        i, t, next_t = self._neighbours(model_output, timestep, sample)
        scaled = t * self.config.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * self._x0(model_output, t, sample) + c_skip * sample
        prev_sample = denoised
        if next_t is not None:
            abar_next = self.alphas_cumprod[next_t]
            noise = random_normal(model_output.shape, generator, model_output.device,
                                  denoised.dtype)
            prev_sample = abar_next.sqrt() * denoised + (1 - abar_next).sqrt() * noise
        self.step_index = i + 1
        return StepOutput(prev_sample, denoised)


class TCDScheduler(LCMScheduler):
    def __init__(self, config: SchedulerConfig = SchedulerConfig(), eta: float = 0.3):
        super().__init__(config)
        if not 0 <= eta <= 1:  # also refuses NaN
            raise ValueError(f"eta (TCD's gamma) must lie in [0, 1] (0: deterministic, 1: all "
                             f"fresh noise), got {eta!r}")
        self.eta = float(eta)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """To the trajectory's point at s = floor((1 - eta) t'), then noised to t' with z from
        ``generator`` (when eta > 0, every step but the last)."""
        i, t, next_t = self._neighbours(model_output, timestep, sample)
        last = next_t is None
        next_t = torch.tensor(0) if last else next_t
        s = torch.floor((1 - self.eta) * next_t).long()  # float32 product, as diffusers
        abar_next, abar_s = self.alphas_cumprod[next_t], self.alphas_cumprod[s]
        x0 = self._x0(model_output, t, sample, clip=False)  # diffusers' TCD never clips
        x_s = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * model_output
        prev_sample = x_s
        if self.eta > 0 and not last:
            noise = random_normal(model_output.shape, generator, model_output.device, x_s.dtype)
            prev_sample = ((abar_next / abar_s).sqrt() * x_s
                           + (1 - abar_next / abar_s).sqrt() * noise)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)
