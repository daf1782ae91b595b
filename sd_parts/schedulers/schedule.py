"""The noise schedule that every sampler shares, and the state and interface they have in common.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020) define the forward process by a
sequence of small variances beta_1..beta_T (T = 1000 for Stable Diffusion):

    alpha_t = 1 - beta_t,   abar_t = alpha_1 * ... * alpha_t                  (``alphas_cumprod``)
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)

so a noisy latent is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with eps ~ N(0, I). The UNet
was trained to predict eps from (x_t, t). Dividing by sqrt(abar_t) gives the same point in the
"variance exploding" form that Karras et al. (2022) use, ``x_t / sqrt(abar_t) = x_0 + sigma_t eps``,
with the noise level

    sigma_t = sqrt((1 - abar_t) / abar_t)       (the noise-to-signal ratio; ``noise_level``)

Samplers differ in how they walk from pure noise back to x_0 along a few of the 1000 timesteps;
what they share is here: the betas, the choice of timesteps (``timestep_spacing``), Karras'
sigma spacing, the random draws and the forward process ``add_noise``. Every array is computed the
way diffusers computes it (same dtypes, same order of float operations), so timesteps and sigmas
are equal to diffusers' bit for bit or to the last float32 digit.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sigmas import SIGMA_SCHEDULES, interpolate_sigmas, np_linspace

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear")
# Settings that some scheduler_config.json files carry and these samplers do not implement, with
# the values that mean "off". A file that sets one otherwise describes a different model or
# sampler, so it is refused rather than run without the setting.
SUPPORTED_VALUES = {
    "trained_betas": (None,),
    "thresholding": (False,),  # dynamic thresholding of x_0 (pixel-space models such as Imagen)
    "rescale_betas_zero_snr": (False,),  # "Common Diffusion Noise Schedules ... Are Flawed"
    "variance_type": ("fixed_small", None),  # DDPM's variance; learned ones need a 2x UNet output
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """A ``scheduler_config.json`` (field names as in the file); defaults are SD v1.5's file.

    A key missing from a file takes the value here, not the default of the diffusers class named
    in the file (DDIMScheduler's own defaults, for instance, clip x_0 and use a linear schedule).
    """

    num_train_timesteps: int = 1000  # T: the noise levels the UNet was trained on
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # "scaled_linear": sqrt(beta) linear in t, the latent diffusion schedule; "linear": beta linear
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # the UNet predicts the noise eps (SD v1; SD 2 uses "v")
    # Which timesteps n steps visit: "leading" i*(T//n) + steps_offset (never reaches t = T-1),
    # "trailing" round(T - i*T/n) - 1 (starts at T-1), "linspace" round(i*(T-1)/(n-1)).
    # None: each sampler's diffusers default ("leading" for DDPM, DDIM, PNDM; "linspace" for
    # Euler and DPM-Solver++), as SD v1.5's file has no such key.
    timestep_spacing: str | None = None
    steps_offset: int = 1  # added to "leading" timesteps so the last step is t=1 rather than t=0
    # DDPM/DDIM: clamp the predicted x_0 to [-range, range]; right for pixels, wrong for latents
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # DDIM/PNDM: abar "after" the final step; True: 1 (fully clean), False: abar_0 (SD's choice)
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True  # PNDM: start with linear multistep (PLMS), not Runge-Kutta steps
    # Samplers that walk sigma: re-space the n noise levels (sigmas.py) instead of taking them at
    # the spaced timesteps. At most one: Karras et al. (2022) eq. 5, dense near sigma_min; even in
    # log sigma; Beta(0.6, 0.6) quantiles, dense at both ends.
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    # LCM / TCD: the timesteps of the distillation's schedule (T // 50 apart), of which a run takes
    # a few; and how sharply its boundary condition switches from "keep x_t" to "take x0_hat"
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"int": int, "float": (int, float), "bool": bool}.get(field.type)
            if expected and (not isinstance(value, expected)
                             or (isinstance(value, bool) and field.type != "bool")):
                raise ValueError(f"scheduler setting {field.name} must be of type {field.type}, "
                                 f"got {value!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}: use one of "
                             f"{', '.join(BETA_SCHEDULES)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")
        if self.prediction_type != "epsilon":
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}: these "
                             "samplers take noise predictions ('epsilon'), as SD v1 was trained")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}: use one of "
                             f"{', '.join(SPACINGS)}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        chosen = [name for name in SIGMA_SCHEDULES if getattr(self, f"use_{name}_sigmas")]
        if len(chosen) > 1:
            raise ValueError(f"at most one sigma schedule can be used, got "
                             f"{', '.join(f'use_{name}_sigmas' for name in chosen)}")
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"original_inference_steps must be from 1 to num_train_timesteps "
                             f"({self.num_train_timesteps}), got {self.original_inference_steps}")
        if not (math.isfinite(self.timestep_scaling) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be a positive number, got "
                             f"{self.timestep_scaling!r}")

    @property
    def sigma_schedule(self) -> str | None:
        """The re-spacing of the noise levels in use: "karras", "exponential", "beta" or None."""
        for name in SIGMA_SCHEDULES:
            if getattr(self, f"use_{name}_sigmas"):
                return name
        return None

    @classmethod
    def from_dict(cls, config: dict) -> SchedulerConfig:
        for key, accepted in SUPPORTED_VALUES.items():
            if key in config and config[key] not in accepted:
                raise ValueError(f"unsupported scheduler setting {key}={config[key]!r} (these "
                                 f"samplers implement {key}={accepted[0]!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x at the next (less noisy) timestep
    pred_original_sample: torch.Tensor  # the step's estimate of the clean latent x_0


def make_alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """abar_t for t = 0..T-1, float32, as diffusers computes it (the same linspace and cumprod)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T,
                               dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep, increasing in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def np_arange_down(start: float, step: float, num: int) -> torch.Tensor:
    """The first ``num`` values of numpy.arange(start, 0, -step) in float64: start + i * delta with
    delta = (start - step) - start, the way numpy fills a float range.

    For some n (485, 497, ...) numpy's float length gives one value more, -1 after the shift,
    and diffusers then runs an extra step at t = -1 (read as t = 999); here there are always n.
    """
    delta = (start - step) - start
    return torch.arange(num, dtype=torch.float64) * delta + start


def spaced_timesteps(spacing: str, n: int, T: int, steps_offset: int) -> torch.Tensor:
    """The n integer timesteps that n sampling steps visit, most noisy first, in float64.

    Table 2 of Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (2023):
    "leading" (SD v1's original choice) starts at (n-1)*(T//n) + offset, e.g. 901 for n=10, so
    the first step never sees pure noise; "trailing" and "linspace" start at T-1.
    """
    if spacing == "linspace":
        return np_linspace(0, T - 1, n).flip(0).round()
    if spacing == "leading":
        return (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0) + steps_offset
    if spacing == "trailing":
        return np_arange_down(T, T / n, n).round() - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}: use one of {', '.join(SPACINGS)}")


