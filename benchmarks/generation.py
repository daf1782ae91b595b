"""A whole text-to-image run, sd_parts against diffusers, side by side in one process.

Both sides load the same full-size random SD v1.5 weights (UNet, VAE, CLIP text encoder, written
by diffusers/transformers ``save_pretrained``) and run the same prompt, seed, sampler and size with
classifier-free guidance. The cases run interleaved, the order rotating every round, and the
median of the rounds is reported with its ratio to diffusers:

    python benchmarks/generation.py             # 256 px, 20 steps, 2 rounds: ~10 min, 2 cores
    python benchmarks/generation.py --size 512 --steps 50 --device cuda

Cases: diffusers in float32; sd_parts exact mode (float32); exact mode with the trace on (every
step's latents and x0, the word maps: the cost of what the app shows); fast mode (the 16-bit type
this machine runs natively, if any). The images are compared with diffusers' (PSNR, 8-bit scale).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import race  # noqa: E402

import sd_parts  # noqa: E402
from sd_parts.pipeline import load_pipeline  # noqa: E402
from tests.helpers.references import reference_text_encoder, reference_unet, reference_vae  # noqa: E402
from viz.metrics import psnr  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def cpu_name() -> str:
    """The CPU model and whether it multiplies bfloat16 natively (AMX, AVX-512 BF16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no native bf16"]
    return f"{model} ({', '.join(native)})"


def write_pipeline(folder: Path) -> object:
    """Full-size random SD v1.5 components, saved by diffusers; returns diffusers' pipeline."""
    import diffusers
    import transformers

    sd_parts.load_tokenizer().save(folder / "vocabulary")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "vocabulary",
                                                           model_max_length=77)
    scheduler = diffusers.PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        skip_prk_steps=True, set_alpha_to_one=False))
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference_vae(), text_encoder=reference_text_encoder(), tokenizer=tokenizer,
        unet=reference_unet(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    sd_parts.load_tokenizer().save(folder / "tokenizer")  # vocab.json + merges.txt, as the Hub
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    fast = sd_parts.fast_dtype(args.device)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, device {args.device}; "
          f"torch {torch.__version__}; fast mode: "
          f"{str(fast).removeprefix('torch.') if fast != torch.float32 else 'none (float32)'}")
    print(f"{args.size} px, {args.steps} PNDM steps, guidance 7.5, median of {args.rounds} "
          "interleaved rounds, full-size random weights\n")

    with tempfile.TemporaryDirectory() as tmp:
        reference = write_pipeline(Path(tmp)).to(args.device)
        exact = load_pipeline(tmp, device=args.device)
        fast_pipe = load_pipeline(tmp, dtype=fast, device=args.device) \
            if fast != torch.float32 else None

    size = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

    def seed() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    runners = {
        "diffusers": lambda: reference(PROMPT, generator=seed(), output_type="pt",
                                       **size).images,
        "exact": lambda: exact(PROMPT, generator=seed(), **size).images,
        "exact+trace": lambda: exact(PROMPT, generator=seed(), trace=True, **size).images,
    }
    if fast_pipe is not None:
        runners["fast"] = lambda: fast_pipe(PROMPT, generator=seed(), **size).images
    with torch.inference_mode():
        times, outputs = race(runners, args.rounds, args.device)
    base = times["diffusers"]
    print("| case | time per run | per step | ratio to diffusers | PSNR vs diffusers |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in times.items():
        quality = "" if name == "diffusers" else \
            f"{psnr(outputs['diffusers'].cpu(), outputs[name].cpu(), 1.0):.1f} dB"
        print(f"| {name} | {seconds:.2f} s | {seconds / args.steps:.3f} s | "
              f"{seconds / base:.2f}x | {quality} |")
    print(f"\ntracing overhead: {times['exact+trace'] / times['exact'] - 1:+.1%} "
          "over exact mode without the trace")


if __name__ == "__main__":
    main()
