"""Latent views for any channel count and downscale: drawn data, colour maps, numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.charts import assert_densities_drawn, assert_normal_drawn
from viz.heatmap import colorize
from viz.latents import (
    CHANNEL_STATS_HEADERS,
    LATENT_RGB_MAPS,
    apply_rgb_map,
    channel_stats,
    enlarge_to,
    fit_rgb_map,
    latent_channels_view,
    latent_histogram_view,
    model_space,
    rgb_map_for,
    std_view,
)
from viz.plot import DIVERGING, SEQUENTIAL

SD1, SD3 = LATENT_RGB_MAPS["sd1"], LATENT_RGB_MAPS["sd3"]


@pytest.mark.parametrize("channels, downscale", [(4, 8), (16, 8), (4, 2)])
@pytest.mark.parametrize("shared_scale", [True, False])
def test_channel_view_draws_every_channel(channels: int, downscale: int,
                                          shared_scale: bool) -> None:
    latent = torch.randn(1, channels, 12, 20, generator=torch.Generator().manual_seed(0)) * 5
    picture = latent_channels_view(latent, downscale, shared_scale)
    assert len(picture.maps) == channels
    values = latent[0].double().numpy()
    for channel, box in enumerate(picture.maps):
        block = values[channel]
        extent = np.abs(values if shared_scale else block).max()
        np.testing.assert_array_equal(box.cells(picture.pixels),
                                      colorize(block, DIVERGING, -extent, extent))


def test_std_view_uses_a_sequential_scale_from_zero() -> None:
    std = torch.rand(16, 6, 9, generator=torch.Generator().manual_seed(1)) * 0.1
    picture = std_view(std)
    values = std.double().numpy()
    for channel, box in enumerate(picture.maps):
        np.testing.assert_array_equal(box.cells(picture.pixels),
                                      colorize(values[channel], SEQUENTIAL, 0.0, values.max()))


def test_published_maps_cover_each_family() -> None:
    assert {name: m.channels for name, m in LATENT_RGB_MAPS.items()} == {
        "sd1": 4, "sdxl": 4, "sd3": 16, "flux": 16}
    assert rgb_map_for(4, 0.18215) is SD1 and rgb_map_for(4, 0.13025) is LATENT_RGB_MAPS["sdxl"]
    assert rgb_map_for(16, 1.5305) is SD3 and rgb_map_for(16, 0.3611) is LATENT_RGB_MAPS["flux"]
    assert rgb_map_for(4, 0.5) is SD1  # SD v1's fine-tunes and unknown 4-channel VAEs
    assert rgb_map_for(16, 0.5) is None  # no published map: the app fits one to the image
    assert all(m.matrix().shape == (m.channels + 1, 3) for m in LATENT_RGB_MAPS.values())


def test_apply_rgb_map_is_the_linear_map_in_model_space() -> None:
    latent = torch.randn(16, 5, 7, generator=torch.Generator().manual_seed(2))
    rgb = apply_rgb_map(latent, SD3.matrix(), 1.5305, 0.0609)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    pixel = (latent[:, 3, 4].double().numpy() - 0.0609) * 1.5305 @ np.array(SD3.weights)
    expected = np.rint((np.clip(pixel + np.array(SD3.bias), -1, 1) + 1) * 127.5)
    assert rgb[3, 4].tolist() == expected.tolist()
    assert np.all(apply_rgb_map(torch.zeros(4, 2, 2), SD1.matrix(), 0.18215) == 128)
    with pytest.raises(ValueError, match=r"16-channel latent needs a \(16, 3\)"):
        apply_rgb_map(latent, SD1.matrix(), 0.18215)


@pytest.mark.parametrize("channels, shift", [(4, 0.0), (16, 0.1159)])
def test_fit_rgb_map_recovers_a_known_linear_map(channels: int, shift: float) -> None:
    rng = np.random.default_rng(channels)
    height, width, scale = 12, 20, 0.3611
    truth = rng.normal(0, 0.3, (channels + 1, 3))
    truth[:3] += np.eye(3)  # keep the first three rows invertible
    # Choose pixels first, then solve for channels 0-2 that map onto them exactly.
    pixels = rng.integers(0, 256, (height * width, 3)).astype(np.float64)
    rest_channels = rng.normal(0, 1, (height * width, channels - 3))
    target = pixels / 127.5 - 1 - rest_channels @ truth[3:channels] - truth[channels]
    first3 = target @ np.linalg.inv(truth[:3])
    scaled = np.concatenate([first3, rest_channels], axis=1).T.reshape(channels, height, width)
    latent = torch.from_numpy(scaled / scale + shift)
    small = Image.fromarray(pixels.reshape(height, width, 3).astype(np.uint8))
    image = small.resize((width * 8, height * 8), Image.Resampling.NEAREST)
    matrix = fit_rgb_map(latent, image, scale, shift)
    np.testing.assert_allclose(matrix, truth, atol=1e-6)
    drawn = apply_rgb_map(latent, matrix, scale, shift).astype(int)
    assert np.abs(drawn - pixels.reshape(height, width, 3)).max() <= 1
    with pytest.raises(ValueError, match="aspect"):
        fit_rgb_map(latent, image.resize((width * 8, height * 4)), scale, shift)


def test_previews_are_enlarged_to_the_encoder_input() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarge_to(rgb, (24, 16))  # (width, height): 8x8 pixels per latent pixel
    assert big.shape == (16, 24, 3)
    assert (big[8:16, 16:24] == rgb[1, 2]).all()
    with pytest.raises(ValueError, match="does not divide"):
        enlarge_to(rgb, (25, 16))


def test_channel_stats_rows_for_any_channel_count() -> None:
    latent = torch.randn(16, 8, 8) * 5 + torch.arange(16.0).view(16, 1, 1)
    rows = channel_stats(latent, 1.5305, 0.0609)
    assert [row[0] for row in rows] == [str(c) for c in range(16)] + ["all"]
    assert all(len(row) == len(CHANNEL_STATS_HEADERS) for row in rows)
    channel2 = latent[2].double()
    assert rows[2][1] == pytest.approx(channel2.mean().item(), abs=1e-4)
    assert rows[2][2] == pytest.approx(channel2.std(unbiased=False).item(), abs=1e-4)
    assert rows[16][3] == pytest.approx(latent.min().item(), abs=1e-4)
    assert rows[2][5] == pytest.approx((channel2.mean().item() - 0.0609) * 1.5305, abs=1e-3)
    assert rows[16][6] == pytest.approx(rows[16][2] * 1.5305, abs=1e-3)


@pytest.mark.parametrize("channels, lines", [(4, 4), (16, 3)])
def test_histogram_draws_the_model_space_density(channels: int, lines: int) -> None:
    # each channel its own spread, so the lines part; channel 0, the narrowest, peaks right of the
    # middle, under the legend
    spreads = torch.linspace(3.0, 9.0, channels)[:, None, None]
    latent = torch.randn(channels, 24, 24, generator=torch.Generator().manual_seed(3)) * spreads
    latent[0] += 14.0
    chart = latent_histogram_view(latent, 0.18215)
    scaled = model_space(latent, 0.18215)
    if channels == 4:
        groups = [("channel 0", scaled[0]), ("channel 1", scaled[1]), ("channel 2", scaled[2]),
                  ("channel 3", scaled[3])]
    else:  # all values, then the quietest and the loudest channel
        groups = [("all channels", scaled), ("channel 0", scaled[0]), ("channel 15", scaled[15])]
    assert len(groups) == lines
    assert_densities_drawn(chart, [values for _, values in groups], [scaled])
    assert_normal_drawn(chart)
    assert [entry.label for entry in chart.legend] == [
        f"{label}: std {values.std():.2f}" for label, values in groups] + ["N(0, 1)"]
    # the legend sits inside the axes at the upper right, above every curve
    plot, (left, top, right, bottom) = chart.plot, chart.legend_box
    assert plot.top < top and bottom < plot.top + plot.height // 2
    assert plot.left + plot.width // 2 < left and right < plot.left + plot.width
    for entry in chart.legend:
        x0, y0, x1, y1 = entry.sample
        sample = chart.pixels[y0 : y1 + 1, x0 : x1 + 1]
        assert (sample == entry.colour).all(axis=2).mean() > 0.5  # dashed: 6 of every 10
    edges = np.linspace(*plot.x_range, 81)
    under = edges[1:] > plot.value_at_column(left)  # the bins reaching under the legend
    for _, values in groups:
        density = np.histogram(values, bins=edges, density=True)[0]
        assert plot.row(density[under].max()) > bottom
