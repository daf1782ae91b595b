"""Heat maps drawn from arrays: the colours are the data, the boxes say where, labels stay out."""

from __future__ import annotations

import numpy as np
import pytest

from viz.heatmap import (
    MASKED,
    add_colorbar,
    add_title,
    arrange,
    colorize,
    colormap_table,
    drawable,
    enlarge,
    heatmap,
)


def test_colorize_maps_the_range_onto_the_table() -> None:
    table = colormap_table("viridis")
    values = np.array([[-5.0, 0.0, 0.5, 1.0, 7.0, np.nan]])
    rgb = colorize(values, "viridis", 0.0, 1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 6, 3)
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() == table[0].tolist()  # clipped below
    assert rgb[0, 2].tolist() == table[128].tolist()
    assert rgb[0, 3].tolist() == rgb[0, 4].tolist() == table[255].tolist()  # clipped above
    assert rgb[0, 5].tolist() == list(MASKED)
    masked = colorize(values[:, :3], "viridis", 0.0, 1.0, mask=np.array([[False, True, False]]))
    assert masked[0, 1].tolist() == list(MASKED)


def test_heatmap_cells_are_the_values() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 11))
    picture = heatmap(values, "RdBu_r", (-2.0, 2.0), (12, 9), [f"row {i}" for i in range(7)],
                      [f"col {j}" for j in range(11)], title="A title")
    (box,) = picture.maps
    assert (box.rows, box.columns, box.cell_height, box.cell_width) == (7, 11, 12, 9)
    np.testing.assert_array_equal(box.cells(picture.pixels), colorize(values, "RdBu_r", -2, 2))
    # every pixel of a cell has the cell's colour: no label or line is drawn over the map
    block = picture.pixels[box.top : box.top + 12 * 7, box.left : box.left + 9 * 11]
    np.testing.assert_array_equal(block, np.repeat(np.repeat(box.cells(picture.pixels), 12, 0),
                                                    9, 1))
    # the labels are drawn: there is ink left of and below the map
    assert picture.pixels[box.top :, : box.left].min() < 100
    assert picture.pixels[box.top + 12 * 7 :, box.left :].min() < 100


def test_heatmap_annotations_and_masks() -> None:
    values = np.array([[0.1, 0.9], [0.5, 0.3]])
    mask = np.array([[False, True], [False, False]])
    picture = heatmap(values, "viridis", (0.0, 1.0), (30, 40), annotate="{:.1f}", mask=mask)
    (box,) = picture.maps
    cells = box.cells(picture.pixels)
    assert cells[0, 1].tolist() == list(MASKED)
    top, left = box.top, box.left
    written = picture.pixels[top : top + 30, left : left + 40]  # the cell holding "0.1"
    assert len(np.unique(written.reshape(-1, 3), axis=0)) > 2  # text in it
    masked_cell = picture.pixels[top : top + 30, left + 40 : left + 80]
    assert (masked_cell == MASKED).all()  # nothing is written in a masked cell


def test_heatmap_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="3 rows but 2 row labels"):
        heatmap(np.zeros((3, 2)), "viridis", (0, 1), (5, 5), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(rows, columns\)"):
        heatmap(np.zeros(3), "viridis", (0, 1), (5, 5))


def test_arrange_bar_and_title_keep_every_map_readable() -> None:
    rng = np.random.default_rng(1)
    blocks = [rng.random((4, 6)) for _ in range(5)]
    pictures = [heatmap(b, "magma", (0, 1), (6, 6), title=f"panel {i}", row_labels=(
        ["r"] * 4 if i % 3 == 0 else ())) for i, b in enumerate(blocks)]
    picture = add_title(add_colorbar(arrange(pictures, 3), "magma", (0, 1), "value"), "Five")
    assert len(picture.maps) == 5
    for box, block in zip(picture.maps, blocks, strict=True):
        np.testing.assert_array_equal(box.cells(picture.pixels), colorize(block, "magma", 0, 1))
    lefts = sorted({box.left for box in picture.maps})
    assert len(lefts) == 3  # three columns, the second row under the first


def test_characters_without_a_glyph_are_written_as_code_points() -> None:
    assert drawable("cat 🐱 é") == "cat 🐱 é"  # DejaVu Sans has these
    assert drawable("猫") == "U+732B"


def test_a_remembered_text_mask_draws_the_pixels_a_fresh_rendering_does() -> None:
    from PIL import Image, ImageDraw, ImageFont

    from viz.heatmap import FONT_FILE, font

    def draw(typeface: ImageFont.FreeTypeFont) -> np.ndarray:
        image = Image.new("RGB", (160, 60), "white")
        canvas = ImageDraw.Draw(image)
        for i, (text, anchor) in enumerate([("0.731", "mm"), ("astronaut</w>", "rm"),
                                            ("0.731", "lm"), ("", "rm")]):
            canvas.text((80 + 0.5 * i, 8 + 13 * i), text, font=typeface, fill=(20, 20, 20),
                        anchor=anchor)
        return np.asarray(image)

    remembered = font(11)
    first, again = draw(remembered), draw(remembered)  # the second drawing reuses the masks
    assert np.array_equal(first, draw(ImageFont.truetype(str(FONT_FILE), 11)))
    assert np.array_equal(again, first) and remembered._masks


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (1, 9, 4), (6, 1, 3)])
def test_enlarge_repeats_every_pixel_into_its_block(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for cell in ((1, 1), (3, 1), (1, 4), (9, 2)):
        expected = np.repeat(np.repeat(pixels, cell[0], axis=0), cell[1], axis=1)
        enlarged = enlarge(pixels, *cell)
        assert np.array_equal(enlarged, expected) and not np.shares_memory(enlarged, pixels)
