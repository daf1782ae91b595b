"""A run of the pipeline in the background: a worker thread, its progress as typed events, a Stop
that reaches it, and what a finished run leaves for the views.

A tab starts a run with ``run_in_background`` and turns its events into views as they come:

    for event in run_in_background(pipe, request, stop, trace=True):
        match event:
            case Started(latents): ...            # the start latents, before the first UNet call
            case Stepped(state, seconds): ...     # one UNet evaluation and sampler step done
            case Finished(result, seconds): ...   # the images, and the pipeline's Trace
            case Failed(error): ...

Leaving the loop early (a client that goes away closes the generator) stops the worker at its
next step and waits for it, so two runs never share the machine. A ``StopFlag`` is a file, so
that a Stop pressed in the web server's process reaches a run that ZeroGPU moved to a process of
its own (``spaces.GPU`` runs the handler there); ``Stops`` keeps one per session.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import sd_parts
from sd_parts.pipeline import GenerationResult, StepState, Trace
from ui.shared import OUTPUT_DIR


@dataclass(frozen=True)
class GenerationRequest:
    """A run's settings, checked, in diffusers' words; ``asdict`` is what its files keep."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    scheduler: str  # a kind of sd_parts.schedulers.SAMPLERS
    use_karras_sigmas: bool
    seed: int
    width: int
    height: int
    image: str | None  # a path: image to image starts from it
    strength: float
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    eta: float | None = None  # DDIM's and TCD's noise; None: the sampler's default

    def sampler_options(self) -> dict[str, object]:
        """The sigma schedule and eta as the pipeline's ``plan`` and ``__call__`` take them."""
        options = {"use_karras_sigmas": self.use_karras_sigmas or None,
                   "use_exponential_sigmas": self.use_exponential_sigmas or None,
                   "use_beta_sigmas": self.use_beta_sigmas or None}
        return options | ({} if self.eta is None else {"eta": self.eta})

    def settings(self) -> dict[str, object]:
        kept = dataclasses.asdict(self)
        kept.pop("image")
        kept["strength"] = self.strength if self.image else None
        return kept


@dataclass(frozen=True)
class Started:
    latents: torch.Tensor  # (B, C, h, w): the noise, or the noised image, in model space


@dataclass(frozen=True)
class Stepped:
    state: StepState
    seconds: float  # this step's wall time, the UNet's share and the sampler's


@dataclass(frozen=True)
class Finished:
    result: GenerationResult
    seconds: float  # the whole run, from the worker's start


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | Stepped | Finished | Failed


class StopFlag:
    """A Stop button: set by one process, seen by any that shares the folder it lives in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Stops:
    """The Stop flags of the sessions' current runs: one run per session at a time."""

    def __init__(self, folder: Path | None = None) -> None:
        # in the app's one folder for its files, removed with it when the app ends
        self.folder = folder or Path(tempfile.mkdtemp(prefix="stops-", dir=OUTPUT_DIR))
        self._flags: dict[str, StopFlag] = {}
        self._lock = threading.Lock()

    def begin(self, session: str) -> StopFlag:
        """A fresh flag for the session's new run (an earlier run's flag is set: it stops)."""
        flag = StopFlag(self.folder / f"{uuid.uuid4().hex}.stop")
        with self._lock:
            earlier = self._flags.get(session)
            self._flags[session] = flag
        if earlier is not None:
            earlier.set()
        return flag

    def request(self, session: str) -> bool:
        """Stop the session's run; False when none is running."""
        with self._lock:
            flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def end(self, session: str, flag: StopFlag) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]
        flag.remove()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_in_background(pipe: sd_parts.StableDiffusionPipeline, request: GenerationRequest,
                      stop: StopFlag, init: torch.Tensor | None = None, **options: object
                      ) -> Iterator[Event]:
    """The pipeline's events for ``request`` as they happen (``options`` go to the pipeline:
    ``trace=True``, ...). Ends with one Finished or Failed."""
    events: queue.Queue[Event] = queue.Queue()
    last = [time.perf_counter()]

    def on_step(index: int, t: float, state: StepState) -> bool:
        now = time.perf_counter()
        events.put(Stepped(state, now - last[0]))
        last[0] = now
        return not stop.is_set()

    def on_start(latents: torch.Tensor) -> None:
        last[0] = time.perf_counter()
        events.put(Started(latents))

    def work() -> None:
        started = time.perf_counter()
        try:
            result = pipe(request.prompt, request.negative_prompt, request.num_inference_steps,
                          request.guidance_scale, request.height, request.width,
                          torch.Generator().manual_seed(request.seed), request.scheduler,
                          image=init, strength=request.strength, callback=on_step,
                          on_start=on_start, **request.sampler_options(), **options)
            events.put(Finished(result, time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - handed to the tab, which says what failed
            events.put(Failed(exc))

    worker = threading.Thread(target=work, name="generate", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return
    finally:
        stop.set()  # a client that left: the worker ends at its next step, and is waited for
        worker.join()


Preview = Callable[[torch.Tensor], np.ndarray]  # a model-space latent (C, h, w) -> RGB picture


@dataclass
class RunRecord:
    """A run for the views that read it after it ended (scrubber, word maps, decode): the
    pipeline's Trace, and what the tab adds to it."""

    request: GenerationRequest
    preview: str  # how the run drew its latents (a name the tab knows)
    show: Preview  # ... as a function
    scaling_factor: float  # the VAE's: latents are in model space, the channel view is raw
    exact: bool  # float32 throughout, else the fast dtype
    trace: Trace = field(default_factory=Trace)
    noise_text: list[torch.Tensor] = field(default_factory=list)  # the UNet's, per step
    noise_uncond: list[torch.Tensor | None] = field(default_factory=list)  # None: no guidance
    pieces: list[str] = field(default_factory=list)  # the prompt's tokens the UNet saw
    image: np.ndarray | None = None  # the final image, (H, W, 3) uint8
    evaluations: int = 0  # UNet evaluations the run made

    @property
    def steps(self) -> int:
        return len(self.trace.timesteps)

    def add_step(self, state: StepState) -> None:
        """What the Trace does not keep of a step: the two noise predictions, for guidance."""
        self.noise_text.append(state.noise_text[0].cpu())
        self.noise_uncond.append(None if state.noise_uncond is None
                                 else state.noise_uncond[0].cpu())

    def finish(self, result: GenerationResult, pieces: list[str], image: np.ndarray) -> None:
        """The run's Trace, first batch item only (the tab makes one image)."""
        trace = result.trace
        self.trace = Trace(
            timesteps=trace.timesteps, noise_levels=trace.noise_levels,
            latents=[x[0] for x in trace.latents], pred_original=[x[0] for x in
                                                                  trace.pred_original],
            word_maps=None if trace.word_maps is None else trace.word_maps[0],
            step_maps=[m[0] for m in trace.step_maps])
        self.pieces, self.image, self.evaluations = pieces, image, result.steps_done
