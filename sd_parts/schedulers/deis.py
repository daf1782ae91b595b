"""DEIS: the diffusion ODE integrated exactly in the noise-to-signal ratio, with a polynomial
through past noise predictions.

Zhang and Chen, "Fast Sampling of Diffusion Models with Exponential Integrator" (2023), the
log-rho multistep variant (diffusers' ``algorithm_type="deis"``, ``solver_type="logrho"``).

What it changes from DPM-Solver++ (see dpm_solver.py). DEIS works with the noise prediction, in
the variable x / alpha and the time rho = s / alpha = sigma (Euler's variable, see euler.py), in
which the ODE has no linear part at all:

    d(x / alpha) / d rho = eps_theta      so     x_t / alpha_t = x_s / alpha_s + integral eps drho

One step approximates eps over [rho_s, rho_t] by the polynomial in log rho through the last p
noise predictions (Lagrange basis L_j) and integrates it exactly:

    x_t = alpha_t (x_s / alpha_s + sum_j c_j eps_j),
    c_j = integral from rho_s to rho_t of L_j(log rho) drho

For p = 1 this is DDIM (eta = 0); for p = 2 and 3 the integrals have closed forms, from
  integral drho = rho,   integral log rho drho = rho (log rho - 1),
  integral log^2 rho drho = rho (log^2 rho - 2 log rho + 2).
The first steps have too few predictions; with fewer than 15 steps the last two steps drop to
first and second order (``lower_order_final``). Unlike DPM-Solver++, DEIS stops at sigma_min (the
last step keeps a little noise, as DDIM with ``set_alpha_to_one=False``); with re-spaced sigmas its
last level is repeated, so its last step leaves the sample unchanged (diffusers' schedule).

The noise prediction is converted to x0_hat and back, as diffusers does (which would clip or
threshold x0_hat there). State: ``model_outputs`` (the last eps), ``lower_order_nums`` and
``step_index``.
"""

from __future__ import annotations

import torch

from .multistep import MultistepSolver, alpha_and_std
from .schedule import Generator, SchedulerConfig, StepOutput


def linear_basis_integral(rho: torch.Tensor, node: torch.Tensor,
                          other: torch.Tensor) -> torch.Tensor:
    """An antiderivative in rho of the line in log rho that is 1 at ``node`` and 0 at ``other``:
    (log rho - log other) / (log node - log other)."""
    return rho * (torch.log(rho) - torch.log(other) - 1) / (torch.log(node) - torch.log(other))


def quadratic_basis_integral(rho: torch.Tensor, node: torch.Tensor, other_1: torch.Tensor,
                             other_2: torch.Tensor) -> torch.Tensor:
    """An antiderivative in rho of the parabola in log rho that is 1 at ``node`` and 0 at the
    two others: (u - c)(u - d) / ((b - c)(b - d)) with u = log rho, b, c, d the nodes' logs."""
    u, b, c, d = torch.log(rho), torch.log(node), torch.log(other_1), torch.log(other_2)
    antiderivative = rho * (u**2 - 2 * u + 2 - (c + d) * (u - 1) + c * d)
    return antiderivative / ((b - c) * (b - d))


class DEISMultistepScheduler(MultistepSolver):
    final_sigma = "sigma_min"

    def __init__(self, config: SchedulerConfig = SchedulerConfig(), solver_order: int = 2):
        super().__init__(config, solver_order)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One DEIS step of the order the history allows. Deterministic: ``generator`` is
        unused."""
        i = self._step_position(model_output, timestep, sample)
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        x0 = (sample - std_s * model_output) / alpha_s
        self._remember((sample - alpha_s * x0) / std_s)  # eps, through x0_hat as diffusers
        steps = len(self.timesteps)
        short = steps < 15  # lower_order_final: the last steps drop in order on short runs
        if self.lower_order_nums < 1 or (i == steps - 1 and short):
            order = 1
        elif self.solver_order == 2 or self.lower_order_nums < 2 or (i == steps - 2 and short):
            order = 2
        else:
            order = 3
        prev_sample = self._update(sample, i, order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)

    def _update(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        alpha_t, std_t = alpha_and_std(self.sigmas[i + 1])
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        eps = self.model_outputs[::-1]  # latest first
        if order == 1:
            _, _, lambda_t = self._lambda(i + 1)
            _, _, lambda_s = self._lambda(i)
            h = lambda_t - lambda_s
            return (alpha_t / alpha_s) * x - (std_t * (torch.exp(h) - 1.0)) * eps[0]
        # rho = s / alpha at the target and at the nodes (this step and the previous ones)
        rho_t = std_t / alpha_t
        rhos = []
        for k in range(order):
            alpha_k, std_k = alpha_and_std(self.sigmas[i - k])
            rhos.append(std_k / alpha_k)
        rho_s = rhos[0]
        total = x / alpha_s
        for j in range(order):
            others = [rhos[k] for k in range(order) if k != j]
            if order == 2:
                integral = (linear_basis_integral(rho_t, rhos[j], *others)
                            - linear_basis_integral(rho_s, rhos[j], *others))
            else:
                integral = (quadratic_basis_integral(rho_t, rhos[j], *others)
                            - quadratic_basis_integral(rho_s, rhos[j], *others))
            total = total + integral * eps[j]
        return alpha_t * total
