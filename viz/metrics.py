"""How close a reconstruction is to the original: PSNR, SSIM and where the error is.

References: Wang et al., "Image Quality Assessment: From Error Visibility to Structural
Similarity" (2004) for SSIM. Two variants: ``ssim`` with scikit-image's defaults (a flat 7x7
window), which the image tab shows, and ``ssim_gaussian`` with the paper's 11x11 Gaussian window,
which the comparison of VAEs reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from viz.heatmap import Picture, add_colorbar, add_title, heatmap

Pixels = Image.Image | np.ndarray | torch.Tensor


def _as_float(values: Pixels) -> np.ndarray:
    """An image, array or tensor as a float64 array of the same shape."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _as_float_image(image: Pixels) -> np.ndarray:
    """An image or array as float64 (H, W, C); a 2-D array gets one channel."""
    values = _as_float(image)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {values.shape}")
    return values


def psnr(a: Pixels, b: Pixels, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / mean squared error).

    Images in 0-255 (the default range), or any two arrays or tensors of one shape with their
    own ``data_range`` (2.0 for images in [-1, 1]). Higher is closer; identical inputs give
    ``float('inf')`` (no error at all).
    """
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"inputs differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def _window_means(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size x size window that fits inside the image, per channel.

    A summed-area table gives each window's sum from four corners, so the cost does not grow with
    the window. Only windows fully inside are needed: SSIM's mean skips the border they miss.
    """
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1, values.shape[2]))
    table[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    sums = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return sums / (size * size)


SSIM_MIN_SIDE = 7  # SSIM's window: smaller images have no full window
GAUSSIAN_SSIM_SIDE = 11  # the Gaussian window of Wang et al.: 11 taps, sigma 1.5


def ssim(a: Pixels, b: Pixels, data_range: float = 255.0) -> float:
    """Mean structural similarity (1 = identical), with scikit-image's default settings.

    SSIM compares local means (brightness), variances (contrast) and covariance (structure) in
    every 7x7 window, with sample (n - 1) variances and constants K1 = 0.01, K2 = 0.03. The mean
    is taken over windows fully inside the image and over channels, as
    ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)`` does.
    Both sides must be at least 7 pixels.
    """
    n = SSIM_MIN_SIDE * SSIM_MIN_SIDE
    return _ssim(a, b, data_range, SSIM_MIN_SIDE, lambda v: _window_means(v, SSIM_MIN_SIDE),
                 n / (n - 1))  # sample (co)variances: rescaled from 1/n to 1/(n - 1)


def _gaussian_window_means(values: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Gaussian-weighted mean over every 11x11 window fully inside the image, per channel.

    The 2-D Gaussian is the outer product of a 1-D one, so the weighted mean is two 1-D passes:
    11 multiply-adds per pixel and pass instead of 121.
    """
    radius = GAUSSIAN_SSIM_SIDE // 2
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    height, width = values.shape[:2]
    rows = sum(w * values[i : i + height - 2 * radius] for i, w in enumerate(taps))
    return sum(w * rows[:, j : j + width - 2 * radius] for j, w in enumerate(taps))


def ssim_gaussian(a: Pixels, b: Pixels, data_range: float = 255.0) -> float:
    """Mean structural similarity as Wang et al. (2004) define it (1 = identical).

    The variant: an 11x11 Gaussian window (sigma 1.5) weighs each neighbourhood, the local
    (co)variances are the window's weighted population ones (no n - 1 correction), K1 = 0.01,
    K2 = 0.03; the SSIM map is averaged over the windows fully inside the image and then over
    channels. Images in 0-255 by default; pass ``data_range=1`` for [0, 1]. This is
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=..., channel_axis=-1)``. The weights fall off
    smoothly from the centre, so the map does not jump as an edge enters or leaves a window,
    as it does with ``ssim``'s flat 7x7 window. Both sides must be at least 11 pixels.
    """
    return _ssim(a, b, data_range, GAUSSIAN_SSIM_SIDE, _gaussian_window_means, 1.0)


def _ssim(a: Pixels, b: Pixels, data_range: float, side: int,
          window_means: Callable[[np.ndarray], np.ndarray], variance_scale: float) -> float:
    """The SSIM map of Wang et al. from local means, averaged: ``window_means`` gives the
    (weighted) mean over every ``side`` x ``side`` window fully inside the image, and
    ``variance_scale`` turns its E[xy] - E[x]E[y] into the variances the variant uses."""
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < side:
        raise ValueError(f"SSIM needs images of at least {side}x{side} pixels, got {x.shape[:2]}")
    mean_x, mean_y = window_means(x), window_means(y)
    var_x = (window_means(x * x) - mean_x**2) * variance_scale
    var_y = (window_means(y * y) - mean_y**2) * variance_scale
    cov_xy = (window_means(x * y) - mean_x * mean_y) * variance_scale
    # The constants keep the ratios stable where means or variances are near zero.
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def abs_error_map(original: Pixels, reconstruction: Pixels) -> np.ndarray:
    """|original - reconstruction| averaged over R, G, B: one number per pixel, (H, W)."""
    a, b = _as_float_image(original), _as_float_image(reconstruction)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return np.abs(a - b).mean(axis=2)


def error_view(original: Pixels, reconstruction: Pixels, min_side: int = 384) -> Picture:
    """Where the VAE loses detail: the error map as a heat map in 0-255 units.

    The colour scale ends at the 99.5th percentile so typical errors are visible; larger ones
    get the last colour. Small images are enlarged (nearest neighbour) to ``min_side`` pixels.
    """
    error = abs_error_map(original, reconstruction)
    height, width = error.shape
    top = max(float(np.quantile(error, 0.995)), 1.0)
    cell = max(1, min_side // max(height, width))
    picture = heatmap(error, "magma", (0.0, top), (cell, cell))
    picture = add_colorbar(picture, "magma", (0.0, top), "mean |error| over R, G, B")
    title = (f"Reconstruction error: mean {error.mean():.2f}, max {error.max():.0f} (of 255), "
             f"{width}x{height} pixels")
    if error.max() > top:
        title += (f"\nthe scale ends at the 99.5th percentile, {top:.0f}: larger errors get its "
                  "colour")
    return add_title(picture, title)
