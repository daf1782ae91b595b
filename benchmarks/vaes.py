"""The Stable Diffusion family's autoencoders, sd_parts against diffusers, side by side.

One architecture at a time, both sides load the same full-size random weights (written by
diffusers' ``save_pretrained``) and encode and decode one 512x512 image: SD v1's AutoencoderKL
(SDXL's has the same shape, only another scaling factor), SD3's and FLUX.1's (16 latent channels,
no quant convs), and, where ``sd_parts`` has ``AutoencoderTiny``, TAESD (TAESDXL's shape) and
TAESD3 (TAEF1's). The cases run interleaved, the order rotating every round; the median of the
rounds and its ratio to diffusers are reported, with the PSNR of the images against diffusers'.

    python benchmarks/vaes.py                 # time table: ~9 minutes on 2 cores
    python benchmarks/vaes.py --rounds 1
    python benchmarks/vaes.py --memory        # every model kept loaded: ~2 minutes

``--memory`` runs, in a fresh process per library and number type, what an app that offers them
all does: load each model, encode + decode one image with it, and keep it loaded. It prints the
resident memory after each step, the peak (Linux's VmHWM) and the weights' total size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ms, race, test_image  # noqa: E402
from generation import cpu_name  # noqa: E402
from memory import current_rss_mb, peak_rss_mb, run_script  # noqa: E402

import sd_parts  # noqa: E402
from tests.helpers.references import diffusers_vae  # noqa: E402
from viz.metrics import psnr  # noqa: E402

IMPLS = ("reference", "exact", "fast")


def architectures() -> dict[str, object]:
    """Label -> config of each architecture: a ``VAEConfig``, or a TAESD-family config."""
    found: dict[str, object] = {"SD v1 / SDXL VAE": sd_parts.SDXL_VAE,
                                "SD3 / FLUX.1 VAE": sd_parts.FLUX_VAE}
    if hasattr(sd_parts, "AutoencoderTiny"):
        found["TAESD / TAESDXL"] = sd_parts.TAESD
        found["TAESD3 / TAEF1"] = sd_parts.TAESD3
    return found


def is_tiny(config: object) -> bool:
    return not isinstance(config, sd_parts.VAEConfig)


def reference_model(config: object) -> torch.nn.Module:
    """diffusers' model of ``config``'s architecture with seeded random weights."""
    if not is_tiny(config):
        return diffusers_vae(config)
    from diffusers import AutoencoderTiny

    accepted = inspect.signature(AutoencoderTiny.__init__).parameters
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k in accepted}
    torch.manual_seed(0)
    return AutoencoderTiny(**fields).eval()


def write_weights(folder: Path) -> dict[str, Path]:
    """Each architecture's random weights, saved by diffusers into a folder of its own."""
    folders = weight_folders(folder)
    for label, config in architectures().items():
        reference_model(config).save_pretrained(folders[label])
    return folders


def weight_folders(folder: Path) -> dict[str, Path]:
    """Where ``write_weights`` puts each architecture's files under ``folder``."""
    return {label: folder / f"vae{i}" for i, label in enumerate(architectures())}


def load(impl: str, config: object, folder: Path) -> torch.nn.Module:
    """One contender: diffusers' model (float32), or sd_parts' in exact or fast mode."""
    if impl == "reference":
        from diffusers import AutoencoderKL, AutoencoderTiny

        model_class = AutoencoderTiny if is_tiny(config) else AutoencoderKL
        return model_class.from_pretrained(folder).eval().requires_grad_(False)
    dtype = torch.float32 if impl == "exact" else sd_parts.fast_dtype("cpu")
    loader = sd_parts.load_tiny_vae if is_tiny(config) else sd_parts.load_vae
    return loader(str(folder), dtype=dtype)


Step = Callable[[torch.Tensor], torch.Tensor]


def encoder(impl: str, model: torch.nn.Module, tiny: bool) -> Step:
    """images -> latents (the posterior mean for AutoencoderKL)."""
    if impl == "reference":
        return (lambda x: model.encode(x).latents) if tiny else (
            lambda x: model.encode(x).latent_dist.mean)
    return model.encode if tiny else (lambda x: model.encode(x).mean)


def decoder(impl: str, model: torch.nn.Module) -> Step:
    return (lambda z: model.decode(z).sample) if impl == "reference" else model.decode


def fast_impls() -> tuple[str, ...]:
    """The contenders this machine has: fast mode only where a 16-bit type runs natively."""
    return IMPLS if sd_parts.fast_dtype("cpu") != torch.float32 else IMPLS[:2]


# ---------------------------------------------------------------------------------------------
# time mode


def time_mode(args: argparse.Namespace, folders: dict[str, Path]) -> None:
    impls = fast_impls()
    rows = []
    for label, config in architectures().items():  # one architecture in memory at a time
        tiny = is_tiny(config)
        models = {impl: load(impl, config, folders[label]) for impl in impls}
        image = test_image(args.size)
        with torch.no_grad():
            for impl, model in models.items():  # warm up: kernels built, weights touched
                decoder(impl, model)(encoder(impl, model, tiny)(test_image(64)))
            print(f"{label}: encode {args.size} ({args.rounds} rounds)", file=sys.stderr)
            enc, latents = race({impl: partial(encoder(impl, m, tiny), image)
                                 for impl, m in models.items()}, args.rounds, "cpu")
            print(f"{label}: decode {args.size} ({args.rounds} rounds)", file=sys.stderr)
            z = latents["exact"]  # every decoder gets the same latent
            dec, images = race({impl: partial(decoder(impl, m), z)
                                for impl, m in models.items()}, args.rounds, "cpu")
        images = {impl: im.float().clamp(-1, 1) for impl, im in images.items()}
        quality = {"exact": psnr(images["exact"], images["reference"], 2.0)}
        if "fast" in images:
            quality["fast"] = psnr(images["fast"], images["exact"], 2.0)
        weights_mb = sum(p.numel() for p in models["exact"].parameters()) * 4 / 2**20
        rows.append((label, weights_mb, enc, dec, quality))
        del models
    print_time_table(args, rows, impls)


