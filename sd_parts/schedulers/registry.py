"""Every sampler, described once: the name users know, what applies to it, what a step costs.

The app, the pipeline and the tests read ``SAMPLERS``; adding a sampler is its file and one line
here. ``load_scheduler`` makes a fresh sampler of a kind for a noise schedule (a Hub repo, a
folder, a ``SchedulerConfig``, or SD v1.5's), with the sigma schedule and settings asked for.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..weights import WeightsError, fetch_files, read_config
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .heun import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lcm import LCMScheduler, TCDScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .schedule import Scheduler, SchedulerConfig
from .sigmas import SIGMA_SCHEDULES
from .unipc import UniPCMultistepScheduler

# one paragraph of the app's explainer each
FAMILIES = ("first order", "ancestral", "multistep", "second order", "consistency")


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler kind. What its class knows (timestep spacings, sigma schedules, UNet calls per
    step) is read from the class, so it is written once."""

    kind: str  # load_scheduler's kind: "euler_a"
    label: str  # the name users know from AUTOMATIC1111 / ComfyUI: "Euler a"
    scheduler: type[Scheduler]
    family: str  # one of FAMILIES
    options: tuple[str, ...] = ()  # per-run arguments of the sampler's constructor: ("eta",)
    fixed: Mapping[str, object] = field(default_factory=dict)  # what defines the kind
    stochastic: bool = False  # draws fresh noise while sampling, so the seed matters beyond x_T
    distilled: bool = False  # made for a consistency-distilled UNet (LCM, TCD)
    extra_calls: int = 0  # UNet calls beyond the steps' (PNDM: its second timestep twice)
    note: str = ""  # one sentence the page may show

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.kind}: family must be one of {', '.join(FAMILIES)}")
        object.__setattr__(self, "fixed", types.MappingProxyType(dict(self.fixed)))

    @property
    def sigma_schedules(self) -> tuple[str, ...]:
        """Which of "karras", "exponential", "beta" can re-space its noise levels."""
        return self.scheduler.sigma_schedules

    @property
    def spacings(self) -> tuple[str, ...]:
        """Which timestep spacings it offers; () for LCM and TCD, which pick their own."""
        return self.scheduler.spacings

    @property
    def unet_calls_per_step(self) -> int:
        """2 for Heun and DPM2 (their last step takes one), 1 for the others."""
        return self.scheduler.order


SECOND_ORDER_NOTE = ("Two UNet evaluations per step, one for the last: {example} steps cost "
                     "{cost} evaluations, about twice an Euler run of as many steps.")
