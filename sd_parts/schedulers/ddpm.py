"""DDPM: ancestral sampling, the process every other sampler here is explained against.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models" (2020).

Forward process (training). Noise is added in T = 1000 small steps of variance beta_t; with
alpha_t = 1 - beta_t and abar_t = alpha_1 ... alpha_t the whole chain collapses to one draw:

    q(x_t | x_0) = N( sqrt(abar_t) x_0,  (1 - abar_t) I )                          (eq. 4)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)                 (add_noise)

The UNet eps_theta(x_t, t) is trained to predict eps. Given that prediction, the clean latent is
estimated by solving the line above for x_0:

    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)                       (eq. 15)

Reverse process (sampling). Knowing x_0, the step back from t to an earlier timestep t' has a
Gaussian posterior (eq. 6-7); with a stride, alpha and beta of the jump t -> t' are
a_t = abar_t / abar_t' and b_t = 1 - a_t:

    p(x_t' | x_t) = N( mu, s^2 I ),
    mu  = sqrt(abar_t') b_t / (1 - abar_t) * x0_hat  +  sqrt(a_t) (1 - abar_t') / (1 - abar_t) * x_t
    s^2 = (1 - abar_t') / (1 - abar_t) * b_t       ("fixed_small": the posterior variance beta~)

so every step draws fresh noise: the sampler is *ancestral* (stochastic) and needs many steps.
At the last step t' is "before" t = 0, where abar = 1 (no noise is left) and no noise is drawn.

What the other samplers change:
  DDIM     the same x0_hat, but a non-Markovian step whose noise is a free parameter eta;
           eta = 0 makes sampling deterministic and good in 20-50 steps.
  Euler    writes x_t / sqrt(abar_t) = x_0 + sigma_t eps and integrates the probability-flow ODE
           dx/dsigma = eps in sigma, one Euler step per timestep.
  PNDM     the DDIM (eta = 0) step, fed with a linear multistep (Adams-Bashforth) blend of the last
           four noise predictions (PLMS): fourth order for the price of one model call.
  DPM++2M  solves the same ODE exactly in its linear part, in log-SNR time lambda, and
           extrapolates x0_hat from the previous step: second order, good in 15-25 steps.
And the rest, each in its file: Euler a (euler.py) and DPM2 a (heun.py) add fresh noise to
Euler's and DPM2's steps, as DDPM does; LMS (lms.py) is PNDM's idea in sigma; Heun and DPM2
(heun.py) call the UNet twice per step; DPM++ 2M/3M SDE (dpm_solver.py), 2S (dpm_singlestep.py),
UniPC (unipc.py) and DEIS (deis.py) are further solvers in lambda or sigma; LCM and TCD (lcm.py)
sample consistency-distilled UNets in 2-8 steps.

State: none besides the timesteps; ``step`` finds the next timestep t' by looking t up in them.
"""

from __future__ import annotations

import torch

from .schedule import Generator, Scheduler, StepOutput, random_normal


class DDPMScheduler(Scheduler):
    """Ancestral sampling with the posterior variance ("fixed_small"), as diffusers' default."""

    default_spacing = "leading"

    def previous_timestep(self, timestep: torch.Tensor | int) -> int:
        """The timestep after ``timestep`` in this run, or -1 after the last one."""
        matches = (self.timesteps == timestep).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(f"timestep {timestep} is not one of this run's timesteps")
        index = int(matches[0])
        return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """x_t -> x_t': the posterior mean plus s * z, z ~ N(0, I) drawn from ``generator``."""
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        a_t = abar_t / abar_prev  # alpha and beta of the (strided) jump t -> t'
        b_t = 1 - a_t

        x0 = (sample - (1 - abar_t) ** 0.5 * model_output) / abar_t**0.5
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        # posterior mean (eq. 7): a blend of the x_0 estimate and the current sample
        x0_coeff = abar_prev**0.5 * b_t / (1 - abar_t)
        sample_coeff = a_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            noise = random_normal(model_output.shape, generator, model_output.device,
                                  model_output.dtype)
            # posterior variance, floored at 1e-20 as in diffusers (it is 0 at the last step)
            variance = ((1 - abar_prev) / (1 - abar_t) * b_t).clamp(min=1e-20)
            prev_sample = prev_sample + variance**0.5 * noise
        return StepOutput(prev_sample, x0)
