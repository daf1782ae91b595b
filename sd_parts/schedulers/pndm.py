"""PNDM / PLMS: the DDIM step fed with a linear multistep blend of past noise predictions.

Liu, Ren, Lin and Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (2022), in
the PLMS form Stable Diffusion shipped with (``skip_prk_steps=True``: no Runge-Kutta warm-up).

What it changes from DDPM (see ddpm.py). The *transfer* from t to t' = t - T//n is DDIM's
deterministic step (eta = 0), written as eq. 9 of the paper:

    x_t' = sqrt(abar_t' / abar_t) x_t
           - (abar_t' - abar_t) e / ( abar_t sqrt(1 - abar_t') + sqrt(abar_t (1 - abar_t) abar_t') )

which equals sqrt(abar_t') x0_hat + sqrt(1 - abar_t') e with x0_hat = (x_t - sqrt(1-abar_t) e) /
sqrt(abar_t). The *gradient* e is not the latest noise prediction alone but an Adams-Bashforth
blend of the last four (eq. 12), treating eps_theta along the trajectory as a smooth function:

    e = (55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24

so each step costs one model call yet is fourth order. The first steps have fewer predictions:
    step 0: e = e_0, a plain DDIM step from t_0 to t_1;
    step 1: the model is called again at t_1 and the step from t_0 is *redone* with
            e = (e_0 + e_1) / 2 (Heun's method), so t_1 appears twice in ``timesteps``;
    step 2: e = (3 e_2 - e_0) / 2;   step 3: e = (23 e_3 - 16 e_2 + 5 e_0) / 12;   then as above.
Hence n steps make n + 1 model calls (n >= 2). t' and the redo use t -/+ T // n, as diffusers.

State: ``ets`` (the noise predictions kept for the blend), ``counter`` (steps done) and
``cur_sample`` (x_t0, kept for the redo at step 1); ``set_timesteps`` clears them. The
``pred_original_sample`` returned is x0_hat of the blended e (diffusers' PNDM returns none).
"""

from __future__ import annotations

import torch

from .schedule import Generator, Scheduler, SchedulerConfig, StepOutput


class PNDMScheduler(Scheduler):
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        if not config.skip_prk_steps:
            raise ValueError("PNDM with Runge-Kutta warm-up steps (skip_prk_steps=False) is not "
                             "implemented: use skip_prk_steps=True (PLMS, SD v1's setting)")
        super().__init__(config)
        self.final_alpha_cumprod = (torch.tensor(1.0) if config.set_alpha_to_one
                                    else self.alphas_cumprod[0])

    def _reset(self) -> None:
        self.ets: list[torch.Tensor] = []
        self.counter = 0
        self.cur_sample: torch.Tensor | None = None

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        # t_0, t_1, t_1, t_2, ..., t_{n-1}: the second timestep is visited twice (the Heun redo)
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:2], timesteps[1:]]).long()

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One PLMS step. Deterministic: ``generator`` is unused."""
        n = self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        stride = self.config.num_train_timesteps // n
        self._check_timestep_range(torch.as_tensor(timestep))
        t = int(timestep)
        prev_t = t - stride
        if self.counter == 1:
            # the redo of step 0: from t_0 (= t_1 + stride) to t_1, with the averaged prediction
            t, prev_t = t + stride, t
        else:
            self.ets = [*self.ets[-3:], model_output]

        ets = self.ets
        if self.counter == 0:
            e = model_output
            self.cur_sample = sample
        elif self.counter == 1:
            e = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        return self._transfer(sample, t, prev_t, e)

    def _transfer(self, sample: torch.Tensor, t: int, prev_t: int,
                  e: torch.Tensor) -> StepOutput:
        """Eq. 9: x_t -> x_t' with noise estimate e (DDIM with eta = 0)."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        sample_coeff = (abar_prev / abar_t) ** 0.5
        e_denominator = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
        prev_sample = sample_coeff * sample - (abar_prev - abar_t) * e / e_denominator
        x0 = (sample - (1 - abar_t) ** 0.5 * e) / abar_t**0.5
        return StepOutput(prev_sample, x0)
