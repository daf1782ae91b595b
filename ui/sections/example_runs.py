"""Finished runs of the example prompts, kept on disk, and the time a run will take here.

A newcomer opening the generation tab sees a finished run of the first example (image, x0
strip, scrubber, word maps) without pressing Generate: it is made once in the background after
start-up and kept in the app's cache folder (``--cache-dir``), so every visitor and every
restart reuses it. A run of any example prompt is kept the same way when it finishes, and asking
for the same run again shows the kept one at once. A kept run is read back into the same
``RunRecord`` a live run leaves, so every view of it is drawn by the same functions.

The estimate before a run comes from the runs made in this process: seconds per UNet
evaluation per latent pixel, and the rest of a run (text encoder, VAE decode) per image pixel.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ui.models import Models
from ui.runs import GenerationRequest, RunRecord, StopFlag, Stops
from ui.sections.steps import record_views
from ui.shared import literal

Generate = Callable[..., Iterator[dict[str, object]]]  # the tab's generate()
Show = Callable[[str, GenerationRequest, bool], Callable]  # preview, request, exact -> show
WAIT_FOR_EXAMPLE_S = 600  # a visitor waits at most this long for the example run to show
_lock = threading.Lock()
_step_rates: dict[int, list[float]] = {}  # UNet passes per evaluation -> s / latent pixel
_overhead_rates: list[float] = []  # s per image pixel outside the steps


def _passes(request: GenerationRequest) -> int:
    return 2 if request.guidance_scale > 1 else 1  # guidance batches two UNet passes


def measured(request: GenerationRequest, seconds: float, downscale: int) -> None:
    grid = (request.width // downscale) * (request.height // downscale)
    with _lock:
        rates = _step_rates.setdefault(_passes(request), [])
        rates.append(seconds / grid)
        del rates[:-50]  # the latest steps: the machine may have got busier or quieter


def estimate(request: GenerationRequest, evaluations: int, downscale: int) -> str:
    """The time the run will take, from the runs measured on this machine so far."""
    with _lock:
        rates = list(_step_rates.get(_passes(request), []))
        overhead = statistics.median(_overhead_rates) if _overhead_rates else 0.0
    if not rates:
        return "The time per step is measured during the first step."
    grid = (request.width // downscale) * (request.height // downscale)
    step_s = statistics.median(rates) * grid
    total = step_s * evaluations + overhead * request.width * request.height
    return f"Estimated {total:.0f} s ({step_s:.2f} s per UNet evaluation, as measured here)."


def _key(models: Models, request: GenerationRequest, exact: bool, preview: str) -> str:
    settings = models.settings
    what = {"request": request.settings(), "image": request.image, "exact": exact,
            "preview": preview, "weights": settings.weights, "unet": settings.unet,
            "pipeline": settings.pipeline, "text_encoder": settings.text_encoder,
            "vae": settings.vae_choices[0], "device": models.device}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _folder(models: Models) -> Path | None:
    if models.settings.cache_dir is None:
        return None
    return Path(models.settings.cache_dir) / "example-runs"


def save(record: RunRecord, seconds: float, path: Path) -> None:
    """The record as one .safetensors (its tensors) and one .json (the rest) beside it."""
    trace = record.trace
    tensors = {"latents": torch.stack(trace.latents), "image": torch.from_numpy(record.image)}
    if record.steps:
        tensors |= {"pred_original": torch.stack(trace.pred_original),
                    "noise_text": torch.stack(record.noise_text),
                    "step_maps": torch.stack(trace.step_maps)}
        if record.noise_uncond[0] is not None:
            tensors["noise_uncond"] = torch.stack(record.noise_uncond)
        if trace.word_maps is not None:
            tensors["word_maps"] = trace.word_maps
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".part")))
    meta = {"request": record.request.settings(), "image_path": record.request.image,
            "preview": record.preview, "scaling_factor": record.scaling_factor,
            "exact": record.exact,
            "timesteps": trace.timesteps, "noise_levels": trace.noise_levels,
            "pieces": record.pieces, "evaluations": record.evaluations, "seconds": seconds}
    path.with_suffix(".json").write_text(json.dumps(meta))
    path.with_suffix(".part").replace(path)  # the tensors last: a kept run is whole or absent


def load(path: Path, show_for: Show) -> tuple[RunRecord, float]:
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path))
    request = dict(meta["request"], image=meta["image_path"])
    request["strength"] = request["strength"] if request["strength"] is not None else 0.8
    request = GenerationRequest(**request)
    record = RunRecord(request, meta["preview"], show_for(meta["preview"], request,
                                                          meta["exact"]),
                       meta["scaling_factor"], meta["exact"])
    trace = record.trace
    trace.timesteps, trace.noise_levels = meta["timesteps"], meta["noise_levels"]
    trace.latents = list(tensors["latents"])
    if trace.timesteps:
        trace.pred_original = list(tensors["pred_original"])
        trace.step_maps = list(tensors["step_maps"])
        trace.word_maps = tensors.get("word_maps")
        record.noise_text = list(tensors["noise_text"])
        record.noise_uncond = list(tensors["noise_uncond"]) if "noise_uncond" in tensors \
            else [None] * len(trace.timesteps)
    record.pieces, record.evaluations = meta["pieces"], meta["evaluations"]
    record.image = np.ascontiguousarray(tensors["image"].numpy())
    return record, meta["seconds"]


def finished(models: Models, record: RunRecord, seconds: float, downscale: int,
             examples: list[list], stopped: bool) -> None:
    """A run has ended: its time goes into the estimate, and a whole run of an example prompt
    is kept."""
    request = record.request
    steps_s = sum(_step_rates.get(_passes(request), [0.0])[-record.evaluations:]) * \
        (request.width // downscale) * (request.height // downscale)
    with _lock:
        _overhead_rates.append(max(0.0, seconds - steps_s) / (request.width * request.height))
        del _overhead_rates[:-10]
    folder = _folder(models)
    example = [request.prompt, request.negative_prompt, request.guidance_scale]
    if folder is None or stopped or request.image or example not in examples:
        return
    save(record, seconds,
         folder / f"{_key(models, request, record.exact, record.preview)}.safetensors")


def kept(models: Models, request: GenerationRequest, exact: bool, preview: str) -> Path | None:
    folder = _folder(models)
    if folder is None:
        return None
    path = folder / f"{_key(models, request, exact, preview)}.safetensors"
    return path if path.exists() else None


def kept_views(models: Models, path: Path, show_for: Show, downscale: int, note: str
               ) -> dict[str, object]:
    record, seconds = load(path, show_for)
    views = record_views(models, record, downscale)
    status = (f"{note} {record.steps} UNet evaluations, {seconds:.1f} s when it ran "
              f"({literal(record.request.prompt)!s}, seed {record.request.seed}).")
    return views | {"status": status, "record": record}


def answers(models: Models, request: GenerationRequest, exact: bool, preview: str,
            stop: StopFlag, generate: Generate, show_for: Show, downscale: int
            ) -> Iterator[dict[str, object]]:
    """A kept run of the same request, at once, or a live run."""
    path = kept(models, request, exact, preview)
    if path is not None:
        yield kept_views(models, path, show_for, downscale,
                         "The same run was made before; here it is as it was kept:")
        return
    yield from generate(models, request, exact, stop, preview)


_waiting: dict[object, list[Callable[[], None]]] = {}  # settings -> runs to start when served


def start_waiting(settings: object) -> None:
    """Start the example runs of the page built with ``settings``; app.py calls it after
    launching the server."""
    for start in _waiting.pop(settings, []):
        start()


class FirstExample:
    """The first example's run, made once in the background and shown to a visitor who opens
    the tab without a run of their own."""

    def __init__(self, models: Models, request: GenerationRequest, exact: bool, preview: str,
                 show_for: Show, downscale: int) -> None:
        self.models, self.request, self.exact, self.preview = models, request, exact, preview
        self.show_for, self.downscale = show_for, downscale
        self.thread: threading.Thread | None = None
        self.failure: str | None = None

    def start_after_launch(self, generate: Generate) -> None:
        """Make the run once the server is up (``start_waiting``): not while a page is only
        built, as the tests and benchmarks do without serving it."""
        _waiting.setdefault(self.models.settings, []).append(lambda: self.start(generate))

    def start(self, generate: Generate) -> None:
        """Make the run in a thread unless it is kept already (or no cache folder is set)."""
        if _folder(self.models) is None or kept(self.models, self.request, self.exact,
                                                self.preview):
            return
        stops = Stops()

        def work() -> None:
            for views in generate(self.models, self.request, self.exact, stops.begin("example"),
                                  self.preview):
                if "record" not in views and views.get("final") is None and \
                        "failed" in str(views.get("status")):
                    self.failure = str(views["status"])
            stops.close()

        self.thread = threading.Thread(target=work, name="first-example", daemon=True)
        self.thread.start()

    def views(self, record: RunRecord | None) -> Iterator[dict[str, object]]:
        """The kept run's views; while it is being made, a line saying so first, then the run
        once it is done. Nothing when the visitor has a run of their own or there is no cache
        folder."""
        if record is not None or _folder(self.models) is None:
            return
        path = kept(self.models, self.request, self.exact, self.preview)
        if path is None and self.thread is not None and self.thread.is_alive():
            yield {"status": "An example run is being made in the background (once, for every "
                             "visitor); it appears here when it is done, or press Generate."}
            self.thread.join(timeout=WAIT_FOR_EXAMPLE_S)
            path = kept(self.models, self.request, self.exact, self.preview)
        if path is not None:
            yield kept_views(self.models, path, self.show_for, self.downscale,
                             "An example run, made when the app started:")
        elif self.failure:
            yield {"status": f"The example run could not be made. {self.failure}"}
