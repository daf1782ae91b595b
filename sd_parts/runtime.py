"""The number format a model runs in, and the fallback to float32 when half precision fails.

Exact mode is float32. Fast mode stores weights and activations in 16 bits: bfloat16 where the
hardware multiplies it natively and faster than float32 (measured once on a CPU), float16 on
older GPUs; float32 where neither is faster, so fast mode is never slower than exact mode.
Matrix products still accumulate in float32, and GroupNorm and softmax keep float32 statistics,
so fast mode changes the VAE's output by about as much as rounding it to 8-bit pixels would.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The 16-bit dtype that runs fast on ``device``, or float32 where none does.

    On a CPU without native bfloat16 instructions PyTorch emulates bfloat16, which is slower than
    float32, so fast mode would be slower than exact mode there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        # float16 has a narrow range (largest value 65504) and may overflow: see run_with_fallback
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if bfloat16_is_faster_on_cpu() else torch.float32
    if device.type == "mps":
        return torch.float16
    return torch.float32


# bfloat16 must beat float32 by this much on the probe's layers to be fast mode's dtype
BFLOAT16_MIN_SPEEDUP = 1.1


@functools.cache
def bfloat16_is_faster_on_cpu() -> bool:
    """Whether the UNet's and the VAE's typical layers run faster in bfloat16 than in float32
    on this CPU, measured once (about 0.2 s).

    Native bfloat16 instructions are not enough: on an Intel Xeon with AVX-512 BF16 but no AMX,
    a full-size UNet call took 1.3x longer in bfloat16 than in float32 (whose path here is tuned,
    see ``linear`` and ``conv3x3``), while on an AMD EPYC with the same flag bfloat16 convolutions
    ran twice as fast. So the two are timed on a 3x3 convolution and a Linear of SD v1's widths.
    """
    if not cpu_has_native_bfloat16():
        return False
    return layer_seconds(torch.float32) > BFLOAT16_MIN_SPEEDUP * layer_seconds(torch.bfloat16)


def layer_seconds(dtype: torch.dtype, rounds: int = 3) -> float:
    """The fastest of ``rounds`` timings (after one warm-up) of a 320-channel 3x3 convolution on
    a 32x32 latent and a 320 -> 1280 Linear over 1024 tokens, as the models run them."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(320, 320, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    image = torch.randn(1, 320, 32, 32, generator=generator).to(
        dtype=dtype, memory_format=torch.channels_last)
    weight = torch.randn(1280, 320, generator=generator).to(dtype)
    tokens = torch.randn(1, 1024, 320, generator=generator).to(dtype)
    times = []
    with torch.no_grad():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            conv3x3(image, conv)
            linear(tokens, weight, None)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN, which runs PyTorch's CPU convolutions, has native bfloat16 kernels here."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextmanager
def in_float32(module: nn.Module) -> Iterator[None]:
    """Temporarily run ``module`` in float32. Going from 16 bits to 32 and back loses nothing."""
    dtype = module_dtype(module)
    module.float()
    try:
        yield
    finally:
        module.to(dtype)


def run_with_fallback(
    module: nn.Module, compute: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``compute(x)`` in ``module``'s dtype, channels-last; the result in ``x``'s dtype, contiguous.

    The guard of fast mode: if a 16-bit run gives a non-finite value (float16 overflows above
    65504, and an inf becomes a NaN at the next normalization), the call is repeated in float32,
    with a warning, so a caller never receives a broken image.
    """
    dtype = module_dtype(module)
    y = compute(x.to(dtype, memory_format=torch.channels_last))
    if dtype != torch.float32 and not torch.isfinite(y).all():
        warnings.warn(
            f"{type(module).__name__} gave non-finite values in {dtype}; this call was repeated "
            "in float32", RuntimeWarning, stacklevel=3,
        )
        with in_float32(module):
            y = compute(x.to(torch.float32, memory_format=torch.channels_last))
    return y.to(x.dtype, memory_format=torch.contiguous_format)


# CPU speed, float32 only (16-bit types already run through oneDNN). PyTorch computes a Linear
# with MKL's matrix product and a convolution with oneDNN. On CPUs where MKL takes no AVX-512
# path (AMD's) oneDNN is about twice as fast for a Linear over many tokens, run as a 1x1
# convolution; where MKL has that path (Intel's) the two should be close. But oneDNN copies
# the weights into its blocked layout at every call, and for a 3x3 conv on a small image (the
# 4x4 and 8x8 levels) that copy, not the arithmetic, is most of the time: there, one MKL
# product over the 3x3 neighbourhoods ("im2col") reads the weights as they are, 2-3x faster.
# Both give the same sums in another order, so only float rounding changes.
ONEDNN_MIN_ROWS = 256  # Linears over at least this many tokens run as 1x1 convolutions
IM2COL_MAX_POSITIONS = 128  # 3x3 convs with at most this many outputs (batch x H x W) use im2col


def _cpu_float32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on (..., C) tokens; ``weight`` may be a 1x1 conv's."""
    weight = weight.flatten(1)  # (out, in)
    rows = x.numel() // x.shape[-1]
    if not _cpu_float32(x) or rows < ONEDNN_MIN_ROWS:
        return F.linear(x, weight, bias)
    # the tokens as a (1, C, rows, 1) channels-last image: a view, no copy
    image = x.reshape(1, rows, 1, x.shape[-1]).permute(0, 3, 1, 2)
    y = F.conv2d(image, weight[:, :, None, None], bias)  # (1, out, rows, 1), channels-last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 3x3 convolution with padding 1 (stride 1 or 2)."""
    B, C, H, W = x.shape
    stride = conv.stride[0]
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    if not _cpu_float32(x) or B * Ho * Wo > IM2COL_MAX_POSITIONS:
        return conv(x)
    windows = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).unfold(1, 3, stride).unfold(2, 3, stride)
    # one row per output position: its 3x3 neighbourhood, ordered (row, column, channel) like
    # the channels-last weights, so the weight matrix below is a view
    columns = windows.permute(0, 1, 2, 4, 5, 3).reshape(B * Ho * Wo, 9 * C)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 9 * C)
    y = F.linear(columns, weight, conv.bias)  # (B * Ho * Wo, out)
    return y.view(B, Ho, Wo, -1).permute(0, 3, 1, 2)  # (B, out, Ho, Wo), channels-last
