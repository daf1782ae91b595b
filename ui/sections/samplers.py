"""The generation form's sampler settings beyond the sampler itself: the sigma schedule (Karras,
exponential, beta) and eta where the chosen sampler takes them, and the "few steps" preset.

What applies to a sampler is read from ``sd_parts.schedulers.SAMPLERS`` (its sigma schedules,
its options, its constructor's default eta); nothing here keeps a copy of that table. The preset
sets LCM, 4 steps and 512 px, SD v1's own size, and says what it changed; it reads the loaded
UNet to tell a guidance-distilled (LCM) UNet, which has ``time_cond_proj_dim`` in its config,
from SD v1.5's own, where LCM's four steps cannot make a sharp image.
"""

from __future__ import annotations

import inspect

import gradio as gr
import numpy as np

from sd_parts.schedulers import SAMPLERS
from ui.models import Models
from ui.shared import REFUSED, literal

# in diffusers' words: use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta"}
SCHEDULE_INFO = {
    "karras": "dense near the end (Karras et al., 2022)",
    "exponential": "evenly spaced in log σ",
    "beta": "dense at both ends, where layout and fine detail form (Lee et al., 2024)",
}
FEW_STEPS = {"scheduler": "lcm", "num_inference_steps": 4, "size": 512}
# LatentConsistencyModelPipeline's default guidance, which a distilled UNet takes as an input
DISTILLED_GUIDANCE = 8.5
LORA_GUIDANCE = 1.0  # an LCM-LoRA has guidance distilled into it as well: 1 (no extra pass)


def offering(schedule: str) -> list[str]:
    """The menu's names of the samplers that offer ``schedule``."""
    return [info.label for info in SAMPLERS.values() if schedule in info.sigma_schedules]


def default_eta(kind: str) -> float | None:
    """The sampler's own eta (DDIM 0, TCD 0.3), read from its constructor; None without one."""
    if "eta" not in SAMPLERS[kind].options:
        return None
    return float(inspect.signature(SAMPLERS[kind].scheduler).parameters["eta"].default)


def check_options(kind: str, use_karras_sigmas: bool, use_exponential_sigmas: bool,
                  use_beta_sigmas: bool, eta: float | None) -> float | None:
    """Refuse a sigma schedule or an eta the sampler does not take, with a ValueError that says
    which samplers do; the eta to run with (None: the sampler's own)."""
    label = SAMPLERS[kind].label
    flags = {"karras": use_karras_sigmas, "exponential": use_exponential_sigmas,
             "beta": use_beta_sigmas}
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise ValueError(f"Choose one sigma schedule at most; got "
                         f"{' and '.join(SCHEDULE_NAMES[name] for name in chosen)}.")
    for name in chosen:
        if name not in SAMPLERS[kind].sigma_schedules:
            raise ValueError(f"{SCHEDULE_NAMES[name]} sigmas do not apply to {label}; they do "
                             f"to {', '.join(offering(name))}.")
    if eta is None:
        return None
    takes = [info.label for info in SAMPLERS.values() if "eta" in info.options]
    if "eta" not in SAMPLERS[kind].options:
        raise ValueError(f"eta does not apply to {label}; it does to {' and '.join(takes)}.")
    if not np.isfinite(eta) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be from 0 (no fresh noise) to 1; got {eta:g}.")
    return float(eta)


