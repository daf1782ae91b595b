"""Image files in, tensors and numbers out: the pixel side of the VAE walkthrough.

- ``load_image`` reads an uploaded file safely (its size is checked before any decoding) into 8-bit
  RGB; ``fit_for_vae`` resizes and crops (or pads) it so both sides are multiples of 8.
- ``image_to_tensor`` and ``tensor_to_image`` convert to and from the VAE's pixel convention:
  floats in [-1, 1], shape (1, 3, H, W).
- ``psnr`` and ``ssim`` say how close a reconstruction is to the original.
- ``latent_to_rgb``, ``fit_latent_to_rgb`` and ``apply_latent_rgb_map`` show a 4-channel latent as
  colours; ``channel_stats`` shows why the VAE's scaling factor exists.
- ``latent_to_safetensors`` and ``embeddings_to_safetensors`` save tensors with metadata that says
  what they are.

References: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022)
for the VAE and its scaling factor; Wang et al., "Image Quality Assessment: From Error Visibility
to Structural Similarity" (2004) for SSIM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file

VAE_FACTOR = 8  # SD v1's VAE maps each 8x8 block of pixels to one latent pixel
SUPPORTED_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Widely published linear approximation from SD v1's scaled latent to RGB in [-1, 1]:
# rows are latent channels 0-3, columns are R, G, B.
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)

CHANNEL_STATS_HEADERS = ["channel", "mean", "std", "min", "max", "mean × factor", "std × factor"]


class ImageInputError(ValueError):
    """An upload that cannot be used as an image; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Reading an uploaded file


def load_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Read an image file into a new 8-bit RGB image, refusing anything unsafe or unreadable.

    The width x height from the file's header is checked against ``max_pixels`` before any pixel
    is decoded (``Image.open`` only reads the header), so a tiny file that declares a huge image
    (a decompression bomb) is refused at once. Then:

    - the EXIF orientation is applied, so a phone photo stands the right way up;
    - an animation (GIF, APNG, WebP) gives its first frame;
    - transparency (RGBA, LA, PA, a palette or grey level marked transparent) is composited on
      white;
    - 16-bit and 32-bit integer images are scaled to 8 bits (values 0-65535 are read as 16-bit);
      float images in [0, 1] are multiplied by 255; other ranges are stretched from min to max;
    - every other mode (palette, 1-bit, grey, CMYK, YCbCr, ...) uses Pillow's conversion. Embedded
      colour profiles are ignored.

    Raises ``ImageInputError`` for an empty, missing, unreadable, truncated or too large file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = Path(path)
    name = path.name or str(path)
    if not path.is_file():
        raise ImageInputError(f"{name!r} is not a file that can be read; upload the image again.")
    if path.stat().st_size == 0:
        raise ImageInputError(f"{name!r} is empty (0 bytes); upload the image again.")

    try:
        with Image.open(path) as opened:
            _check_pixel_count(name, opened.size, max_pixels)
            # Image.open stands on the first frame of an animation; load() decodes only that one.
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside Image.open, before we can read the size ourselves. Its
        # warning is an exception only where a warnings filter says so; otherwise our
        # max_pixels check above refuses the image (when max_pixels is below Pillow's limit).
        raise ImageInputError(
            f"{name!r} declares an image far too large to decode safely ({exc}). Upload an image "
            f"of at most {max_pixels:,} pixels."
        ) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_svg(path):
            raise ImageInputError(
                f"{name!r} is an SVG drawing; SVG is vector graphics that Pillow cannot read. "
                "Export it as PNG and upload that."
            ) from exc
        raise ImageInputError(
            f"{name!r} is not an image Pillow can read; upload a {SUPPORTED_FORMATS} file."
        ) from exc
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        # Pillow reports a file that ends early or holds broken data with one of these.
        raise ImageInputError(
            f"{name!r} is truncated or damaged ({exc}); save it again and upload the new file."
        ) from exc
    return _to_rgb8(upright)


