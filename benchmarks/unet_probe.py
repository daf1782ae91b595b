"""What looking inside the UNet costs, and what a denoising-loss table costs.

1. A probed UNet call (every top-level block kept, one self-attention query, every
   cross-attention map) against a plain one: full-size SD v1.5 UNet with random weights
   (written by diffusers' ``save_pretrained``), 64x64 latent (512 pixels), batch 1 and batch 2,
   float32. The two are called in turns, the order swapping every round, after one warm-up call
   each; reported: median and fastest seconds, the ratio of medians (target: at most 1.3) and
   the size of what the probe kept. The probed output is checked to be bit-identical.
2. ``pipe.denoising_loss`` of 20 timesteps x 3 captions on a 256-pixel image, full-size random
   weights (UNet, VAE, CLIP text encoder), in a fresh process: seconds, and the peak resident
   memory (Linux's VmHWM) before and after.

The CPU model and the load average before and after are printed: other work on the machine
slows both sides of a pair alike, but makes single timings (the denoising loss) longer.

    python benchmarks/unet_probe.py               # about 5 minutes on 2 cores
    python benchmarks/unet_probe.py --rounds 3 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.unet import cpu_description, time_pair  # noqa: E402
from sd_parts import UNetProbe, unet_blocks  # noqa: E402
from sd_parts.weights import load_unet  # noqa: E402
from tests.helpers.references import (  # noqa: E402
    reference_text_encoder,
    reference_unet,
    reference_vae,
)

# Run in a fresh process, so its peak resident memory is this work's alone.
LOSS_PROBE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from sd_parts import StableDiffusionPipeline, load_tokenizer
from sd_parts.weights import load_text_encoder, load_unet, load_vae

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

folder = {folder!r}
pipe = StableDiffusionPipeline(load_tokenizer(None), load_text_encoder(folder + "/text_encoder"),
                               load_unet(folder + "/unet"), load_vae(folder + "/vae"))
image = torch.rand(1, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
captions = ["a photograph of a cat on a sofa", "a bowl of fruit on a table", "a city at night"]
timesteps = [int(t) for t in torch.linspace(0, 999, {steps}).round()]
before = status("VmHWM")
start = time.perf_counter()
losses = pipe.denoising_loss(image, captions, timesteps, generator=torch.Generator().manual_seed(1))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "before": before, "peak": status("VmHWM"),
                  "finite": bool(torch.isfinite(losses).all()), "shape": list(losses.shape)}}))
"""


def load_average() -> str:
    one, five, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    quiet = "quiet" if one < 0.5 * cores else "busy"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {cores} cores: {quiet}"


def full_probe(config, size: int) -> UNetProbe:
    """Every top-level block kept, one query at the latent's centre, every cross-attention."""
    return UNetProbe(keep=[block.path for block in unet_blocks(config)],
                     queries=[(size // 2, size // 2)], cross_attention=True)


def probe_cost(unet: torch.nn.Module, batch: int, size: int, rounds: int) -> None:
    torch.manual_seed(0)
    latents = torch.randn(batch, 4, size, size)
    context = torch.randn(batch, 77, 768)
    plain = unet(latents, 500, context)
    probe = full_probe(unet.config, size)
    probed = unet(latents, 500, context, probe=probe)
    same = torch.equal(plain, probed)
    kept = [*probe.outputs.values(), *probe.self_attention.values(),
            *probe.cross_attention.values()]
    kept_mb = sum(t.numel() * t.element_size() for t in kept) / 1e6
    times = time_pair({
        "plain": lambda: unet(latents, 500, context),
        "probed": lambda: unet(latents, 500, context, probe=full_probe(unet.config, size)),
    }, rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    print(f"| {batch} | {median['plain']:.2f} ({fastest['plain']:.2f}) | "
          f"{median['probed']:.2f} ({fastest['probed']:.2f}) | "
          f"{median['probed'] / median['plain']:.2f} | "
          f"{fastest['probed'] / fastest['plain']:.2f} | {kept_mb:.0f} | {same} |", flush=True)


def denoising_loss_cost(folder: Path, size: int, steps: int) -> dict:
    code = LOSS_PROBE.format(root=str(ROOT), folder=str(folder), size=size, steps=steps)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="latent side for the probe pairs")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each side")
    parser.add_argument("--loss-size", type=int, default=256, help="image side (pixels)")
    parser.add_argument("--loss-steps", type=int, default=20, help="timesteps of the loss")
    args = parser.parse_args()
    print(cpu_description())
    print(f"before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference_unet().save_pretrained(folder / "unet")
        reference_vae().save_pretrained(folder / "vae")
        reference_text_encoder().save_pretrained(folder / "text_encoder")
        unet = load_unet(str(folder / "unet"))
        print(f"\nUNet float32, latent Bx4x{args.size}x{args.size}, timestep 500; seconds per "
              f"call, median (fastest) of {args.rounds}; the probe keeps every top-level block, "
              "1 query, all cross-attention\n")
        print("| batch | plain | probed | ratio of medians | ratio of fastest | kept MB |"
              " bit-identical |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for batch in args.batches:
            probe_cost(unet, batch, args.size, args.rounds)
        del unet
        m = denoising_loss_cost(folder, args.loss_size, args.loss_steps)
        print(f"\ndenoising_loss: {args.loss_steps} timesteps x 3 captions at {args.loss_size} "
              f"px, in a fresh process: {m['seconds']:.1f} s "
              f"({m['seconds'] / args.loss_steps:.2f} s per UNet call of batch 3); peak RSS "
              f"{m['peak'] / 1e9:.2f} GB ({(m['peak'] - m['before']) / 1e9:.2f} GB over the "
              f"high-water mark after loading); shape {m['shape']}, finite {m['finite']}")
    print(f"after: {load_average()}")


if __name__ == "__main__":
    main()
