"""LoRA: what loading one costs against loading a second checkpoint, and fused against unfused.

A full-size SD v1.5 pipeline with random weights (UNet, VAE, text encoder written by diffusers'
and transformers' ``save_pretrained`` as a diffusers folder) and a rank-16 LoRA over all 128
attention projections of the UNet (to_q, to_k, to_v, to_out.0 of every attn1 and attn2).

1. Loading, each in a fresh process with the pipeline already loaded: the seconds and the peak
   resident memory (Linux's VmHWM) above what the process held before, of ``load_lora_weights``
   (fused) and of ``load_pipeline`` for a second checkpoint (what switching models costs).
2. One UNet call (a 256-pixel image: latent 2 x 4 x 32 x 32, as with guidance), median of
   interleaved rounds: without a LoRA; fused (W + B A in place of W); unfused as this UNet
   allows it, the weight recomputed at each access (``torch.nn.utils.parametrize``); and the
   classic unfused low-rank path x -> B(A x), timed on every layer's real inputs (captured in
   one call) and added to the call without LoRA, which is what it would cost inside the model.

    python benchmarks/lora.py                  # about 6 minutes on 2 cores
    python benchmarks/lora.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sd_parts  # noqa: E402
from benchmarks.memory import current_rss_mb, peak_rss_mb, reset_peak_rss, run_script  # noqa: E402
from benchmarks.unet import cpu_description  # noqa: E402
from sd_parts.lora import read_lora  # noqa: E402
from tests.helpers.references import (  # noqa: E402
    reference_text_encoder,
    reference_unet,
    reference_vae,
)

RANK = 16
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                      set_alpha_to_one=False, clip_sample=False)


def write_checkpoint(folder: Path) -> None:
    """A whole SD v1.5 pipeline with random weights, as a diffusers folder."""
    from diffusers import PNDMScheduler

    reference_unet().save_pretrained(folder / "unet")
    reference_vae().save_pretrained(folder / "vae")
    reference_text_encoder().save_pretrained(folder / "text_encoder")
    PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    sd_parts.load_tokenizer().save(folder / "tokenizer")


def attention_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in unet.named_modules()
            if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name)}


def write_lora(unet: nn.Module, path: Path) -> int:
    """A random rank-16 LoRA (diffusers layout, alpha 8) over every attention projection;
    ``unet`` may be on the meta device (only its shapes are read)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in attention_projections(unet).items():
        out_features, in_features = module.weight.shape
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(RANK, in_features,
                                                            generator=generator) * 0.01
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(out_features, RANK,
                                                            generator=generator) * 0.01
        tensors[f"unet.{name}.alpha"] = torch.tensor(RANK / 2)
    save_file(tensors, path)
    return len(tensors) // 3


# ---------------------------------------------------------------------------------------------
# 1. loading, in a fresh process each


