"""sd_parts against diffusers and transformers, side by side, on the same machine and weights.

Both sides load the same full-size random weights (Stable Diffusion v1's VAE and CLIP ViT-L/14
text tower, written by diffusers/transformers ``save_pretrained``). In one process the cases are
run interleaved, the order rotating every round so that a busy neighbour or a warm cache favours
no one, and the median of the rounds is reported.

    python benchmarks/bench.py                     # time table, plot: ~9 minutes on 2 cores
    python benchmarks/bench.py --sizes 256 512 --repeats 5
    python benchmarks/bench.py --device cuda       # on a GPU

It prints one markdown table: VAE encode and decode at each size (diffusers' default
float32 setup, sd_parts exact mode in float32, sd_parts fast mode in the 16-bit type this machine
runs natively, if any), the text encoder with and without attention maps, the time ratios to the
reference, and the PSNR between fast and exact mode. A second table puts each VAE run's
arithmetic rate next to this machine's best convolution rate, and a plot of time against image
size is saved (``--plot``). Sizes of 1024 and up are run ``--large-repeats`` times (default once).
Peak memory is measured by ``benchmarks/memory.py``, the app's views by ``benchmarks/views.py``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sd_parts  # noqa: E402
from tests.helpers.references import reference_text_encoder, reference_vae  # noqa: E402
from viz.metrics import psnr  # noqa: E402

IMPLS = ("reference", "exact", "fast")


# ---------------------------------------------------------------------------------------------
# weights and inputs


def write_weights(folder: Path) -> None:
    """Full-size random weights, written by the reference libraries themselves."""
    reference_vae().save_pretrained(folder / "vae")
    reference_text_encoder().save_pretrained(folder / "text_encoder")


def on_random_weights(mode: Callable[[argparse.Namespace, Path], None],
                      args: argparse.Namespace) -> None:
    """Run ``mode(args, folder)`` on full-size random weights written to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        print("writing full-size random weights", file=sys.stderr)
        write_weights(Path(tmp))
        mode(args, Path(tmp))


def test_image(size: int) -> torch.Tensor:
    """A deterministic (1, 3, size, size) image in [-1, 1]: gradients, waves and a sharp disc."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.3) ** 2 + (y + 0.2) ** 2 < 0.15).float()
    image = torch.stack([torch.sin(6 * x + 2 * y), torch.cos(5 * y - 3 * x), x * y])
    return (0.7 * image + 0.6 * disc - 0.3).clamp(-1, 1).unsqueeze(0)


def test_prompt() -> torch.Tensor:
    """77 token ids: start, 12 words, end, then end-of-text padding, as SD's tokenizer gives."""
    words = torch.randint(400, 40000, (12,), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([49406]), words, torch.full((64,), 49407)]).unsqueeze(0)


def vae_flops(library: str, op: str, size: int) -> int:
    """Floating-point operations of one VAE call, counted by PyTorch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = reference_vae() if library == "diffusers" else sd_parts.AutoencoderKL()
    image = torch.empty(1, 3, size, size, device="meta")
    latents = torch.empty(1, 4, size // 8, size // 8, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(image) if op == "encode" else vae.decode(latents)
    return counter.get_total_flops()


def conv_peak(dtype: torch.dtype, device: str) -> float:
    """This machine's best rate on a large 3x3 convolution (FLOP/s): a practical upper bound."""
    x = torch.randn(1, 256, 128, 128, device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
    flops = 2 * 256 * 256 * 9 * 128 * 128
    best = min(timed(lambda: F.conv2d(x, w, padding=1), device)[0] for _ in range(10))
    return flops / best


# ---------------------------------------------------------------------------------------------
# the contenders


def load_models(folder: Path, device: str, fast: torch.dtype | None) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    models = {
        "vae": {
            "reference": AutoencoderKL.from_pretrained(folder / "vae").to(device).eval(),
            "exact": sd_parts.load_vae(str(folder / "vae"), device=device),
        },
        "text": {
            "eager": CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                   attn_implementation="eager").to(device).eval(),
            "sdpa": CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                  attn_implementation="sdpa").to(device).eval(),
            "exact": sd_parts.load_text_encoder(str(folder / "text_encoder"), device=device),
        },
    }
    if fast is not None:
        models["vae"]["fast"] = sd_parts.load_vae(str(folder / "vae"), dtype=fast, device=device)
    return models


