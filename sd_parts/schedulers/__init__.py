"""The samplers of the denoising loop, one small file per family, with the maths written out.

Start with ddpm.py: it states the forward process and ancestral sampling that the others change.
schedule.py holds what they share (the betas, the spacing of timesteps, the sampler interface).
Each sampler equals the diffusers class of the same name, for the same configuration.

    scheduler = load_scheduler(None, kind="dpm++2m", karras=True)   # None: SD v1.5's schedule
    scheduler.set_timesteps(25)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, text)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
"""

from __future__ import annotations

import dataclasses

from ..weights import WeightsError, fetch_files, read_config
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .pndm import PNDMScheduler
from .schedule import Scheduler, SchedulerConfig, StepOutput

KINDS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}
KARRAS_KINDS = ("euler", "dpm++2m")  # the samplers that walk a list of sigmas
SAMPLER_OPTIONS = {"ddim": ("eta",)}  # per-sampler arguments, beside the file's settings


def load_scheduler(
    source: str | SchedulerConfig | None = None,
    kind: str = "ddim",
    karras: bool | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    **overrides: object,
) -> Scheduler:
    """A fresh sampler of ``kind`` for the noise schedule of ``source``.

    ``source``: a Hub repo id or a local folder holding ``scheduler_config.json`` (at its top or in
    ``scheduler/``), a ``SchedulerConfig`` already read, or None for SD v1.5's schedule. The file's
    ``_class_name`` (PNDMScheduler for SD v1.5) is only its default sampler: ``kind`` chooses
    ours, one of ddpm, ddim, euler, pndm, dpm++2m. ``karras``: Karras sigmas, for euler and
    dpm++2m only; None takes the file's ``use_karras_sigmas`` for those. ``overrides`` replace
    the file's settings (``timestep_spacing="trailing"``, ``steps_offset=0``, ...) or are the
    sampler's own arguments (``eta`` for ddim).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scheduler kind {kind!r}: use one of {', '.join(KINDS)}")
    karras_setting = overrides.pop("use_karras_sigmas", None)
    requested_karras = karras if karras is not None else karras_setting
    if requested_karras and kind not in KARRAS_KINDS:
        raise ValueError(f"Karras sigmas apply to samplers that walk a list of noise levels "
                         f"({', '.join(KARRAS_KINDS)}), not to {kind!r}")

    options = {k: overrides.pop(k) for k in SAMPLER_OPTIONS.get(kind, ()) if k in overrides}
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        other = sorted({o for opts in SAMPLER_OPTIONS.values() for o in opts} & set(unknown))
        hint = f" ({', '.join(other)} applies to another kind)" if other else ""
        raise ValueError(f"unknown scheduler setting(s) {', '.join(unknown)}{hint}: use "
                         f"{', '.join(sorted(fields))} or {kind}'s "
                         f"{', '.join(SAMPLER_OPTIONS.get(kind, ())) or 'none'}")

    if source is None or isinstance(source, SchedulerConfig):
        config = source or SchedulerConfig()
    else:
        config = read_scheduler_config(source, subfolder, revision)
    use_karras = (requested_karras if requested_karras is not None
                  else config.use_karras_sigmas and kind in KARRAS_KINDS)
    config = dataclasses.replace(config, **overrides, use_karras_sigmas=bool(use_karras))
    return KINDS[kind](config, **options)


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


__all__ = [
    "KINDS", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler", "PNDMScheduler", "Scheduler", "SchedulerConfig", "StepOutput",
    "load_scheduler", "read_scheduler_config",
]
