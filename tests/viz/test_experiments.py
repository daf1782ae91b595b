"""The latent experiments' pure functions: the nudge, the change measured and drawn, channel edits,
linear and spherical mixes and the strip, with the drawn data read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import sd_parts
from viz import experiments
from viz.heatmap import GAP, colorize, text_width


def latent(channels: int = 4, height: int = 6, width: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(channels, height, width, generator=torch.Generator().manual_seed(seed)) * 5


def test_nudge_moves_one_latent_pixel_by_channel_stds() -> None:
    z = latent()
    before = z.clone()
    stds = z.flatten(1).std(dim=1, correction=0)
    moved = experiments.nudge_latent(z, 2, 5, 2.0)
    torch.testing.assert_close(moved[:, 2, 5] - z[:, 2, 5], 2 * stds)
    untouched = torch.ones(6, 8, dtype=torch.bool)
    untouched[2, 5] = False
    assert torch.equal(moved[:, untouched], z[:, untouched])
    assert torch.equal(z, before)  # the input is left as it was
    one = experiments.nudge_latent(z, 0, 0, -1.5, channel=3)
    assert torch.equal(one[:3], z[:3])
    torch.testing.assert_close(one[3, 0, 0] - z[3, 0, 0], -1.5 * stds[3])
    with pytest.raises(ValueError, match="outside the 8x6 latent"):
        experiments.nudge_latent(z, 6, 0, 1.0)
    with pytest.raises(ValueError, match="4 channels"):
        experiments.nudge_latent(z, 0, 0, 1.0, channel=4)


def test_change_is_measured_by_threshold() -> None:
    change = np.zeros((20, 30))
    change[5:9, 10:13] = 3.0  # a 3 x 4 patch of big changes
    change[4, 20] = 0.5  # and one small change further right
    core = experiments.measure_change(change, 1.0)
    assert (core.count, core.box, core.width, core.height) == (12, (5, 10, 8, 12), 3, 4)
    assert core.largest == 3.0
    assert core.contains((6, 11, 7, 12)) and not core.contains((6, 11, 9, 12))
    wide = experiments.measure_change(change, 0.1)
    assert (wide.count, wide.box) == (13, (4, 10, 8, 20))
    empty = experiments.measure_change(change, 5.0)
    assert empty.box is None and empty.count == 0 and not empty.contains((0, 0, 0, 0))
    with pytest.raises(ValueError, match="above 0"):
        experiments.measure_change(change, 0.0)
    assert experiments.block_of(2, 3, 8) == (16, 24, 23, 31)
    text = experiments.describe_change(core, (6, 10, 7, 11), 2, (30, 20))
    assert text.startswith("Changed region 3 x 4 px (x 10-12, y 5-8); the block is 2 x 2. 12 "
                           "of the 600 pixels (2.0%) changed by at least 1 (of 255); the largest "
                           "change is 3.")
    assert "Part of the block" not in text and "whole image" not in text
    assert "Part of the block" in experiments.describe_change(core, (8, 12, 9, 13), 2, (30, 20))
    everywhere = experiments.measure_change(change + 1.0, 1.0)
    assert "whole image" in experiments.describe_change(everywhere, (6, 10, 7, 11), 2, (30, 20))
    assert experiments.describe_change(empty, (6, 10, 7, 11), 2, (30, 20)) == (
        "No pixel changed by 5 (of 255) or more; the largest change is 3.")


def test_change_map_takes_the_largest_colour_change() -> None:
    before = np.zeros((2, 2, 3))
    after = before.copy()
    after[0, 1] = (1.0, -4.0, 2.0)
    np.testing.assert_array_equal(experiments.change_map(before, after), [[0, 4], [0, 0]])
    decoded = torch.tensor([[[-2.0, 0.0]], [[1.0, 1.0]], [[-1.0, 0.5]]])  # (3, 1, 2)
    np.testing.assert_allclose(experiments.to_levels(decoded),
                               [[[0, 255, 0], [127.5, 255, 191.25]]])


def test_receptive_field_view_colours_the_change_over_the_grey_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    change = np.zeros((16, 24))
    change[4:10, 6:14] = np.linspace(1.0, 40.0, 48).reshape(6, 8)
    region = experiments.measure_change(change, 1.0)
    block = experiments.block_of(2, 4, 2)  # y 4-5, x 8-9
    picture = experiments.receptive_field_view(image, change, region, block, "title", 96)
    box = picture.maps[0]
    assert (box.rows, box.columns, box.cell_height) == (16, 24, 4)
    cells = box.cells(picture.pixels)
    changed = change >= 1.0
    np.testing.assert_array_equal(cells[changed], colorize(change[changed], "magma", 0.0, 40.0))
    grey = np.rint(96 + 0.5 * (image.astype(float) @ [0.299, 0.587, 0.114])).astype(np.uint8)
    np.testing.assert_array_equal(cells[~changed], np.repeat(grey[~changed][:, None], 3, 1))

    def pixel(y: int, x: int) -> list[int]:  # image pixel (y, x)'s top-left corner, less (dy, dx)
        return picture.pixels[box.top + y, box.left + x].tolist()

    # the block's outline runs one pixel outside it, in green; the region's in blue
    assert pixel(4 * 4 - 1, 8 * 4) == list(experiments.BLOCK_COLOUR)
    assert pixel(6 * 4, 10 * 4) == list(experiments.BLOCK_COLOUR)
    assert pixel(4 * 4 - 1, 6 * 4 + 1) == list(experiments.REGION_COLOUR)
    assert pixel(10 * 4, 14 * 4 - 2) == list(experiments.REGION_COLOUR)
    # the block, 8 px wide here, is small on a page: green ticks point at it from 3 px away,
    # above (x 8-9 is drawn at 32-39: its middle column is 35) and to the left
    above = [pixel(4 * 4 - 1 - experiments.MARK_GAP - i, 35) for i in range(1, 8)]
    left = [pixel(19, 8 * 4 - 1 - experiments.MARK_GAP - i) for i in range(1, 8)]
    assert all(p == list(experiments.BLOCK_COLOUR) for p in above + left)
    assert pixel(4 * 4 - 1 - experiments.MARK_GAP + 1, 35) != list(experiments.BLOCK_COLOUR)
    big = experiments.receptive_field_view(image, change, region, block, "title", 384)
    green = (big.pixels == experiments.BLOCK_COLOUR).all(axis=2).sum()
    assert green == 4 * (2 * 16 + 1)  # 32 px wide: the outline alone (4 sides of 33 px)
    with pytest.raises(ValueError, match="differ"):
        experiments.receptive_field_view(image[:8], change, region, block, "title")


@pytest.mark.parametrize("channels, shift_factor", [(4, 0.0), (16, 0.1159)])
def test_channel_edits(channels: int, shift_factor: float) -> None:
    z = latent(channels) + shift_factor
    before = z.clone()
    same = experiments.edit_channels(z, [1.0] * channels, [0.0] * channels, shift_factor)
    assert torch.equal(same, z)  # bit for bit: no edit, no rounding
    scales, shifts = [1.0] * channels, [0.0] * channels
    scales[1], shifts[2], scales[3] = 0.0, 1.5, 2.0
    edited = experiments.edit_channels(z, scales, shifts, shift_factor)
    assert torch.equal(z, before)
    torch.testing.assert_close(edited[1], torch.full_like(z[1], shift_factor))
    torch.testing.assert_close(edited[2], z[2] + 1.5 * z[2].std(correction=0))
    torch.testing.assert_close(edited[3] - shift_factor, 2 * (z[3] - shift_factor))
    assert torch.equal(edited[0], z[0])
    with pytest.raises(ValueError, match=f"{channels} channels, got 3 scales"):
        experiments.edit_channels(z, [1.0] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match="finite"):
        experiments.edit_channels(z, [math.nan] * channels, [0.0] * channels)


def test_difference_view_cells_are_the_change() -> None:
    plain = np.zeros((8, 10, 3), dtype=np.uint8)
    edited = plain.copy()
    edited[2:4, 3:7, 1] = 50
    picture = experiments.difference_view(plain, edited, min_side=40)
    box = picture.maps[0]
    expected = colorize(experiments.change_map(plain, edited), "magma", 0.0, 50.0)
    np.testing.assert_array_equal(box.cells(picture.pixels), expected)


def test_lerp_and_slerp_end_exactly_at_the_two_latents() -> None:
    a, b = latent(16, seed=1), latent(16, seed=2)
    for mix in (experiments.lerp, experiments.slerp):
        assert torch.equal(mix(a, b, 0.0), a) and torch.equal(mix(a, b, 1.0), b)
    centre = 0.1159
    assert torch.equal(experiments.slerp(a, b, 0.0, centre), a)
    assert torch.equal(experiments.slerp(a, b, 1.0, centre), b)


def test_slerp_keeps_the_length_that_lerp_loses() -> None:
    """Two independent unit-Gaussian latents (4 x 64 x 64, as SD v1's at 512 px): the straight
    midpoint is about 1/sqrt(2) as long; the spherical path keeps the length all the way."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, 64, generator=g), torch.randn(4, 64, 64, generator=g)
    b = b * (a.norm() / b.norm())  # equal lengths, so slerp's length is exactly constant
    midpoint = experiments.lerp(a, b, 0.5)
    assert abs(float(midpoint.norm() / a.norm()) - 1 / math.sqrt(2)) < 0.02
    assert abs(experiments.rms(midpoint, 1.0) - 1 / math.sqrt(2)) < 0.02
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(experiments.slerp(a, b, t).norm(), a.norm())
    # slerp moves along the angle at a constant rate: at t the angle to a is t x the whole angle
    whole = torch.arccos(a.flatten() @ b.flatten() / (a.norm() * b.norm()))
    quarter = experiments.slerp(a, b, 0.25)
    angle = torch.arccos(a.flatten() @ quarter.flatten() / (a.norm() * quarter.norm()))
    torch.testing.assert_close(angle, whole / 4)
    # parallel latents: the angle is 0 and the weights are the straight line's
    assert experiments.slerp_weights(a, 3 * a, 0.3) == (0.7, 0.3)
    with pytest.raises(ValueError, match="opposite"):
        experiments.slerp(a, -a, 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        experiments.slerp(a, torch.zeros_like(a), 0.5)


def test_match_size_crops_to_the_aspect_then_resizes() -> None:
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 0, 255), (0, 0, 60, 100))  # a blue left edge, cropped away
    matched, note = experiments.match_size(image, (64, 48))
    assert matched.size == (64, 48)
    assert note == "300x100 cropped to 133x100, resized to 64x48"
    assert np.asarray(matched)[:, :, 2].max() < 10  # no blue left: the crop was centred
    same, note = experiments.match_size(image.crop((0, 0, 64, 48)), (64, 48))
    assert same.size == (64, 48) and note == "64x48"


