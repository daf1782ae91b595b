"""The image tab's latent experiments through gradio_client, on the app served with tiny random
weights, for the 4-channel and the 16-channel tiny VAE: where one latent pixel reaches, channel
edits, interpolation, and a message for every bad input; and, with every VAE encode counted in an
app of the image tab served in this process, that they start from the tab's own latent. Pictures
are read back pixel by pixel."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from safetensors import safe_open

import sd_parts
from tests.helpers.serve import free_port, local_client
from ui import encoding, server
from ui.models import VAES, Models, Settings, menu
from ui.sections import latent_lab
from ui.shared import LABEL_ROOM
from ui.tabs import image
from viz import experiments, pixels

VAES = list(menu(VAES, "tiny"))  # the 4-channel tiny VAE, then the 16-channel one
CHANNELS = {VAES[0]: 4, VAES[1]: 16}
CORE = "10% of the largest change (the core)"
WIDTH, HEIGHT = 48, 40  # multiples of the tiny VAE's downscale (2): encoded as they are


@pytest.fixture(scope="module")
def client(tiny_server) -> Client:
    return local_client(tiny_server.url,
                  download_files=str(tiny_server.folder / "lab-downloads"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, Path]:
    """Two images of one size: smooth colour gradients with some texture."""
    folder = tmp_path_factory.mktemp("lab")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    paths = []
    for i, (r, g) in enumerate(((x * 5, y * 6), (255 - y * 6, x * 5))):
        rgb = np.stack([r, g, np.full_like(x, 90 + 60 * i)], axis=2) + rng.normal(0, 12, (
            HEIGHT, WIDTH, 3))
        paths.append(folder / f"picture-{i}.png")
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths[0], paths[1]


def settings(path: Path | None, vae: str) -> tuple:
    """The image tab's values the experiments read, in the API's order."""
    return (handle_file(str(path)) if path else None, vae, 384, "crop", encoding.MEAN, 0, True)


def pixels_of(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@functools.cache
def tab_outputs(client: Client, path: Path, vae: str) -> dict:
    """The image tab's own outputs, from its encode_image endpoint (once per image and VAE)."""
    values = client.predict(handle_file(str(path)), vae, 384, "crop", encoding.MEAN, 0, True, True,
                            api_name="/encode_image")
    return dict(zip(image.OUTPUTS, values, strict=True))


def reconstruction(client: Client, path: Path, vae: str) -> np.ndarray:
    return pixels_of(tab_outputs(client, path, vae)["reconstruction"])


def stds_of(client: Client, path: Path, vae: str) -> list[float]:
    """The raw std of each channel, from the image tab's per-channel statistics."""
    stats = tab_outputs(client, path, vae)["stats"]
    column = stats["headers"].index("std")
    return [float(row[column]) for row in stats["data"][:-1]]  # the last row is all channels


