"""The number format a model runs in, and the fallback to float32 when half precision fails.

Exact mode is float32. Fast mode stores weights and activations in 16 bits: bfloat16 where the
hardware multiplies it natively (CPUs with AVX-512 BF16 or AMX, recent GPUs), float16 on older GPUs.
Matrix products still accumulate in float32, and GroupNorm and softmax keep float32 statistics,
so fast mode changes the VAE's output by about as much as rounding it to 8-bit pixels would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
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
        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    if device.type == "mps":
        return torch.float16
    return torch.float32


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
