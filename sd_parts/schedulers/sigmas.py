"""Noise levels: where the n steps of a run sit between sigma_max and sigma_min.

Samplers that walk the noise level sigma (Euler, Heun, LMS, DPM-Solver++, UniPC, DEIS, ...) take
their n levels either at the spaced timesteps (``schedule.spaced_timesteps``, then interpolated in
the trained table) or re-spaced by one of three rules that only need the range:

    karras       Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
                 Models" (2022) eq. 5: uniform in sigma^(1/rho), rho = 7; denser at low noise,
                 where detail is formed
    exponential  uniform in log sigma (k-diffusion's ``get_sigmas_exponential``)
    beta         Lee et al., "Beta Sampling is All You Need" (2024): sigma_min + (sigma_max -
                 sigma_min) * F^-1(1 - i/(n-1)) with F the CDF of Beta(0.6, 0.6); dense at both
                 ends, where the image's layout and its fine detail are decided

A re-spaced sigma lies between two training timesteps in general; ``sigma_to_timestep`` finds the
fractional timestep the UNet is then told. Every function repeats numpy's float arithmetic (which
diffusers uses), so the levels and timesteps are diffusers' to the last float32 digit.
"""

from __future__ import annotations

import math

import torch

SIGMA_SCHEDULES = ("karras", "exponential", "beta")
BETA_SHAPE = 0.6  # both parameters of the Beta distribution of "Beta Sampling is All You Need"


def np_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace in float64, with numpy's arithmetic (i * step + start, exact endpoint).

    The spaced timesteps are rounded, and a value such as 499.5 rounds differently if computed
    another way (torch.linspace counts from both ends), so the arithmetic must be numpy's to give
    diffusers' timesteps.
    """
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64) * step + start
    y[-1] = stop
    return y


def interpolate_sigmas(sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps, linear between integers (numpy.interp), float64."""
    table = sigmas.to(torch.float64)
    low = timesteps.floor().long().clamp(0, len(table) - 1)
    high = (low + 1).clamp(max=len(table) - 1)
    frac = timesteps - low
    between = (table[high] - table[low]) * frac + table[low]
    return torch.where(frac == 0, table[low], between)


def sigma_to_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each noise level: linear interpolation in log sigma between the
    two neighbouring training timesteps. ``log_sigmas`` is float32, as in diffusers; the logs of
    ``sigma`` are taken in its own dtype (float64 for re-spaced levels)."""
    log_sigma = sigma.clamp(min=1e-10).log().to(torch.float64)  # (n,)
    below = log_sigmas.to(torch.float64)[:, None] <= log_sigma  # (T, n): log sigma_t <= target
    # the last training timestep whose sigma is not above the target (0 if none is)
    low = (below.cumsum(0).argmax(0)).clamp(max=len(log_sigmas) - 2)
    low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
    # the denominator is a float32 difference in diffusers, the numerator float64
    w = ((low_value.to(torch.float64) - log_sigma) / (low_value - high_value).to(torch.float64))
    w = w.clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: n noise levels from sigma_max to sigma_min, uniform in
    sigma^(1/rho); rho = 7 spends more steps at low noise, where detail is formed. float64."""
    ramp = np_linspace(0, 1, n)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n noise levels from sigma_max to sigma_min, evenly spaced in log sigma. float64."""
    return np_linspace(math.log(sigma_max), math.log(sigma_min), n).exp()


def beta_sigmas(sigma_min: float, sigma_max: float, n: int,
                a: float = BETA_SHAPE, b: float = BETA_SHAPE) -> torch.Tensor:
    """n noise levels at the quantiles 1 - i/(n-1) of Beta(a, b), mapped onto [sigma_min,
    sigma_max]: with a = b = 0.6 the density is U-shaped, so steps crowd at both ends. float64."""
    quantiles = [beta_ppf(float(q), a, b) for q in 1 - np_linspace(0, 1, n)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles],
                        dtype=torch.float64)


def respace_sigmas(schedule: str, sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min by ``schedule`` (one of SIGMA_SCHEDULES)."""
    spacings = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
    if schedule not in spacings:
        raise ValueError(f"unknown sigma schedule {schedule!r}: use one of "
                         f"{', '.join(SIGMA_SCHEDULES)}")
    return spacings[schedule](sigma_min, sigma_max, n)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = P(X <= x) for X ~ Beta(a, b), in float64.

    The continued fraction I_x = x^a (1-x)^b / (a B(a, b)) / (1 + d_1 / (1 + d_2 / (1 + ...)))
    with d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and d_{2m} = m(b-m) x / ((a+2m-1)(a+2m))
    converges fast for x < (a+1)/(a+b+2); above that, I_x(a, b) = 1 - I_{1-x}(b, a) is used.
    The fraction is evaluated front to back by Lentz's method.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a
    tiny = 1e-300
    value, c, d = 1.0, 1.0, 0.0  # value = 1 + d_1 / (1 + d_2 / ...), built term by term
    for j in range(1, 500):
        m = j // 2
        if j % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        value *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return front / value


def beta_ppf(p: float, a: float, b: float) -> float:
    """The p-quantile of Beta(a, b): the x with I_x(a, b) = p, to float64 precision.

    Newton's method on I_x - p (its derivative is the Beta density), kept inside a bracket that
    shrinks every iteration and bisected whenever Newton would leave it.
    """
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    low, high, x = 0.0, 1.0, 0.5
    for _ in range(200):
        error = regularized_incomplete_beta(x, a, b) - p
        if error == 0.0:
            return x
        if error > 0:
            high = x
        else:
            low = x
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        step = x - error / density
        x_next = step if low < step < high else (low + high) / 2
        if abs(x_next - x) <= 2e-16 * max(x, 1e-300) or high - low <= 2e-16 * high:
            return x_next
        x = x_next
    return x
