"""What the exponential-integrator solvers share: DPM-Solver++ (multistep and singlestep), UniPC
and DEIS.

They write the noisy latent as x_t = alpha_t x_0 + s_t eps, with alpha_t = sqrt(abar_t) and
s_t = sqrt(1 - abar_t) (so sigma = s_t / alpha_t), and measure time by

    lambda_t = log(alpha_t / s_t) = -log sigma_t        (half the log signal-to-noise ratio)

in which the linear part of the probability-flow ODE integrates exactly; the solvers differ in
how they approximate the rest from the model's past predictions (see each file). What they have
in common is here:

  timesteps  n integer timesteps: "linspace" and "leading" take n + 1 points and drop the last
             (t = 0 or steps_offset), "trailing" n points ending at T // n - 1; re-spaced noise
             levels (Karras, exponential, beta) span the whole trained range, and their
             fractional timesteps are rounded (Karras) or truncated toward zero (exponential,
             beta) to integers, as diffusers does (so sigma_max's 998.99999975 becomes 998).
  final      the noise level after the last step: 0 (the clean end) for DPM-Solver++ and UniPC;
             DEIS stops at sigma_min, or repeats the last re-spaced level.
  history    the model's last ``solver_order`` predictions, and how many steps have been taken
             (``lower_order_nums``), since the first steps have too few for the full order.

A run of n steps with plain spacing may repeat a timestep (n close to T): the step between them
has length 0 and the solvers divide by it, so such runs are refused.
"""

from __future__ import annotations

import torch

from .schedule import (
    SchedulerConfig,
    SigmaScheduler,
    batch_view,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .sigmas import SIGMA_SCHEDULES, interpolate_sigmas, respace_sigmas, sigma_to_timestep


def alpha_and_std(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the noise-to-signal ratio sigma back to x_t = alpha_t x_0 + s_t eps:
    alpha_t = 1 / sqrt(sigma^2 + 1), s_t = sigma alpha_t."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class MultistepSolver(SigmaScheduler):
    """Integer timesteps, the noise levels they walk and the history of the model's predictions.

    ``solver_order``: how many past predictions a step may combine (2: second order)."""

    default_spacing = "linspace"
    timestep_dtype = torch.int64
    sigma_schedules = SIGMA_SCHEDULES
    final_sigma = "zero"  # "sigma_min" for DEIS: see _final_level
    solver_orders: tuple[int, ...] = (1, 2, 3)

    def __init__(self, config: SchedulerConfig = SchedulerConfig(), solver_order: int = 2):
        if solver_order not in self.solver_orders:
            raise ValueError(f"{type(self).__name__} takes solver_order "
                             f"{' or '.join(map(str, self.solver_orders))}, got {solver_order!r}")
        self.solver_order = solver_order
        super().__init__(config)

    def _reset(self) -> None:
        super()._reset()
        self.model_outputs: list[torch.Tensor | None] = [None] * self.solver_order  # oldest first
        self.lower_order_nums = 0

    def _remember(self, prediction: torch.Tensor) -> None:
        """Shift the history by one and keep ``prediction`` as the latest."""
        self.model_outputs = [*self.model_outputs[1:], prediction]

    def _make_timesteps(self, n: int) -> torch.Tensor:
        c = self.config
        T = c.num_train_timesteps
        if c.timestep_spacing == "trailing":
            return spaced_timesteps("trailing", n, T, c.steps_offset)
        # n + 1 points from T-1 (or the leading start) down to 0, without the final 0
        return spaced_timesteps(c.timestep_spacing, n + 1, T, c.steps_offset)[:-1]

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float32, increasing
        schedule = self.config.sigma_schedule
        if schedule is not None:
            sigmas = respace_sigmas(schedule, train_sigmas[0].item(), train_sigmas[-1].item(),
                                    len(timesteps))
            timesteps = sigma_to_timestep(sigmas, train_sigmas.log())
            if schedule == "karras":
                timesteps = timesteps.round()
        else:
            if (timesteps[1:] >= timesteps[:-1]).any():
                raise ValueError(
                    f"{len(timesteps)} steps with {self.config.timestep_spacing!r} spacing repeat "
                    f"a timestep, which gives a {type(self).__name__} step of length 0: use "
                    "fewer steps")
            sigmas = interpolate_sigmas(train_sigmas, timesteps)
        final = self._final_level(sigmas, train_sigmas)
        self.timesteps = timesteps.long()  # truncates the fractional ones toward zero
        self.sigmas = torch.cat([sigmas, final.reshape(1).to(sigmas.dtype)]).float()

    def _final_level(self, sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
        """The noise level the last step goes to: 0, or for DEIS the smallest trained sigma (with
        re-spaced levels, the last of them again, so that DEIS' last step changes nothing)."""
        if self.final_sigma == "zero":
            return torch.zeros(())
        if self.config.sigma_schedule is not None:
            return sigmas[-1].float()
        return train_sigmas[0]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor | int) -> torch.Tensor:
        """alpha x_0 + s noise at the noise level of each timestep's position in the run."""
        t = torch.as_tensor(timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        alpha, std = alpha_and_std(batch_view(sigmas[self._sigma_indices(t)], original_samples))
        return alpha * original_samples + std * noise

    def _lambda(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha, s and lambda = log(alpha / s) of ``sigmas[i]``."""
        alpha, std = alpha_and_std(self.sigmas[i])
        return alpha, std, torch.log(alpha) - torch.log(std)
