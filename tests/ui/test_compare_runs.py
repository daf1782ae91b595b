"""Compare runs through gradio_client, on the tiny app: four runs differing in guidance stream
one by one, start from the same seed's noise and end in four different images, each the
pipeline's own; Stop ends the comparison and starts no other run; a bad value names its run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from gradio_client import Client
from safetensors import safe_open

from tests.helpers.serve import fetch, in_process, local_client, picture
from ui.models import Models, Settings
from ui.sections import compare_runs
from ui.shared import literal
from viz import pixels

MODELS = Models(Settings(weights="tiny"))
SIZE = 32  # pixels; the tiny VAE halves each side
GUIDANCE = (1.0, 3.0, 7.5, 12.0)


@pytest.fixture(scope="module")
def client():
    with in_process(MODELS.settings) as address:
        yield local_client(address, download_files=False)


def submit(client: Client, vary: str, values: str, steps: int = 3, scheduler: str = "DDIM",
           seed: int = 7, **changes: object):
    settings = dict(prompt="a cat on a mat", negative_prompt="", num_inference_steps=steps,
                    guidance_scale=7.5, scheduler=scheduler, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, seed=seed, width=SIZE,
                    height=SIZE, exact=True, vary=vary, values=values) | changes
    return client.submit(**settings, api_name="/compare_runs")


def updates(job) -> list[dict]:
    return [dict(zip(compare_runs.OUTPUTS, values, strict=True)) for values in job.outputs()]


@pytest.fixture(scope="module")
def guidance_runs(client) -> list[dict]:
    job = submit(client, "guidance scale", " | ".join(f"{g:g}" for g in GUIDANCE))
    job.result(timeout=120)
    return updates(job)


def test_four_guidance_scales_four_images_from_the_same_noise(guidance_runs, tmp_path):
    last = guidance_runs[-1]
    assert last["status"] == "Done: 4 runs of the same prompt, differing in guidance scale."
    path = tmp_path / "runs.safetensors"
    path.write_bytes(fetch(last["downloads"][0]))
    with safe_open(str(path), "pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        runs = json.loads(file.metadata()["runs"])
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(7))
    for run in range(1, 5):  # every run starts from the seed's noise
        assert tensors[f"run{run}_start"].equal(noise[0])
    assert [run["guidance_scale"] for run in runs] == list(GUIDANCE)
    # four different images, each the one the pipeline makes with that guidance
    shown = picture(last["images"])
    pipe = MODELS.pipeline(True)
    results = [pipe("a cat on a mat", "", 3, guidance, SIZE, SIZE,
                    torch.Generator().manual_seed(7), "ddim") for guidance in GUIDANCE]
    images = [pixels.images_to_pixels(result.images * 2 - 1) for result in results]
    assert len({image.tobytes() for image in images}) == 4
    for run, (result, image) in enumerate(zip(results, images, strict=True), start=1):
        assert tensors[f"run{run}_final"].equal(result.latents[0])
        # the picture of the images holds this one (found by its pixels)
        assert any(np.array_equal(shown[y:y + SIZE, x:x + SIZE], image)
                   for y in range(shown.shape[0] - SIZE + 1)
                   for x in range(shown.shape[1] - SIZE + 1)), run
    table = last["table"]
    assert [row[:4] for row in table["data"]] == [[i + 1, f"guidance scale {g:g}", 3, 3]
                                                  for i, g in enumerate(GUIDANCE)]
    assert table["data"][0][6] == "" and all(row[6] > 0 for row in table["data"][1:])


def test_runs_stream_as_they_finish(guidance_runs):
    statuses = [update["status"] for update in guidance_runs]
    finished = [i for i, status in enumerate(statuses) if "runs made" in status]
    assert len(finished) == 3  # after runs 1, 2 and 3; then "Done"
    for made, index in enumerate(finished, start=1):
        assert statuses[index] == f"{made} of 4 runs made; the next is running."
        assert len(guidance_runs[index]["table"]["data"]) == made
    # the runs' schedules are on the chart before the first run ends
    assert guidance_runs[0]["sigma_chart"] is not None
    assert statuses[0].startswith("Run 1 of 4 (guidance scale 1): UNet evaluation 1 of 3.")


def test_stop_ends_the_comparison_and_starts_no_other_run(client):
    job = submit(client, "seed", "0 | 1 | 2", steps=100)
    deadline = time.monotonic() + 60
    while not any(str(o[0]).startswith("Run 1 of 3") and "evaluation 3 " in str(o[0])
                  for o in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "no steps arrived"
        time.sleep(0.02)
    assert client.predict(api_name="/stop_compare_runs") == "Stopping after this step..."
    job.result(timeout=60)
    last = updates(job)[-1]
    assert last["status"] == "Stopped: 1 of 3 runs made."
    (row,) = last["table"]["data"]
    assert 3 <= row[3] < 100  # the UNet evaluations made before the stop
    assert last["downloads"] is not None and last["differences"] is None
    assert client.predict(api_name="/stop_compare_runs") == "Nothing is running."


@pytest.mark.parametrize("vary, values, message", [
    ("guidance scale", "1 | 2 | 3 | 4 | 5", "Give 2 to 4 values of the guidance scale, "
                                            "separated by |; got 5."),
    ("steps", "4 | many", "Run 2 (many): 'many' is not a number of steps."),
    ("sampler", "Euler | Euler b", "Run 2 (Euler b): Unknown scheduler 'Euler b'"),
    ("sigma schedule", "default | Karras", "Run 2 (Karras): Karras sigmas do not apply to DDIM"),
    ("guidance scale", "3 | 40", "Run 2 (40): Guidance scale must be from 1"),
])
def test_a_bad_value_names_its_run(client, vary, values, message):
    job = submit(client, vary, values)
    job.result(timeout=60)
    (update,) = updates(job)
    assert literal(message) in update["status"]  # as Markdown shows it
    assert update["table"]["data"] == []  # a Dataframe sends its headers even when empty
    assert all(update[name] is None for name in compare_runs.OUTPUTS
               if name not in ("status", "table"))


def test_a_sampler_comparison_runs_each_with_its_own_evaluations(client):
    job = submit(client, "sampler", "Euler | Heun | LCM", steps=3, use_karras_sigmas=True,
                 scheduler="Euler")
    job.result(timeout=120)
    last = updates(job)[-1]
    # Karras applies to Euler and Heun, not to LCM; Heun makes 2 evaluations a step but the last
    assert [row[1:4] for row in last["table"]["data"]] == [
        ["Euler (karras)", 3, 3], ["Heun (karras)", 3, 5], ["LCM", 3, 3]]
