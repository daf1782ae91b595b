"""What the tabs share: the download folder, the notes every tab shows, and how a failure looks.

A request that cannot be answered (an unreadable upload, a model that cannot be loaded) leaves
every output empty and puts one readable message in the tab's status box, rather than raising:
Gradio would mark each output box with a bare "Error" badge.
"""

from __future__ import annotations

import atexit
import contextvars
import html
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

import sd_parts
from ui.loading import ModelUnavailable
from viz.heatmap import Picture, pad

# Lossless WebP, least effort: quality 0 and method 0 choose speed over size, never the pixels
# (lossless keeps every RGB value; "exact" keeps them under transparent pixels too).
WEBP_OPTIONS = {"lossless": True, "quality": 0, "method": 0, "exact": True}
WEBP_MAX_SIDE = 16383  # pixels: the longest side the WebP format can hold
T = TypeVar("T")
SERVED_FOLDER = "sd-parts-views"  # in Gradio's upload folder: see served_path
LABEL_ROOM = 30  # pixels: Gradio draws a component's label over the top-left of its picture

OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="sd-parts-"))
atexit.register(shutil.rmtree, OUTPUT_DIR, ignore_errors=True)
SWEEP_EVERY_S = 1.0  # an answer asks for several files; the folder is swept once for all
_last_sweep = 0.0
# Pillow and numpy let go of the GIL while they encode and copy pixels, so the independent
# pictures of one answer are drawn and written side by side, on the cores the model has just
# finished with (``benchmarks/view_profile.py`` times an answer both ways).
VIEW_THREADS = ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="views")


def output_path(name: str, max_age_s: int) -> Path:
    """A fresh file for a download; files older than max_age_s are removed first (looked for
    at most once every SWEEP_EVERY_S)."""
    global _last_sweep
    now = time.time()
    if now - _last_sweep >= SWEEP_EVERY_S:
        _last_sweep = now
        for old in OUTPUT_DIR.iterdir():
            try:
                if old.is_file() and now - old.stat().st_mtime > max_age_s:
                    old.unlink()  # (folders here, as the runs' Stop flags, keep their own)
            except FileNotFoundError:  # removed meanwhile by a request in another session
                pass
    return OUTPUT_DIR / f"{uuid.uuid4().hex[:12]}-{name}"


def served_path(name: str) -> Path:
    """A fresh file for a picture of an answer, in Gradio's own upload folder.

    Gradio serves a file there as it is; one from anywhere else it first hashes and copies into
    that folder, on the server's event loop, while the answer waits to be sent (6 ms for the
    prompt tab's seven files on an AVX2-only AMD EPYC). The cache cleaner (``ui.server``)
    removes these files with the uploads once the cache's age has passed: a browser fetches
    each picture after its answer has arrived, so none can be removed sooner.
    """
    folder = Path(gr.utils.get_upload_folder()) / SERVED_FOLDER
    folder.mkdir(parents=True, exist_ok=True)  # each time: the cleaner removes it when empty
    return folder / f"{uuid.uuid4().hex[:12]}-{name}"


