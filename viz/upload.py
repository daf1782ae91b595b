"""Reading an uploaded image file safely into 8-bit RGB.

An upload is whatever a stranger sends: a decompression bomb (a tiny file that declares a huge
image), a text file named ``.png``, a truncated JPEG, a 16-bit or CMYK scan, an animation, a
phone photo stored sideways. ``load_image`` checks the declared size before any pixel is decoded
and turns every readable file into an upright 8-bit RGB image, or refuses it with a message that
names the file, says what is wrong and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class ImageInputError(ValueError):
    """An upload that cannot be used as an image; the message says what is wrong and what to do."""


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
