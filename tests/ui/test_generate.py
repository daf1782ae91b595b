"""The generation tab, started in-process with tiny random weights and driven through
gradio_client: the stream of steps, seeds, Stop, image to image, the scrubber, the word maps, the
forward process and every bad input. Pictures are fetched as a browser would and compared with
the pipeline's own tensors."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import load

import app
from tests.helpers.references import reference_text_encoder, tiny_reference_vae
from tests.helpers.serve import fetch, in_process, local_client, picture
from ui.models import Models, Settings
from ui.sections import steps as steps_section
from ui.tabs import generate
from viz import diffusion, latents, pixels

MODELS = Models(Settings(weights="tiny"))
SIZE = 32  # pixels; the tiny VAE halves each side, so the latent is 16 x 16
MARKER = (220, 60, 40)  # the noise-level chart's current-step dot
FORWARD = ("status", "noisy", "x0", "schedule")


@pytest.fixture(scope="module")
def url():
    with in_process(MODELS.settings) as address:
        yield address


@pytest.fixture
def client(url) -> Client:
    """A visitor of their own (a session of their own). Files are fetched only when looked at:
    downloading every streamed picture would take most of the test's time."""
    return local_client(url, download_files=False)


def step_latents(value: dict) -> dict[str, torch.Tensor]:
    """The latents file of a run: step_000 (the start), then one latent after each step."""
    return dict(sorted(load(fetch(value)).items()))


def submit(client: Client, prompt: str = "a cat on a mat", steps: int = 4, guidance: float = 7.5,
           scheduler: str = "DDIM", karras: bool = False, seed: int = 0, size: int = SIZE,
           init: str | None = None, strength: float = 0.8):
    # the endpoint's parameters are named as diffusers names them
    return client.submit(prompt=prompt, negative_prompt="", num_inference_steps=steps,
                         guidance_scale=guidance, scheduler=scheduler,
                         use_karras_sigmas=karras, seed=seed, width=size, height=size,
                         image=handle_file(init) if init else None, strength=strength,
                         exact=True, api_name="/generate")


def run(client: Client, **settings) -> list[dict]:
    """Every update of one run, each keyed by the tab's output names."""
    job = submit(client, **settings)
    job.result(timeout=120)
    return [dict(zip(generate.OUTPUTS, values, strict=True)) for values in job.outputs()]


def expected_image(seed: int, steps: int = 4, prompt: str = "a cat on a mat",
                   size: int = SIZE) -> np.ndarray:
    """The pipeline's own run, in this process, with the tab's default settings."""
    result = MODELS.pipeline(True)(prompt, "", steps, 7.5, size, size,
                                   torch.Generator().manual_seed(seed), "ddim")
    return (result.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def rgb_matrix() -> np.ndarray:
    vae = MODELS.pipeline(True).vae
    return latents.rgb_map_for(vae.config.latent_channels, vae.config.scaling_factor).matrix()


def marker_x(chart: np.ndarray) -> float:
    xs = np.nonzero((chart == MARKER).all(axis=-1))[1]
    assert len(xs), "no current-step marker in the chart"
    return float(xs.mean())


@pytest.fixture(scope="module")
def first_run(url) -> tuple[list[dict], dict[str, torch.Tensor]]:
    updates = run(local_client(url, download_files=False), seed=0)
    return updates, step_latents(updates[-1]["downloads"][1])


def test_a_streamed_run_yields_each_step_then_the_image(first_run):
    updates, steps_file = first_run
    start, *step_updates, last = updates
    assert start["status"].startswith("Running 4 steps.")
    assert len(step_updates) == 4  # one update per step
    matrix, previews, chart_xs = rgb_matrix(), [], []
    # the start latent is shown before the first UNet call
    np.testing.assert_array_equal(
        picture(start["step_preview"]),
        diffusion.latent_preview(steps_file["step_000"][0], matrix, (SIZE, SIZE)))
    for i, update in enumerate(step_updates):
        assert update["status"].startswith(f"Step {i + 1} of 4 · timestep ")
        assert update["final"] is None  # the image comes at the end
        # the streamed preview is the latent after this step, as the latents file keeps it
        preview = picture(update["step_preview"])
        expected = diffusion.latent_preview(steps_file[f"step_{i + 1:03d}"][0], matrix,
                                            (SIZE, SIZE))
        np.testing.assert_array_equal(preview, expected)
        previews.append(preview.tobytes())
        chart_xs.append(marker_x(picture(update["chart"])))
        assert picture(update["x0_preview"]).shape == (SIZE, SIZE, 3)
    assert len(set(previews)) == 4  # the latent changes at every step
    assert chart_xs == sorted(chart_xs) and len(set(chart_xs)) == 4  # the marker moves on
    assert last["status"].startswith("Done: 4 steps")
    np.testing.assert_array_equal(picture(last["final"]), expected_image(0))
    # the start latent is the seed's noise
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    assert steps_file["step_000"].equal(noise)
    assert len(steps_file) == 5
    for name in ("strip", "guidance", "word_maps", "channels"):
        assert picture(last[name]).shape[1] > 100, name
    png = Image.open(io.BytesIO(fetch(last["downloads"][0])))
    settings = json.loads(png.text["parameters"])
    assert settings | {"prompt": "a cat on a mat", "num_inference_steps": 4, "seed": 0,
                       "scheduler": "ddim",
                       "width": SIZE, "height": SIZE, "strength": None} == settings
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), picture(last["final"]))


