"""The app, started in-process with tiny random weights, driven through gradio_client; and the
tabs' own functions, whose pictures are checked against the tensors they show."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors import safe_open

import sd_parts
from tests.helpers.html_reader import MapReader
from tests.helpers.serve import in_process, local_client
from ui import encoding
from ui.models import VAES, Models, Settings, get_text_encoder, get_unet, get_vae, menu
from ui.shared import LABEL_ROOM
from ui.tabs import image, prompt
from viz.heatmap import colorize, pad
from viz.text_encoder import ATTENTION
from viz.tokens import read_tokens

TINY = next(iter(menu(VAES, "tiny")))
MODELS = Models(Settings(weights="tiny"))


@pytest.fixture(scope="module")
def client():
    with in_process(MODELS.settings) as url:
        yield local_client(url)


def encode(client: Client, path: str | Path, latent_kind: str = encoding.MEAN,
           size: int = 256) -> dict:
    values = client.predict(handle_file(str(path)), TINY, size, "crop", latent_kind, 0, True, True,
                            api_name="/encode_image")
    return dict(zip(image.OUTPUTS, values, strict=True))


@pytest.mark.parametrize("example", encoding.EXAMPLE_IMAGES[:2])
def test_encode_examples(client, example):
    out = encode(client, example)
    source = Image.open(example)
    assert out["status"] is None
    # the tiny VAE halves each side once: the page says so, not SD v1's 8x
    assert "multiples of 2" in out["size"] and "1 latent pixel per 2x2 pixels" in out["size"]
    reconstruction = Image.open(out["reconstruction"])
    # shown as lossless WebP: the very pixels of the PNG download, nothing lost to compression
    assert reconstruction.format == "WEBP"
    assert np.array_equal(np.asarray(reconstruction), np.asarray(Image.open(out["downloads"][1])))
    assert reconstruction.width % 2 == 0 and reconstruction.height % 2 == 0
    assert max(reconstruction.size) <= 256
    assert abs(reconstruction.width / reconstruction.height - source.width / source.height) < 0.1
    # previews are shown at the size of the encoder's input, not as a strip of latent pixels
    for name in ("preview", "fitted_preview"):
        assert Image.open(out[name]).size == reconstruction.size
    for name in ("channels", "std", "error", "histogram"):
        assert Image.open(out[name]).width > 300
    assert "PSNR" in out["metrics"] and "SSIM" in out["metrics"]
    assert len(out["stats"]["data"]) == 5  # four channels and all of them together
    latent_path, png_path = out["downloads"]
    with safe_open(latent_path, framework="pt") as f:
        latent = f.get_tensor("latent")
        metadata = f.metadata()
    assert latent.shape == (1, 4, reconstruction.height // 2, reconstruction.width // 2)
    assert float(metadata["scaling_factor"]) == pytest.approx(0.18215)
    assert Image.open(png_path).size == reconstruction.size


def test_sample_differs_from_mean_and_is_seeded():
    def latent(kind: str, seed: int) -> torch.Tensor:
        *_, last = image.encode_image(MODELS, encoding.EXAMPLE_IMAGES[0], TINY, 256, "crop", kind,
                                      seed, True, True)
        with safe_open(last["downloads"][0], "pt") as f:
            return f.get_tensor("latent")

    mean, sample = latent(encoding.MEAN, 0), latent(encoding.SAMPLE, 0)
    assert not mean.equal(sample)
    assert sample.equal(latent(encoding.SAMPLE, 0)) and not sample.equal(latent(encoding.SAMPLE, 1))


def test_unusable_upload_gives_one_message_and_empty_outputs(client, tmp_path):
    notes = tmp_path / "not_an_image.png"
    notes.write_text("not an image")
    out = encode(client, notes)
    assert "is not an image Pillow can read" in out["status"]
    assert r"not\_an\_image.png" in out["status"]  # shown as typed: no italics
    assert out["stats"]["data"] == []  # an empty table
    assert all(value is None for name, value in out.items() if name not in ("status", "stats"))


def inspect(client: Client, text: str, layer: int = 1, head: str = prompt.MEAN_OVER_HEADS,
            padding: bool = False) -> dict:
    values = client.predict(text, layer, head, padding, api_name="/inspect_prompt")
    return dict(zip(prompt.OUTPUTS, values, strict=True))


def test_inspect_prompt(client):
    out = inspect(client, "a photo of a cat 🐱")
    texts = [item["token"] for item in out["tokens"]]
    assert texts[:8] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                         "🐱</w>", "<|endoftext|>"]
    assert len(texts) == 77 and out["tokens"][-1]["class_or_confidence"] == "padding"
    assert "8 of 77" in out["notes"]
    rows = out["table"]["data"]
    assert [row[3] for row in rows[:8]] == [49406, 320, 1125, 539, 320, 2368, 22979, 49407]
    assert rows[6][2] == "ðŁĲ±</w>" and rows[6][1] == "🐱</w>"  # raw piece and its text
    for name in ("embeddings", "norms", "cosine", "attention", "heads", "eos"):
        assert Image.open(out[name]).width > 200
    with safe_open(out["download"], "pt") as f:
        assert f.get_tensor("last_hidden_state").shape == (1, 77, 32)


def test_empty_and_long_prompts(client):
    out = inspect(client, "")
    assert [t["class_or_confidence"] for t in out["tokens"][:3]] == ["BOS", "EOS", "padding"]
    assert "unconditional" in out["notes"]
    words = ["cat"] * 75 + ["zebra"] + ["dog"] * 424  # 500 words, one token each
    out = inspect(client, " ".join(words))
    assert len(out["tokens"]) == 77 and out["tokens"][-1]["class_or_confidence"] == "EOS"
    assert "425 more tokens were cut" in out["notes"]
    assert "never sees these words: “zebra”" in out["notes"]


def test_tokens_come_before_the_text_encoder_runs():
    views = prompt.inspect_prompt(MODELS, "a photo of a cat", 1, prompt.MEAN_OVER_HEADS, False)
    first = next(views)
    assert set(first) == {"tokens", "notes", "table"}
    last = next(views)
    assert set(last) == set(prompt.OUTPUTS)


def test_attention_views_show_the_chosen_layer_and_head():
    read = read_tokens(MODELS.tokenizer(), "a photo of a cat")
    output = prompt.run_text_encoder(MODELS, read.ids)
    views = prompt.attention_views(read, output, 2, "head 3", False)
    weights = output.attentions[1][0, 2, : read.n_real, : read.n_real].double().numpy()
    future = np.triu(np.ones(weights.shape, dtype=bool), k=1)
    (box,) = views["attention"].maps
    np.testing.assert_array_equal(box.cells(views["attention"].pixels),
                                  colorize(weights, ATTENTION, 0.0, weights.max(), future))
    rows = MapReader(views["attention_map"]).rows  # the map to point at holds the same values
    shown = [[float(cell["data-v"]) for cell in row.cells if "data-v" in cell] for row in rows]
    assert [len(values) for values in shown] == list(range(1, read.n_real + 1))
    for q, values in enumerate(shown):
        np.testing.assert_allclose(values, weights[q, : q + 1], rtol=5e-3)
    heads = views["heads"]
    layer2 = output.attentions[1][0, :, : read.n_real, : read.n_real].double().numpy()
    for head, box in enumerate(heads.maps):
        np.testing.assert_array_equal(box.cells(heads.pixels),
                                      colorize(layer2[head], ATTENTION, 0.0, layer2.max(), future))


def test_served_attention_map_is_the_one_asked_for(client):
    """The picture the server sends for layer 2, head 3 is the one drawn from that layer and
    head, pixel for pixel; another layer or head gives another picture."""
    text = "a photo of a cat"
    inspect(client, text)
    served = {
        (layer, head): np.asarray(Image.open(client.predict(
            text, layer, head, False, api_name="/attention_view")[0]).convert("RGB"))
        for layer, head in [(1, prompt.MEAN_OVER_HEADS), (2, prompt.MEAN_OVER_HEADS),
                            (2, "head 3")]
    }
    read = read_tokens(MODELS.tokenizer(), text)
    output = prompt.run_text_encoder(MODELS, read.ids)
    drawn = pad(prompt.attention_views(read, output, 2, "head 3", False)["attention"],
                top=LABEL_ROOM).pixels
    np.testing.assert_array_equal(served[(2, "head 3")], drawn)
    assert len({array.tobytes() for array in served.values()}) == 3
    html = client.predict(text, 2, "head 3", True, api_name="/attention_view")[1]
    assert html == prompt.attention_views(read, output, 2, "head 3", True)["attention_map"]
    labels = MapReader(html).rows
    assert len(labels) == 77 and labels[-1].label.kind == "padding"
    with pytest.raises(AppError, match="heads"):
        client.predict(text, 1, "head 9", False, api_name="/attention_view")


class SixteenChannels(Models):
    """The tiny app, with a VAE of 16 latent channels (as SD3's and FLUX's have)."""

    def vae(self, choice: str, exact: bool) -> sd_parts.AutoencoderKL:
        torch.manual_seed(0)
        config = dataclasses.replace(sd_parts.TINY_VAE, latent_channels=16, scaling_factor=0.5)
        return sd_parts.AutoencoderKL(config).eval()


def test_image_tab_shows_any_channel_count_and_downscale():
    views = list(image.encode_image(SixteenChannels(MODELS.settings), encoding.EXAMPLE_IMAGES[1],
                                    TINY, 256, "crop", encoding.MEAN, 0, False, True))[-1]
    assert views["status"] is None
    assert "The latent is 16x" in views["size"] and "2x2 pixels" in views["size"]
    assert "No published RGB map" in views["size"]  # so the preview's map is fitted
    assert len(views["channels"].maps) == len(views["std"].maps) == 16
    assert len(views["stats"]) == 17
    width, height = views["original"].size
    assert views["preview"].shape == views["fitted_preview"].shape == (height, width, 3)
    assert (views["channels"].maps[0].rows, views["channels"].maps[0].columns) == (
        height // 2, width // 2)


def test_uploads_from_the_wild_reach_the_tab_with_what_was_done(client, tmp_path):
    """A TGA (an extension Gradio's "image" filter does not list) is read by its content, and a
    12-bit grey image in a 16-bit PNG is stretched with a note on the page, not shown black."""
    targa = tmp_path / "photo.tga"
    Image.new("RGB", (64, 48), (200, 40, 30)).save(targa)
    assert encode(client, targa)["status"] is None
    grey = np.linspace(291, 694, 64 * 64).reshape(64, 64).astype(np.uint16)
    deep = tmp_path / "scan.png"
    Image.fromarray(grey).save(deep)
    out = encode(client, deep)
    assert out["status"] is None and "291" in out["size"] and "694" in out["size"]


def test_models_built_at_once_get_the_seeded_weights():
    """Random weights come from seed 0 whatever else is built meanwhile: threads that build models
    at once (the example run at start-up, a visitor's first request) each get the weights another
    process rebuilds from the seed, as the tests that recompute a server's answer do."""
    settings = Settings(weights="tiny")
    cached = (get_unet, get_text_encoder, get_vae)
    builds = (lambda: get_unet(settings, True), lambda: get_text_encoder(settings),
              lambda: get_vae(settings, settings.vae_choices[0], True))

    def weights() -> list[dict[str, torch.Tensor]]:
        return [build().state_dict() for build in builds]

    for function in cached:
        function.cache_clear()
    alone = weights()
    for _ in range(3):
        for function in cached:
            function.cache_clear()
        barrier = threading.Barrier(len(builds))
        threads = [threading.Thread(target=lambda build=build, barrier=barrier: (
            barrier.wait(), build())) for build in builds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for built, expected in zip(weights(), alone, strict=True):
            assert built.keys() == expected.keys()
            assert all(torch.equal(built[name], expected[name]) for name in expected)
