"""The "Compare VAEs" tab through gradio_client on the tiny app (its own server process): one
result per chosen VAE with its metrics, pictures that hold the VAEs' own reconstructions, the
crop that follows the click, and a message for every bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.helpers.serve import local_client
from ui.models import Models, Settings
from ui.shared import LABEL_ROOM
from ui.tabs import compare as tab
from viz import compare, metrics

SETTINGS = Settings(weights="tiny")
MODELS = Models(SETTINGS)
CHOICES = SETTINGS.vae_choices + SETTINGS.tiny_vae_choices
SIZE = (96, 64)  # width, height: small, so every tiny VAE runs in a fraction of a second


@pytest.fixture(scope="module")
def client(tiny_server) -> Client:
    return local_client(tiny_server.url)


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gradient with texture, already a multiple of every downscale: encoded as it is."""
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    rgb = np.stack([x * 2.5, y * 3.5, (x * y) % 40 * 6], axis=2).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("compare") / "gradient.png"
    Image.fromarray(rgb).save(path)
    return path


def run(client: Client, path: Path | None, choices: list[str], side: int = 32) -> dict:
    values = client.predict(handle_file(str(path)) if path else None, 256, choices, True, side,
                            api_name="/compare")
    return dict(zip(tab.OUTPUTS, values, strict=True))


def drawn(path: str) -> np.ndarray:
    """A served picture without the strip left free for Gradio's label."""
    return np.asarray(Image.open(path).convert("RGB"))[LABEL_ROOM:]


def panels(view: compare.Picture, pixels: np.ndarray) -> list[np.ndarray]:
    """The pictures inside a composite, found where the same layout puts them."""
    assert pixels.shape == view.pixels.shape
    return [box.cells(pixels) for box in view.maps]


@pytest.fixture(scope="module")
def compared(client: Client, picture: Path) -> dict:
    return run(client, picture, CHOICES)


def test_every_chosen_vae_gives_its_reconstruction_and_numbers(compared, picture) -> None:
    original = np.asarray(Image.open(picture).convert("RGB"))
    assert f"Compared {len(CHOICES)} VAEs on {SIZE[0]}x{SIZE[1]} pixels" in compared["status"]
    np.testing.assert_array_equal(np.asarray(Image.open(compared["original"])), original)
    rows = compared["table"]["data"]
    assert [row[0] for row in rows] == CHOICES
    headers = compared["table"]["headers"]
    assert headers == compare.TABLE_HEADERS
    # the layout depends only on the sizes and labels, so the same call finds each picture
    layout = compare.side_by_side([(label, original) for label in ["original", *CHOICES]])
    shown = panels(layout, drawn(compared["reconstructions"]))
    np.testing.assert_array_equal(shown[0], original)
    for row, reconstruction in zip(rows, shown[1:], strict=True):
        label, shape, channels = row[0], row[1], row[2]
        vae = tab._load(MODELS, label, True)
        assert channels == vae.config.latent_channels  # 4 and 16 channels
        assert shape == (f"{channels}x{SIZE[1] // vae.downscale}x{SIZE[0] // vae.downscale}")
        psnr, ssim = row[headers.index("PSNR (dB)")], row[headers.index("SSIM")]
        assert math.isfinite(psnr) and math.isfinite(ssim) and -1 <= ssim <= 1
        # the picture is that VAE's reconstruction (this process runs the same seeded VAE) and
        # the numbers are measured on it
        mine = tab.round_trip(vae, Image.fromarray(original)).reconstruction
        assert np.abs(mine.astype(int) - reconstruction).max() <= 1
        assert psnr == pytest.approx(metrics.psnr(original, reconstruction), abs=0.006)
        assert ssim == pytest.approx(metrics.ssim_gaussian(original / 255, reconstruction / 255,
                                                           1.0), abs=6e-5)
        assert row[headers.index("encode (s)")] > 0 and row[headers.index("decode (s)")] > 0
    with open(compared["csv"], newline="") as file:
        table = list(csv.reader(file))
    assert table[0] == headers and [row[0] for row in table[1:]] == CHOICES
    assert [float(row[4]) for row in table[1:]] == [row[4] for row in rows]


