"""The app with real-weight settings when the Hub cannot help: offline with nothing cached, or a
Hub that does not answer. It starts, the tokens are shown at once, the model views say what
failed and how to fix it, a failure is known in seconds and remembered, cached weights still
load, and the start-up prefetch says what it does."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import huggingface_hub.constants
import pytest

import app
import ui.models
from tests.helpers.hub_cache import build_hub_cache
from tests.helpers.references import tiny_reference_vae
from tests.helpers.serve import free_port
from ui import encoding, loading
from ui.tabs import compare, image, prompt

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB = ui.models.Settings(weights="hub")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "empty-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(ui.models, "HUB", loading.HubAccess())
    for getter in (ui.models.get_vae, ui.models.get_text_encoder, prompt.run_text_encoder):
        getter.cache_clear()
    return cache


@pytest.fixture
def offline(empty_cache, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable(empty_cache, monkeypatch) -> None:
    """Online mode, but the Hub's address is a port nobody listens on: refused at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")


def test_demo_builds_without_loading_anything(offline):
    assert isinstance(app.build_demo(HUB), gr.Blocks)
    loaded = ui.models.get_vae.cache_info(), ui.models.get_text_encoder.cache_info()
    assert [info.currsize for info in loaded] == [0, 0]


def test_prompt_view_shows_tokens_and_the_reason(offline):
    views = list(prompt.inspect_prompt(ui.models.Models(HUB), "a photo of a cat", 1,
                                       prompt.MEAN_OVER_HEADS, False))
    assert views[0]["tokens"][1] == ("a</w>", "token")  # before any model is asked for
    last = views[-1]
    assert [row[3] for row in last["table"][:7]] == [49406, 320, 1125, 539, 320, 2368, 49407]
    notes = last["notes"]
    assert "could not be loaded" in notes and "not in the local cache" in notes
    assert SD_REPO in notes
    assert all(last.get(name) is None for name in ("embeddings", "attention", "download"))


def test_image_view_says_what_failed(offline):
    (views,) = image.encode_image(ui.models.Models(HUB), encoding.EXAMPLE_IMAGES[0],
                                  "SD v1.5 VAE", 256, "crop", encoding.MEAN, 0, True, True)
    message = views["status"]
    assert "vae/config.json: not in the local cache and the Hub could not be reached" in message
    assert SD_REPO in message and r"HF\_HUB\_OFFLINE=1" in message
    assert all(value is None for name, value in views.items() if name != "status")


def test_the_comparison_says_a_shared_fix_once(offline):
    """Three VAEs, none cached: each row says why its VAE failed, the status adds the fix once."""
    choices = ["SD v1.5 VAE", "FLUX.1-schnell VAE", "TAESD (SD v1)"]
    *_, last = compare.compare_vaes(ui.models.Models(HUB), encoding.EXAMPLE_IMAGES[0], 256,
                                    choices, True, 64)
    status = last["status"]
    assert status.count("To fix:") == 1 and "None of the chosen VAEs could be loaded" in status
    assert all(f"'{choice}'" in status for choice in choices)
    notes = [row[-1] for row in last["table"]]
    assert len(notes) == 3 and all("not in the local cache" in n and "To fix" not in n
                                   for n in notes)


def test_split_fix_and_with_one_fix():
    assert loading.split_fix("A failed. To fix: do X.") == ("A failed.", "To fix: do X.")
    assert loading.split_fix("B failed.") == ("B failed.", "")
    assert loading.with_one_fix(["A failed. To fix: do X.", "B failed.\nTo fix: do X.",
                                 "C failed. To fix: do Y."]) == \
        "A failed. B failed. C failed. To fix: do X. To fix: do Y."


