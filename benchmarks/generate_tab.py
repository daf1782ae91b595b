"""What the generation tab adds to the pipeline's own run, with full-size random weights.

The app's models are built in this process as ``--weights random`` makes them (SD v1.5's UNet,
VAE and CLIP text encoder, seeded random weights: the same arithmetic as the real ones) and the
same prompt, seed, sampler and size run two ways, one right after the other in every round (the
order swapping each round, so a busy neighbour slows both alike; the ratio is the median of
the rounds' ratios):

- the pipeline's own run: ``StableDiffusionPipeline.__call__``, no trace; a callback only notes
  the time of each step;
- the tab's ``generate``, as the page runs it: the trace on, the views of every step drawn and
  each picture written as the PNG file Gradio is given, then the final views, the word maps and
  the downloads.

Targets: the tab adds at most 5% to the pipeline's time (the previews are a linear map of the
latent to RGB, no VAE decode per step); the first preview (the start latent, shown before the
first UNet call) appears within one step time of the start.

    python benchmarks/generate_tab.py               # 256 px, 20 PNDM steps, 4 rounds: ~3 min
    python benchmarks/generate_tab.py --rounds 6 --exact
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generation import cpu_name  # noqa: E402

import sd_parts  # noqa: E402
from ui.models import DEVICE, Models, Settings  # noqa: E402
from ui.runs import GenerationRequest  # noqa: E402
from ui.shared import PictureFiles  # noqa: E402
from ui.tabs import generate  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def pipeline_run(models: Models, request: GenerationRequest, exact: bool
                 ) -> tuple[float, list[float]]:
    """Seconds of the pipeline's own run, and the time of each step since the start."""
    pipe = models.pipeline(exact)
    marks: list[float] = []
    start = time.perf_counter()
    pipe(request.prompt, request.negative_prompt, request.num_inference_steps,
         request.guidance_scale, request.height,
         request.width, torch.Generator().manual_seed(request.seed), request.scheduler,
         callback=lambda *_: marks.append(time.perf_counter() - start))
    return time.perf_counter() - start, marks


def tab_run(models: Models, request: GenerationRequest, exact: bool
            ) -> tuple[float, float, float]:
    """Seconds of the tab's whole run, until its first preview is written, and of this thread's
    CPU time in it: the views' own cost, drawn and written here while the pipeline runs on the
    run's own thread."""
    files = PictureFiles(models.settings.output_max_age)
    first, last = None, {}
    start, start_cpu = time.perf_counter(), time.thread_time()
    for views in generate.generate(models, request, exact, threading.Event()):
        written = {name: files(views.get(name)) for name in generate.OUTPUTS}
        if first is None and written["step_preview"] is not None:
            first = time.perf_counter() - start
        last = views
    total, views_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    files.remove()
    if last.get("final") is None:
        raise RuntimeError(f"the tab's run failed: {last.get('status')}")
    return total, first, views_cpu


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
    models.pipeline(exact)
    print(f"models built in {time.perf_counter() - built:.0f} s")
    warm_up = generate.parse_request(PROMPT, "", 2, 7.5, "pndm", False, 0, args.size,
                                     args.size, None, 0.8, 8)
    pipeline_run(models, warm_up, exact)
    tab_run(models, warm_up, exact)

    pipeline_s, tab_s, first_s, views_s, step_s, first_step_s = [], [], [], [], [], []
    visited = 0
    for round_ in range(args.rounds):
        order = ("pipeline", "tab") if round_ % 2 == 0 else ("tab", "pipeline")
        for case in order:
            if case == "pipeline":
                seconds, marks = pipeline_run(models, request, exact)
                pipeline_s.append(seconds)
                first_step_s.append(marks[0])
                visited = len(marks)  # PNDM visits one timestep more than it is asked for
                step_s.append(statistics.median(b - a for a, b in itertools.pairwise(marks)))
            else:
                seconds, first, views_cpu = tab_run(models, request, exact)
                tab_s.append(seconds)
                first_s.append(first)
                views_s.append(views_cpu)
            print(f"  round {round_ + 1}, {case}: {seconds:.1f} s", flush=True)

    pipeline, tab = statistics.median(pipeline_s), statistics.median(tab_s)
    step, first_step, first = (statistics.median(step_s), statistics.median(first_step_s),
                               statistics.median(first_s))
    ratios = [t / p for p, t in zip(pipeline_s, tab_s, strict=True)]
    print("\n| measure | time | target |")
    print("| --- | ---: | --- |")
    print(f"| the pipeline's own run ({visited} UNet steps) | {pipeline:.1f} s | |")
    print(f"| the tab's streamed run | {tab:.1f} s | |")
    print(f"| what the tab adds | {statistics.median(ratios) - 1:+.1%} | at most +5% |")
    print(f"| one step (median) | {step:.2f} s | |")
    views = statistics.median(views_s)
    print(f"| the views' own CPU time (drawn and written on the page's thread) | {views:.2f} s, "
          f"{views / visited * 1000:.0f} ms per step, {views / pipeline:.1%} of the run | |")
    print(f"| the pipeline's first step, from the start | {first_step:.2f} s | |")
    print(f"| the tab's first preview (the start latent), from the start | {first:.2f} s "
          f"({first / step:.2f} steps) | within one step |")


if __name__ == "__main__":
    main()
