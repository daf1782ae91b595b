"""What the generation tab adds to the pipeline's own run, with full-size random weights.

The app's models are built in this process as ``--weights random`` makes them (SD v1.5's UNet,
VAE and CLIP text encoder, seeded random weights: the same arithmetic as the real ones) and the
same prompt, seed, sampler and size run two ways, one right after the other in every round (the
order swapping each round, so a busy neighbour slows both alike; the ratio is the median of
the rounds' ratios):

- the pipeline's own run: ``StableDiffusionPipeline.__call__``, no trace; a callback only notes
  the time of each step. It runs on a thread of its own, as the tab's run does, and so are the
  models built: the main thread never runs torch, so no second OpenMP team slows either
  (``benchmarks/omp_teams.py``);
- the tab's ``generate``, as the page runs it: the trace on, the views of every step drawn and
  each picture written as the PNG file Gradio is given, then the final views, the word maps and
  the downloads.

Besides the whole runs' ratio it prints the median step of each run against the pipeline's (a
busy neighbour's burst moves a median step less than a total) and the CPU time of every thread
of the process, tab against pipeline.

Targets: the tab adds at most 5% to the pipeline's time (the previews are a linear map of the
latent to RGB, no VAE decode per step); the first preview (the start latent, shown before the
first UNet call) appears within one step time of the start.

    python benchmarks/generate_tab.py               # 256 px, 20 PNDM steps, 4 rounds: ~3 min
    python benchmarks/generate_tab.py --rounds 6 --exact
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the pictures written here go to a folder of this run, removed when it ends
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="sd-parts-benchmark-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

from generation import cpu_name  # noqa: E402

import sd_parts  # noqa: E402
from ui.models import DEVICE, Models, Settings  # noqa: E402
from ui.runs import GenerationRequest  # noqa: E402
from ui.shared import PictureFiles, on_own_thread  # noqa: E402
from ui.tabs import generate  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Timing:
    seconds: float  # the whole run
    cpu_seconds: float  # of every thread of this process
    marks: list[float]  # seconds from the start to the end of each step

    @property
    def step(self) -> float:
        """The median step: a burst of a busy neighbour's work moves it less than the total."""
        return statistics.median(b - a for a, b in itertools.pairwise(self.marks))


def pipeline_run(models: Models, request: GenerationRequest, exact: bool) -> Timing:
    """The pipeline's own run: its time, its CPU time, and when each step ended. It runs on a
    thread of its own, as the tab's does: one run on this thread would leave it an OpenMP team,
    and a second team slows every model call in the process (``ui.shared.on_own_thread``)."""
    return on_own_thread(lambda: _timed_pipeline(models, request, exact))


def _timed_pipeline(models: Models, request: GenerationRequest, exact: bool) -> Timing:
    pipe = models.pipeline(exact)
    marks: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    pipe(request.prompt, request.negative_prompt, request.num_inference_steps,
         request.guidance_scale, request.height,
         request.width, torch.Generator().manual_seed(request.seed), request.scheduler,
         callback=lambda *_: marks.append(time.perf_counter() - start))
    return Timing(time.perf_counter() - start, time.process_time() - start_cpu, marks)


