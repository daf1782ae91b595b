"""What the "Inside the UNet" views cost against the probed UNet call they are drawn from.

Full-size random weights (SD v1's UNet and CLIP text encoder, seeded: the same arithmetic as the
real ones) at 256 px (a 32 x 32 latent), a guided step (batch 2). Each round clears the kept call,
then times: a plain UNet call, the probed call (every block, conv1, attention queries and keys,
cross-attention maps, timed per block), and each view drawn from it: the diagram with its table,
guidance and timestep views (one answer of ``unet_inside``), a block's channels, a position's
self-attention, a word's cross-attention. Medians over the rounds, with the CPU and its load.

    python benchmarks/unet_inside.py             # ~1-2 minutes on 2 cores
    python benchmarks/unet_inside.py --rounds 5 --size 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sd_parts.pipeline import Trace  # noqa: E402
from ui.models import Models, Settings  # noqa: E402
from ui.runs import GenerationRequest, RunRecord  # noqa: E402
from ui.sections import unet_calls  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def record_at(models: Models, size: int) -> RunRecord:
    """A one-step run's record as the tab keeps it: the start noise, its timestep, an image."""
    pipe = models.pipeline(True)
    request = GenerationRequest(PROMPT, "", 1, 7.5, "ddim", False, 0, size, size, None, 0.8)
    latent = torch.randn(4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    _, timesteps, _ = pipe.plan(1, "ddim")
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    record = RunRecord(request, "linear RGB map", lambda x: x, 0.18215, True,
                       Trace(timesteps=[float(timesteps[0])], latents=[latent]))
    record.pieces, record.image = pipe.tokenizer.tokenize(PROMPT), image
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; load average (1, 5, 15 "
          f"min) before: {load()}", flush=True)
    models = Models(Settings(weights="random"))
    started = time.perf_counter()
    pipe = models.pipeline(True)
    print(f"models built in {time.perf_counter() - started:.1f} s", flush=True)
    record = record_at(models, args.size)
    context = pipe.encode_prompt(["", PROMPT])
    latent = torch.cat([record.trace.latents[0][None]] * 2)
    word = unet_calls.word_groups  # the first word's label, read from the probed call below
    cases = {
        "plain UNet call (batch 2)": lambda p: pipe.unet(latent, record.trace.timesteps[0],
                                                         context),
        "probed UNet call": None,
        "unet_inside views (diagram, table, guidance, timestep)":
            lambda p: unet_calls.inside_views(models, p, True),
        "unet_block views (up_blocks.2)": lambda p: unet_calls.block_views(p, "up_blocks.2"),
        "self_attention views": lambda p: unet_calls.self_attention_views(p, 100, 60),
        "cross_attention views (a word, one layer's heads)":
            lambda p: unet_calls.cross_attention_views(p, word(p)[1][0], next(iter(p.cross))),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        unet_calls._cache.clear()
        start = time.perf_counter()
        probed = unet_calls.probe_step(models, record, 1, True)
        times["probed UNet call"].append(time.perf_counter() - start)
        for name, run in cases.items():
            if run is None:
                continue
            start = time.perf_counter()
            run(probed)
            times[name].append(time.perf_counter() - start)
    probe_s = statistics.median(times["probed UNet call"])
    print(f"\n{args.size} px, latent {args.size // 8} x {args.size // 8}, median of "
          f"{args.rounds} rounds\n")
    print("| what | seconds | / probed call |\n| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / probe_s:.2f} |")
    shares = probed.shares()
    print("\nblock time shares in the last probed call: "
          + ", ".join(f"{p} {100 * s:.1f}%" for p, s in shares.items()))
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
