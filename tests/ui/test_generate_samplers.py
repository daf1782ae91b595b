"""/generate with every sampler the menu offers beyond the first five, with the exponential and
beta sigma schedules and with eta, through gradio_client on the tiny app: each image is the
pipeline's own for the same settings, the status counts the UNet evaluations, and a setting a
sampler does not take is refused with the samplers that do. Older clients that name none of the
new parameters are served as before. The few-steps preset, on a plain and an LCM-distilled UNet.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from gradio_client import Client

import sd_parts
from sd_parts.schedulers import SAMPLERS, unet_evaluations
from tests.helpers.serve import in_process, local_client, picture
from ui.models import Models, Settings
from ui.sections import samplers
from ui.shared import literal
from ui.tabs import generate

MODELS = Models(Settings(weights="tiny"))
SIZE, STEPS = 32, 3
NEW_KINDS = ["euler_a", "lms", "heun", "dpm2", "dpm2_a", "dpm++2m_sde", "dpm++3m_sde", "dpm++2s",
             "unipc", "deis", "lcm", "tcd"]


@pytest.fixture(scope="module")
def client():
    with in_process(MODELS.settings) as address:
        yield local_client(address, download_files=False)


def generate_image(client: Client, kind: str, **options: object) -> tuple[str, np.ndarray | None]:
    status, *_, final, _, _, _, _ = client.predict(
        prompt="a cat on a mat", negative_prompt="", num_inference_steps=STEPS,
        guidance_scale=7.5, scheduler=SAMPLERS[kind].label, use_karras_sigmas=False, seed=3,
        width=SIZE, height=SIZE, image=None, strength=0.8, exact=True, **options,
        api_name="/generate")
    return status, None if final is None else picture(final)


def pipeline_image(kind: str, **options: object) -> np.ndarray:
    result = MODELS.pipeline(True)("a cat on a mat", "", STEPS, 7.5, SIZE, SIZE,
                                   torch.Generator().manual_seed(3), kind, **options)
    return (result.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_each_new_sampler_makes_the_pipelines_image(client, kind):
    status, image = generate_image(client, kind)
    evaluations = unet_evaluations(kind, STEPS)
    counted = f"{STEPS} steps" if evaluations == STEPS else \
        f"{STEPS} steps, {evaluations} UNet evaluations"
    assert status.startswith(f"Done: {counted}"), status
    np.testing.assert_array_equal(image, pipeline_image(kind))


@pytest.mark.parametrize("kind, options", [
    ("heun", {"use_exponential_sigmas": True}),
    ("dpm++2m", {"use_beta_sigmas": True}),
    ("ddim", {"eta": 1.0}),
    ("tcd", {"eta": 0.0}),
])
def test_sigma_schedules_and_eta_reach_the_sampler(client, kind, options):
    status, image = generate_image(client, kind, **options)
    assert status.startswith("Done: "), status
    np.testing.assert_array_equal(image, pipeline_image(kind, **options))
    assert not np.array_equal(image, pipeline_image(kind))  # the option changed the run


@pytest.mark.parametrize("kind, options, message", [
    ("ddim", {"use_exponential_sigmas": True}, "Exponential sigmas do not apply to DDIM; they do "
                                               "to Euler, LMS, Heun"),
    ("euler", {"use_exponential_sigmas": True, "use_beta_sigmas": True},
     "Choose one sigma schedule at most; got Exponential and Beta."),
    ("euler", {"eta": 0.5}, "eta does not apply to Euler; it does to DDIM and TCD."),
])
def test_a_setting_the_sampler_does_not_take_is_refused(client, kind, options, message):
    status, image = generate_image(client, kind, **options)
    assert status.startswith(literal(message)) and image is None


def test_the_tab_checks_eta_itself():
    """Gradio's number box bounds eta for the page and the API; a caller of the tab's function
    gets the same limit."""
    with pytest.raises(ValueError, match=r"eta must be from 0 \(no fresh noise\) to 1; got 2."):
        generate.parse_request("a cat", "", 4, 7.5, "TCD", False, 0, 32, 32, None, 0.8, 8,
                               eta=2.0)


def test_the_new_parameters_are_optional_and_in_diffusers_words(client):
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"][
        "/generate"]["parameters"]
    names = [p["parameter_name"] for p in parameters]
    assert names[-3:] == ["use_exponential_sigmas", "use_beta_sigmas", "eta"]
    assert all(p["parameter_has_default"] for p in parameters[-3:])
    assert [p["parameter_default"] for p in parameters[-3:]] == [False, False, None]


class DistilledModels(Models):
    """The tiny models with an LCM-distilled UNet (time_cond_proj_dim), as --unet would load."""

    def unet(self, exact: bool) -> sd_parts.UNet2DConditionModel:
        torch.manual_seed(0)
        config = dataclasses.replace(sd_parts.TINY_UNET, time_cond_proj_dim=32)
        return sd_parts.UNet2DConditionModel(config).eval().requires_grad_(False)


def test_the_few_steps_preset_says_what_a_plain_unet_does_with_it():
    preset = samplers.few_steps(MODELS, True, 2)
    assert {k: preset[k] for k in ("scheduler", "num_inference_steps", "width", "height",
                                   "guidance_scale")} == {
        "scheduler": "LCM", "num_inference_steps": 4, "width": 512, "height": 512,
        "guidance_scale": 1.0}
    assert "not LCM-distilled" in preset["note"] and "LCM-LoRA" in preset["note"]
    assert "--unet" in preset["note"] and "blurred" in preset["note"]


def test_the_few_steps_preset_on_a_distilled_unet_runs_one_pass_a_step():
    models = DistilledModels(Settings(weights="tiny"))
    preset = samplers.few_steps(models, True, 2)
    assert preset["guidance_scale"] == samplers.DISTILLED_GUIDANCE
    assert preset["negative_prompt"] == "" and "is LCM-distilled" in preset["note"]
    request = generate.parse_request("a cat", preset["negative_prompt"],
                                     preset["num_inference_steps"], preset["guidance_scale"],
                                     preset["scheduler"], False, 0, SIZE, SIZE, None, 0.8, 2)
    views = list(generate.generate(models, request, True, threading.Event()))
    assert views[-1]["status"].startswith("Done: 4 steps")
    assert views[-1]["guidance"] is None  # guidance embedded: no unconditional branch
