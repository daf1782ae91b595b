"""LMS: a linear multistep (Adams-Bashforth) method for the ODE in sigma, up to fourth order.

Karras et al. (2022) discuss linear multistep methods for this ODE; this is k-diffusion's
``sample_lms`` (Crowson, 2022) as diffusers' LMSDiscreteScheduler writes it, with order 4.

What it changes from Euler (see euler.py). Euler takes the slope d = dx/dsigma = (x - x0_hat) /
sigma at the current level only. LMS keeps the slopes of the last p levels sigma_i, sigma_{i-1},
..., fits the polynomial in sigma through them (Lagrange basis L_k) and integrates it over the
step, as PNDM does with its fixed weights:

    x_{i+1} = x_i + sum_k c_k d_{i-k},     c_k = integral_{sigma_i}^{sigma_{i+1}} L_k(s) ds,
    L_k(s) = prod_{m != k} (s - sigma_{i-m}) / (sigma_{i-k} - sigma_{i-m})

with p = min(i + 1, 4): the first step is Euler's. The weights depend on the noise levels only,
so each step costs one model call. L_k has degree p - 1 <= 3, which two-point Gauss-Legendre
quadrature integrates exactly (diffusers uses scipy's adaptive quadrature, to the same numbers).

As diffusers does, p counts from the run's first position, also when an image-to-image run starts
part way (the first steps then have fewer past slopes than p; the missing ones are left out).
State: ``derivatives`` (the last slopes) and ``step_index``.
"""

from __future__ import annotations

import math

import torch

from .euler import KDiffusionScheduler
from .schedule import Generator, StepOutput

MAX_ORDER = 4
GAUSS_NODES = (-1 / math.sqrt(3), 1 / math.sqrt(3))  # two-point Gauss-Legendre on [-1, 1]


def lagrange_weight(nodes: list[float], k: int, start: float, end: float) -> float:
    """integral from ``start`` to ``end`` of the Lagrange basis polynomial that is 1 at
    ``nodes[k]`` and 0 at the other nodes (at most 4 nodes: exact by Gauss-Legendre)."""
    def basis(s: float) -> float:
        value = 1.0
        for m, node in enumerate(nodes):
            if m != k:
                value *= (s - node) / (nodes[k] - node)
        return value

    middle, half = (start + end) / 2, (end - start) / 2
    return half * sum(basis(middle + half * g) for g in GAUSS_NODES)


class LMSDiscreteScheduler(KDiffusionScheduler):
    def _reset(self) -> None:
        super()._reset()
        self.derivatives: list[torch.Tensor] = []  # oldest first

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """One linear multistep step. Deterministic: ``generator`` is unused."""
        i = self._step_position(model_output, timestep, sample)
        sigma = self.sigmas[i]
        x0 = sample - sigma * model_output
        self.derivatives = [*self.derivatives[-(MAX_ORDER - 1):], (sample - x0) / sigma]
        order = min(i + 1, MAX_ORDER)
        levels = self.sigmas.tolist()
        nodes = [levels[i - k] for k in range(order)]  # this level, then the earlier ones
        weights = [lagrange_weight(nodes, k, levels[i], levels[i + 1]) for k in range(order)]
        pairs = zip(weights, reversed(self.derivatives), strict=False)
        prev_sample = sample + sum(weight * derivative for weight, derivative in pairs)
        self.step_index = i + 1
        return StepOutput(prev_sample, x0)