def test_the_error_maps_are_drawn_from_the_reconstructions(compared, picture) -> None:
    original = np.asarray(Image.open(picture).convert("RGB"))
    layout = compare.side_by_side([(label, original) for label in ["original", *CHOICES]])
    shown = panels(layout, drawn(compared["reconstructions"]))[1:]
    expected = compare.error_maps_view(original, list(zip(CHOICES, shown, strict=True)))
    np.testing.assert_array_equal(drawn(compared["errors"]), expected.pixels)
    histogram = Image.open(compared["histogram"])
    assert histogram.width > 300 and histogram.height > 200


def test_the_crop_enlarges_the_clicked_region_of_every_picture(client, picture) -> None:
    chosen = CHOICES[-2:]  # two VAEs: one result each, plus the original
    result = run(client, picture, chosen, side=32)
    original = np.asarray(Image.open(picture).convert("RGB"))
    layout = compare.side_by_side([(label, original) for label in ["original", *chosen]])
    pictures = panels(layout, drawn(result["reconstructions"]))
    labelled = list(zip(["original", *chosen], pictures, strict=True))
    seen = []
    for x, y in [(10, 12), (90, 60)]:
        status, crop = client.predict(x, y, 32, api_name="/compare_crop")
        assert status == ""
        box = compare.crop_box(x, y, SIZE, 32)
        expected = [picture[box[1]:box[3], box[0]:box[2]] for picture in pictures]
        shown = panels(compare.crop_view(labelled, box), drawn(crop))
        assert len(shown) == len(chosen) + 1
        for region, wanted in zip(shown, expected, strict=True):
            np.testing.assert_array_equal(region, wanted)
        seen.append(shown[0])
    assert not np.array_equal(seen[0], seen[1])  # a new click moved the region
    # the crop the comparison itself showed is the centre of the image, and the x, y boxes say
    # so: a new region side then enlarges the same place
    assert (result["crop_x"], result["crop_y"]) == (SIZE[0] // 2, SIZE[1] // 2)
    centre = compare.crop_box(result["crop_x"], result["crop_y"], SIZE, 32)
    first = panels(compare.crop_view(labelled, centre), drawn(result["crop"]))[0]
    np.testing.assert_array_equal(first, original[centre[1]:centre[3], centre[0]:centre[2]])


def test_bad_inputs_get_a_message(client, tiny_server, picture, tmp_path) -> None:
    assert "Upload an image" in run(client, None, CHOICES[:1])["status"]
    out = run(client, picture, [])
    assert "Tick at least one VAE" in out["status"] and out["reconstructions"] is None
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    assert "notes.png" in run(client, fake, CHOICES[:1])["status"]
    fresh = local_client(tiny_server.url)  # a new visitor has nothing to crop
    status, crop = fresh.predict(5, 5, 32, api_name="/compare_crop")
    assert "Run a comparison first" in status and crop is None
    status, crop = client.predict(None, 5, 32, api_name="/compare_crop")
    assert "Click the original" in status and crop is None


@pytest.mark.parametrize("size", [(8, 8), (3000, 20)])  # too small; a strip 2 px high at 256
def test_an_image_too_small_for_ssim_gets_a_message(size, tmp_path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", size, (200, 30, 60)).save(path)
    (last,) = list(tab.compare_vaes(MODELS, str(path), 256, CHOICES[:1], True, 32))[-1:]
    assert "too few to compare: SSIM needs at least 11x11" in last["status"]
    assert last["reconstructions"] is None and last["table"] is None


def test_a_vae_that_cannot_load_says_why_and_the_others_run(picture) -> None:
    views = list(tab.compare_vaes(MODELS, str(picture), 256, [CHOICES[0], "no such VAE"], True,
                                  32))
    last = views[-1]
    first_row, failed_row = last["table"]
    assert first_row[0] == CHOICES[0] and math.isfinite(first_row[4])
    assert failed_row[0] == "no such VAE" and "No VAE is called 'no such VAE'" in failed_row[-1]
    assert "1 VAE could not run" in last["status"]
    assert [label for label, _ in last["record"]["reconstructions"]] == [CHOICES[0]]
    # results stream: the first VAE's views come before the last answer
    assert any(view.get("reconstructions") is not None for view in views[:-1])
