"""Shared fixtures: reference models from diffusers/transformers, written with their own
``save_pretrained`` so that the tests read the real Hub file layout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.references import reference_text_encoder, reference_unet, reference_vae, saved

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the workers share the cores: each gets its share of threads (the servers they start and
    # in-process launches too, through OMP_NUM_THREADS), not a team of threads per core that
    # spin waiting for cores the other workers hold
    THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

# The apps built in the tests' own processes write their uploads and pictures into a folder of
# this run, removed when it ends, not into the machine's shared Gradio folder. (A server process
# started by tests/helpers/serve.py gets a folder of its own.)
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="sd-parts-tests-gradio-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory):
    """One ``python app.py --weights tiny`` server process for the robustness and browser tests
    (``tests/helpers/serve.py``): starting one takes several seconds on 2 cores."""
    from tests.helpers.serve import serve

    with serve(tmp_path_factory.mktemp("tiny-server")) as running:
        yield running


@pytest.fixture(scope="session")
def sd_vae_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The full SD v1 VAE with random weights, as diffusers writes it."""
    return saved(tmp_path_factory, "vae", reference_vae())


@pytest.fixture(scope="session")
def sd_text_encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The full CLIP ViT-L/14 text tower with random weights, as transformers writes it."""
    return saved(tmp_path_factory, "text_encoder", reference_text_encoder())


@pytest.fixture(scope="session")
def sd_unet_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The full SD v1.5 noise predictor (UNet) with random weights, as diffusers writes it."""
    return saved(tmp_path_factory, "unet", reference_unet())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole tiny SD v1 pipeline, written by diffusers' own save_pretrained (read only)."""
    from tests.helpers.references import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd")
    save_tiny_pipeline(folder)
    return folder
