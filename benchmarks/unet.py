"""The noise predictor (UNet) of sd_parts against diffusers', side by side on the same weights.

Both sides use the same full-size SD v1.5 UNet with random weights, written by diffusers'
``save_pretrained``. In one process, after a warm-up call each, the two are called in turns (the
order swapping every round, so a busy neighbour or a warm cache favours neither) on a 32x32
latent (a 256-pixel image), batch 2 as with classifier-free guidance. The median time of each
is reported with the ratio ours/diffusers, and so is the fastest call of each, which a busy
neighbour disturbs least. That is done in float32 (exact mode) and, where this CPU multiplies
bfloat16 natively (``sd_parts.fast_dtype()``), in bfloat16.

Then the peak memory of ``load_unet`` reading the half-size ``variant="fp16"`` file into float32
and into bfloat16, each in a fresh process: the peak resident memory (Linux's VmHWM) above what
the process held before loading, as a multiple of the loaded model's size.

    python benchmarks/unet.py                  # about 6 minutes on 2 cores
    python benchmarks/unet.py --rounds 3 --size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sd_parts  # noqa: E402
from sd_parts.weights import load_unet  # noqa: E402
from tests.helpers.references import reference_unet  # noqa: E402

# Run in a fresh process: the peak resident memory of loading the fp16 file into one dtype. It
# reads Linux's VmHWM (this process image's peak resident set) rather than ru_maxrss, which a
# child started by fork+exec inherits from its parent (here one holding two full models).
LOAD_PROBE = """
import json, sys, torch
sys.path.insert(0, {root!r})
from sd_parts.weights import load_unet

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = status("VmHWM")
model = load_unet({folder!r}, variant="fp16", dtype=getattr(torch, {dtype!r}))
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({{"before": before, "peak": status("VmHWM"), "model": size}}))
"""


def cpu_description() -> str:
    """The CPU model and the bfloat16-related flags it reports."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    present = [f for f in wanted if f in flags] or ["none of " + ", ".join(wanted)]
    return f"{model}; {torch.get_num_threads()} threads; flags: {' '.join(present)}"


def time_pair(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each entry, called in turns after one warm-up call each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def compare(reference: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype, size: int,
            rounds: int) -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 4, size, size, dtype=dtype)
    context = torch.randn(2, 77, 768, dtype=dtype)
    with torch.inference_mode():
        expected = reference(latents, 500, context).sample.float()
        got = ours(latents, 500, context).float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        times = time_pair({
            "diffusers": lambda: reference(latents, 500, context),
            "sd_parts": lambda: ours(latents, 500, context),
        }, rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    print(f"| {str(dtype).removeprefix('torch.')} | {median['diffusers']:.2f} "
          f"({fastest['diffusers']:.2f}) | {median['sd_parts']:.2f} ({fastest['sd_parts']:.2f}) | "
          f"{median['sd_parts'] / median['diffusers']:.2f} | "
          f"{fastest['sd_parts'] / fastest['diffusers']:.2f} | {error:.1e} |", flush=True)


def load_memory(folder: Path, dtype: str) -> dict:
    code = LOAD_PROBE.format(root=str(ROOT), folder=str(folder), dtype=dtype)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each side")
    parser.add_argument("--no-memory", action="store_true", help="skip the loading memory test")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting a model with .to(bfloat16)
    print(cpu_description())
    fast = sd_parts.fast_dtype()
    print(f"fast dtype here: {fast}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference = reference_unet()
        reference.save_pretrained(folder)
        ours = load_unet(str(folder))
        print(f"\nUNet, latent 2x4x{args.size}x{args.size}, timestep 500, context 2x77x768; "
              f"seconds per call, median (fastest) of {args.rounds}\n")
        print("| dtype | diffusers | sd_parts | ratio of medians | ratio of fastest |"
              " max error / max |")
        print("| --- | --- | --- | --- | --- | --- |")
        compare(reference, ours, torch.float32, args.size, args.rounds)
        if fast != torch.float32:
            compare(reference.to(fast), ours.to(fast), fast, args.size, args.rounds)
        if args.no_memory:
            return
        reference.to(torch.float16).save_pretrained(folder, variant="fp16")
        del reference, ours
        print("\nPeak memory of load_unet(variant='fp16'), each in a fresh process\n")
        print("| into | model GB | peak RSS GB | peak - before GB | (peak - before) / model |")
        print("| --- | --- | --- | --- | --- |")
        for dtype in ("float32", "bfloat16"):
            m = load_memory(folder, dtype)
            grown = m["peak"] - m["before"]
            print(f"| {dtype} | {m['model'] / 1e9:.2f} | {m['peak'] / 1e9:.2f} | "
                  f"{grown / 1e9:.2f} | {grown / m['model']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
