"""UniPC: a multistep predictor with a corrector that costs no extra model call.

Zhao, Bai, Rao, Zhou and Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (2023): UniP-2 with UniC, the "B(h) = e^{-h} - 1" variant (bh2) on data
predictions, as diffusers' defaults (``solver_order=2``, ``predict_x0``, ``solver_type="bh2"``).

What it changes from DPM-Solver++ 2M (see dpm_solver.py). The predictor is the same kind of
multistep step in lambda, from x_s to x_t with the latest x0_hat m_0 and the slopes
D_k = (m_k - m_0) / r_k of older ones (r_k = (lambda_k - lambda_s) / h, h = lambda_t - lambda_s):

    x_t = (s_t / s_s) x_s - alpha_t phi_1 m_0 - alpha_t B(h) sum_k rho_k D_k,
    phi_1 = B(h) = e^{-h} - 1

where the weights rho solve a small Vandermonde system R rho = b, R[k, j] = r_j^k and
b_k = k! phi_{k+1}(-h) / B(h) with phi_{k+1}(x) = (phi_k(x) - 1/k!) / x: a Taylor expansion of
x0_hat in lambda matched to order p (for p = 2 simply rho = 1/2).

The corrector (UniC) runs at the start of the next step, once the model has been evaluated at the
predicted x_t: it redoes the step from x_s with that new prediction m_t included,

    x_t^c = (s_t / s_s) x_s - alpha_t phi_1 m_0 - alpha_t B(h) (sum_k rho_k D_k + rho_t (m_t - m_0))

(rho from the full system, 1/2 for a first-order step), and the run continues from x_t^c. The
model call at x_t is reused rather than repeated, so the corrected step is one order higher for
free. The first step has no history (order 1); with ``lower_order_final`` the order never exceeds
the steps left, so the last step, to sigma = 0, is first order and lands on x0_hat.

State: ``model_outputs`` (x0_hat, oldest first), ``last_sample`` (x_s, for the corrector),
``this_order`` (the order of the step the corrector revisits), ``lower_order_nums`` and
``step_index``.
"""

from __future__ import annotations

import torch

from .multistep import MultistepSolver, alpha_and_std
from .schedule import Generator, SchedulerConfig, StepOutput


def taylor_system(rks: torch.Tensor, hh: torch.Tensor, order: int) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """UniPC's R (order x order, R[k, j] = r_j^k) and b (b_k = k! phi_{k+1}(hh) / B(h))."""
    phi_1 = torch.expm1(hh)
    phi = phi_1 / hh - 1  # phi_2(hh), times 1!: the recursion phi_{k+1} = (phi_k - 1/k!) / hh
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(phi * factorial / phi_1)  # B(h) = e^{-h} - 1 = phi_1 (bh2)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return torch.stack(rows), torch.stack(b)


class UniPCMultistepScheduler(MultistepSolver):
    def __init__(self, config: SchedulerConfig = SchedulerConfig(), solver_order: int = 2):
        super().__init__(config, solver_order)

    def _reset(self) -> None:
        super()._reset()
        self.last_sample: torch.Tensor | None = None
        self.this_order = 1

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """Correct the previous step with this prediction, then predict the next sample.
        Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        x0 = (sample - std_s * model_output) / alpha_s
        if i > 0 and self.last_sample is not None:  # UniC: revisit the step just taken
            sample = self._update(self.last_sample, i - 1, self.this_order, x0)
        self._remember(x0)
        steps_left = len(self.timesteps) - i  # lower_order_final: never beyond the end
        self.this_order = min(self.solver_order, steps_left, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._update(sample, i, self.this_order)  # UniP
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)

    def _update(self, x: torch.Tensor, start: int, order: int,
                model_t: torch.Tensor | None = None) -> torch.Tensor:
        """From x at ``sigmas[start]`` to ``sigmas[start + 1]``, with the x0_hat history whose
        latest entry is that of ``start``: the predictor, or with ``model_t`` (x0_hat at the
        end point) the corrector."""
        alpha_t, std_t, lambda_t = self._lambda(start + 1)
        _, std_s0, lambda_s0 = self._lambda(start)
        h = lambda_t - lambda_s0
        m0 = self.model_outputs[-1]
        rks, slopes = [], []
        for k in range(1, order):
            _, _, lambda_k = self._lambda(start - k)
            rk = (lambda_k - lambda_s0) / h
            rks.append(rk)
            slopes.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones(()))
        hh = -h  # data prediction: the step runs backwards in -lambda
        R, b = taylor_system(torch.stack(rks), hh, order)
        phi_1 = torch.expm1(hh)
        x_t = (std_t / std_s0) * x - (alpha_t * phi_1) * m0
        if model_t is None:
            if not slopes:
                return x_t.to(x.dtype)
            rhos = (torch.full((1,), 0.5) if order == 2
                    else torch.linalg.solve(R[:-1, :-1], b[:-1]))
            correction = sum(rho * slope for rho, slope in zip(rhos, slopes, strict=True))
        else:
            rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(R, b)
            past = sum(rho * slope for rho, slope in zip(rhos[:-1], slopes, strict=True))
            correction = past + rhos[-1] * (model_t - m0)
        return (x_t - (alpha_t * phi_1) * correction).to(x.dtype)
