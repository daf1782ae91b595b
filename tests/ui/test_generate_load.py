"""The generation tab under load, in its own server process with tiny random weights: four
visitors who press Generate at the same moment each get the run of their own seed, and the
server's memory stays flat over many runs.

Runs queue (one generation at a time per model), so the four answers come one after another;
each is checked against its own seed three ways: the start latent in its latents file is that
seed's noise, its PNG names that seed, and its image is the one this process makes with that seed.
Memory: the resident size after 20 runs may be at most 10% above the size after 5 (the first
runs allocate what every later run reuses). Measured on 2 cores: about 1% (487 -> 494 MB).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image
from safetensors.torch import load

from tests.helpers.serve import local_client, serve
from ui.models import Models, Settings
from ui.tabs import generate

VISITORS = 4
SIZE, STEPS = 64, 2  # tiny weights halve each side: a 32 x 32 latent
EARLY, RUNS = 5, 20
GROWTH = 0.10
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("generate-load")) as running:
        yield running


def generate_image(client: Client, seed: int) -> dict:
    values = client.submit("a lighthouse at dusk", "", STEPS, 7.5, "DDIM", False, seed, SIZE,
                           SIZE, None, 0.8, True, api_name="/generate").result(TIMEOUT_S)
    return dict(zip(generate.OUTPUTS, values, strict=True))


def fetch(http: httpx.Client, value: dict) -> bytes:
    response = http.get(value["url"])
    response.raise_for_status()
    return response.content


def test_visitors_at_once_each_get_their_own_run(server):
    seeds = [11, 12, 13, 14]
    clients = [local_client(server.url, download_files=False) for _ in seeds]
    with ThreadPoolExecutor(VISITORS) as pool:
        answers = list(pool.map(generate_image, clients, seeds))
    pipe = Models(Settings(weights="tiny")).pipeline(True)  # the server's weights
    images = []
    with httpx.Client(timeout=30, trust_env=False) as http:
        for seed, answer in zip(seeds, answers, strict=True):
            assert answer["status"].startswith(f"Done: {STEPS} steps"), answer["status"]
            png_file, latents_file = answer["downloads"]
            start = load(fetch(http, latents_file))["step_000"]
            noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))
            assert start.equal(noise), seed
            png = Image.open(io.BytesIO(fetch(http, png_file)))
            assert json.loads(png.text["parameters"])["seed"] == seed
            image = np.asarray(Image.open(io.BytesIO(fetch(http, answer["final"]))))
            expected = pipe("a lighthouse at dusk", "", STEPS, 7.5, SIZE, SIZE,
                            torch.Generator().manual_seed(seed), "ddim").images[0]
            expected = (expected.permute(1, 2, 0).numpy() * 255).round()
            assert np.abs(image - expected).max() <= 1, seed  # another thread count: rounding
            images.append(image.astype(int))
    for i in range(VISITORS):
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 1, (seeds[i], seeds[j])


def test_memory_stays_flat_over_many_runs(server):
    clients = [local_client(server.url, download_files=False) for _ in range(VISITORS)]
    resident = {}
    for run in range(1, RUNS + 1):
        answer = generate_image(clients[run % VISITORS], seed=100 + run)
        assert answer["status"].startswith(f"Done: {STEPS} steps"), answer["status"]
        if run in (EARLY, RUNS):
            resident[run] = server.rss()
    early, late = resident[EARLY] / 2**20, resident[RUNS] / 2**20
    print(f"resident memory after {EARLY} runs: {early:.0f} MiB, after {RUNS}: {late:.0f} MiB "
          f"({late / early - 1:+.1%})")
    assert late <= early * (1 + GROWTH), f"{early:.0f} MiB -> {late:.0f} MiB"