Generator = torch.Generator | Sequence[torch.Generator] | None


def random_normal(shape: Sequence[int], generator: Generator, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) draws made as diffusers' ``randn_tensor`` makes them, so a seed gives its numbers.

    A CPU generator draws on the CPU and the result moves to ``device`` (so a seed gives the same
    image on every device); a list of generators draws each batch item from its own generator.
    """
    generators = list(generator) if isinstance(generator, Sequence) else [generator]
    draw_device = device
    first = generators[0]
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"a {first.device.type} generator cannot draw a tensor for "
                             f"{device}: pass a CPU generator or one on {device}")
        draw_device = torch.device("cpu")
    if len(generators) == 1:
        return torch.randn(tuple(shape), generator=first, device=draw_device,
                           dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: pass one "
                         "generator per batch item, or a single generator")
    item = (1, *shape[1:])
    draws = [torch.randn(item, generator=g, device=draw_device, dtype=dtype) for g in generators]
    return torch.cat(draws).to(device)


def _as_float(t: torch.Tensor | float | int) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"expected one timestep, got a tensor of shape {tuple(t.shape)}")
        return float(t.item())
    return float(t)


def batch_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast one value per batch item over a (B, C, H, W) tensor."""
    return values.flatten().reshape(-1, *([1] * (like.dim() - 1)))