def test_the_same_seed_gives_the_same_image_another_seed_another(client, first_run):
    first = picture(first_run[0][-1]["final"])
    again = picture(run(client, seed=0)[-1]["final"])
    other = picture(run(client, seed=1)[-1]["final"])
    np.testing.assert_array_equal(again, first)
    assert np.abs(other.astype(int) - first).mean() > 1


def test_scrub_decode_and_word_maps_read_the_finished_run(client):
    assert "Generate an image first" in client.predict(1, api_name="/scrub")[0]
    last = run(client, steps=3, seed=5)[-1]
    steps_file = step_latents(last["downloads"][1])
    matrix = rgb_matrix()
    note, latent, x0, guidance = client.predict(0, api_name="/scrub")
    assert "start latent" in note and x0 is None and guidance is None
    np.testing.assert_array_equal(
        picture(latent), diffusion.latent_preview(steps_file["step_000"][0], matrix, (SIZE,) * 2))
    note, latent, x0, guidance = client.predict(2, api_name="/scrub")
    assert note.startswith("After step 2 of 3")
    np.testing.assert_array_equal(
        picture(latent), diffusion.latent_preview(steps_file["step_002"][0], matrix, (SIZE,) * 2))
    assert picture(x0).shape == (SIZE, SIZE, 3) and picture(guidance).shape[1] > 100
    # the VAE's image of the last step is the final image
    decoded = client.predict(3, True, api_name="/decode_step")
    np.testing.assert_array_equal(picture(decoded), picture(last["final"]))
    # the whole run at the latent grid is the map shown at the end; one step differs
    whole = picture(client.predict(1, 3, "latent grid", api_name="/word_maps"))
    np.testing.assert_array_equal(whole, picture(last["word_maps"]))
    first_step = picture(client.predict(1, 1, "16 x 16", api_name="/word_maps"))
    assert first_step.shape != whole.shape or not np.array_equal(first_step, whole)


def test_stop_ends_the_run_and_keeps_the_steps_made(client):
    job = submit(client, steps=100)
    deadline = time.monotonic() + 60
    while sum(str(o[0]).startswith("Step ") for o in job.outputs()) < 3:
        assert time.monotonic() < deadline and not job.done(), "no steps arrived"
        time.sleep(0.02)
    assert client.predict(api_name="/stop") == "Stopping after this step..."
    job.result(timeout=60)
    updates = [dict(zip(generate.OUTPUTS, v, strict=True)) for v in job.outputs()]
    last = updates[-1]
    assert last["status"].startswith("Stopped after ")
    made = int(last["status"].split()[2])
    assert 3 <= made < 100 and last["status"].startswith(f"Stopped after {made} of 100 steps")
    assert sum(u["status"].startswith("Step ") for u in updates) == made  # each one shown
    assert len(step_latents(last["downloads"][1])) == made + 1  # and kept
    assert picture(last["final"]).shape == (SIZE, SIZE, 3)
    assert client.predict(api_name="/stop") == "Nothing is running."


