"""DPM-Solver++ 2M and 3M, as an ODE solver and as an SDE solver: multistep, in log-SNR time.

Lu, Zhou, Bao, Chen, Li and Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022), Algorithm 2 ("2M": second order, multistep, data prediction); the
SDE variants are k-diffusion's ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` (Crowson), the
"SDE-DPM-Solver++" of Lu et al. (2022) and Gonzalez et al., "SEEDS" (2023).

What it changes from DDPM (see ddpm.py). With x_t = alpha_t x_0 + s_t eps, lambda = log(alpha /
s) = -log sigma and x0_hat = (x_t - s_t eps_theta) / alpha_t (see multistep.py), the
probability-flow ODE integrates exactly in its linear part (eq. 9):

    x_t = (s_t / s_s) x_s  +  s_t * integral from lambda_s to lambda_t of e^lambda x0_hat dlambda

With h = lambda_t - lambda_s and x0_hat held constant over the step this is the first-order step,
which is DDIM (eta = 0) written in lambda:

    x_t = (s_t / s_s) x_s  -  alpha_t (e^{-h} - 1) x0_hat_s

Multistep ("M") steps extrapolate x0_hat in lambda from the previous steps' predictions instead
of calling the model again. With r_0 = h_0 / h (h_0 the previous step's length), 2M takes the
slope D1 = (x0_hat_s - x0_hat_prev) / r_0:

    x_t = (s_t / s_s) x_s  -  alpha_t (e^{-h} - 1) D0  -  0.5 alpha_t (e^{-h} - 1) D1

and 3M also a curvature D2 from the step before that (r_1 = h_1 / h):

    D1_0 = (x0_s - x0_prev) / r_0,   D1_1 = (x0_prev - x0_prev2) / r_1
    D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1),    D2 = (D1_0 - D1_1) / (r_0 + r_1)
    x_t = (s_t / s_s) x_s - alpha_t (phi_1) D0 + alpha_t (phi_1 / h + 1) D1
          - alpha_t ((phi_1 + h) / h^2 - 0.5) D2,            phi_1 = e^{-h} - 1

The SDE variant solves the reverse SDE instead: the same terms with h doubled where it weights the
data prediction, the old sample shrunk by a further e^{-h}, and fresh noise
s_t sqrt(1 - e^{-2h}) z each step, z ~ N(0, I) from the caller's generator:

    x_t = (s_t / s_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D0 + 0.5 alpha_t (1 - e^{-2h}) D1
          + s_t sqrt(1 - e^{-2h}) z                                                 (2M SDE)

The first steps have too few predictions (first order, then second); with fewer than 15 steps
the second-to-last step of 3M is second order; the last step (to sigma = 0, where lambda is
infinite) is first order and lands on x0_hat. These are diffusers' defaults (``solver_type=
"midpoint"``, ``lower_order_final``, ``final_sigmas_type="zero"``).

State: ``model_outputs`` (the last x0_hat predictions), ``lower_order_nums`` and ``step_index``;
``set_timesteps`` clears them.
"""

from __future__ import annotations

import torch

from .multistep import MultistepSolver, alpha_and_std
from .schedule import Generator, SchedulerConfig, StepOutput, random_normal

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class DPMSolverMultistepScheduler(MultistepSolver):
    solver_orders = (2, 3)

    def __init__(self, config: SchedulerConfig = SchedulerConfig(), solver_order: int = 2,
                 algorithm_type: str = "dpmsolver++"):
        if algorithm_type not in ALGORITHMS:
            raise ValueError(f"unknown algorithm_type {algorithm_type!r}: use one of "
                             f"{', '.join(ALGORITHMS)}")
        self.algorithm_type = algorithm_type
        super().__init__(config, solver_order)

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One DPM-Solver++ step of the order the history allows; the SDE variant draws its
        noise from ``generator`` at every step (float32, before the update, as diffusers)."""
        i = self._step_position(model_output, timestep, sample)
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        x0 = (sample - std_s * model_output) / alpha_s  # the data prediction at this step
        self._remember(x0)

        steps = len(self.timesteps)
        x = sample.float()  # the update is done in float32 whatever the model's dtype
        noise = (random_normal(model_output.shape, generator, model_output.device, torch.float32)
                 if self.stochastic else None)
        if self.lower_order_nums < 1 or i == steps - 1:
            prev_sample = self._first_order(x, i, noise)
        elif (self.solver_order == 2 or self.lower_order_nums < 2
              or (i == steps - 2 and steps < 15)):
            prev_sample = self._second_order(x, i, noise)
        else:
            prev_sample = self._third_order(x, i, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index = i + 1
        return StepOutput(prev_sample.to(model_output.dtype), x0)

    def _first_order(self, x: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s, lambda_s = self._lambda(i)
        h = lambda_t - lambda_s
        x0 = self.model_outputs[-1]
        if noise is None:
            return (std_t / std_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        return ((std_t / std_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
                + std_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def _second_order(self, x: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s0, lambda_s0 = self._lambda(i)
        _, _, lambda_s1 = self._lambda(i - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)  # x0_hat and its slope in lambda (times h)
        if noise is None:
            return ((std_t / std_s0) * x
                    - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return ((std_t / std_s0 * torch.exp(-h)) * x
                + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
                + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
                + std_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def _third_order(self, x: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s0, lambda_s0 = self._lambda(i)
        _, _, lambda_s1 = self._lambda(i - 1)
        _, _, lambda_s2 = self._lambda(i - 2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # slope at s0, corrected for curvature
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)  # curvature
        if noise is None:
            phi = torch.exp(-h) - 1.0
            return ((std_t / std_s0) * x - (alpha_t * phi) * m0
                    + (alpha_t * (phi / h + 1.0)) * D1
                    - (alpha_t * ((phi + h) / h**2 - 0.5)) * D2)
        phi = 1.0 - torch.exp(-2.0 * h)
        return ((std_t / std_s0 * torch.exp(-h)) * x + (alpha_t * phi) * m0
                + (alpha_t * (phi / (-2.0 * h) + 1.0)) * D1
                + (alpha_t * ((phi - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
                + std_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
