"""The pictures a tab answers with are written once each, in a format that keeps every pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ui.shared import LABEL_ROOM, PictureFiles
from viz.heatmap import heatmap
from viz.plot import add_axes, new_figure


def _noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def test_arrays_images_and_pictures_decode_to_the_very_pixels() -> None:
    files = PictureFiles(3600)
    array, rgba = _noise(37, 53), _noise(20, 30, 4)
    picture = heatmap(np.random.default_rng(1).normal(size=(6, 9)), "viridis", (-2.0, 2.0),
                      (7, 5), [f"row {i}" for i in range(6)], [str(i) for i in range(9)])
    try:
        for value, expected in ((array, array), (Image.fromarray(rgba), rgba),
                                (picture, np.pad(picture.pixels, ((LABEL_ROOM, 0), (0, 0), (0, 0)),
                                                 constant_values=255))):
            path = files(value)
            assert path.endswith(".webp")  # lossless WebP: fast to write and to send
            with Image.open(path) as decoded:
                assert np.array_equal(np.asarray(decoded), expected)
    finally:
        files.remove()


def test_grey_pixels_keep_their_mode_in_a_png() -> None:
    files = PictureFiles(3600)
    grey = _noise(16, 24, channels=1)
    try:
        path = files(grey)
        with Image.open(path) as decoded:
            assert path.endswith(".png") and decoded.mode == "L"
            assert np.array_equal(np.asarray(decoded), grey)
    finally:
        files.remove()


def test_a_figure_is_written_as_its_canvas_draws_it() -> None:
    figure = new_figure(2.0, 1.5)
    add_axes(figure, 0.4, 0.3, 1.4, 1.0).plot([0, 1, 2], [2, 0, 1])
    figure.canvas.draw()
    drawn = np.asarray(figure.canvas.buffer_rgba()).copy()
    files = PictureFiles(3600)
    try:
        with Image.open(files(figure)) as decoded:
            assert np.array_equal(np.asarray(decoded.convert("RGBA")), drawn)
    finally:
        files.remove()


def test_each_object_is_written_once_and_removed_after() -> None:
    files = PictureFiles(3600)
    array = _noise(8, 8)
    first = files(array)
    assert files(array) == first and files(array.copy()) != first
    assert files("some text") == "some text" and files(None) is None  # not pictures: as they are
    files.remove()
    assert not Path(first).exists()
