"""Pixels for the VAE: sizing an image to the VAE's grid, and the [-1, 1] tensor convention.

The VAE halves the image's height and width ``log2(downscale)`` times, so both sides must be
multiples of its downscale (8 for every Stable Diffusion VAE). ``fit_for_vae`` resizes and then
crops or pads to get there, and says what it did; ``image_to_tensor`` and ``tensor_to_image``
convert to and from floats in [-1, 1], shape (1, 3, H, W).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def fit_for_vae(
    image: Image.Image, max_side: int, multiple: int, mode: str = "crop"
) -> tuple[Image.Image, str]:
    """Resize and center-crop (or pad) an RGB image so the VAE can encode it; say what was done.

    The image is shrunk with LANCZOS so its longer side is at most ``max_side`` (it is never
    enlarged). Then each side becomes a multiple of ``multiple``, the VAE's downscale:
    ``mode="crop"`` removes the remainder evenly from both edges, ``mode="pad"`` adds pixels up to
    the next multiple by repeating the edge pixels. A side shorter than ``multiple`` (a 7x13
    image, or a 10000x10 strip after resizing) is padded in either mode, since cropping would
    leave nothing. Returns the new image and one sentence for the user, for example "Resized
    1024x768 -> 512x384 (longer side at most 512 px); no crop needed: both sides are multiples of
    8." Sizes are width x height.
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
    return fitted, f"{first}; {_describe_change(resized.size, target_size, multiple)}."


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


def images_to_pixels(images: torch.Tensor) -> np.ndarray:
    """The first of a batch of images (B, 3, H, W) in [-1, 1], on any device, as (H, W, 3) uint8."""
    return np.asarray(tensor_to_image(images[0]))


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