def region_of(status: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the changed region, as the status states it."""
    found = re.search(r"Changed region (\d+) x (\d+) px \(x (\d+)-(\d+), y (\d+)-(\d+)\)", status)
    assert found, status
    width, height, left, right, top, bottom = map(int, found.groups())
    assert (width, height) == (right - left + 1, bottom - top + 1)
    return top, left, bottom, right


@pytest.mark.parametrize("vae", VAES)
def test_receptive_field_holds_the_block_and_moves_with_the_point(client, pictures, vae):
    regions, blocks = [], []
    for x, y in ((5, 4), (40, 33)):
        status, view = client.predict(*settings(pictures[0], vae), x, y, "all channels", 2.0,
                                      CORE, api_name="/receptive_field")
        block = experiments.block_of(y // 2, x // 2, 2)
        assert f"the 2 x 2 block at x {block[1]}-{block[3]}, y {block[0]}-{block[2]}" in status
        assert f"all {CHANNELS[vae]} channels moved by +2 std" in status
        region = region_of(status)
        assert region[0] <= block[0] and region[1] <= block[1]
        assert region[2] >= block[2] and region[3] >= block[3]
        # the picture: the green block outline lies inside the blue region outline
        drawn = pixels_of(view)[LABEL_ROOM:]
        green = np.argwhere((drawn == experiments.BLOCK_COLOUR).all(axis=2))
        blue = np.argwhere((drawn == experiments.REGION_COLOUR).all(axis=2))
        assert len(green) and len(blue)
        assert (green.min(0) > blue.min(0)).all() and (green.max(0) < blue.max(0)).all()
        regions.append(region)
        blocks.append(block)
        all_status = status
    # the region moves with the point: each holds its own block and not the other's, and its
    # centre moved down and to the right
    for region, other in ((regions[0], blocks[1]), (regions[1], blocks[0])):
        assert not (region[0] <= other[0] and region[1] <= other[1] and region[2] >= other[2]
                    and region[3] >= other[3])
    centres = [((top + bottom) / 2, (left + right) / 2) for top, left, bottom, right in regions]
    assert centres[1][0] > centres[0][0] and centres[1][1] > centres[0][1]
    # one channel only: a smaller change, still around the same block
    last = CHANNELS[vae] - 1
    status, _ = client.predict(*settings(pictures[0], vae), 40, 33, f"channel {last}",
                               -3.0, CORE, api_name="/receptive_field")
    assert f"channel {last} moved by -3 std" in status and region_of(status)
    # the std is the channel's over this latent, the tab's "std" column, in the VAE's units
    stds = stds_of(client, pictures[0], vae)
    moved = float(re.search(rf"channel {last} -3 std = ([-+\d.e]+) in the VAE's units",
                            status).group(1))
    assert moved == pytest.approx(-3 * stds[last], rel=1e-2)
    low, high = map(float, re.search(r"own std over this latent, ([\d.e-]+) to ([\d.e-]+) in "
                                     r"the VAE's units", all_status).groups())
    assert (low, high) == (pytest.approx(min(stds), rel=1e-2), pytest.approx(max(stds), rel=1e-2))


@pytest.mark.parametrize("vae", VAES)
def test_channel_edits(client, pictures, vae):
    plain = reconstruction(client, pictures[0], vae)
    channels = CHANNELS[vae]
    table = {"headers": latent_lab.TABLE_HEADERS, "data": latent_lab.default_table(channels),
             "metadata": None}
    status, edited, shown_plain, difference = client.predict(*settings(pictures[0], vae), table,
                                                             api_name="/edit_channels")
    assert "No channel is edited" in status
    np.testing.assert_array_equal(pixels_of(edited), plain)  # all ones: the tab's reconstruction
    np.testing.assert_array_equal(pixels_of(shown_plain), plain)
    rows = latent_lab.zero_row(table["data"], "channel 1")
    rows[2][2] = 1.5  # and channel 2 moved by 1.5 of its stds
    status, edited, _, _ = client.predict(*settings(pictures[0], vae), table | {"data": rows},
                                          api_name="/edit_channels")
    assert "Edited channels 1, 2. Against the plain decode: PSNR" in status
    assert np.abs(pixels_of(edited).astype(int) - plain).max() > 0
    moved = float(re.search(r"channel 2 \+1.5 std = ([-+\d.e]+) in the VAE's units",
                            status).group(1))
    assert moved == pytest.approx(1.5 * stds_of(client, pictures[0], vae)[2], rel=1e-2)
    status, *_ = client.predict(*settings(pictures[0], vae), table | {"data": rows[:3]},
                                api_name="/edit_channels")
    assert f"The table has 3 rows but this latent has {channels} channels" in status


@pytest.mark.parametrize("vae", VAES)
def test_interpolation_ends_at_the_two_reconstructions(client, pictures, vae):
    ends = [reconstruction(client, path, vae) for path in pictures]
    status, strip = client.predict(*settings(pictures[0], vae), handle_file(str(pictures[1])), 5,
                                   api_name="/interpolate")
    linear_mid, spherical_mid = map(float, re.search(
        r"linear mix has rms ([\d.]+) and the spherical one ([\d.]+)", status).groups())
    assert spherical_mid > linear_mid  # the straight line cuts inside the sphere
    # every rms with three significant digits, trailing zeros kept, so they line up
    sizes = re.findall(r"(?:rms|one|have|and) (\d[\d.]*\d)", status.split("\n")[0])
    assert len(sizes) == 4 and all(len(re.sub(r"^0\.0*", "", v)) == 3 for v in sizes), status
    drawn = pixels_of(strip)[LABEL_ROOM:]
    # the layout of a strip of this size, with captions of the same length, says where frames are
    layout = experiments.strip_picture([[ends[0]] * 5] * 2, ["linear", "spherical"],
                                       [["t = 0.00\nrms 0.0000"] * 5] * 2)
    assert drawn.shape == layout.pixels.shape
    boxes = layout.maps
    for row in (0, 1):
        np.testing.assert_array_equal(boxes[row * 5].cells(drawn), ends[0])
        np.testing.assert_array_equal(boxes[row * 5 + 4].cells(drawn), ends[1])
    middle = [boxes[row * 5 + 2].cells(drawn) for row in (0, 1)]
    assert not np.array_equal(middle[0], middle[1])  # the two paths differ inside


def test_bad_input_gets_a_message(client, pictures):
    vae = VAES[0]
    status, view = client.predict(*settings(None, vae), 5, 5, "all channels", 2.0, CORE,
                                  api_name="/receptive_field")
    assert "Upload an image (or click an example) and encode it first" in status and view is None
    status, _ = client.predict(*settings(pictures[0], vae), WIDTH, 3, "all channels", 2.0, CORE,
                               api_name="/receptive_field")
    assert f"The point ({WIDTH}, 3) is outside the {WIDTH}x{HEIGHT} preview" in status
    status, _ = client.predict(*settings(pictures[0], vae), None, None, "all channels", 2.0,
                               CORE, api_name="/receptive_field")
    assert "Click a point of the latent preview" in status
    status, _ = client.predict(*settings(pictures[0], vae), 5, 5, "channel 9", 2.0, CORE,
                               api_name="/receptive_field")
    assert "'channel 9' is not a channel of this latent: it has 4" in status
    table = {"headers": latent_lab.TABLE_HEADERS, "metadata": None,
             "data": [[0, 1.0, 0.0], [1, 50.0, 0.0], [2, 1.0, 0.0], [3, 1.0, 0.0]]}
    status, *_ = client.predict(*settings(pictures[0], vae), table, api_name="/edit_channels")
    assert "The scale of channel 1 must be from -10 to 10; got 50" in status
    status, _ = client.predict(*settings(pictures[0], vae), None, 5, api_name="/interpolate")
    assert "Upload a second image" in status
    status, _ = client.predict(*settings(None, vae), handle_file(str(pictures[1])), 5,
                               api_name="/interpolate")
    assert "encode it first" in status


def test_the_experiments_start_from_the_tabs_latent(pictures, monkeypatch, tmp_path):
    """After the tab's encode, an experiment decodes the tab's latent and encodes nothing."""
    encodes = []
    plain_encode = sd_parts.AutoencoderKL.encode

    def counted(vae: sd_parts.AutoencoderKL, images: torch.Tensor, tiled: bool = False
                ) -> sd_parts.DiagonalGaussian:
        encodes.append(tuple(images.shape))
        return plain_encode(vae, images, tiled=tiled)

    monkeypatch.setattr(sd_parts.AutoencoderKL, "encode", counted)
    models = Models(Settings(weights="tiny"))
    with gr.Blocks(delete_cache=models.settings.delete_cache) as demo:  # the image tab alone
        with gr.Tab(image.TITLE) as tab:
            image.build(models, tab)
    port = free_port()
    server.launch(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = local_client(f"http://127.0.0.1:{port}/", download_files=str(tmp_path))
        vae = VAES[0]
        source = settings(pictures[0], vae)
        tab = dict(zip(image.OUTPUTS, client.predict(*source[:-1], True, True,
                                                     api_name="/encode_image"), strict=True))
        assert len(encodes) == 1  # the tab's: so each encode of the app's VAE is counted
        with safe_open(tab["downloads"][0], "pt") as f:
            latent = f.get_tensor("latent")[0]  # the tab's latent, as it offers it
        rows = latent_lab.zero_row(latent_lab.default_table(4), "channel 1")
        table = {"headers": latent_lab.TABLE_HEADERS, "data": rows, "metadata": None}
        status, edited, plain, _ = client.predict(*source, table, api_name="/edit_channels")
        assert "Edited channel 1" in status and len(encodes) == 1  # decodes only
        # the edited picture is the decode of the tab's latent, edited
        model = models.vae(vae, True)
        scales, shifts = latent_lab.parse_table(rows, 4)
        expected = model.decode(experiments.edit_channels(latent, scales, shifts,
                                                          model.config.shift_factor)[None])
        np.testing.assert_array_equal(pixels_of(edited),
                                      np.asarray(pixels.tensor_to_image(expected)))
        np.testing.assert_array_equal(pixels_of(plain), pixels_of(tab["reconstruction"]))
    finally:
        demo.close()
