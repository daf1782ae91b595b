"""Peak memory of sd_parts against diffusers and transformers: every case in a fresh process.

Each case loads one model (full-size random weights, written by the reference libraries'
``save_pretrained``) and makes one call, in a process of its own, and reports the process's peak
resident memory (interpreter, libraries, weights and activations). Then a 2048x2048 encode +
decode round trip with ``tiled=True``, and the peak memory of loading each model against the
size of its weights. It reads Linux's /proc, runs on the CPU and takes about 25 minutes on 2
cores.

    python benchmarks/memory.py
    python benchmarks/memory.py --sizes 256 512 --big 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sd_parts  # noqa: E402
from benchmarks.bench import IMPLS, on_random_weights, test_image  # noqa: E402


def peak_rss_mb() -> float:
    """The process's peak resident memory since it started or since ``reset_peak_rss``.

    Linux's ``VmHWM``, not ``getrusage``: the latter keeps the peak of the parent process that
    forked this one, which here holds two copies of the weights.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("memory mode needs Linux's /proc/self/status")


def reset_peak_rss() -> None:
    """Restart the peak from the present resident memory (Linux 4.0 and later)."""
    Path("/proc/self/clear_refs").write_text("5")


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def one_case(impl: str, op: str, size: int, folder: Path) -> dict:
    """Runs in a child process: load one model, run one call, report memory."""
    if op.startswith("load"):
        return load_case(impl, op, folder)
    if impl == "reference":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    else:
        dtype = torch.float32 if impl == "exact" else sd_parts.fast_dtype("cpu")
        vae = sd_parts.load_vae(str(folder / "vae"), dtype=dtype)
    before = peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        if op == "roundtrip":  # tiled, sd_parts only
            latents = vae.encode(test_image(size), tiled=True).mean
            vae.decode(latents, tiled=True)
        elif op == "encode":
            image = test_image(size)
            vae.encode(image).latent_dist if impl == "reference" else vae.encode(image)
        else:
            latents = torch.randn(1, 4, size // 8, size // 8)
            vae.decode(latents).sample if impl == "reference" else vae.decode(latents)
    return {"peak_mb": peak_rss_mb(), "after_load_mb": before,
            "seconds": time.perf_counter() - start}


def load_case(impl: str, op: str, folder: Path) -> dict:
    """Peak memory while loading a model and bringing every weight into memory (the first call
    would), minus the memory in use before, against the size of the weights file."""
    which = "vae" if op == "load_vae" else "text_encoder"
    files = list((folder / which).glob("*.safetensors"))
    weights_mb = sum(f.stat().st_size for f in files) / 2**20
    if impl == "reference":  # import the library first: its import is not loading
        if which == "vae":
            from diffusers import AutoencoderKL as Model
        else:
            from transformers import CLIPTextModel as Model
    reset_peak_rss()
    rss_before = current_rss_mb()
    start = time.perf_counter()
    dtype = sd_parts.fast_dtype("cpu") if impl == "fast" else torch.float32
    if impl == "reference":
        model = Model.from_pretrained(folder / which)
    elif which == "vae":
        model = sd_parts.load_vae(str(folder / which), dtype=dtype)
    else:
        model = sd_parts.load_text_encoder(str(folder / which), dtype=dtype)
    seconds = time.perf_counter() - start
    for tensor in model.state_dict().values():
        tensor.sum()  # page every weight in, as a first forward pass would
    return {"peak_mb": peak_rss_mb(), "increase_mb": peak_rss_mb() - rss_before,
            "weights_mb": weights_mb, "seconds": seconds}


def run_script(script: str, *args: object) -> object:
    """Run ``script`` with ``args`` in a fresh Python process (so its peak memory is its own) and
    return the JSON value on the last line it prints."""
    command = [sys.executable, script, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(impl: str, op: str, size: int, folder: Path) -> dict:
    print(f"  {impl} {op} {size}", file=sys.stderr)
    return run_script(__file__, "--one-case", impl, op, size, folder)


def memory_mode(args: argparse.Namespace, folder: Path) -> None:
    fast = sd_parts.fast_dtype("cpu")
    impls = IMPLS if fast != torch.float32 else IMPLS[:2]
    print("| case | diffusers (fp32) | sd_parts exact (fp32) | sd_parts fast |")
    print("| --- | ---: | ---: | ---: |")
    for size in args.sizes:
        for op in ("encode", "decode"):
            cells = [f"VAE {op} {size}"]
            for impl in IMPLS:
                result = run_child(impl, op, size, folder) if impl in impls else None
                cells.append(f"{result['peak_mb']:,.0f} MB" if result else "-")
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.big:
        cells = [f"VAE encode + decode {args.big}, tiled"]
        for impl in IMPLS:
            if impl == "reference" or impl not in impls:
                cells.append("-")
                continue
            result = run_child(impl, "roundtrip", args.big, folder)
            cells.append(f"{result['peak_mb']:,.0f} MB ({result['seconds']:.0f} s)")
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\npeak resident memory of a fresh process doing one call (interpreter, libraries, "
          "weights and activations)\n")
    print("| loading | library | peak increase / file size | file size | load time |")
    print("| --- | --- | ---: | ---: | ---: |")
    for op, what in (("load_vae", "VAE"), ("load_text_encoder", "text encoder")):
        libraries = [("reference", "diffusers" if what == "VAE" else "transformers"),
                     ("exact", "sd_parts, float32")]
        if "fast" in impls:
            libraries.append(("fast", f"sd_parts, {str(fast).removeprefix('torch.')}"))
        for impl, library in libraries:
            result = run_child(impl, op, 0, folder)
            print(f"| {what} | {library} | {result['increase_mb'] / result['weights_mb']:.2f} "
                  f"| {result['weights_mb']:,.0f} MB | {result['seconds']:.2f} s |", flush=True)
    print("\nthe increase of peak resident memory from just before loading until every weight "
          "has been read once; the files hold float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--big", type=int, default=2048,
                        help="side of the tiled round trip (0: skip)")
    parser.add_argument("--one-case", nargs=4, metavar=("IMPL", "OP", "SIZE", "FOLDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:
        impl, op, size, folder = args.one_case
        print(json.dumps(one_case(impl, op, int(size), Path(folder))))
        return
    on_random_weights(memory_mode, args)


if __name__ == "__main__":
    main()
