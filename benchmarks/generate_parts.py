"""Where the generation tab's step time goes, one part added at a time, with full-size random
weights (SD v1.5's UNet, VAE and CLIP text encoder, seeded: the same arithmetic as the real ones).

Each round runs the same request four ways, one after the other, each on a thread of its own (the
main thread never runs torch, so no second OpenMP team slows any of them; see
``benchmarks/omp_teams.py``), and takes the median time between steps:

- the pipeline's own run, a callback noting each step's end;
- the same run in the background, as the tab starts it (``ui.runs.run_in_background``);
- that with the trace the word maps need (latents, x0, cross-attention maps of every step);
- the tab's whole ``generate``, every step's views drawn and written as the page gets them.

It prints each way's median step over all rounds and the process's voluntary context switches per
run (a run whose OpenMP workers sleep between regions has thousands).

    python benchmarks/generate_parts.py                    # 256 px, 5 PNDM steps, 3 rounds
    python benchmarks/generate_parts.py --steps 8 --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# generate_tab gives this run its own Gradio folder as it is imported
from generate_tab import PROMPT, pipeline_run, tab_run  # noqa: E402

from benchmarks.unet import cpu_description  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.runs import Stepped, run_in_background  # noqa: E402
from ui.shared import on_own_thread  # noqa: E402
from ui.tabs import generate  # noqa: E402


def intervals(marks: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(marks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = Models(Settings(weights="random"))
    pipe = on_own_thread(lambda: models.pipeline(True))
    request = generate.parse_request(PROMPT, "", args.steps, 7.5, "pndm", False, 0, args.size,
                                     args.size, None, 0.8, 8)

    def background(trace: bool) -> list[float]:
        marks = [time.perf_counter() for event in run_in_background(
            pipe, request, threading.Event(), None, trace=trace) if isinstance(event, Stepped)]
        return intervals(marks)

    ways: dict[str, Callable[[], list[float]]] = {
        "the pipeline's own run": lambda: intervals(pipeline_run(models, request, True).marks),
        "in the background, as the tab runs it": lambda: background(False),
        "with the trace": lambda: background(True),
        "the whole tab, every step's views written":
            lambda: intervals(tab_run(models, request, True)[0].marks),
    }
    print(f"{cpu_description()}; torch {torch.__version__}; float32; {args.size} px, "
          f"{args.steps} PNDM steps, guidance 7.5; {args.rounds} rounds")
    ways["the pipeline's own run"]()  # warm-up
    steps: dict[str, list[float]] = {name: [] for name in ways}
    switches: dict[str, list[int]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name, run in ways.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            steps[name] += run()
            switches[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before)
            print(f"  round {round_ + 1}, {name}: {statistics.median(steps[name]):.2f} s a step",
                  flush=True)
    print("\n| way | median step | voluntary context switches a run |")
    print("| --- | ---: | ---: |")
    for name in ways:
        print(f"| {name} | {statistics.median(steps[name]):.2f} s | "
              f"{statistics.median(switches[name]):,.0f} |")


if __name__ == "__main__":
    main()