class SamplerOptions:
    """The sigma schedule boxes (at most one ticked) and eta, inside the open form."""

    def __init__(self, kind: str) -> None:
        offered = SAMPLERS[kind].sigma_schedules
        # shown only for a sampler that offers a sigma schedule (most of those walking sigma)
        with gr.Column(visible=bool(offered), elem_id="sigma-schedules") as self.schedules:
            with gr.Row():
                self.karras, self.exponential, self.beta = (
                    gr.Checkbox(False, label=f"{SCHEDULE_NAMES[name]} sigmas", min_width=80,
                                visible=name in offered) for name in SCHEDULE_NAMES)
            gr.Markdown("Sigma schedules re-space the noise levels. "
                        + "; ".join(f"{SCHEDULE_NAMES[name]}: {info}"
                                    for name, info in SCHEDULE_INFO.items()) + ".",
                        elem_classes="info-text")
        self.eta = gr.Number(default_eta(kind), label="eta (fresh noise per step; empty: the "
                             "sampler's own)", minimum=0, maximum=1, step=0.05,
                             visible=default_eta(kind) is not None, elem_id="sampler-eta")
        self.boxes = {"karras": self.karras, "exponential": self.exponential,
                      "beta": self.beta}
        self.note = gr.Markdown(self.sampler_note(kind), elem_id="sampler-note")

    @staticmethod
    def sampler_note(kind: str) -> str:
        info = SAMPLERS[kind]
        applies = ", ".join(SCHEDULE_NAMES[s] for s in info.sigma_schedules) or "none"
        return f"*{info.label}* ({info.family}): sigma schedules: {applies}. {info.note}".strip()

    def for_sampler(self, label: str) -> tuple:
        """The boxes as they apply to the sampler the menu names: only the schedules it offers
        are shown (the others unticked), eta (at the sampler's own value) only where it
        applies."""
        kind = next((k for k, info in SAMPLERS.items() if info.label == label), None)
        if kind is None:
            return (gr.skip(),) * 6
        offered = SAMPLERS[kind].sigma_schedules
        boxes = tuple(gr.Checkbox(visible=True) if name in offered
                      else gr.Checkbox(False, visible=False) for name in self.boxes)
        eta = default_eta(kind)
        return (gr.Column(visible=bool(offered)), *boxes,
                gr.Number(eta, visible=eta is not None), self.sampler_note(kind))

    def wire(self, scheduler: gr.Dropdown) -> None:
        outputs = [self.schedules, *self.boxes.values(), self.eta, self.note]
        scheduler.change(self.for_sampler, scheduler, outputs, api_visibility="private",
                         queue=False, show_progress="hidden")
        for name, box in self.boxes.items():  # ticking one schedule unticks the others
            others = [b for n, b in self.boxes.items() if n != name]
            box.input(lambda on, n=len(others): [gr.Checkbox(False) if on else gr.skip()] * n,
                      box, others, api_visibility="private", queue=False,
                      show_progress="hidden")


def few_steps(models: Models, exact: bool, multiple: int) -> dict[str, object]:
    """The preset's form values and what it says it changed; a note of what stands in the way
    when the UNet cannot be loaded."""
    size = FEW_STEPS["size"] // multiple * multiple
    try:
        distilled = models.unet(bool(exact)).config.time_cond_proj_dim is not None
    except REFUSED as exc:
        return {"note": literal(f"The preset needs the UNet: {exc}")}
    label = SAMPLERS[FEW_STEPS["scheduler"]].label
    values = {"scheduler": label, "num_inference_steps": FEW_STEPS["num_inference_steps"],
              "width": size, "height": size}
    guidance = DISTILLED_GUIDANCE if distilled else LORA_GUIDANCE
    values["guidance_scale"] = guidance
    changed = (f"**Few steps: {label}, {values['num_inference_steps']} steps, {size} x {size} px, "
               f"guidance {guidance:g}.** Each LCM step predicts the clean image outright, then "
               "noises it again, less, for the next step.")
    if distilled:
        values["negative_prompt"] = ""
        return values | {"note": (
            f"{changed} This UNet is LCM-distilled (`time_cond_proj_dim` in its config): the "
            "guidance scale (diffusers' LatentConsistencyModelPipeline's default) goes into the "
            "UNet as an input, so a step is one pass on the prompt alone, with no negative "
            "prompt (cleared).")}
    return values | {"note": (
        f"{changed} **This UNet is not LCM-distilled** (no `time_cond_proj_dim`, as SD v1.5's "
        "own): LCM needs distilled weights, an LCM-LoRA (the *What changed* tab's preset) or an "
        "LCM UNet started with `--unet`. Trained to remove a little noise at a time, this one "
        "turns four jumps into a blurred image. Guidance 1 is what an LCM-LoRA wants (one pass "
        "a step); here it means no guidance.")}
