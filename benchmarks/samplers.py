"""Samplers: a 4-step LCM run against diffusers and against a 20-step guided run, and what each
sampler's own arithmetic costs per step beside one UNet call.

Full-size random SD v1.5 weights (UNet, VAE, CLIP text encoder) written by diffusers'
``save_pretrained``, plus a guidance-distilled (LCM) UNet with ``time_cond_proj_dim`` 256, as
LCM-distilled SD v1.5 checkpoints have. Three measurements, one after another so that at most one
pair of full-size UNets is in memory:

  1. LCM, 4 steps: diffusers' LatentConsistencyModelPipeline (float32) beside sd_parts' pipeline
     in exact mode (float32) and fast mode (sd_parts.fast_dtype), interleaved rounds, medians.
  2. A 20-step PNDM run with classifier-free guidance (21 UNet calls on a batch of 2) in exact
     and fast mode: the run LCM replaces, and the LCM run's ratio to it.
  3. Each sampler of sd_parts.SAMPLERS: scale_model_input + step per step with a fixed noise
     prediction (20 steps, the image's latent), beside one guided UNet call in each mode.

The CPU (its model, whether it has AVX-512 BF16 / AMX) and the machine's load average before and
after are printed, as other work on the machine changes every number.

    python benchmarks/samplers.py                        # 512 px, 2 rounds: ~20 min on 2 cores
    python benchmarks/samplers.py --size 256 --rounds 1  # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import race, timed  # noqa: E402
from generation import PROMPT, cpu_name, write_pipeline  # noqa: E402

import sd_parts  # noqa: E402
from sd_parts.pipeline import load_pipeline  # noqa: E402
from tests.helpers.references import reference_unet  # noqa: E402
from viz.metrics import psnr  # noqa: E402

LCM_STEPS, LCM_GUIDANCE = 4, 8.5  # LatentConsistencyModelPipeline's defaults
GUIDED_STEPS, GUIDANCE = 20, 7.5
TIME_COND_DIM = 256  # LCM-distilled SD v1.5 UNets (e.g. LCM_Dreamshaper_v7)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_models(folder: Path) -> None:
    """folder/sd: SD v1.5 with PNDM; folder/lcm: the same VAE and text encoder with an LCM UNet
    and LCMScheduler. Both written by diffusers."""
    import diffusers

    (folder / "sd").mkdir()
    reference = write_pipeline(folder / "sd")
    lcm = diffusers.LatentConsistencyModelPipeline(
        **{k: v for k, v in reference.components.items() if k not in ("unet", "scheduler")},
        unet=reference_unet(time_cond_proj_dim=TIME_COND_DIM),
        scheduler=diffusers.LCMScheduler.from_config(reference.scheduler.config))
    lcm.save_pretrained(folder / "lcm")
    sd_parts.load_tokenizer().save(folder / "lcm" / "tokenizer")


def seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def lcm_runs(folder: Path, size: int, rounds: int, fast: torch.dtype) -> dict[str, float]:
    import diffusers

    reference = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder / "lcm")
    reference.set_progress_bar_config(disable=True)
    exact = load_pipeline(str(folder / "lcm"))
    run = dict(num_inference_steps=LCM_STEPS, guidance_scale=LCM_GUIDANCE, height=size,
               width=size)
    runners = {
        "diffusers": lambda: reference(PROMPT, generator=seed(), output_type="pt", **run).images,
        "exact": lambda: exact(PROMPT, generator=seed(), scheduler="lcm", **run).images,
    }
    fast_pipe = None
    if fast != torch.float32:
        fast_pipe = load_pipeline(str(folder / "lcm"), dtype=fast)
        runners["fast"] = lambda: fast_pipe(PROMPT, generator=seed(), scheduler="lcm",
                                            **run).images
    with torch.inference_mode():
        times, outputs = race(runners, rounds, "cpu")
    print(f"\n### LCM, {LCM_STEPS} steps, guidance {LCM_GUIDANCE} embedded, {size} px\n")
    print("| case | time per run | ratio to diffusers | PSNR vs diffusers |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in times.items():
        quality = "" if name == "diffusers" else \
            f"{psnr(outputs['diffusers'].cpu(), outputs[name].cpu(), 1.0):.1f} dB"
        print(f"| {name} | {seconds:.2f} s | {seconds / times['diffusers']:.2f}x | {quality} |")
    return times  # the pipelines go with this frame


def guided_runs(folder: Path, size: int, rounds: int, fast: torch.dtype
                ) -> tuple[dict[str, float], dict[str, float]]:
    """20 guided PNDM steps per mode, and one guided UNet call's time per mode."""
    pipes = {"exact": load_pipeline(str(folder / "sd"))}
    if fast != torch.float32:
        pipes["fast"] = load_pipeline(str(folder / "sd"), dtype=fast)
    run = dict(num_inference_steps=GUIDED_STEPS, guidance_scale=GUIDANCE, height=size,
               width=size, scheduler="pndm")
    runners = {name: (lambda p=pipe: p(PROMPT, generator=seed(), **run).images)
               for name, pipe in pipes.items()}
    unet_call = {}
    with torch.inference_mode():
        times, _ = race(runners, rounds, "cpu")
        for name, pipe in pipes.items():
            latents = torch.randn(2, 4, size // 8, size // 8, generator=seed())
            context = pipe.encode_prompt(["", PROMPT])
            pipe.unet(latents, 500, context)  # warm-up
            calls = [timed(lambda p=pipe, x=latents, c=context: p.unet(x, 500, c), "cpu")[0]
                     for _ in range(max(rounds, 2))]
            unet_call[name] = statistics.median(calls)
    del pipes, runners
    gc.collect()
    return times, unet_call


def sampler_overheads(size: int, repeats: int) -> dict[str, float]:
    """Median seconds of scale_model_input + step per step of a 20-step run, per kind."""
    shape = (1, 4, size // 8, size // 8)
    eps = torch.randn(shape, generator=seed())
    result = {}
    for kind in sd_parts.SAMPLERS:
        per_step = []
        for _ in range(repeats):
            sampler = sd_parts.load_scheduler(None, kind=kind)
            sampler.set_timesteps(GUIDED_STEPS)
            x = torch.randn(shape, generator=seed()) * sampler.init_noise_sigma
            g = seed()
            start = time.perf_counter()
            for t in sampler.timesteps:
                sampler.scale_model_input(x, t)
                x = sampler.step(eps, t, x, generator=g).prev_sample
            per_step.append((time.perf_counter() - start) / len(sampler.timesteps))
        result[kind] = statistics.median(per_step)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--guided-rounds", type=int, default=1,
                        help="rounds of the 20-step guided run (the longest part)")
    args = parser.parse_args()
    fast = sd_parts.fast_dtype("cpu")
    fast_name = str(fast).removeprefix("torch.") if fast != torch.float32 else "none (float32)"
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"fast mode: {fast_name}")
    print(f"load average (1, 5, 15 min) before: {load_average()} on {os.cpu_count()} cores")
    print(f"{args.size} px, full-size random weights, medians of {args.rounds} interleaved "
          f"rounds ({args.guided_rounds} for the {GUIDED_STEPS}-step guided runs)")

    with tempfile.TemporaryDirectory() as tmp:
        print("writing full-size random weights", file=sys.stderr)
        write_models(Path(tmp))
        gc.collect()
        lcm = lcm_runs(Path(tmp), args.size, args.rounds, fast)
        gc.collect()
        guided, unet_call = guided_runs(Path(tmp), args.size, args.guided_rounds, fast)

    print(f"\n### LCM ({LCM_STEPS} steps) against {GUIDED_STEPS} guided PNDM steps "
          f"({GUIDED_STEPS + 1} UNet calls on a batch of 2), sd_parts\n")
    print("| mode | LCM run | guided PNDM run | LCM / PNDM |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in guided.items():
        print(f"| {name} | {lcm[name]:.2f} s | {seconds:.2f} s | {lcm[name] / seconds:.2f}x |")
    target = min(lcm.get("fast", lcm["exact"]), lcm["exact"]) / lcm["diffusers"]
    print(f"\nLCM, sd_parts' best mode against diffusers: {target:.2f}x (target: at most 0.6x)")

    overheads = sampler_overheads(args.size, max(args.rounds, 3))
    print(f"\n### Each sampler's own work per step ({GUIDED_STEPS} steps, latent "
          f"{args.size // 8}x{args.size // 8}, scale_model_input + step), beside one guided "
          f"UNet call ({', '.join(f'{k} {v:.2f} s' for k, v in unet_call.items())})\n")
    print("| sampler | per step | share of one exact UNet call |")
    print("| --- | ---: | ---: |")
    for kind, seconds in sorted(overheads.items(), key=lambda item: item[1]):
        label = sd_parts.SAMPLERS[kind].label
        print(f"| {label} | {seconds * 1000:.2f} ms | {seconds / unet_call['exact']:.4%} |")
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
