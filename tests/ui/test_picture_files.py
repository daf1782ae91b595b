"""The pictures a tab answers with are written once each, in a format that keeps every pixel."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio import processing_utils
from PIL import Image

from ui.shared import LABEL_ROOM, SERVED_FOLDER, PictureFiles, in_parallel, on_own_thread
from viz.heatmap import heatmap
from viz.plot import add_axes, new_figure


def _noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def test_arrays_images_and_pictures_decode_to_the_very_pixels() -> None:
    files = PictureFiles()
    array, rgba = _noise(37, 53), _noise(20, 30, 4)
    picture = heatmap(np.random.default_rng(1).normal(size=(6, 9)), "viridis", (-2.0, 2.0),
                      (7, 5), [f"row {i}" for i in range(6)], [str(i) for i in range(9)])
    for value, expected in ((array, array), (Image.fromarray(rgba), rgba),
                            (picture, np.pad(picture.pixels, ((LABEL_ROOM, 0), (0, 0), (0, 0)),
                                             constant_values=255))):
        path = files(value)
        assert path.endswith(".webp")  # lossless WebP: fast to write and to send
        with Image.open(path) as decoded:
            assert np.array_equal(np.asarray(decoded), expected)


def test_grey_pixels_keep_their_mode_in_a_png() -> None:
    files = PictureFiles()
    grey = _noise(16, 24, channels=1)
    path = files(grey)
    with Image.open(path) as decoded:
        assert path.endswith(".png") and decoded.mode == "L"
        assert np.array_equal(np.asarray(decoded), grey)


def test_a_figure_is_written_as_its_canvas_draws_it() -> None:
    figure = new_figure(2.0, 1.5)
    add_axes(figure, 0.4, 0.3, 1.4, 1.0).plot([0, 1, 2], [2, 0, 1])
    figure.canvas.draw()
    drawn = np.asarray(figure.canvas.buffer_rgba()).copy()
    files = PictureFiles()
    with Image.open(files(figure)) as decoded:
        assert np.array_equal(np.asarray(decoded.convert("RGBA")), drawn)


def test_each_object_is_written_once_into_the_folder_gradio_serves_from() -> None:
    """Gradio sends a file of its own upload folder as it is, where it would copy one from
    anywhere else; the server's cache cleaner removes it there with the uploads."""
    files = PictureFiles()
    array = _noise(8, 8)
    first = files(array)
    assert files(array) == first and files(array.copy()) != first
    assert files("some text") == "some text" and files(None) is None  # not pictures: as they are
    assert Path(first).parent == Path(gr.utils.get_upload_folder()) / SERVED_FOLDER


def test_gradio_sends_a_written_picture_as_it_is_and_copies_one_from_elsewhere(tmp_path) -> None:
    image = gr.Image()
    written = PictureFiles()(_noise(8, 8))
    elsewhere = tmp_path / "picture.webp"
    elsewhere.write_bytes(Path(written).read_bytes())
    sent = {}
    for path in (written, str(elsewhere)):
        payload = image.postprocess(path).model_dump()
        sent[path] = asyncio.run(processing_utils.async_move_files_to_cache(
            payload, image, postprocess=True))["path"]
    assert sent[written] == written and sent[str(elsewhere)] != str(elsewhere)


def test_an_answer_writes_its_pictures_side_by_side_each_once() -> None:
    """``answer`` writes every picture of an answer on the view threads: the same picture shown
    by two components is one file, a download is a PNG, and other values pass as they are."""
    shown, again, offered = gr.Image(), gr.Image(), gr.File()
    text, other = gr.Markdown(), gr.Image()
    array, second = _noise(12, 16), _noise(8, 8)
    files = PictureFiles()
    out = files.answer({shown: array, again: array, offered: array, text: "**note**",
                        other: second})
    assert out[shown] == out[again] and out[shown].endswith(".webp")
    assert out[offered].endswith(".png") and out[text] == "**note**"
    for component, expected in ((shown, array), (offered, array), (other, second)):
        with Image.open(out[component]) as decoded:
            assert np.array_equal(np.asarray(decoded.convert("RGB")), expected)
    assert len({out[shown], out[offered], out[other]}) == 3


def test_jobs_in_parallel_keep_their_keys_and_raise_their_errors() -> None:
    assert in_parallel({"b": lambda: 2, "a": lambda: 1}) == {"b": 2, "a": 1}

    def broken() -> None:
        raise ValueError("no such layer")

    with pytest.raises(ValueError, match="no such layer"):
        in_parallel({"fine": lambda: 1, "broken": broken})


def test_then_makes_each_result_on_the_thread_that_ran_its_job() -> None:
    def job(value: int):
        return lambda: (value, threading.get_ident())

    def then(key: str, result: tuple[int, int]) -> tuple[str, int, bool]:
        value, job_thread = result
        return key, value * 10, job_thread == threading.get_ident()

    assert in_parallel({"a": job(1), "b": job(2)}, then) == {"a": ("a", 10, True),
                                                              "b": ("b", 20, True)}


def test_work_on_its_own_thread_returns_raises_and_keeps_the_context() -> None:
    seen = contextvars.ContextVar("seen")
    seen.set("the caller's")
    threads = []

    def work() -> str:
        threads.append(threading.current_thread())
        return seen.get()

    assert on_own_thread(work) == "the caller's"
    assert threads[0] is not threading.current_thread() and not threads[0].is_alive()

    def broken() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        on_own_thread(broken)