def test_strip_keeps_each_frame_readable() -> None:
    rng = np.random.default_rng(1)
    frames = [[rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
              for _ in range(2)]
    captions = [[f"t = {t}\nrms 1.00" for t in (0, 0.5, 1)]] * 2
    picture = experiments.strip_picture(frames, ["linear", "spherical"], captions)
    assert len(picture.maps) == 6
    for box, frame in zip(picture.maps, [f for row in frames for f in row], strict=True):
        assert (box.cell_height, box.rows, box.columns) == (4, 20, 30)  # 128 // 30: 4x
        np.testing.assert_array_equal(box.cells(picture.pixels), frame)
    first = picture.maps[0]
    assert first.left == text_width(["linear", "spherical"], experiments.CAPTION_SIZE) + GAP
    below = picture.pixels[first.top + 80 : first.top + 100, first.left : first.left + 120]
    assert below.min() < 100  # the caption is written under the frame
    narrow = experiments.strip_picture(frames, ["a", "b"], captions, max_width=200)
    assert narrow.maps[0].cell_height == 2  # enlarged less: 3 frames of 60 px fit in 200
    np.testing.assert_array_equal(narrow.maps[4].cells(narrow.pixels), frames[1][1])
    big = [[np.repeat(np.repeat(f, 10, 0), 10, 1) for f in row] for row in frames]  # 300 px
    shrunk = experiments.strip_picture(big, ["a", "b"], captions, max_width=200)
    box = shrunk.maps[0]
    assert (box.cell_height, box.rows, box.columns) == (1, 40, 60)  # 900 px / 5
    np.testing.assert_array_equal(box.cells(shrunk.pixels),  # blocks of 5 x 5 averaged
                                  np.asarray(Image.fromarray(big[0][0]).resize(
                                      (60, 40), Image.Resampling.BOX)))
    # five 384 x 256 frames: halved, so the strip is shown near its size and captions stay legible
    wide = experiments.strip_picture([[np.zeros((256, 384, 3), np.uint8)] * 5] * 2, ["a", "b"],
                                     [["t = 0.00\nrms 1.00"] * 5] * 2)
    assert wide.maps[0].columns == 192 and wide.pixels.shape[1] <= experiments.STRIP_WIDTH + 100
    with pytest.raises(ValueError, match="one caption"):
        experiments.strip_picture(frames, ["a", "b"], [["x"], ["y"]])


def test_tiny_16_channel_vae_nudge_stays_local_and_edits_round_trip() -> None:
    """TINY_VAE_16 (random weights): one latent pixel's core footprint holds its own block and
    moves with it; all-ones edits decode to the plain reconstruction."""
    torch.manual_seed(0)
    vae = sd_parts.AutoencoderKL(sd_parts.TINY_VAE_16).eval()
    z = latent(16, 12, 16, seed=3)
    plain = vae.decode(z[None])[0]
    boxes = []
    for row, column in ((2, 3), (9, 12)):
        after = vae.decode(experiments.nudge_latent(z, row, column, 2.0)[None])[0]
        change = experiments.change_map(experiments.to_levels(plain),
                                         experiments.to_levels(after))
        region = experiments.measure_change(change, 0.1 * change.max())
        assert region.contains(experiments.block_of(row, column, vae.downscale))
        boxes.append(region.box)
    assert boxes[1][0] > boxes[0][2] and boxes[1][1] > boxes[0][3]  # below and right of it
    shift = sd_parts.TINY_VAE_16.shift_factor
    same = experiments.edit_channels(z, [1.0] * 16, [0.0] * 16, shift)
    assert torch.equal(vae.decode(same[None])[0], plain)