def test_the_scrubber_spans_the_steps_made():
    """After a run the scrubber reaches its last step, after a stopped run the last step made;
    it stands there and shows that step as the run's last update did."""
    def last_views(steps: int, stop_after: int | None = None) -> dict:
        stop = threading.Event()
        request = generate.parse_request("a cat", "", steps, 7.5, "DDIM", False, 0, SIZE, SIZE,
                                         None, 0.8, 2)
        for views in generate.generate(MODELS, request, True, stop):
            if stop_after is not None and views["status"].startswith(f"Step {stop_after} of"):
                stop.set()
        return views

    # before any run: every output as it is (Gradio's skip), none missing
    assert all(value == gr.skip() for value in steps_section.scrubber_after_run(None).values())
    done, stopped = last_views(3), last_views(100, stop_after=2)
    made = int(stopped["status"].split()[2])
    assert stopped["status"].startswith(f"Stopped after {made} of 100") and made < 100
    for views, last in ((done, 3), (stopped, made)):
        after = steps_section.scrubber_after_run(views["record"])
        assert (after["scrubber"].maximum, after["scrubber"].value) == (last, last)
        assert after["last_step"].value == last  # the word maps' "To step"
        assert after["scrub_note"].startswith(f"After step {last} of {last} ")
        np.testing.assert_array_equal(after["scrub_latent"], views["step_preview"])
        np.testing.assert_array_equal(after["scrub_x0"], views["x0_preview"])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 32 x 32 picture with structure (the sides are those of the runs, so no resizing)."""
    rng = np.random.default_rng(0)
    pixels_ = np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3)), 8, 0), 8, 1)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels_.astype(np.uint8)).save(path)
    return path


def test_image_to_image_strength_0_keeps_the_image_and_1_ignores_it(client, photo):
    updates = run(client, init=str(photo), strength=0.0, seed=3)
    assert len(updates) == 2 and updates[0]["status"].startswith("Running 0 steps")
    kept = picture(updates[-1]["final"])
    # strength 0: the VAE's reconstruction of the image (a sample of its latent, seeded)
    vae = MODELS.pipeline(True).vae
    image = pixels.image_to_tensor(Image.open(photo).convert("RGB"))
    latent = vae.encode(image).sample(torch.Generator().manual_seed(3))
    reconstruction = (vae.decode(latent)[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(kept, (reconstruction * 255).round(), atol=1)
    # strength 1: the image plays no part; the run is text to image with the same seed
    ignored = run(client, init=str(photo), strength=1.0, seed=3)
    assert sum(u["status"].startswith("Step ") for u in ignored) == 4
    np.testing.assert_array_equal(picture(ignored[-1]["final"]), expected_image(3))
    # in between: half the steps, from the image
    half = run(client, init=str(photo), strength=0.5, seed=3)
    assert sum(u["status"].startswith("Step ") for u in half) == 2
    mixed = picture(half[-1]["final"])
    assert not np.array_equal(mixed, kept) and not np.array_equal(mixed, expected_image(3))


@pytest.mark.parametrize("change, message", [
    ({"size": 33}, "Width must be a multiple of 2 from 2 to 1024 pixels; got 33."),
    ({"steps": 2.5}, "Steps must be a whole number from 1 to 100; got 2.5."),
    ({"karras": True}, "Karras sigmas do not apply to DDIM"),
])
def test_bad_input_gets_its_message_and_nothing_else(client, change, message):
    (update,) = run(client, **change)
    assert message in update["status"]
    assert all(update[name] is None for name in generate.OUTPUTS if name != "status")


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "Value 0 is less than minimum value 1."),
    ({"steps": 10_000}, "Value 10000 is greater than maximum value 100."),
    ({"size": 2048}, "Value 2048 is greater than maximum value 1024."),
    ({"scheduler": "Euler b"}, "Value: Euler b is not in the list of choices"),
])
def test_out_of_range_input_is_refused_before_the_tab_runs(client, change, message):
    """Gradio checks the bounds of sliders and number boxes itself, with this message."""
    with pytest.raises(AppError, match=message):
        submit(client, **change).result(timeout=60)


def test_guidance_nan_gets_its_message(url):
    """JSON has no NaN, but Python's parser (and so the server's) takes the literal."""
    # a raw HTTP call sends every input, the optional last three (sigma schedules, eta) too
    body = ('{"data": ["a cat", "", 4, NaN, "DDIM", false, 0, 32, 32, null, 0.8, true, '
            '"linear RGB map", false, false, null]}')
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        event = http.post("gradio_api/call/generate", content=body,
                          headers={"content-type": "application/json"}).json()["event_id"]
        stream = http.get(f"gradio_api/call/generate/{event}").text
    events = [line for line in stream.splitlines() if line.startswith("event: ")]
    assert events == ["event: generating", "event: complete"]  # one answer, no run
    data = json.loads(stream.splitlines()[stream.splitlines().index("event: complete") + 1][6:])
    assert data[0] == "Guidance scale must be from 1 (no guidance) to 20; got nan."
    assert all(value is None for value in data[1:])


@pytest.mark.parametrize("values, message", [
    ((0, 7.5, 32), "Steps must be a whole number from 1 to 100; got 0."),
    ((10_000, 7.5, 32), "Steps must be a whole number from 1 to 100; got 10000."),
    ((4, float("nan"), 32), "Guidance scale must be from 1 (no guidance) to 20; got nan."),
    ((4, 7.5, 2048), "Width must be a multiple of 8 from 8 to 1024 pixels; got 2048."),
    ((4, 7.5, 100), "Width must be a multiple of 8 from 8 to 1024 pixels; got 100."),
    ((float("inf"), 7.5, 32), "Steps, seed and strength must be finite numbers."),
])
def test_the_tab_checks_every_value_itself(values, message):
    """The same limits for a caller of the tab's function, where no form has checked them."""
    steps, guidance, size = values
    with pytest.raises(ValueError) as error:
        generate.parse_request("a cat", "", steps, guidance, "DDIM", False, 0, size, size, None,
                               0.8, 8)
    assert str(error.value) == message


