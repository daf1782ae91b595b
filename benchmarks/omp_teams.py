"""Why a model runs slower once a second thread of the process has run torch.

Each thread that runs a parallel torch operation gets an OpenMP team of worker threads, kept for
as long as the thread lives. libgomp lets the workers spin between parallel regions only while
the process holds no more of them than it has cores; past that, they sleep, and every region
must wake them. This times one model on a thread of its own (as the app runs its models,
``ui.shared.on_own_thread``) while no other thread has a team, and again while another thread
keeps one (it ran the model once and lives on, as a Gradio worker thread that ran a model
would), in alternating rounds, and counts the voluntary context switches of the process: each
is a thread going to sleep.

    python benchmarks/omp_teams.py                  # CLIP's text encoder, 15 rounds
    python benchmarks/omp_teams.py --model unet     # SD v1.5's UNet at 256 px, with guidance
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.unet import cpu_description  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.shared import on_own_thread  # noqa: E402


def model_call(model: str):
    """The model's call, built on a thread that ends (so the main thread keeps no team)."""
    models = Models(Settings(weights="random"))
    if model == "unet":
        unet = on_own_thread(lambda: models.pipeline(True).unet)
        inputs = (torch.randn(2, 4, 32, 32), torch.tensor(500), torch.randn(2, 77, 768))
        return lambda: unet(*inputs)
    encoder = on_own_thread(models.text_encoder)
    ids = torch.randint(0, 49408, (1, 77))
    return lambda: encoder(ids, output_hidden_states=True, output_attentions=True)


def timed(call) -> tuple[float, int]:
    """Seconds of one call on a thread of its own, and the process's voluntary switches."""
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    seconds = on_own_thread(run)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before


class Keeper:
    """A thread that runs the model once and lives on, as a Gradio worker thread that ran a
    model would, until ``end``: its OpenMP team lives as long."""

    def __init__(self, call) -> None:
        self.done, ran = threading.Event(), threading.Event()

        def keep() -> None:
            with torch.inference_mode():
                call()
            ran.set()
            self.done.wait()

        self.thread = threading.Thread(target=keep, daemon=True)
        self.thread.start()
        ran.wait()

    def end(self) -> None:
        self.done.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("text", "unet"), default="text")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    call = model_call(args.model)
    print(f"{cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"per team, {len(os.sched_getaffinity(0))} cores; median of {args.rounds} rounds")
    timed(call)  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"lone": [], "kept": []}
    for round_ in range(args.rounds):
        for case in ("lone", "kept") if round_ % 2 == 0 else ("kept", "lone"):
            keeper = Keeper(call) if case == "kept" else None
            runs[case].append(timed(call))
            if keeper is not None:
                keeper.end()
    print("\n| threads with an OpenMP team | time of one call | voluntary context switches |")
    print("| --- | ---: | ---: |")
    for case, name in (("lone", "the model's own thread only"),
                       ("kept", "that and another thread that ran the model and lives on")):
        seconds = statistics.median(s for s, _ in runs[case])
        print(f"| {name} | {seconds * 1000:,.0f} ms "
              f"| {statistics.median(n for _, n in runs[case]):,.0f} |")
    ratios = [k[0] / lone[0] for lone, k in zip(runs["lone"], runs["kept"], strict=True)]
    print(f"\nthe second team's cost: {statistics.median(ratios) - 1:+.1%} "
          "(the median of the rounds' ratios)")


if __name__ == "__main__":
    main()
