"""The comparison of VAEs as pure views: Wang et al.'s SSIM, the labelled reconstructions, the
error maps on one scale, the crop, the table and its CSV, the latent histograms. Each test reads
the drawn data back."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.helpers.charts import assert_densities_drawn, assert_normal_drawn
from viz import compare, latents
from viz.heatmap import GAP, colorize
from viz.metrics import GAUSSIAN_SSIM_SIDE, abs_error_map, ssim_gaussian


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gradient with noise: structure for SSIM, different values for every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 / max(width - 1, 1), y * 200 / max(height - 1, 1), (x * y) % 50 * 4])
    noisy = base.transpose(1, 2, 0) + 20 + rng.normal(0, 10, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(11, 11), (37, 64), (96, 80)])
def test_gaussian_ssim_matches_scikit_image(size: tuple[int, int]) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(size[0] * 100 + size[1])
    a = _picture(*size, 0) / 255.0
    pairs = [(a, np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)), (a, rng.random(a.shape))]
    for x, y in pairs:
        expected = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=1,
                                                 channel_axis=-1)
        assert ssim_gaussian(x, y, data_range=1.0) == pytest.approx(expected, abs=1e-6)  # 1e-4
    expected = metrics.structural_similarity(a[:, :, 1], pairs[0][1][:, :, 1],
                                             gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1)
    assert ssim_gaussian(a[:, :, 1], pairs[0][1][:, :, 1], data_range=1.0) == pytest.approx(
        expected, abs=1e-6)
    # the same images in 0-255 with their own range give the same number
    assert ssim_gaussian(pairs[0][0] * 255, pairs[0][1] * 255) == pytest.approx(
        ssim_gaussian(*pairs[0], data_range=1.0), abs=1e-12)


def test_gaussian_ssim_of_identical_images_is_one_and_small_images_are_refused() -> None:
    a = _picture(20, 30, 1)
    assert ssim_gaussian(a, a) == pytest.approx(1.0)
    side = GAUSSIAN_SSIM_SIDE
    with pytest.raises(ValueError, match=f"at least {side}x{side}"):
        ssim_gaussian(a[: side - 1], a[: side - 1])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_gaussian(a, a[:, :20])


def test_side_by_side_draws_every_picture_under_its_label() -> None:
    pictures = [(f"VAE {i}", _picture(24 + 8 * i, 40, i)) for i in range(5)]
    view = compare.side_by_side(pictures, columns=3)
    assert len(view.maps) == 5
    for box, (_, picture) in zip(view.maps, pictures, strict=True):
        assert (box.rows, box.columns) == picture.shape[:2]
        np.testing.assert_array_equal(box.cells(view.pixels), picture)
    assert view.maps[1].top == view.maps[0].top and view.maps[3].top > view.maps[0].top  # 3 a row


@pytest.mark.parametrize("width, per_row", [(128, 4), (256, 4), (384, 2), (512, 2), (1200, 1)])
def test_a_row_holds_as_many_pictures_as_fit_near_their_own_size(width, per_row) -> None:
    pictures = [(f"VAE {i}", _picture(width * 3 // 4, width, i)) for i in range(4)]
    views = [compare.side_by_side(pictures), compare.error_maps_view(pictures[0][1], pictures)]
    for view in views:
        tops = [box.top for box in view.maps]
        assert tops == sorted(tops) and tops.count(tops[0]) == per_row
        assert view.maps[per_row - 1].left + width <= compare.ROW_WIDTH or per_row == 1
    # enlarged crops are about CROP_DISPLAY wide: the original and three VAEs in one row
    crops = compare.crop_view(pictures, compare.crop_box(20, 20, (width, width * 3 // 4), 32))
    assert len({box.top for box in crops.maps}) == 1


def test_a_long_name_wraps_over_its_picture_and_the_pictures_line_up() -> None:
    names = ["original", "FLUX.1 VAE architecture, random weights", "TAESD", "SD v1 VAE"]
    pictures = [(name, _picture(96, 128, i)) for i, name in enumerate(names)]
    view = compare.side_by_side(pictures)
    assert view.pixels.shape[1] == 4 * 128 + 3 * 2 * GAP  # no title widens its picture
    assert len({box.top for box in view.maps}) == 1  # a title of two lines, all moved down
    for box, (_, picture) in zip(view.maps, pictures, strict=True):
        np.testing.assert_array_equal(box.cells(view.pixels), picture)
    crops = compare.crop_view([(name, _picture(256, 256, 0)) for name in names],
                              compare.crop_box(100, 100, (256, 256), 64))
    assert len({box.top for box in crops.maps}) == 1  # four 256-px crops still in one row


def test_error_maps_share_one_colour_scale() -> None:
    original = _picture(32, 48, 0)
    small = np.clip(original.astype(int) + 10, 0, 255).astype(np.uint8)  # error 10 everywhere
    large = np.clip(original.astype(int) - 40, 0, 255).astype(np.uint8)  # error 40 everywhere
    noisy = _picture(32, 48, 5)
    reconstructions = [("small", small), ("large", large), ("noisy", noisy)]
    view = compare.error_maps_view(original, reconstructions)
    assert len(view.maps) == 3
    errors = [abs_error_map(original, picture) for _, picture in reconstructions]
    top = compare.shared_error_scale(errors)
    assert top == pytest.approx(40.0)  # the worst VAE's 99.5th percentile ends the scale
    for box, error in zip(view.maps, errors, strict=True):
        np.testing.assert_array_equal(box.cells(view.pixels),
                                      colorize(error, compare.ERROR_CMAP, 0.0, top))
    # one scale: the VAE with a quarter of the error is drawn a quarter of the way up the map
    assert (view.maps[0].cells(view.pixels) == colorize(np.array([[0.25]]), compare.ERROR_CMAP,
                                                        0.0, 1.0)[0, 0]).all()


def test_the_shared_scale_ignores_a_few_extreme_pixels() -> None:
    error = np.full((100, 100), 5.0)
    error[0, :3] = 250.0  # 3 pixels in 10,000: beyond the 99.5th percentile
    assert compare.shared_error_scale([error, np.full((100, 100), 2.0)]) == pytest.approx(5.0)
    assert compare.shared_error_scale([np.zeros((4, 4))]) == 1.0  # a perfect copy: still a scale


@pytest.mark.parametrize("click, size, side, expected", [
    ((50, 40), (100, 80), 20, (40, 30, 60, 50)),  # centred on the click
    ((2, 3), (100, 80), 20, (0, 0, 20, 20)),  # moved inside at a corner
    ((99, 79), (100, 80), 64, (36, 16, 100, 80)),
    ((10, 10), (30, 20), 64, (0, 0, 20, 20)),  # shrunk to the shorter side
])
def test_crop_box_stays_inside_the_image(click, size, side, expected) -> None:
    assert compare.crop_box(*click, size, side) == expected


def test_crop_box_refuses_what_is_not_a_position() -> None:
    with pytest.raises(ValueError, match="pixel position"):
        compare.crop_box(float("nan"), 3, (10, 10), 4)
    with pytest.raises(ValueError, match="positive"):
        compare.crop_box(3, 3, (10, 10), 0)


def test_crop_view_enlarges_the_same_region_of_every_picture() -> None:
    pictures = [("original", _picture(64, 96, 0)), ("a", _picture(64, 96, 1)),
                ("b", _picture(64, 96, 2))]
    box = compare.crop_box(80, 10, (96, 64), 32)
    left, top, right, bottom = box
    view = compare.crop_view(pictures, box)
    zoom = compare.CROP_DISPLAY // 32
    assert len(view.maps) == 3
    for panel, (_, picture) in zip(view.maps, pictures, strict=True):
        assert (panel.cell_height, panel.cell_width) == (zoom, zoom)
        assert (panel.rows, panel.columns) == (bottom - top, right - left)
        np.testing.assert_array_equal(panel.cells(view.pixels), picture[top:bottom, left:right])
        # nearest neighbour: every pixel of a block has its cell's colour
        block = view.pixels[panel.top:panel.top + zoom, panel.left:panel.left + zoom]
        assert (block == picture[top, left]).all()
    with pytest.raises(ValueError, match="outside"):
        compare.crop_view(pictures, (80, 0, 112, 32))


def test_table_rows_and_csv_round_trip(tmp_path) -> None:
    rows = [compare.table_row("SD", (4, 48, 64), latents.latent_space_text(0.18215, 0.0),
                              31.234567, 0.912345678, 0.51234, 0.98765),
            compare.failure_row("SD3", "the repository is gated"),
            compare.table_row("FLUX", (16, 48, 64), latents.latent_space_text(0.3611, 0.1159),
                              35.0, 0.95, 1.0, 2.0, note="fast")]
    assert rows[0] == ["SD", "4x48x64", 4, "z x 0.18215", 31.23, 0.9123, 0.512, 0.988, ""]
    assert rows[2][3] == "(z - 0.1159) x 0.3611"
    assert rows[1][0] == "SD3" and rows[1][-1] == "the repository is gated"
    assert all(value is None for value in rows[1][1:-1])
    path = compare.table_to_csv(rows, tmp_path / "table.csv")
    with path.open(newline="") as file:
        read = list(csv.reader(file))
    assert read[0] == compare.TABLE_HEADERS
    assert read[1] == [str(value) for value in rows[0]]
    assert read[2] == ["SD3"] + [""] * (len(compare.TABLE_HEADERS) - 2) + [rows[1][-1]]


def test_histograms_draw_each_latent_against_the_standard_normal() -> None:
    rng = np.random.default_rng(0)
    latents = [("4 channels", rng.normal(0.5, 1.0, (4, 16, 16))),
               ("16 channels", rng.normal(0.0, 2.0, (16, 8, 8)))]
    chart = compare.latent_histograms_view(latents)
    values = [latent for _, latent in latents]
    assert_densities_drawn(chart, values, values)  # shared bins spanning every latent
    assert_normal_drawn(chart)
    *entries, normal = chart.legend
    assert normal.label == "N(0, 1)"
    for entry, (label, latent) in zip(entries, latents, strict=True):
        assert entry.label.startswith(f"{label}: mean {latent.mean():+.2f}, std ")
    # the legend lies under the axes and inside the picture, a line per VAE and N(0, 1): the
    # only curve colours in it are its own samples, each in its entry's colour
    plot, (left, top, right, bottom) = chart.plot, chart.legend_box
    height, width = chart.pixels.shape[:2]
    assert top > plot.top + plot.height and bottom <= height and right <= width and left >= 0
    legend = chart.pixels[top : bottom + 1, left : right + 1].copy()
    for entry in chart.legend:
        x0, y0, x1, y1 = entry.sample
        sample = chart.pixels[y0 : y1 + 1, x0 : x1 + 1]
        assert (sample == entry.colour).all(axis=2).mean() > 0.5  # dashed: 6 of every 10
        legend[y0 - top : y1 - top + 1, x0 - left : x1 - left + 1] = 255
    for colour in [entry.colour for entry in chart.legend]:
        assert not (legend == colour).all(axis=2).any()