SAMPLERS: dict[str, SamplerInfo] = {info.kind: info for info in [
    SamplerInfo("ddpm", "DDPM", DDPMScheduler, "ancestral", stochastic=True,
                note="Made for hundreds of steps: with 20-50 the image stays noisy."),
    SamplerInfo("ddim", "DDIM", DDIMScheduler, "first order", options=("eta",),
                note="eta 0 (the default) is deterministic; eta 1 adds DDPM's noise."),
    SamplerInfo("pndm", "PLMS", PNDMScheduler, "multistep", extra_calls=1,
                note="SD v1's default: n steps make n + 1 UNet evaluations, because its second "
                     "timestep is evaluated twice to start the multistep blend."),
    SamplerInfo("euler", "Euler", EulerDiscreteScheduler, "first order"),
    SamplerInfo("euler_a", "Euler a", EulerAncestralDiscreteScheduler, "ancestral",
                stochastic=True, note="Fresh noise every step: the picture changes with the "
                                      "number of steps instead of settling."),
    SamplerInfo("lms", "LMS", LMSDiscreteScheduler, "multistep"),
    SamplerInfo("heun", "Heun", HeunDiscreteScheduler, "second order",
                note=SECOND_ORDER_NOTE.format(example=20, cost=39)),
    SamplerInfo("dpm2", "DPM2", KDPM2DiscreteScheduler, "second order",
                note=SECOND_ORDER_NOTE.format(example=20, cost=39)),
    SamplerInfo("dpm2_a", "DPM2 a", KDPM2AncestralDiscreteScheduler, "second order",
                stochastic=True, note=SECOND_ORDER_NOTE.format(example=20, cost=39)),
    SamplerInfo("dpm++2m", "DPM++ 2M", DPMSolverMultistepScheduler, "multistep"),
    SamplerInfo("dpm++2m_sde", "DPM++ 2M SDE", DPMSolverMultistepScheduler, "multistep",
                fixed={"algorithm_type": "sde-dpmsolver++"}, stochastic=True),
    SamplerInfo("dpm++3m_sde", "DPM++ 3M SDE", DPMSolverMultistepScheduler, "multistep",
                fixed={"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                stochastic=True),
    SamplerInfo("dpm++2s", "DPM++ 2S", DPMSolverSinglestepScheduler, "second order",
                note="Steps come in pairs, the first a stepping stone for the second; one UNet "
                     "evaluation per step, linspace timesteps only."),
    SamplerInfo("unipc", "UniPC", UniPCMultistepScheduler, "multistep"),
    SamplerInfo("deis", "DEIS", DEISMultistepScheduler, "multistep"),
    SamplerInfo("lcm", "LCM", LCMScheduler, "consistency", stochastic=True, distilled=True,
                note="For an LCM-distilled UNet: 2-8 steps (at most 50), guidance built in."),
    SamplerInfo("tcd", "TCD", TCDScheduler, "consistency", options=("eta",), stochastic=True,
                distilled=True, note="For a TCD- or LCM-distilled UNet: 2-8 steps (at most 50); "
                                     "eta (gamma, 0.3) sets how much fresh noise each step adds."),
]}


def unet_evaluations(kind: str, num_inference_steps: int) -> int:
    """How many times a run of ``num_inference_steps`` calls the UNet (without guidance; with
    it, each call is one batched call on twice the latents): the length of the sampler's
    timesteps after ``set_timesteps``."""
    info = sampler_info(kind)
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")
    calls = info.unet_calls_per_step
    return calls * n - (calls - 1) + (info.extra_calls if n >= 2 else 0)


def sampler_info(kind: str) -> SamplerInfo:
    if kind not in SAMPLERS:
        raise ValueError(f"unknown scheduler kind {kind!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[kind]


def kinds_offering(schedule: str) -> list[str]:
    return [kind for kind, info in SAMPLERS.items() if schedule in info.sigma_schedules]


def load_scheduler(
    source: str | SchedulerConfig | None = None,
    kind: str = "ddim",
    karras: bool | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    *,
    use_karras_sigmas: bool | None = None,
    use_exponential_sigmas: bool | None = None,
    use_beta_sigmas: bool | None = None,
    **overrides: object,
) -> Scheduler:
    """A fresh sampler of ``kind`` (a key of SAMPLERS) for the noise schedule of ``source``.

    ``source``: a Hub repo id or a local folder holding ``scheduler_config.json`` (at its top or in
    ``scheduler/``), a ``SchedulerConfig`` already read, or None for SD v1.5's schedule. The file's
    ``_class_name`` (PNDMScheduler for SD v1.5) is only its default sampler: ``kind`` chooses ours.

    Sigma schedules, in diffusers' words (``karras`` is ``use_karras_sigmas``): True uses it
    (at most one), False turns it off, None takes the file's setting where the kind offers it. A
    schedule the kind does not offer is refused. ``overrides`` replace the file's settings
    (``timestep_spacing="trailing"``, ``steps_offset=0``, ...) or are the sampler's own arguments
    (``eta`` for ddim and tcd).
    """
    info = sampler_info(kind)
    if karras is not None and use_karras_sigmas is not None and karras != use_karras_sigmas:
        raise ValueError(f"karras={karras} and use_karras_sigmas={use_karras_sigmas} disagree: "
                         "give one of them")
    requested = {"karras": use_karras_sigmas if karras is None else karras,
                 "exponential": use_exponential_sigmas, "beta": use_beta_sigmas}
    chosen = [name for name, on in requested.items() if on]
    if len(chosen) > 1:
        raise ValueError(f"at most one sigma schedule can be used, got {', '.join(chosen)}")
    for name in chosen:
        if name not in info.sigma_schedules:
            raise ValueError(f"{name} sigmas (use_{name}_sigmas) apply to "
                             f"{', '.join(kinds_offering(name))}, not to {kind!r}")

    options = {k: overrides.pop(k) for k in info.options if k in overrides}
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    fields -= {f"use_{name}_sigmas" for name in SIGMA_SCHEDULES}  # the arguments above
    unknown = sorted(set(overrides) - fields)
    if unknown:
        other = sorted({o for i in SAMPLERS.values() for o in i.options} & set(unknown))
        hint = f" ({', '.join(other)} applies to another kind)" if other else ""
        raise ValueError(f"unknown scheduler setting(s) {', '.join(unknown)}{hint}: use "
                         f"{', '.join(sorted(fields))} or {kind}'s "
                         f"{', '.join(info.options) or 'none'}")
    spacing = overrides.get("timestep_spacing")
    if spacing is not None and spacing not in info.spacings:
        offered = ", ".join(info.spacings) or "none (it picks its own timesteps)"
        raise ValueError(f"{kind!r} does not offer timestep_spacing {spacing!r}: it offers "
                         f"{offered}")

    if source is None or isinstance(source, SchedulerConfig):
        config = source or SchedulerConfig()
    else:
        config = read_scheduler_config(source, subfolder, revision)
    flags = {}
    for name in SIGMA_SCHEDULES:
        setting = f"use_{name}_sigmas"
        if chosen:
            flags[setting] = name in chosen
        elif requested[name] is None:  # the file's, where the kind offers it
            flags[setting] = bool(getattr(config, setting)) and name in info.sigma_schedules
        else:
            flags[setting] = False
    if len(info.spacings) == 1:  # a kind with one spacing uses it whatever the file says
        overrides["timestep_spacing"] = info.spacings[0]
    config = dataclasses.replace(config, **overrides, **flags)
    return info.scheduler(config, **info.fixed, **options)


def read_scheduler_config(source: str, subfolder: str | None = None,
                          revision: str | None = None) -> SchedulerConfig:
    """The ``scheduler_config.json`` of a Hub repo or folder (top level, then ``scheduler/``)."""
    path = fetch_files(source, ["scheduler_config.json"], subfolder, "scheduler",
                       revision)["scheduler_config.json"]
    config = read_config(path)
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object of scheduler settings")
    try:
        return SchedulerConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from exc
