"""DPM-Solver++ 2M: a second-order multistep solver of the diffusion ODE in log-SNR time.

Lu, Zhou, Bao, Chen, Li and Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022), Algorithm 2 ("2M": second order, multistep, data prediction).

What it changes from DDPM (see ddpm.py). Write the noisy latent as x_t = alpha_t x_0 + s_t eps with
alpha_t = sqrt(abar_t) and s_t = sqrt(1 - abar_t) (so sigma = s_t / alpha_t), and measure time by

    lambda_t = log(alpha_t / s_t) = -log sigma_t          (half the log signal-to-noise ratio)

The probability-flow ODE is then linear in x plus a term in the model's clean-latent prediction
x0_hat = (x_t - s_t eps_theta) / alpha_t, and the linear part integrates exactly (eq. 9):

    x_t = (s_t / s_s) x_s  +  s_t * integral from lambda_s to lambda_t of e^lambda x0_hat dlambda

With h = lambda_t - lambda_s and x0_hat held constant over the step this is the first-order step,
which is DDIM (eta = 0) written in lambda:

    x_t = (s_t / s_s) x_s  -  alpha_t (e^{-h} - 1) x0_hat_s

The second-order multistep ("2M") step reuses the previous step's prediction instead of a second
model call: with h_0 the previous step's length and r_0 = h_0 / h, x0_hat is extrapolated
linearly in lambda, D0 = x0_hat_s, D1 = (x0_hat_s - x0_hat_prev) / r_0, and

    x_t = (s_t / s_s) x_s  -  alpha_t (e^{-h} - 1) D0  -  0.5 alpha_t (e^{-h} - 1) D1

The first step has no previous prediction and the last one (to sigma = 0, where lambda is
infinite) is first order: it lands on x0_hat. These are diffusers' defaults (``solver_order=2``,
``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``, ``lower_order_final``,
``final_sigmas_type="zero"``). With Karras sigmas the n noise levels are Karras' spacing of the
whole trained range, and the UNet gets each one's timestep rounded to an integer.

State: ``model_outputs`` (the previous and current x0_hat), ``lower_order_nums`` (how many steps
have been taken, up to 2) and ``step_index``; ``set_timesteps`` clears them.
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
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)


def alpha_and_std(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the noise-to-signal ratio sigma back to x_t = alpha_t x_0 + s_t eps:
    alpha_t = 1 / sqrt(sigma^2 + 1), s_t = sigma alpha_t."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class DPMSolverMultistepScheduler(SigmaScheduler):
    default_spacing = "linspace"
    timestep_dtype = torch.int64

    def _reset(self) -> None:
        super()._reset()
        self.model_outputs: list[torch.Tensor | None] = [None, None]  # x0_hat: previous, current
        self.lower_order_nums = 0

    def _make_timesteps(self, n: int) -> torch.Tensor:
        c = self.config
        T = c.num_train_timesteps
        if c.timestep_spacing == "trailing":
            return spaced_timesteps("trailing", n, T, c.steps_offset)
        # n + 1 points from T-1 (or the leading start) down to 0, without the final 0
        return spaced_timesteps(c.timestep_spacing, n + 1, T, c.steps_offset)[:-1]

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float32, increasing
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(),
                                   len(timesteps))
            timesteps = sigma_to_timestep(sigmas, train_sigmas.log()).round()
        else:
            if (timesteps[1:] >= timesteps[:-1]).any():
                raise ValueError(
                    f"{len(timesteps)} steps with {self.config.timestep_spacing!r} spacing repeat "
                    "a timestep, which gives a DPM-Solver++ step of length 0: use fewer steps")
            sigmas = interpolate_sigmas(train_sigmas, timesteps)
        self.timesteps = timesteps.long()
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]).float()

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One DPM-Solver++ 2M step. Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        x0 = (sample - std_s * model_output) / alpha_s  # the data prediction at this step
        self.model_outputs = [self.model_outputs[1], x0]

        first_order = self.lower_order_nums < 1 or i == len(self.timesteps) - 1
        x = sample.float()  # the update is done in float32 whatever the model's dtype
        if first_order:
            prev_sample = self._first_order(x, i, x0)
        else:
            prev_sample = self._second_order(x, i, self.model_outputs)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.step_index = i + 1
        return StepOutput(prev_sample.to(model_output.dtype), x0)

    def _lambda(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha, s and lambda = log(alpha / s) of ``sigmas[i]``."""
        alpha, std = alpha_and_std(self.sigmas[i])
        return alpha, std, torch.log(alpha) - torch.log(std)

    def _first_order(self, x: torch.Tensor, i: int, x0: torch.Tensor) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s, lambda_s = self._lambda(i)
        h = lambda_t - lambda_s
        return (std_t / std_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _second_order(self, x: torch.Tensor, i: int,
                      x0s: list[torch.Tensor | None]) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s0, lambda_s0 = self._lambda(i)
        _, _, lambda_s1 = self._lambda(i - 1)
        m0, m1 = x0s[1], x0s[0]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)  # x0_hat and its slope in lambda (times h)
        return ((std_t / std_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor | int) -> torch.Tensor:
        """alpha x_0 + s noise at the noise level of each timestep's position in the run."""
        t = torch.as_tensor(timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        alpha, std = alpha_and_std(batch_view(sigmas[self._sigma_indices(t)], original_samples))
        return alpha * original_samples + std * noise