def print_time_table(args: argparse.Namespace, rows: list, impls: tuple[str, ...]) -> None:
    import diffusers

    fast = str(sd_parts.fast_dtype("cpu")).removeprefix("torch.") if "fast" in impls else "-"
    print(f"{datetime.date.today()}; {cpu_name()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}; one {args.size}x{args.size} "
          f"image, median of {args.rounds} interleaved rounds; full-size random weights\n")
    print(f"| architecture (float32 weights) | step | diffusers (fp32) | sd_parts exact (fp32) "
          f"| exact / diffusers | sd_parts fast ({fast}) | fast / diffusers |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, weights_mb, enc, dec, _ in rows:
        both = {impl: enc[impl] + dec[impl] for impl in enc}
        for step, times in (("encode", enc), ("decode", dec), ("encode + decode", both)):
            name = f"{label} ({weights_mb:,.0f} MB)" if step == "encode" else ""
            cells = [name, step, ms(times["reference"]), ms(times["exact"]),
                     f"{times['exact'] / times['reference']:.2f}"]
            if "fast" in times:
                cells += [ms(times["fast"]), f"{times['fast'] / times['reference']:.2f}"]
            else:
                cells += ["-", "-"]
            print("| " + " | ".join(cells) + " |")
    print("\nratios below 1: sd_parts is faster. Decoded images (clamped to [-1, 1]), PSNR:\n")
    print("| architecture | sd_parts exact vs diffusers | sd_parts fast vs exact |")
    print("| --- | ---: | ---: |")
    for label, _, _, _, quality in rows:
        fast_cell = f"{quality['fast']:.1f} dB" if "fast" in quality else "-"
        print(f"| {label} | {quality['exact']:.1f} dB | {fast_cell} |")


# ---------------------------------------------------------------------------------------------
# memory mode


def memory_child(impl: str, size: int, folders: dict[str, Path]) -> list[dict]:
    """Runs in a fresh process: load every architecture in turn, encode + decode one image with
    each, keep them all; the resident memory after each, and the peak so far."""
    if impl == "reference":  # the library's import is not the models' memory
        import diffusers  # noqa: F401
    steps = [{"step": "start", "rss_mb": current_rss_mb(), "peak_mb": peak_rss_mb()}]
    kept = []
    for label, config in architectures().items():
        model = load(impl, config, folders[label])
        kept.append(model)
        with torch.no_grad():
            decoder(impl, model)(encoder(impl, model, is_tiny(config))(test_image(size)))
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        steps.append({"step": label, "weights_mb": weights / 2**20, "rss_mb": current_rss_mb(),
                      "peak_mb": peak_rss_mb()})
    return steps


def run_memory_child(impl: str, size: int, folder: Path) -> list[dict]:
    print(f"  {impl}: every model in one process", file=sys.stderr)
    return run_script(__file__, "--memory-child", impl, size, folder)


def memory_mode(args: argparse.Namespace, folder: Path) -> None:
    fast = str(sd_parts.fast_dtype("cpu")).removeprefix("torch.")
    names = {"reference": "diffusers (fp32)", "exact": "sd_parts exact (fp32)",
             "fast": f"sd_parts fast ({fast})"}
    results = {impl: run_memory_child(impl, args.size, folder) for impl in fast_impls()}
    print(f"{datetime.date.today()}; {cpu_name()}; torch {torch.__version__}; each column one "
          f"fresh process that loads the models in turn, encodes + decodes one {args.size}x"
          f"{args.size} image with each and keeps them all loaded\n")
    print("| after | " + " | ".join(f"{names[impl]}: resident / peak" for impl in results) + " |")
    print("| --- |" + " ---: |" * len(results))
    for i, step in enumerate(results["exact"]):
        cells = [step["step"] if i == 0 else f"+ {step['step']}"]
        for steps in results.values():
            cells.append(f"{steps[i]['rss_mb']:,.0f} / {steps[i]['peak_mb']:,.0f} MB")
        print("| " + " | ".join(cells) + " |")
    cells = ["weights of all models"]
    for steps in results.values():
        cells.append(f"{sum(s.get('weights_mb', 0.0) for s in steps):,.0f} MB")
    print("| " + " | ".join(cells) + " |")
    print("\nresident: the process's memory after that model's round trip, the models before it "
          "still loaded; peak: Linux's VmHWM since the process started (interpreter and libraries "
          "included)")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true",
                        help="peak memory with all models kept loaded, in fresh processes")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "SIZE", "FOLDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        impl, size, folder = args.memory_child
        folders = weight_folders(Path(folder))
        print(json.dumps(memory_child(impl, int(size), folders)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("writing full-size random weights", file=sys.stderr)
        folders = write_weights(Path(tmp))
        if args.memory:
            memory_mode(args, Path(tmp))
        else:
            time_mode(args, folders)



if __name__ == "__main__":
    main()