def _check_pixel_count(name: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        side = math.isqrt(max_pixels)
        raise ImageInputError(
            f"{name!r} is {width}x{height} = {width * height:,} pixels, more than the "
            f"{max_pixels:,} allowed. Downscale it (for example to {side}x{side}) and upload again."
        )


def _looks_like_svg(path: Path) -> bool:
    """True when the file starts like an SVG document (an XML text with an <svg> element)."""
    with path.open("rb") as file:
        head = file.read(4096).lower()
    return b"<svg" in head


def _to_rgb8(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from any Pillow mode, with transparency composited on white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_depth_to_rgb8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageInputError(
            f"Pillow cannot convert colour mode {image.mode} to RGB; save the image as an RGB PNG "
            "or JPEG and upload that."
        ) from exc


def _high_depth_to_rgb8(image: Image.Image) -> Image.Image:
    """Grey levels of a 16/32-bit integer or float image scaled to 8 bits (Pillow would clip)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0  # 65535 / 255 = 257 maps the full 16-bit range onto 0-255
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    grey = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # A single grey level marked transparent (PNG tRNS): composite those pixels on white.
        grey = np.where(np.asarray(image) == transparent, np.uint8(255), grey)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


# ---------------------------------------------------------------------------------------------
# Sizing for the VAE and the pixel convention


def fit_for_vae(
    image: Image.Image, max_side: int, multiple: int = VAE_FACTOR, mode: str = "crop"
) -> tuple[Image.Image, str]:
    """Resize and center-crop (or pad) an RGB image so the VAE can encode it; say what was done.

    The image is shrunk with LANCZOS so its longer side is at most ``max_side`` (it is never
    enlarged). Then each side becomes a multiple of ``multiple``, because the VAE halves the size
    three times: ``mode="crop"`` removes the remainder evenly from both edges, ``mode="pad"`` adds
    pixels up to the next multiple by repeating the edge pixels. A side shorter than ``multiple``
    (a 7x13 image, or a 10000x10 strip after resizing) is padded in either mode, since cropping
    would leave nothing. Returns the new image and one sentence for the user, for example
    "Resized 1024x768 -> 512x384 (longer side at most 512 px); no crop needed: both sides are
    multiples of 8. The latent will be 64x48 with 4 channels." Sizes are width x height.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if multiple < 1 or max_side < multiple:
        raise ValueError(f"need 1 <= multiple <= max_side, got multiple={multiple}, {max_side=}")
    if image.mode != "RGB":
        raise ValueError(
            f"fit_for_vae needs an RGB image (as load_image returns), got {image.mode}"
        )

    width, height = image.size
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = image.resize(size, Image.Resampling.LANCZOS)
        first = f"Resized {width}x{height} -> {size[0]}x{size[1]}"
        first += f" (longer side at most {max_side} px)"
    else:
        resized = image.copy()
        first = f"Kept {width}x{height} (longer side already at most {max_side} px)"

    def target(side: int) -> int:
        if mode == "crop" and side >= multiple:
            return side // multiple * multiple
        return -(-side // multiple) * multiple  # round up

    target_size = (target(resized.width), target(resized.height))
    fitted = _center_crop_or_pad(resized, target_size)
    second = _describe_change(resized.size, target_size, multiple)
    latent = f"The latent will be {target_size[0] // VAE_FACTOR}x{target_size[1] // VAE_FACTOR}"
    return fitted, f"{first}; {second}. {latent} with 4 channels."


def _center_crop_or_pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop each side evenly where it is too long; repeat edge pixels where it is too short."""
    pixels = np.asarray(image)
    for axis, wanted in ((1, size[0]), (0, size[1])):
        have = pixels.shape[axis]
        if wanted < have:
            start = (have - wanted) // 2
            pixels = pixels.take(range(start, start + wanted), axis=axis)
        elif wanted > have:
            before = (wanted - have) // 2
            widths = [(0, 0)] * pixels.ndim
            widths[axis] = (before, wanted - have - before)
            pixels = np.pad(pixels, widths, mode="edge")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _describe_change(before: tuple[int, int], after: tuple[int, int], multiple: int) -> str:
    """Half a sentence saying how many pixels were cropped or padded on each side."""
    changes = []
    for word, have, wanted in (("width", before[0], after[0]), ("height", before[1], after[1])):
        if wanted < have:
            changes.append(f"cropped {have - wanted} px of {word}")
        elif wanted > have:
            changes.append(f"padded {wanted - have} px of {word} by repeating edge pixels")
    if not changes:
        return f"no crop needed: both sides are multiples of {multiple}"
    reason = f"so both sides are multiples of {multiple}"
    return f"{' and '.join(changes)} around the centre to {after[0]}x{after[1]}, {reason}"


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) float32 tensor in [-1, 1], the VAE's input convention."""
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor expects an RGB image, got mode {image.mode}")
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))  # (H, W, 3), a fresh copy
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) or (1, 3, H, W) tensor in [-1, 1] as an RGB image (clamped, rounded).

    Values outside [-1, 1] (a decoder can overshoot) are clamped; NaN becomes mid grey.
    """
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected shape (3, H, W) or (1, 3, H, W), got {tuple(tensor.shape)}")
    values = torch.nan_to_num(tensor.detach().to("cpu", torch.float32), nan=0.0)
    pixels = ((values + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics


def _as_float_image(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image or array as float64 (H, W, C); a 2-D array gets one channel."""
    values = np.asarray(image, dtype=np.float64)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {values.shape}")
    return values


