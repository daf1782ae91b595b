"""The app with real-weight settings when nothing can be downloaded: it starts, the tokenizer
works on the bundled vocabulary, and the model views say what failed and how to fix it."""

from __future__ import annotations

import gradio as gr
import huggingface_hub.constants
import pytest

import app


@pytest.fixture
def offline_settings(tmp_path, monkeypatch) -> app.Settings:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    app.get_vae.cache_clear()
    app.get_text_encoder.cache_clear()
    return app.Settings(weights="hub")


def test_demo_builds_without_loading_anything(offline_settings):
    assert isinstance(app.build_demo(offline_settings), gr.Blocks)


def test_prompt_view_shows_tokens_and_the_reason(offline_settings):
    tokens, notes, table, *views = app.inspect_prompt(offline_settings, "a photo of a cat", 1,
                                                      app.MEAN_OVER_HEADS, False)
    assert [row[2] for row in table[:7]] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokens[1] == ("a</w>", "token")
    assert "could not be loaded" in notes and "not in the local cache" in notes
    assert sd_repo_named(notes)
    assert all(view is None for view in views)


def sd_repo_named(text: str) -> bool:
    return "stable-diffusion-v1-5/stable-diffusion-v1-5" in text


def test_image_view_says_what_failed(offline_settings):
    run = app.encode_image(offline_settings, app.EXAMPLE_IMAGES[0], "SD v1.5 VAE", 256, "crop",
                           app.MEAN, 0, True, True)
    with pytest.raises(gr.Error) as info:
        next(run)
    message = info.value.message
    assert "vae/config.json: not in the local cache and the Hub could not be reached" in message
    assert sd_repo_named(message) and "HF_HUB_OFFLINE=1" in message
