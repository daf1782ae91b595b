"""The app, started in-process with tiny random weights, driven through gradio_client."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors import safe_open

import app
from tests.serve import free_port

TINY = "tiny random weights"


@pytest.fixture(scope="module")
def client():
    demo = app.build_demo(app.Settings(weights="tiny"))
    port = free_port()
    app.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def encode(client: Client, path: str | Path, latent_kind: str = app.MEAN, size: int = 256):
    return client.predict(handle_file(str(path)), TINY, size, "crop", latent_kind, 0, True, True,
                          api_name="/encode_image")


def as_dict(values: tuple) -> dict:
    return dict(zip(app.IMAGE_OUTPUTS, values, strict=True))


@pytest.mark.parametrize("example", app.EXAMPLE_IMAGES)
def test_encode_examples(client, example):
    out = as_dict(encode(client, example))
    source = Image.open(example)
    assert "Resized" in out["size"] or "no crop" in out["size"]
    reconstruction = Image.open(out["reconstruction"])
    assert reconstruction.format == "PNG"  # exact pixels, not lossy WebP
    assert reconstruction.width % 8 == 0 and reconstruction.height % 8 == 0
    assert max(reconstruction.size) <= 256
    assert abs(reconstruction.width / reconstruction.height - source.width / source.height) < 0.1
    for name in ("channels", "histogram", "std", "error"):
        assert out[name]["type"] == "matplotlib" and out[name]["plot"].startswith("data:image/png")
    assert "PSNR" in out["metrics"] and "SSIM" in out["metrics"]
    assert len(out["stats"]["data"]) == 5  # four channels and all of them together
    latent_path, png_path = out["downloads"]
    with safe_open(latent_path, framework="pt") as f:
        latent = f.get_tensor("latent")
        metadata = f.metadata()
    assert latent.shape == (1, 4, reconstruction.height // 2, reconstruction.width // 2)  # tiny: /2
    assert float(metadata["scaling_factor"]) == pytest.approx(0.18215)
    assert Image.open(png_path).size == reconstruction.size


def test_sample_differs_from_mean_and_is_seeded(client):
    example = app.EXAMPLE_IMAGES[0]
    mean = as_dict(encode(client, example, app.MEAN))["downloads"][0]
    sample = as_dict(encode(client, example, app.SAMPLE))["downloads"][0]
    again = as_dict(encode(client, example, app.SAMPLE))["downloads"][0]
    with safe_open(mean, "pt") as a, safe_open(sample, "pt") as b, safe_open(again, "pt") as c:
        z_mean, z_sample, z_again = (f.get_tensor("latent") for f in (a, b, c))
    assert not z_mean.equal(z_sample)
    assert z_sample.equal(z_again)


def inspect(client: Client, prompt: str, layer: int = 1, head: str = app.MEAN_OVER_HEADS,
            padding: bool = False) -> tuple:
    return client.predict(prompt, layer, head, padding, api_name="/inspect_prompt")


def test_inspect_prompt(client):
    tokens, notes, table, *plots, embeddings = inspect(client, "a photo of a cat")
    pieces = [item["token"] for item in tokens]
    assert pieces[:7] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                          "<|endoftext|>"]
    assert len(pieces) == 77 and tokens[-1]["class_or_confidence"] == "padding"
    assert "7 of 77" in notes
    assert [row[2] for row in table["data"][:7]] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert all(plot["type"] == "matplotlib" for plot in plots)
    with safe_open(embeddings, "pt") as f:
        assert f.get_tensor("last_hidden_state").shape == (1, 77, 32)


def test_empty_and_long_prompts(client):
    tokens, notes, *_ = inspect(client, "")
    assert [t["class_or_confidence"] for t in tokens[:3]] == ["BOS", "EOS", "padding"]
    assert "unconditional" in notes
    words = ["cat"] * 75 + ["zebra"] + ["dog"] * 424  # 500 words, one token each
    tokens, notes, *_ = inspect(client, " ".join(words))
    assert len(tokens) == 77 and tokens[-1]["class_or_confidence"] == "EOS"
    assert "425 more tokens were cut" in notes and "never sees these words: “zebra”" in notes


def test_script_is_shown_as_text(client):
    """The prompt comes back as plain text pieces (the browser tests check nothing runs)."""
    prompt = "<script>alert(1)</script>"
    tokens, *_ = inspect(client, prompt)
    pieces = [t["token"] for t in tokens if t["class_or_confidence"] == "token"]
    assert "".join(p.removesuffix("</w>") for p in pieces) == prompt


def test_attention_view_changes_with_layer_and_head(client):
    inspect(client, "a photo of a cat")
    views = {
        (layer, head): client.predict("a photo of a cat", layer, head, False,
                                      api_name="/attention_view")[0]["plot"]
        for layer, head in [(1, app.MEAN_OVER_HEADS), (2, app.MEAN_OVER_HEADS), (2, "head 3")]
    }
    assert len(set(views.values())) == 3
    with pytest.raises(AppError, match="heads"):
        client.predict("a photo of a cat", 1, "head 9", False, api_name="/attention_view")