def load_case(case: str, folder: Path, lora: Path) -> dict:
    pipe = sd_parts.load_pipeline(str(folder))
    for tensor in pipe.unet.state_dict().values():
        tensor.sum()  # every weight paged in, as after the first image
    reset_peak_rss()
    before = current_rss_mb()
    start = time.perf_counter()
    if case == "lora":
        pipe.load_lora_weights(str(lora), scale=0.8)
    else:
        second = sd_parts.load_pipeline(str(folder))
        for tensor in second.unet.state_dict().values():
            tensor.sum()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "increase_mb": peak_rss_mb() - before,
              "held_mb": current_rss_mb() - before}
    if case == "lora":
        start = time.perf_counter()
        pipe.unload_lora_weights()
        result["unload_seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# 2. one UNet call


class LowRankWeight(nn.Module):
    """A parametrization: the weight W + s B A, recomputed at every access (unfused)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, factor: float):
        super().__init__()
        self.register_buffer("down", down.float())
        self.register_buffer("up", up.float())
        self.factor = factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weight, self.up, self.down, alpha=self.factor)


def low_rank_extra(unet: nn.Module, layers: list, call) -> float:
    """Seconds the classic unfused path x -> s B(A x) adds to one call: every layer's input is
    captured once (the Attention modules' inputs; to_out reads a tensor the size of the query),
    then the low-rank products and the sums into an output are timed alone."""
    inputs: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args, kwargs):
            x = args[0]
            context = args[1] if len(args) > 1 and args[1] is not None else x
            for projection in PROJECTIONS:
                source = context if projection in ("to_k", "to_v") else x
                inputs[f"{name}.{projection}"] = source.detach().clone()
        return hook

    handles = [module.register_forward_pre_hook(capture(name), with_kwargs=True)
               for name, module in unet.named_modules() if name.endswith((".attn1", ".attn2"))]
    call()
    for handle in handles:
        handle.remove()
    work = [(inputs[layer.module], layer.down.float(), layer.up.float(), layer.alpha / layer.rank)
            for layer in layers]
    outputs = [torch.empty(*x.shape[:-1], up.shape[0]) for x, _, up, _ in work]

    def extra():
        for (x, down, up, factor), y in zip(work, outputs, strict=True):
            y.add_(F.linear(F.linear(x, down), up), alpha=factor)

    extra()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        extra()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recompute_alone(unet: nn.Module, layers: list) -> float:
    """Seconds one call's weight recomputations take (each parametrized weight is read once)."""
    modules = [unet.get_submodule(layer.module) for layer in layers]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for module in modules:
            module.weight  # noqa: B018  (the parametrization runs on access)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def call_costs(folder: Path, lora: Path, rounds: int, size: int) -> dict[str, float]:
    unet = sd_parts.load_unet(str(folder))
    pipe = SimpleNamespace(unet=unet, text_encoder=sd_parts.CLIPTextEncoder(sd_parts.TINY_CLIP))
    layers, _, _ = read_lora(pipe, lora)
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, size, size), torch.randn(2, 77, 768)

    def call():
        return unet(latents, 500, context)

    def fuse():
        sd_parts.load_lora_weights(pipe, lora, scale=1.0, adapter_name="bench")

    def unfuse():
        sd_parts.unload_lora_weights(pipe)

    def parametrized():
        for layer in layers:
            parametrize.register_parametrization(
                unet.get_submodule(layer.module), "weight",
                LowRankWeight(layer.down, layer.up, layer.alpha / layer.rank))

    def unparametrized():
        for layer in layers:
            parametrize.remove_parametrizations(unet.get_submodule(layer.module), "weight",
                                                leave_parametrized=False)

    cases = {"no LoRA": (lambda: None, lambda: None), "fused": (fuse, unfuse),
             "unfused (weight per access)": (parametrized, unparametrized)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():  # set-ups swap parameters, which inference mode would not allow
        call()  # warm-up
        extra = low_rank_extra(unet, layers, call)
        parametrized()
        recompute = recompute_alone(unet, layers)
        unparametrized()
        names = list(cases)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                setup, teardown = cases[name]
                setup()
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
                teardown()
                print(f"    {name:28s} {times[name][-1]:.2f} s", file=sys.stderr)
    costs = {name: (statistics.median(t), min(t)) for name, t in times.items()}
    base = costs["no LoRA"]
    costs["unfused (low-rank path, estimated)"] = (base[0] + extra, base[1] + extra)
    costs["alone: the weight recomputations of one call"] = (recompute, recompute)
    costs["alone: the low-rank paths of one call"] = (extra, extra)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--one-case", nargs=3, metavar=("CASE", "FOLDER", "LORA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_case:
        case, folder, lora = args.one_case
        print(json.dumps(load_case(case, Path(folder), Path(lora))))
        return
    print(cpu_description())
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} cores; torch {torch.__version__}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, lora = Path(tmp) / "checkpoint", Path(tmp) / "lora.safetensors"
        print("writing full-size random weights", file=sys.stderr)
        write_checkpoint(folder)
        with torch.device("meta"):
            shapes = sd_parts.UNet2DConditionModel()
        n_layers = write_lora(shapes, lora)
        lora_mb = lora.stat().st_size / 2**20
        loads = {case: run_script(__file__, "--one-case", case, folder, lora)
                 for case in ("lora", "checkpoint")}
        print(f"LoRA: rank {RANK} on {n_layers} attention projections, {lora_mb:.0f} MB file\n")
        print("| load | seconds | peak memory above before (MB) | held after (MB) |")
        print("| --- | ---: | ---: | ---: |")
        for case, label in (("lora", "load_lora_weights (fused)"),
                            ("checkpoint", "load_pipeline, a second checkpoint")):
            m = loads[case]
            print(f"| {label} | {m['seconds']:.2f} | {m['increase_mb']:,.0f} | "
                  f"{m['held_mb']:,.0f} |")
        print(f"\nunload_lora_weights: {loads['lora']['unload_seconds'] * 1000:.0f} ms\n",
              flush=True)
        costs = call_costs(folder, lora, args.rounds, args.size)
    base = costs["no LoRA"][0]
    print(f"One UNet call, latent 2x4x{args.size}x{args.size}, float32; median (fastest) of "
          f"{args.rounds} interleaved rounds; the parts alone: median of 5\n")
    print("| UNet call | seconds | vs no LoRA (medians) |")
    print("| --- | ---: | ---: |")
    for name, (median, fastest) in costs.items():
        if name.startswith("alone"):
            print(f"| {name} | {median:.3f} | {100 * median / base:.1f}% of a call |")
        else:
            print(f"| {name} | {median:.3f} ({fastest:.3f}) | {100 * (median / base - 1):+.1f}% |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