def psnr(
    a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, data_range: float = 255.0
) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / mean squared error).

    Higher is closer; identical images give ``float('inf')`` (no error at all).
    """
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
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


def ssim(
    a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, data_range: float = 255.0
) -> float:
    """Mean structural similarity (1 = identical), with scikit-image's default settings.

    SSIM compares local means (brightness), variances (contrast) and covariance (structure) in
    every 7x7 window, with sample (n - 1) variances and constants K1 = 0.01, K2 = 0.03. The mean
    is taken over windows fully inside the image and over channels, as
    ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)`` does.
    Both sides must be at least 7 pixels.
    """
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    size = 7
    if min(x.shape[:2]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {x.shape[:2]}")
    n = size * size
    mean_x, mean_y = _window_means(x, size), _window_means(y, size)
    # Sample (co)variances: E[xy] - E[x]E[y], rescaled from 1/n to 1/(n - 1).
    var_x = (_window_means(x * x, size) - mean_x**2) * n / (n - 1)
    var_y = (_window_means(y * y, size) - mean_y**2) * n / (n - 1)
    cov_xy = (_window_means(x * y, size) - mean_x * mean_y) * n / (n - 1)
    # The constants keep the ratios stable where means or variances are near zero.
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


# ---------------------------------------------------------------------------------------------
# Looking at a latent as colours and numbers


def latent_to_numpy(latent: torch.Tensor | np.ndarray) -> np.ndarray:
    """A latent of shape (4, h, w) or (1, 4, h, w) as a float64 array of shape (4, h, w)."""
    if isinstance(latent, torch.Tensor):
        values = latent.detach().to("cpu", torch.float64).numpy()
    else:
        values = np.asarray(latent, dtype=np.float64)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3 or values.shape[0] != 4:
        raise ValueError(
            f"expected a latent of shape (4, h, w) or (1, 4, h, w), not {values.shape}"
        )
    return values


def apply_latent_rgb_map(
    latent: torch.Tensor, scaling_factor: float, matrix: np.ndarray | Sequence[Sequence[float]]
) -> np.ndarray:
    """Colour each latent pixel with a linear map: (h, w, 3) uint8.

    ``matrix`` has shape (4, 3), or (5, 3) with a last row of biases; it maps the *scaled* latent
    (latent x scaling_factor) to RGB in [-1, 1], which is then clipped and mapped to 0-255.
    """
    weights = np.asarray(matrix, dtype=np.float64)
    if weights.shape not in ((4, 3), (5, 3)):
        raise ValueError(f"matrix must have shape (4, 3) or (5, 3), got {weights.shape}")
    scaled = latent_to_numpy(latent) * scaling_factor
    rgb = np.tensordot(scaled, weights[:4], axes=(0, 0))  # (h, w, 3)
    if weights.shape[0] == 5:
        rgb = rgb + weights[4]
    return np.rint((np.clip(rgb, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def latent_to_rgb(latent: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """A quick colour preview of an SD v1 latent, (h, w, 3) uint8, without running the decoder.

    Uses ``LATENT_RGB_FACTORS``, a published linear approximation: most of the latent's four
    channels is simply colour at 1/8 resolution, which is why this crude map already looks like a
    small, blurry copy of the image.
    """
    return apply_latent_rgb_map(latent, scaling_factor, LATENT_RGB_FACTORS)


def fit_latent_to_rgb(
    latent: torch.Tensor, image: Image.Image, scaling_factor: float
) -> np.ndarray:
    """The best linear map (least squares) from this latent to this image's colours: (5, 3).

    The image is averaged down to the latent grid (each latent pixel stands for an 8x8 block).
    Rows 0-3 weigh the scaled latent channels and row 4 is a bias; the result is RGB in [-1, 1],
    so ``apply_latent_rgb_map(latent, scaling_factor, matrix)`` draws the fitted colours and the
    matrix can be compared with ``LATENT_RGB_FACTORS``.
    """
    scaled = latent_to_numpy(latent) * scaling_factor
    _, height, width = scaled.shape
    if image.width * height != image.height * width:
        raise ValueError(
            f"image {image.width}x{image.height} and latent {width}x{height} differ in aspect ratio"
        )
    small = image.convert("RGB").resize((width, height), Image.Resampling.BOX)
    target = np.asarray(small, dtype=np.float64).reshape(-1, 3) / 127.5 - 1.0
    design = np.concatenate([scaled.reshape(4, -1).T, np.ones((height * width, 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    return solution


def channel_stats(latent: torch.Tensor, scaling_factor: float) -> list[list]:
    """Table rows, one per channel and one for all channels, with ``CHANNEL_STATS_HEADERS``.

    Mean, (population) std, min and max are of the unscaled latent, as the VAE encoder outputs
    it; the last two columns multiply mean and std by the scaling factor, which is what the
    diffusion model sees: the std there should be close to 1. Numbers are rounded to 4 places.
    """
    values = latent_to_numpy(latent)
    groups = [(str(channel), values[channel]) for channel in range(4)] + [("all", values)]
    rows = []
    for label, group in groups:
        mean, std = float(group.mean()), float(group.std())
        numbers = [mean, std, float(group.min()), float(group.max())]
        numbers += [mean * scaling_factor, std * scaling_factor]
        rows.append([label] + [round(number, 4) for number in numbers])
    return rows


# ---------------------------------------------------------------------------------------------
# Saving tensors with metadata


def latent_to_safetensors(
    latent: torch.Tensor, scaling_factor: float, source_size: tuple[int, int], path: str | Path
) -> Path:
    """Write a latent to a .safetensors file as ``latent`` of shape (1, 4, h, w), float32.

    The metadata (safetensors allows only strings) records the scaling factor, the width and
    height of the encoded image, and that the tensor is unscaled: multiply it by the scaling factor
    before giving it to the diffusion U-Net, divide a U-Net latent by it before decoding.
    """
    values = torch.from_numpy(latent_to_numpy(latent).astype(np.float32)).unsqueeze(0)
    width, height = source_size
    metadata = {
        "content": "Stable Diffusion v1 VAE latent",
        "scaling_factor": repr(float(scaling_factor)),
        "source_width": str(int(width)),
        "source_height": str(int(height)),
        "note": "unscaled: multiply by scaling_factor before the U-Net; decode it as it is",
    }
    path = Path(path)
    save_file({"latent": values.contiguous()}, str(path), metadata=metadata)
    return path


def embeddings_to_safetensors(
    last_hidden_state: torch.Tensor, input_ids: torch.Tensor, path: str | Path, prompt: str = ""
) -> Path:
    """Write CLIP text embeddings to a .safetensors file with the ids and prompt they came from.

    Tensors: ``last_hidden_state`` (1, T, D) float32 and ``input_ids`` (1, T) int64, a batch of
    one as SD v1's U-Net takes them (T = 77, D = 768). A missing batch dimension is added.
    """
    hidden = last_hidden_state.detach().to("cpu", torch.float32)
    ids = input_ids.detach().to("cpu", torch.int64)
    hidden = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    if hidden.dim() != 3 or ids.dim() != 2 or hidden.shape[:2] != ids.shape:
        raise ValueError(
            f"expected hidden (1, T, D) and ids (1, T), got {tuple(hidden.shape)} and "
            f"{tuple(ids.shape)}"
        )
    metadata = {
        "content": "CLIP text encoder last hidden state (after the final layer norm)",
        "prompt": prompt,
        "positions": str(ids.shape[1]),
        "note": "SD v1's U-Net cross-attends to every position, padding included",
    }
    path = Path(path)
    tensors = {"last_hidden_state": hidden.contiguous(), "input_ids": ids.contiguous()}
    save_file(tensors, str(path), metadata=metadata)
    return path