def tab_run(models: Models, request: GenerationRequest, exact: bool
            ) -> tuple[Timing, float, float]:
    """The tab's whole run (when each step's views were written), the seconds until its first
    preview is written, and this thread's CPU time in it: the views' own cost, drawn and written
    here while the pipeline runs on the run's own thread."""
    files = PictureFiles()
    first, last, marks = None, {}, []
    start, start_cpu, start_views = time.perf_counter(), time.process_time(), time.thread_time()
    for views in generate.generate(models, request, exact, threading.Event()):
        written = {name: files(views.get(name)) for name in generate.OUTPUTS}
        if first is None and written["step_preview"] is not None:
            first = time.perf_counter() - start
        if views.get("x0_preview") is not None and views.get("final") is None:
            marks.append(time.perf_counter() - start)  # a step's views, written
        last = views
    total, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    views_cpu = time.thread_time() - start_views
    if last.get("final") is None:
        raise RuntimeError(f"the tab's run failed: {last.get('status')}")
    return Timing(total, cpu, marks), first, views_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--exact", action="store_true",
                        help="float32 (default: the app's default mode on this machine)")
    args = parser.parse_args()
    exact = args.exact or sd_parts.fast_dtype(DEVICE) == torch.float32
    dtype = "float32" if exact else str(sd_parts.fast_dtype(DEVICE)).removeprefix("torch.")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, device {DEVICE}; "
          f"torch {torch.__version__}; {dtype}")
    print(f"{args.size} px, {args.steps} PNDM steps, guidance 7.5, full-size random weights, "
          f"median of {args.rounds} rounds\n")

    models = Models(Settings(weights="random"))
    request = generate.parse_request(PROMPT, "", args.steps, 7.5, "pndm", False, 0,
                                     args.size, args.size, None, 0.8, 8)
    built = time.perf_counter()
    on_own_thread(lambda: models.pipeline(exact))
    print(f"models built in {time.perf_counter() - built:.0f} s")
    warm_up = generate.parse_request(PROMPT, "", 2, 7.5, "pndm", False, 0, args.size,
                                     args.size, None, 0.8, 8)
    pipeline_run(models, warm_up, exact)
    tab_run(models, warm_up, exact)

    pipelines: list[Timing] = []
    tabs: list[Timing] = []
    first_s, views_s = [], []
    for round_ in range(args.rounds):
        order = ("pipeline", "tab") if round_ % 2 == 0 else ("tab", "pipeline")
        for case in order:
            if case == "pipeline":
                timing = pipeline_run(models, request, exact)
                pipelines.append(timing)
            else:
                timing, first, views_cpu = tab_run(models, request, exact)
                tabs.append(timing)
                first_s.append(first)
                views_s.append(views_cpu)
            print(f"  round {round_ + 1}, {case}: {timing.seconds:.1f} s", flush=True)

    def median(values) -> float:
        return statistics.median(values)

    pairs = list(zip(pipelines, tabs, strict=True))
    visited = len(pipelines[0].marks)  # PNDM visits one timestep more than it is asked for
    pipeline, tab = median(p.seconds for p in pipelines), median(t.seconds for t in tabs)
    step, first_step = median(p.step for p in pipelines), median(p.marks[0] for p in pipelines)
    first, views = median(first_s), median(views_s)
    extra_cpu = median((t.cpu_seconds - p.cpu_seconds) / visited for p, t in pairs)
    print("\n| measure | time | target |")
    print("| --- | ---: | --- |")
    print(f"| the pipeline's own run ({visited} UNet steps) | {pipeline:.1f} s | |")
    print(f"| the tab's streamed run | {tab:.1f} s | |")
    print(f"| what the tab adds | {median(t.seconds / p.seconds for p, t in pairs) - 1:+.1%} "
          f"| at most +5% |")
    print(f"| one step (median): the pipeline's, the tab's | {step:.2f} s, "
          f"{median(t.step for t in tabs):.2f} s | |")
    print(f"| what the tab adds to a step (the median step, round by round) | "
          f"{median(t.step / p.step for p, t in pairs) - 1:+.1%} | |")
    print(f"| the views' own CPU time (drawn and written on the page's thread) | {views:.2f} s, "
          f"{views / visited * 1000:.0f} ms per step, {views / pipeline:.1%} of the run | |")
    print(f"| the tab's CPU time over the pipeline's, every thread (views, trace, final views) | "
          f"{extra_cpu * 1000:.0f} ms per step, "
          f"{median((t.cpu_seconds / p.cpu_seconds) for p, t in pairs) - 1:+.1%} | |")
    print(f"| the pipeline's first step, from the start | {first_step:.2f} s | |")
    print(f"| the tab's first preview (the start latent), from the start | {first:.2f} s "
          f"({first / step:.2f} steps) | within one step |")


if __name__ == "__main__":
    main()