def on_own_thread(work: Callable[[], T]) -> T:
    """``work()`` run on a thread made for it, which ends with it; what it raises is raised here.

    Every thread that runs torch keeps an OpenMP team of worker threads for as long as it lives.
    Once the process holds more of them than it has cores, libgomp has every team's workers
    sleep between parallel regions, not spin, and each of the thousands of regions of a model
    call then waits to wake them: the UNet's step at 256 px took 4.34-4.68 s instead of
    4.05-4.12 s on a 2-core AMD EPYC once a second team existed (10,700 voluntary context
    switches a run instead of 60). Gradio runs handlers on threads that live on after them, so
    the models run on threads of their own, which take their teams with them when they end.
    The context goes along: a Hub download's progress still reaches the visitor's page.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="model") as thread:  # joined as it closes
        return thread.submit(contextvars.copy_context().run, work).result()


def in_parallel(jobs: Mapping[Hashable, Callable[[], object]],
                then: Callable[[Hashable, object], object] | None = None) -> dict[Hashable, object]:
    """Each job's result under its key, the jobs run at once on ``VIEW_THREADS``; the first
    job that raises raises here. With ``then``, each result is ``then(key, result)``, run on the
    job's own thread as soon as the job is done: a handler writes each picture while the others
    are still being drawn, rather than waiting for the last one."""
    def run(key: Hashable, job: Callable[[], object]) -> object:
        return job() if then is None else then(key, job())
    futures = {key: VIEW_THREADS.submit(run, key, job) for key, job in jobs.items()}
    return {key: future.result() for key, future in futures.items()}


def random_banner(weights: str) -> str:
    return ("**Random weights: every output below is meaningless.** The architecture is real "
            f"({'full-size' if weights == 'random' else 'tiny'} configuration); start without "
            "`--weights` to use the real checkpoints.")


def mode_note(exact: bool) -> str:
    dtype = sd_parts.fast_dtype("cpu")
    if exact or dtype == torch.float32:
        why = "" if exact else (" (bfloat16 is not faster than float32 on this CPU, so fast "
                                "mode is float32 too)")
        return f"Exact mode: float32{why}."
    return "Fast mode: bfloat16 on this CPU. Tick *Exact mode* for float32 numerics."


def literal(text: str) -> str:
    """Text that Markdown shows as it is: markup, entities and emphasis marks are escaped.

    Messages quote what a visitor chose (a file name, the words of a prompt), and names such as
    HF_HUB_OFFLINE would otherwise turn italic.
    """
    return re.sub(r"([\\`*_\[\]~|#])", r"\\\1", html.escape(text, quote=False))


# What a handler answers with ``failure``: a model that cannot be loaded, or input that cannot be
# used (an unreadable upload is a viz.upload.ImageInputError, a ValueError too). Anything else is
# a bug, and Gradio's error badge is then right.
REFUSED = (ModelUnavailable, ValueError)


def failure(names: Iterable[str], status: str, message: str) -> dict[str, object]:
    """Every output empty but the status box, which says what went wrong and what to do."""
    return {name: None for name in names} | {status: literal(message)}


class PictureFiles:
    """The pictures of one request, each written once as a file that Gradio is given by path.

    Gradio encodes an array or a figure again at every yield, so a handler that yields the
    latent's views first and everything at the end would pay for them twice. Here each picture
    is written once, as lossless WebP at its fastest setting (``WEBP_OPTIONS``): the very pixels,
    in about half the time of PNG at zlib level 1 and fewer bytes for Gradio to send
    (``benchmarks/view_profile.py`` measures both), into Gradio's own folder (``served_path``).
    The same object gets the same file. Heat maps get a strip at the top left free for the label
    Gradio draws over the picture.
    """

    def __init__(self) -> None:
        # (id, download) -> (the object, kept alive; its file)
        self._written: dict[tuple[int, bool], tuple[object, str]] = {}

    def __call__(self, value: object, download: bool = False) -> object:
        """The file of ``value`` (a picture; anything else is returned as it is). A ``download``
        (a picture offered as a file) is written as PNG, the format its visitor expects."""
        if not isinstance(value, Picture | np.ndarray | Image.Image | Figure):
            return value
        key = (id(value), download)
        if key not in self._written:
            path = served_path("view.png" if download else "view.webp")
            if isinstance(value, Figure):
                value.savefig(path, format=path.suffix[1:],
                              **({} if download else {"pil_kwargs": WEBP_OPTIONS}))
            else:
                pixels = pad(value, top=LABEL_ROOM).pixels if isinstance(value, Picture) else value
                image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
                if not download and image.mode in ("RGB", "RGBA") and \
                        max(image.size) <= WEBP_MAX_SIDE:
                    image.save(path, "WEBP", **WEBP_OPTIONS)
                else:  # grey or 16-bit pixels, a strip too long for WebP, or a download
                    path = path.with_suffix(".png")
                    image.save(path, "PNG", compress_level=1)
            self._written[key] = (value, str(path))
        return self._written[key][1]

    def answer(self, views: Mapping[object, object]) -> dict[object, object]:
        """An answer (component -> value) as Gradio takes it: every picture written, side by
        side, as the file its component shows (a ``gr.File`` gets a download)."""
        pictures = {component: value for component, value in views.items()
                    if isinstance(value, Picture | np.ndarray | Image.Image | Figure)}
        jobs = {}  # one job per picture, however many components show it
        for component, value in pictures.items():
            key = (id(value), is_download(component))
            jobs.setdefault(key, lambda value=value, download=key[1]: self(value, download))
        written = in_parallel(jobs)
        return {component: written[(id(value), is_download(component))]
                if component in pictures else value for component, value in views.items()}


def send(answers: Iterable[Mapping[object, object]],
         components: Mapping[str, object] | None = None) -> Iterator[dict[object, object]]:
    """A handler's answers as Gradio takes them, each picture written once as a file by
    ``PictureFiles``.

    With ``components`` (output name -> component) the answers are keyed by output name, and
    names without a component (a value for the tab's own state, say) are left out; without it
    they are keyed by component already.
    """
    files = PictureFiles()
    for views in answers:
        if components is not None:
            views = {components[name]: value for name, value in views.items()
                     if name in components}
        yield files.answer(views)


def is_download(component: object) -> bool:
    """Whether a picture sent to ``component`` is a file to download (a ``gr.File``)."""
    return isinstance(component, gr.File)


def answer_once(views: Mapping[object, object]) -> Iterator[dict[object, object]]:
    """A handler's one answer (component -> value), each picture written as a file."""
    return send([views])


def on_zero_gpu(handler: Callable) -> Callable:
    """``handler`` run on a GPU of Hugging Face's ZeroGPU Spaces, where the ``spaces`` package is
    installed (a GPU is attached there only while a function marked this way runs); elsewhere
    ``handler`` itself."""
    try:
        import spaces
    except ImportError:
        return handler
    return spaces.GPU(duration=300)(handler)