class Scheduler(ABC):
    """What every sampler has: the trained schedule, the chosen timesteps and the forward process.

    Stateful use, as in diffusers: ``set_timesteps(n)`` chooses the timesteps and resets all state,
    then ``step`` is called once per timestep, in order. Until ``set_timesteps`` is called the
    timesteps are all T training timesteps and ``step`` refuses to run.
    """

    default_spacing = "leading"
    timestep_dtype = torch.int64
    # timesteps per step, diffusers' ``order``: 2 for samplers that call the UNet twice per step
    # (Heun, DPM2), whose timesteps list each intermediate point
    order = 1
    spacings: tuple[str, ...] = SPACINGS  # the timestep spacings the sampler offers
    sigma_schedules: tuple[str, ...] = ()  # the re-spacings of sigma it offers (sigmas.py)

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        if config.timestep_spacing is None:
            config = dataclasses.replace(config, timestep_spacing=self.default_spacing)
        name = type(self).__name__
        if self.spacings and config.timestep_spacing not in self.spacings:
            raise ValueError(f"{name} spaces its timesteps by {' or '.join(self.spacings)}, not "
                             f"{config.timestep_spacing!r}")
        schedule = config.sigma_schedule
        if schedule is not None and schedule not in self.sigma_schedules:
            offered = ", ".join(self.sigma_schedules) or "none"
            raise ValueError(f"{name} does not offer {schedule} sigmas (use_{schedule}_sigmas); "
                             f"it offers: {offered}")
        self.config = config
        self.alphas_cumprod = make_alphas_cumprod(config)  # (T,) float32
        T = config.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1).to(self.timestep_dtype)
        self.num_inference_steps: int | None = None
        self.begin_index: int | None = None
        self._reset()

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the starting noise: x_T ~ N(0, init_noise_sigma^2 I)."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps of an n-step run and reset the sampler's state."""
        T = self.config.num_train_timesteps
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"the number of steps must be an integer from 1 to {T}, got {n!r}")
        timesteps = self._make_timesteps(n)
        if timesteps.max() > T - 1:
            raise ValueError(
                f"{n} steps with {self.config.timestep_spacing!r} spacing and steps_offset "
                f"{self.config.steps_offset} reach timestep {timesteps.max().item():g}, beyond the "
                f"trained 0..{T - 1}: use fewer steps or 'trailing' spacing")
        self._set_schedule(timesteps)
        self.num_inference_steps = n
        self.begin_index = None
        self._reset()

    def _make_timesteps(self, n: int) -> torch.Tensor:
        """The spaced timesteps of an n-step run, float64, most noisy first."""
        c = self.config
        return spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        """Store what a run walks through, made from the spaced timesteps."""
        self.timesteps = timesteps.to(self.timestep_dtype)

    def _reset(self) -> None:
        """Forget the state of a previous run (past noise predictions, the step counter).
        DDPM and DDIM keep none."""
        return None

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(n) before step()")
        return self.num_inference_steps

    def begin_at(self, index: int) -> None:
        """Start the run at ``timesteps[index]`` rather than at the first timestep (image to image).

        Image to image as diffusers' StableDiffusionImg2ImgPipeline does it, for n steps and a
        strength in [0, 1] (``order`` is 2 for Heun and DPM2, whose steps take two timesteps)::

            scheduler.set_timesteps(n)
            start = max(n - min(int(n * strength), n), 0) * scheduler.order
            timesteps = scheduler.timesteps[start:]
            scheduler.begin_at(start)
            x = scheduler.add_noise(image_latent, noise, timesteps[:1])   # then step through

        Samplers that index their noise levels by position (Euler, DPM-Solver++) need this to find
        sigma for ``add_noise`` and the first step; the others look timesteps up by value and only
        record it. Call it after ``set_timesteps``, which clears it.
        """
        length = len(self.timesteps)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= length:
            raise ValueError(f"begin index must be an integer from 0 to {length}, got {index!r}")
        self.begin_index = index

    def scale_model_input(self, sample: torch.Tensor,
                          timestep: torch.Tensor | float) -> torch.Tensor:
        """The UNet's input at this step (a new tensor). Here x_t is already what the UNet was
        trained on; Euler rescales its variable."""
        return sample.clone()

    @abstractmethod
    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, generator: Generator = None) -> StepOutput:
        """From x_t and the UNet's noise prediction at ``timestep`` to the next, less noisy x;
        ``generator`` drives the random draws of stochastic samplers (DDPM, DDIM with eta > 0,
        the ancestral and SDE samplers, LCM, TCD), drawn as diffusers draws them."""

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor | int) -> torch.Tensor:
        """The forward process q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, one
        timestep per batch item (or one for all)."""
        t = torch.as_tensor(timesteps, device=original_samples.device)
        self._check_timestep_range(t)
        abar = self.alphas_cumprod.to(original_samples.device, original_samples.dtype)[t.long()]
        signal = batch_view(abar**0.5, original_samples)
        noise_scale = batch_view((1 - abar) ** 0.5, original_samples)
        return signal * original_samples + noise_scale * noise

    def noise_level(self, timestep: torch.Tensor | float) -> float:
        """sigma_t = sqrt((1 - abar_t) / abar_t) at a timestep, for plots and the UI.

        A fractional timestep (Euler) interpolates between the two neighbouring training
        timesteps as it was made: linearly in sigma, or in log sigma with re-spaced sigmas.
        """
        t = torch.tensor([_as_float(timestep)], dtype=torch.float64)
        self._check_timestep_range(t)
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        if self.config.sigma_schedule is not None:
            return float(interpolate_sigmas(sigmas.log(), t).exp())
        return float(interpolate_sigmas(sigmas, t))

    def _check_timestep_range(self, t: torch.Tensor) -> None:
        T = self.config.num_train_timesteps
        if t.numel() == 0 or t.min() < 0 or t.max() > T - 1:
            raise ValueError(f"timesteps must lie in 0..{T - 1}, got {t.tolist()}")

    def _check_step_inputs(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        if model_output.shape != sample.shape:
            raise ValueError(f"the model output {tuple(model_output.shape)} and the sample "
                             f"{tuple(sample.shape)} must have the same shape")


class SigmaScheduler(Scheduler):
    """Samplers that walk a list of noise levels ``sigmas`` by position (Euler, DPM-Solver++, ...).

    ``sigmas[i]`` is the noise level of ``timesteps[i]``; one extra final entry, 0, is the clean
    end. State: ``step_index``, the position of the next step, found from the first timestep seen
    (or ``begin_index``) and then advanced by each step. Duplicate timesteps are allowed.
    """

    timestep_dtype = torch.float32

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        super().__init__(config)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = torch.cat([train_sigmas.flip(0), torch.zeros(1)])  # (T + 1,) float32

    def _reset(self) -> None:
        self.step_index: int | None = None

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        """Position of a timestep in ``timesteps``; of a repeated one, the second occurrence, so
        that a run starting part way (image to image) does not skip a noise level (diffusers)."""
        matches = (self.timesteps == _as_float(timestep)).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(f"timestep {_as_float(timestep):g} is not one of this run's "
                             "timesteps: pass a value from scheduler.timesteps")
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep: torch.Tensor | float) -> int:
        if self.step_index is None:
            if self.begin_index is not None:
                self.step_index = self.begin_index
            else:
                self.step_index = self.index_for_timestep(timestep)
        return self.step_index

    def _step_position(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
                       sample: torch.Tensor) -> int:
        """The checks every step starts with, then the position of this step in ``sigmas``."""
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        i = self._init_step_index(timestep)
        if i >= len(self.timesteps):
            raise ValueError("the run is finished: every timestep has been stepped; call "
                             "set_timesteps(n) to start another")
        return i

    def _sigma_indices(self, timesteps: torch.Tensor) -> list[int]:
        """Which sigma add_noise uses for each timestep: before any step and with a begin index
        (image to image), the begin index; after steps (inpainting), the current position."""
        if self.begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten()]
        index = self.step_index if self.step_index is not None else self.begin_index
        return [index] * timesteps.numel()
