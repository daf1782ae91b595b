"""The generation tab's TAESD preview, on the tiny app through gradio_client: every streamed
latent and x0 picture, the scrubber's and the strip of steps are what SD v1's TAESD draws from
that step's tensors, "decode this step" stays the full VAE, and the linear map stays the default,
so clients that do not name a preview are served as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load

from tests.helpers.serve import fetch, in_process, local_client, picture
from ui.models import TINY_VAES, Models, Settings, menu
from ui.shared import LABEL_ROOM
from ui.tabs import generate
from viz import diffusion, latents

MODELS = Models(Settings(weights="tiny"))
SIZE = 32  # pixels: the tiny VAE and the tiny TAESD both halve each side
STEPS = 4


@pytest.fixture(scope="module")
def url():
    with in_process(MODELS.settings) as address:
        yield address


def taesd_picture(latent: torch.Tensor) -> np.ndarray:
    """What the tab should show for a model-space latent (C, h, w), computed here: TAESD's image
    in [-1, 1] to 8-bit pixels."""
    image = MODELS.generation_tiny_vae(True).decode(latent[None].float())[0]
    return ((image + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def linear_picture(latent: torch.Tensor) -> np.ndarray:
    config = MODELS.pipeline(True).vae.config
    matrix = latents.rgb_map_for(config.latent_channels, config.scaling_factor).matrix()
    return diffusion.latent_preview(latent, matrix, (SIZE, SIZE))


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to one level of rounding (a value on a .5 boundary may round either way)."""
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_taesd_preview_draws_the_decoded_latent():
    """The pure view: a (C, h, w) latent becomes the image TAESD decodes, at the image's size."""
    tiny_vae = MODELS.generation_tiny_vae(True)
    assert tiny_vae.config == menu(TINY_VAES, "tiny")[MODELS.settings.tiny_vae_choices[0]]
    assert tiny_vae.downscale == MODELS.pipeline(True).latent_downscale
    latent = torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(3))
    drawn = diffusion.taesd_preview(tiny_vae, latent)
    assert drawn.dtype == np.uint8 and drawn.shape == (16, 24, 3)
    close(drawn, taesd_picture(latent))
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 10  # a picture, not a flat colour


def test_streamed_previews_are_taesd_decodes_of_the_step_latents(url):
    client = local_client(url, download_files=False)
    job = client.submit("a cat on a mat", "", STEPS, 7.5, "DDIM", False, 0, SIZE, SIZE, None, 0.8,
                        True, generate.TAESD_PREVIEW, api_name="/generate")
    job.result(timeout=120)
    updates = [dict(zip(generate.OUTPUTS, values, strict=True)) for values in job.outputs()]
    start, *steps, last = updates
    assert start["status"].startswith(f"Running {STEPS} steps.") and len(steps) == STEPS
    saved = dict(sorted(load(fetch(last["downloads"][1])).items()))  # step_000 ... step_004
    assert len(saved) == STEPS + 1

    # each step's x0, from the pipeline's own run with the same settings in this process
    x0s: list[torch.Tensor] = []
    MODELS.pipeline(True)("a cat on a mat", "", STEPS, 7.5, SIZE, SIZE,
                          torch.Generator().manual_seed(0), "ddim",
                          callback=lambda i, t, state: x0s.append(state.pred_original[0].cpu()))
    assert len(x0s) == STEPS

    close(picture(start["step_preview"]), taesd_picture(saved["step_000"][0]))
    for i, update in enumerate(steps):
        close(picture(update["step_preview"]), taesd_picture(saved[f"step_{i + 1:03d}"][0]))
        close(picture(update["x0_preview"]), taesd_picture(x0s[i]))
    close(picture(last["step_preview"]), taesd_picture(saved[f"step_{STEPS:03d}"][0]))
    # the linear map would have drawn something else
    linear = linear_picture(saved["step_001"][0])
    assert not np.array_equal(picture(steps[0]["step_preview"]), linear)

    # the strip of chosen steps' x0 and the scrubber draw as the run did
    chosen = diffusion.strip_steps(STEPS)
    strip = diffusion.step_strip([taesd_picture(x0s[i]) for i in chosen],
                                 [f"step {i + 1}: x0" for i in chosen])
    close(picture(last["strip"])[LABEL_ROOM:], strip.pixels)
    note, latent, x0, _ = client.predict(2, api_name="/scrub")
    assert note.startswith(f"After step 2 of {STEPS}")
    close(picture(latent), taesd_picture(saved["step_002"][0]))
    close(picture(x0), taesd_picture(x0s[1]))
    # while "decode this step" is the full VAE's: the final image, at the last step
    decoded = client.predict(STEPS, True, api_name="/decode_step")
    np.testing.assert_array_equal(picture(decoded), picture(last["final"]))


def test_the_linear_map_stays_the_default(url):
    """A client that sends the twelve values of before gets the linear preview."""
    client = local_client(url, download_files=False)
    parameters = client.view_api(print_info=False, return_format="dict")[
        "named_endpoints"]["/generate"]["parameters"]
    preview = next(p for p in parameters if p["parameter_name"] == "preview")
    assert preview["parameter_default"] == generate.LINEAR_PREVIEW
    job = client.submit("a cat", "", 1, 7.5, "DDIM", False, 0, SIZE, SIZE, None, 0.8, True,
                        api_name="/generate")
    job.result(timeout=120)
    start = dict(zip(generate.OUTPUTS, job.outputs()[0], strict=True))
    assert start["step_preview"] is not None
    saved = load(fetch(dict(zip(generate.OUTPUTS, job.outputs()[-1], strict=True))
                       ["downloads"][1]))
    expected = linear_picture(saved["step_000"][0])
    np.testing.assert_array_equal(picture(start["step_preview"]), expected)