@pytest.mark.parametrize("seed", [-1, 2.5, 1e20])
def test_seeds_outside_a_generator_are_refused(seed):
    with pytest.raises(ValueError, match=r"The seed must be a whole number from 0 to 2\^63 - 1"):
        generate.parse_request("a cat", "", 4, 7.5, "DDIM", False, seed, 32, 32, None, 0.8, 8)


def test_a_missing_unet_gets_its_message(tmp_path, monkeypatch):
    """Real-weight settings, offline with an empty cache: the VAE and the text encoder come from
    local folders, the UNet from nowhere."""
    import huggingface_hub.constants

    from ui import loading

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(app, "HUB", loading.HubAccess())
    tiny_reference_vae().save_pretrained(tmp_path / "vae")
    reference_text_encoder(hidden_size=32, intermediate_size=64, layers=2, heads=4
                           ).save_pretrained(tmp_path / "text_encoder")
    settings = Settings(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text_encoder"))
    with in_process(settings) as address:
        (update,) = run(local_client(address, download_files=False))
    assert update["status"].startswith("Could not load the UNet")
    assert "not in the local cache" in update["status"]
    assert all(update[name] is None for name in generate.OUTPUTS if name != "status")


def test_forward_process_at_t0_is_the_reconstruction(client, photo):
    at_0 = dict(zip(FORWARD, client.predict(handle_file(str(photo)), 0, 0, True, True,
                                            api_name="/forward_noise"), strict=True))
    assert at_0["status"].startswith("t = 0") and at_0["x0"] is None
    vae = MODELS.pipeline(True).vae
    fitted, _ = pixels.fit_for_vae(Image.open(photo).convert("RGB"), SIZE, 2)
    decoded = vae.decode(vae.encode(pixels.image_to_tensor(fitted)).mean)[0]
    expected = ((decoded / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(picture(at_0["noisy"]), expected)
    at_1000 = dict(zip(FORWARD, client.predict(handle_file(str(photo)), 1000, 0, True, True,
                                               api_name="/forward_noise"), strict=True))
    assert np.abs(picture(at_1000["noisy"]).astype(int) - expected).mean() > 5  # mostly noise
    assert picture(at_1000["x0"]).shape == expected.shape