def vae_runners(vaes: dict, op: str, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One zero-argument call per contender, each returning its output as a tensor."""
    ours = {name: vae for name, vae in vaes.items() if name != "reference"}
    if op == "encode":
        runners = {"reference": lambda: vaes["reference"].encode(x).latent_dist.mean}
        return runners | {name: (lambda v=v: v.encode(x).mean) for name, v in ours.items()}
    runners = {"reference": lambda: vaes["reference"].decode(x).sample}
    return runners | {name: (lambda v=v: v.decode(x)) for name, v in ours.items()}


# ---------------------------------------------------------------------------------------------
# time mode


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def race(runners: dict[str, Callable[[], object]], rounds: int, device: str
         ) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each runner over ``rounds`` interleaved rounds, and its last output."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, object] = {}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            seconds, outputs[name] = timed(runners[name], device)
            times[name].append(seconds)
            print(f"    {name:9s} {seconds * 1000:9.0f} ms", file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def time_mode(args: argparse.Namespace, folder: Path) -> None:
    fast = sd_parts.fast_dtype(args.device)
    fast = None if fast == torch.float32 else fast
    models = load_models(folder, args.device, fast)
    vaes, texts = models["vae"], models["text"]
    rows, rates, totals = [], [], {}
    # the best rate seen before or after the runs: a busy neighbour can only make it look lower
    peaks = {"reference": conv_peak(torch.float32, args.device)}
    if fast:
        peaks["fast"] = conv_peak(fast, args.device)
    with torch.no_grad():
        # warm up: touch every weight and build the kernels once, untimed
        warm = test_image(64).to(args.device)
        for op, x in [("encode", warm), ("decode", torch.zeros(1, 4, 8, 8, device=args.device))]:
            for run in vae_runners(vaes, op, x).values():
                run()
        for size in args.sizes:
            rounds = args.large_repeats if size >= 1024 else args.repeats
            image = test_image(size).to(args.device)
            print(f"VAE encode {size} ({rounds} rounds)", file=sys.stderr)
            enc, enc_out = race(vae_runners(vaes, "encode", image), rounds, args.device)
            latents = enc_out["exact"]
            print(f"VAE decode {size} ({rounds} rounds)", file=sys.stderr)
            dec, dec_out = race(vae_runners(vaes, "decode", latents), rounds, args.device)
            latent_range = (latents.max() - latents.min()).item()
            enc_psnr = psnr(enc_out["fast"], latents, latent_range) if fast else None
            dec_psnr = (psnr(dec_out["fast"].clamp(-1, 1), dec_out["exact"].clamp(-1, 1), 2.0)
                        if fast else None)
            rows.append((f"VAE encode {size}", enc, enc_psnr, "latents"))
            rows.append((f"VAE decode {size}", dec, dec_psnr, "image"))
            both = {name: enc[name] + dec[name] for name in enc}
            rows.append((f"VAE encode + decode {size}", both, None, ""))
            totals[size] = both
            for op, times in (("encode", enc), ("decode", dec)):
                flops = {impl: vae_flops("diffusers" if impl == "reference" else "sd_parts", op,
                                         size) for impl in times}
                rates.append((f"VAE {op} {size}", flops,
                              {impl: flops[impl] / t for impl, t in times.items()}))
        ids = test_prompt().to(args.device)
        print("text encoder (20 rounds)", file=sys.stderr)
        maps, _ = race({"reference": lambda: texts["eager"](ids, output_attentions=True),
                        "exact": lambda: texts["exact"](ids, output_attentions=True)},
                       20, args.device)
        plain, _ = race({"reference": lambda: texts["sdpa"](ids),
                         "exact": lambda: texts["exact"](ids)}, 20, args.device)
        rows.append(("text encoder, attention maps (vs transformers eager)", maps, None, ""))
        rows.append(("text encoder, no maps (vs transformers sdpa)", plain, None, ""))
        peaks["reference"] = max(peaks["reference"], conv_peak(torch.float32, args.device))
        if fast:
            peaks["fast"] = max(peaks["fast"], conv_peak(fast, args.device))
    print_header(args, fast)
    print_time_table(rows, fast)
    print_rate_table(rates, peaks, fast)
    print_targets(totals, rows, fast)
    if args.plot:
        plot(totals, fast, Path(args.plot))


def print_header(args: argparse.Namespace, fast: torch.dtype | None) -> None:
    import diffusers
    import transformers

    print(f"{datetime.date.today()}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads on {args.device}; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
          f"fast mode: {str(fast).removeprefix('torch.') if fast else 'none (float32 only)'}")
    print(f"sizes {args.sizes}; median of {args.repeats} interleaved rounds "
          f"({args.large_repeats} from 1024 up); full-size random weights\n")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def print_time_table(rows: list, fast: torch.dtype | None) -> None:
    fast_name = str(fast).removeprefix("torch.") if fast else "-"
    print("| case | reference (fp32) | sd_parts exact (fp32) | exact / ref "
          f"| sd_parts fast ({fast_name}) | fast / ref | fast speed-up | PSNR fast vs exact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, times, quality, what in rows:
        ref, exact = times["reference"], times["exact"]
        cells = [name, ms(ref), ms(exact), f"{exact / ref:.2f}"]
        if "fast" in times:
            fast_time = times["fast"]
            cells += [ms(fast_time), f"{fast_time / ref:.2f}", f"{ref / fast_time:.1f}x"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{quality:.1f} dB ({what})" if quality is not None else "-")
        print("| " + " | ".join(cells) + " |")
    print("\nreference: diffusers AutoencoderKL (default float32, contiguous) for the VAE, "
          "transformers CLIPTextModel for the text encoder; ratios below 1 mean sd_parts is "
          "faster.\n")


def print_rate_table(rates: list, peaks: dict, fast: torch.dtype | None) -> None:
    line = f"best 3x3 convolution rate here: float32 {peaks['reference'] / 1e9:.0f} GFLOP/s"
    if fast:
        line += f", {str(fast).removeprefix('torch.')} {peaks['fast'] / 1e9:.0f} GFLOP/s"
    print(line + "\n")
    print("| case | work: diffusers, sd_parts | diffusers | sd_parts exact | sd_parts fast |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, flops, rate in rates:
        cells = [name, f"{flops['reference'] / 1e12:.2f}, {flops['exact'] / 1e12:.2f} TFLOP"]
        for impl in IMPLS:
            peak = peaks["fast" if impl == "fast" else "reference"]
            if impl in rate:
                cells.append(f"{rate[impl] / 1e9:.0f} GFLOP/s ({100 * rate[impl] / peak:.0f}%)")
            else:
                cells.append("-")
        print("| " + " | ".join(cells) + " |")
    print("\n(% of the best convolution rate of the same number type; sd_parts' decoder does 15%"
          " less work, as its upsampling convolutions skip the repeated pixels)\n")


def print_targets(totals: dict, rows: list, fast: torch.dtype | None) -> None:
    if 512 in totals:
        t = totals[512]
        print(f"- exact encode + decode 512: {t['exact'] / t['reference']:.2f} of diffusers' time "
              "(target: at most 0.80)")
        if fast:
            print(f"- fast encode + decode 512: {t['reference'] / t['fast']:.1f}x faster than "
                  "diffusers (target: at least 4x)")
    maps = next(times for name, times, *_ in rows if name.startswith("text encoder, attention"))
    print(f"- text encoder with attention maps: {maps['exact'] / maps['reference']:.2f} of "
          "transformers' eager time (target: at most 1.00)")


def plot(totals: dict, fast: torch.dtype | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(totals)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    labels = {"reference": "diffusers (float32)", "exact": "sd_parts exact (float32)",
              "fast": f"sd_parts fast ({str(fast).removeprefix('torch.')})"}
    for impl, style in (("reference", "o-"), ("exact", "s-"), ("fast", "^-")):
        if impl in totals[sizes[0]]:
            ax.plot(sizes, [totals[s][impl] for s in sizes], style, label=labels[impl])
    ax.set(xscale="log", yscale="log", xlabel="image side (pixels)",
           ylabel="encode + decode (s)", title="VAE round trip, time against image size")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xticks([], minor=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3, help="rounds below 1024 pixels")
    parser.add_argument("--large-repeats", type=int, default=1, help="rounds from 1024 pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "vae_time.png"),
                        help="where to save the plot ('' for none)")
    on_random_weights(time_mode, parser.parse_args())


if __name__ == "__main__":
    main()
