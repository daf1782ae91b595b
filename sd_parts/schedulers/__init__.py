"""The samplers of the denoising loop, one small file per family, with the maths written out.

Start with ddpm.py: it states the forward process and ancestral sampling that the others change.
schedule.py holds what they share (the betas, the spacing of timesteps, the sampler interface),
sigmas.py the re-spacings of the noise levels (Karras, exponential, beta), registry.py the table
of samplers (``SAMPLERS``) and ``load_scheduler``. Each sampler equals the diffusers class of the
same name, for the same configuration.

    scheduler = load_scheduler(None, kind="dpm++2m", use_karras_sigmas=True)  # None: SD v1.5
    scheduler.set_timesteps(25)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, text)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
"""

from __future__ import annotations

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
from .registry import (
    FAMILIES,
    SAMPLERS,
    SamplerInfo,
    load_scheduler,
    read_scheduler_config,
    sampler_info,
    unet_evaluations,
)
from .schedule import Scheduler, SchedulerConfig, StepOutput
from .sigmas import SIGMA_SCHEDULES
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
    "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "TCDScheduler",
    "UniPCMultistepScheduler",
    "FAMILIES", "SAMPLERS", "SIGMA_SCHEDULES", "SamplerInfo", "Scheduler", "SchedulerConfig",
    "StepOutput", "load_scheduler", "read_scheduler_config", "sampler_info", "unet_evaluations",
]
