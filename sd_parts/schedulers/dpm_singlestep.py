"""DPM-Solver++ 2S: the second-order singlestep solver, two timesteps per second-order step.

Lu, Zhou, Bao, Chen, Li and Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022), Algorithm 1 (DPM-Solver++(2S)) in diffusers' form, which spends the
intermediate model call on a timestep of the run instead of a point of its own.

What it changes from DPM-Solver++ 2M (see dpm_solver.py). A multistep step reuses predictions
from earlier steps; a singlestep step starts afresh from one sample x_s and uses only what it
evaluates itself. The n timesteps are taken in pairs s, u, t:

    at s:  x0_s from the model; a first-order step to u (as in 2M)
    at u:  x0_u from the model at that intermediate sample; then, again from x_s,

        x_t = (s_t / s_s) x_s - alpha_t (e^{-h} - 1) x0_s - 0.5 alpha_t (e^{-h} - 1) D1,
        h = lambda_t - lambda_s,  r = (lambda_u - lambda_s) / h,  D1 = (x0_u - x0_s) / r

so each pair makes one second-order step of length h with two model calls, and the sample at u
is only a stepping stone (the pipeline still shows it). Orders step by step (diffusers'
``lower_order_final``): 1, 2, 1, 2, ..., ending with 1 (an odd n) or 1, 1 (an even n), the last
step to sigma = 0 always first order. n steps still make n model calls.

Only "linspace" timesteps, as diffusers' DPMSolverSinglestepScheduler offers no other spacing.
State: ``model_outputs`` (x0_s, x0_u), ``sample`` (x_s, the start of the current pair),
``order_list`` and ``step_index``; ``set_timesteps`` clears them.
"""

from __future__ import annotations

import torch

from .multistep import MultistepSolver, alpha_and_std
from .schedule import Generator, SchedulerConfig, StepOutput


def singlestep_orders(n: int) -> list[int]:
    """The order of each of n steps: pairs (1, 2), then a first-order end."""
    if n % 2 == 0:
        return [1, 2] * (n // 2 - 1) + [1, 1]
    return [1, 2] * (n // 2) + [1]


class DPMSolverSinglestepScheduler(MultistepSolver):
    spacings = ("linspace",)
    solver_orders = (2,)

    def __init__(self, config: SchedulerConfig = SchedulerConfig(), solver_order: int = 2):
        super().__init__(config, solver_order)

    def _reset(self) -> None:
        super()._reset()
        self.sample: torch.Tensor | None = None  # x_s, where the current pair started
        n = self.num_inference_steps
        self.order_list = singlestep_orders(n) if n is not None else []

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One step of the current pair. Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        alpha_s, std_s = alpha_and_std(self.sigmas[i])
        x0 = (sample - std_s * model_output) / alpha_s
        self._remember(x0)
        order = self.order_list[i]
        # a run begun part way may lack the pair's first prediction
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample  # a pair starts here
            prev_sample = self._first_order(i)
        else:
            prev_sample = self._second_order(i)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)

    def _first_order(self, i: int) -> torch.Tensor:
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, std_s, lambda_s = self._lambda(i)
        h = lambda_t - lambda_s
        return (std_t / std_s) * self.sample - (alpha_t * (torch.exp(-h) - 1.0)) * \
            self.model_outputs[-1]

    def _second_order(self, i: int) -> torch.Tensor:
        """From x_s (two levels back) to t, with x0_s and the intermediate x0_u."""
        alpha_t, std_t, lambda_t = self._lambda(i + 1)
        _, _, lambda_u = self._lambda(i)
        _, std_s, lambda_s = self._lambda(i - 1)
        x0_u, x0_s = self.model_outputs[-1], self.model_outputs[-2]
        h, h_u = lambda_t - lambda_s, lambda_u - lambda_s
        r = h_u / h
        D0, D1 = x0_s, (1.0 / r) * (x0_u - x0_s)
        return ((std_t / std_s) * self.sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