def test_unreachable_hub_is_known_at_once_and_remembered(unreachable):
    models = ui.models.Models(HUB)
    start = time.perf_counter()
    (views,) = image.encode_image(models, encoding.EXAMPLE_IMAGES[0], "SD v1.5 VAE", 256, "crop",
                                  encoding.MEAN, 0, True, True)
    first_s = time.perf_counter() - start
    message = views["status"]
    assert "the Hugging Face Hub did not answer" in message and "ConnectError" in message
    for fix in (r"HF\_HUB\_OFFLINE=1", "local files", "--unet", "--pipeline", "--weights random"):
        assert fix in message
    assert first_s < 10  # huggingface_hub alone retries for about 45 s

    start = time.perf_counter()
    last = list(prompt.inspect_prompt(models, "a cat", 1, prompt.MEAN_OVER_HEADS, False))[-1]
    assert time.perf_counter() - start < 2  # remembered: the Hub is not asked again
    assert "the Hugging Face Hub did not answer" in last["notes"]
    assert ui.models.HUB.probes == 1 and 0 < ui.models.HUB.retry_in() <= loading.REMEMBER_FAILURE_S


def test_cached_weights_load_while_the_hub_is_down(unreachable, empty_cache, tmp_path):
    folder = tmp_path / "vae"
    tiny_reference_vae().save_pretrained(folder)
    build_hub_cache(empty_cache, SD_REPO, {f"vae/{f.name}": f for f in folder.iterdir()})
    vae = ui.models.get_vae(HUB, "SD v1.5 VAE", True)
    assert vae.config.block_out_channels == (16, 32)
    assert ui.models.HUB.probes == 1 and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_hub_timeouts_are_short():
    assert huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT == loading.ETAG_TIMEOUT_S


def test_prefetch_starts_only_when_something_is_missing(empty_cache, unreachable, tmp_path):
    said = []
    downloads = ui.models.downloads(HUB)
    assert [(d.what, d.source) for d in downloads][:2] == [
        ("the VAE (SD v1.5 VAE)", SD_REPO), ("the text encoder", SD_REPO)]
    # then what the comparison ticks at first besides SD v1.5's VAE: a 16-channel VAE and TAESD
    assert [(d.source, d.subfolder) for d in downloads][3:] == [
        ("black-forest-labs/FLUX.1-schnell", "vae"), ("madebyollin/taesd", None)]
    assert ui.models.downloads(ui.models.Settings(weights="random")) == []
    local = loading.Download("a local VAE", str(tmp_path), None, downloads[0].layout)
    assert local.cached() and loading.start_prefetch([local], ui.models.HUB, said.append) is None
    # the Hub does not answer: said once in the console, nothing fetched, the failure remembered
    loading.start_prefetch(downloads, ui.models.HUB, said.append).join(timeout=30)
    assert len(said) == 1 and "did not answer" in said[0] and "--weights random" in said[0]
    assert "the VAE (SD v1.5 VAE), the text encoder, the UNet, " in said[0]  # each once
    # remembered, not asked again
    assert ui.models.HUB.failure() is not None and ui.models.HUB.probes == 1


def test_prefetch_fetches_in_the_background(empty_cache, tmp_path, monkeypatch):
    """With a Hub that answers (here: files are 'fetched' from a local copy), the missing files
    are fetched in a thread, with a line in the console before and after."""
    monkeypatch.setattr(ui.models.HUB, "failure", lambda: None)
    folder = tmp_path / "vae"
    tiny_reference_vae().save_pretrained(folder)
    fetched = []

    def fetch(self: loading.Download) -> None:
        build_hub_cache(empty_cache, self.source, {f"vae/{f.name}": f for f in folder.iterdir()})
        fetched.append(self.what)

    monkeypatch.setattr(loading.Download, "fetch", fetch)
    download = ui.models.downloads(HUB)[0]
    said = []
    thread = loading.start_prefetch([download], ui.models.HUB, said.append)
    thread.join(timeout=30)
    assert fetched == [download.what] and download.cached()
    assert said[0].startswith("Fetching the VAE") and said[1].startswith("Fetched the VAE")
    assert loading.start_prefetch([download], ui.models.HUB, said.append) is None  # cached now
