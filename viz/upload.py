"""Reading an uploaded image file safely into 8-bit RGB, and saying what was done to it.

An upload is whatever a stranger sends: a decompression bomb (a tiny file that declares a huge
image), a text file named ``.png``, a truncated JPEG, a DDS texture in a variant nobody decodes,
an EPS drawing, 12-bit microscope data in a 16-bit TIFF, an APNG whose still image is not part of
its animation, a phone photo stored sideways. ``load_image_with_notes`` checks the declared size
before any pixel is decoded and turns every readable file into an upright 8-bit RGB image plus
the notes a person should read (which frame was taken, how a narrow range of values was
stretched), or refuses it with a message that names the file, says in plain words what is wrong
and what to do. Pillow decides the format from the file's content, never from its name;
``accepted_file_types`` lists every extension Pillow can open, for an upload component's filter.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# What Pillow's plugins raise on a file they recognise but cannot decode. Image.open turns some
# of these into UnidentifiedImageError while it looks for a plugin; the rest escape from open,
# n_frames, seek, load or convert. MemoryError is a bomb that slipped past the header check.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, TypeError, LookupError, ArithmeticError,
                   struct.error, EOFError, NotImplementedError, MemoryError)

# Words in Pillow's messages, each telling one of the plain reasons below.
_UNSUPPORTED_WORDS = ("unsupported", "unimplemented", "not supported", "not implemented",
                      "unknown pixel format", "unknown compression", "not available",
                      "cannot handle")
_TRUNCATED_WORDS = ("truncated", "not enough", "incomplete", "premature", "no more images",
                    "missing frame", "buffer is not large enough", "end of file")

# How a file with several pictures names them: format -> (one picture, the file).
_SEQUENCES = {
    "GIF": ("frame", "an animated GIF"),
    "PNG": ("frame", "an animated PNG"),
    "WEBP": ("frame", "an animated WebP"),
    "AVIF": ("frame", "an animated AVIF"),
    "FLI": ("frame", "an FLI/FLC animation"),
    "MPO": ("image", "an MPO file (a JPEG holding several pictures, such as a stereo pair)"),
    "TIFF": ("page", "a multi-page TIFF"),
    "DCX": ("page", "a multi-page DCX fax"),
}


class ImageInputError(ValueError):
    """An upload that cannot be used as an image; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class LoadedImage:
    """An upload read into 8-bit RGB, with what a person should know about how it was read."""

    image: Image.Image  # upright, 8-bit RGB, transparency composited on white
    notes: tuple[str, ...] = ()  # one sentence each: the frame taken, a stretched value range

    @property
    def note(self) -> str:
        """The notes as one paragraph ("" when there is nothing to say)."""
        return " ".join(self.notes)


def accepted_file_types() -> list[str]:
    """The ``file_types`` for a Gradio upload component: "image" and every extension Pillow opens.

    "image" lets through whatever the browser calls an image (SVG too, so that it reaches the
    loader and gets its own message); the extensions add the files browsers do not know as
    images (.tga, .dds, .icns, .cur, .j2k, ...). The filter only helps people pick files: the
    loader reads every file by its content, whatever its name.
    """
    openable = {
        extension for extension, fmt in Image.registered_extensions().items()
        # MPO has no opener of its own: the JPEG plugin opens it (a JPEG with more pictures)
        if fmt in Image.OPEN or fmt == "MPO"
    }
    return ["image", *sorted(openable)]


def load_image(path: str | Path, max_pixels: int) -> Image.Image:
    """The upload as an upright 8-bit RGB image; ``load_image_with_notes`` without the notes.

    Prefer ``load_image_with_notes`` where the page can show them: a 12-bit scan is stretched and
    an animation gives one frame, and the notes say so.
    """
    return load_image_with_notes(path, max_pixels).image


def load_image_with_notes(path: str | Path, max_pixels: int) -> LoadedImage:
    """Read an image file into a new 8-bit RGB image, refusing anything unsafe or unreadable.

    The width x height from the file's header is checked against ``max_pixels`` before any pixel
    is decoded (``Image.open`` only reads the header), so a tiny file that declares a huge image
    (a decompression bomb) is refused at once. Then:

    - a file with several pictures gives its first: the first frame of an animation (of an APNG's
      animation, not the still image it may carry for viewers that do not animate), the first
      page of a TIFF, the first image of an MPO; a note says which was taken of how many;
    - the EXIF orientation is applied, so a phone photo stands the right way up;
    - transparency (RGBA, LA, PA, a palette or grey level marked transparent) is composited on
      white;
    - 16-bit, 32-bit integer and float grey images are scaled to 8 bits from their full range
      (0-65535, or 0-1 for floats); values that stay below half of it (12-bit data in a 16-bit
      file) or fall outside it are stretched from their min to their max, and a note says so;
    - every other mode (palette, 1-bit, grey, CMYK, YCbCr, ...) uses Pillow's conversion. Embedded
      colour profiles are ignored.

    Raises ``ImageInputError`` for an empty, missing, unreadable, truncated, damaged, unsupported
    or too large file, and for a format Pillow reads only with a program this machine lacks.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = Path(path)
    name = path.name or str(path)
    if not path.is_file():
        raise ImageInputError(f"{name!r} is not a file that can be read; upload the image again.")
    if path.stat().st_size == 0:
        raise ImageInputError(f"{name!r} is empty (0 bytes); upload the image again.")

    fmt, size = None, None  # known once the header is read; the error messages use them
    try:
        with Image.open(path) as opened:
            fmt, size = opened.format, opened.size
            _refuse_without_reader(name, path, opened)
            _check_pixel_count(name, opened.size, max_pixels)
            frame_note = _go_to_first_frame(opened)
            colour16 = ";16" in _rawmode(opened)  # 16-bit samples; Pillow keeps 8 bits of colour
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            image, depth_note = _to_rgb8(name, upright, colour16)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside Image.open, before we can read the size ourselves. Its
        # warning is an exception only where a warnings filter says so; otherwise our
        # max_pixels check above refuses the image (when max_pixels is below Pillow's limit).
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"of {int(declared.group(1)):,} pixels, " if declared else ""
        raise ImageInputError(
            f"{name!r} declares an image {pixels}far too large to decode safely (a decompression "
            f"bomb). Upload an image of at most {max_pixels:,} pixels."
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
    except _DECODER_ERRORS as exc:
        raise ImageInputError(
            _decoder_failure(name, fmt or _sniff_format(path), size, exc)
        ) from exc
    notes = tuple(note for note in (frame_note, depth_note) if note)
    return LoadedImage(image, notes)


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


def _refuse_without_reader(name: str, path: Path, image: Image.Image) -> None:
    """Refuse a format Pillow recognises but can decode only with help this machine lacks."""
    if image.format == "EPS" and not EpsImagePlugin.has_ghostscript():
        what, why = "an EPS (PostScript) file", "Pillow needs the Ghostscript program to read it"
    elif image.format == "MPEG":
        what, why = "an MPEG video", "Pillow recognises MPEG files but cannot decode them"
    # A stub plugin only reads the header; its _load hook gives the decoder registered for the
    # format: for WMF/EMF one exists on Windows only, for BUFR, GRIB and HDF5 none by default.
    elif isinstance(image, ImageFile.StubImageFile) and image._load() is None:
        if image.format == "WMF":
            with path.open("rb") as file:
                emf = file.read(44)[40:44] == b" EMF"
            what = "an EMF (Enhanced Metafile)" if emf else "a WMF (Windows Metafile)"
            what += " drawing"
            why = "Pillow can draw these only on Windows"
        else:
            what = f"a {image.format} data file"
            why = "Pillow reads it only through a plugin that is not installed here"
    else:
        return
    raise ImageInputError(f"{name!r} is {what}; {why}. Export it as PNG and upload that.")


def _go_to_first_frame(image: Image.Image) -> str | None:
    """Stand on the first picture of a file with several; a note saying which was taken."""
    frames = getattr(image, "n_frames", 1)
    if frames <= 1 or image.format == "PSD":  # a PSD's "frames" are layers of the merged image
        return None
    one, whole = _SEQUENCES.get(image.format, ("frame", f"a {image.format} file"))
    if getattr(image, "default_image", False):
        # An APNG may hold a still image (Pillow's frame 0) that is not part of its animation;
        # the animation starts at frame 1.
        image.seek(1)
        return (f"Read {one} 1 of {frames - 1} of {whole}; its separate still image, for "
                "viewers that do not animate, was skipped.")
    image.seek(0)
    return f"Read {one} 1 of {frames} of {whole}."


def _rawmode(image: Image.Image) -> str:
    """How the decoder lays out the stored samples ("RGB;16B": 16-bit big-endian RGB), or ""."""
    if not getattr(image, "tile", None):
        return ""
    args = image.tile[0].args
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def _sniff_format(path: Path) -> str | None:
    """The first format whose plugin claims the file's first bytes (its magic number), or None.

    Only for messages about files that failed inside ``Image.open``; plugins without a magic
    number to check (TGA) never claim a file here.
    """
    Image.init()
    with path.open("rb") as file:
        prefix = file.read(16)
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix) is True:
                return fmt
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open allows them
            continue
    return None


def _decoder_failure(name: str, fmt: str | None, size: tuple[int, int] | None,
                     exc: BaseException) -> str:
    """Pillow's decoder error in plain words, with what to do: never its raw text."""
    text = str(exc).lower()
    data = f"its {fmt} data" if fmt else "its data"
    if isinstance(exc, MemoryError) or "out of memory" in text:
        declared = f" (its header declares {size[0]}x{size[1]} pixels)" if size else ""
        return (f"{name!r} needs more memory to decode than this server can give{declared}. "
                "Upload a smaller image.")
    if isinstance(exc, NotImplementedError) or any(word in text for word in _UNSUPPORTED_WORDS):
        stored = f"is in {fmt} format, stored" if fmt else "is stored"
        return (f"{name!r} {stored} in a variant that Pillow cannot decode (an unsupported "
                "compression, pixel format or colour mode). Convert it to PNG with an image "
                "editor and upload that.")
    if isinstance(exc, EOFError | struct.error | IndexError) or any(
            word in text for word in _TRUNCATED_WORDS):
        return (f"{name!r} is truncated or damaged: {data} stop before the image is complete, "
                "as when a download or copy is cut short. Download or save it again and upload "
                "the new file.")
    return (f"{name!r} is damaged: {data} are corrupt and cannot be decoded. Save it again from "
            "the program that made it (as PNG, for example) and upload the new file.")


def _to_rgb8(name: str, image: Image.Image, colour16: bool) -> tuple[Image.Image, str | None]:
    """A new 8-bit RGB image from any Pillow mode, transparency composited on white; a note.

    ``colour16``: the file stored 16 bits per colour channel, of which Pillow kept the top 8.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_depth_to_rgb8(name, image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except ValueError as exc:
            raise ImageInputError(
                f"{name!r} has colour mode {image.mode}, which Pillow cannot convert to RGB; save "
                "it as an RGB PNG or JPEG and upload that."
            ) from exc
    if colour16:
        return _stretch_dark_colour(rgb)
    return rgb, None


def _stretch_dark_colour(rgb: Image.Image) -> tuple[Image.Image, str | None]:
    """16-bit colour whose values stay below 4096 of 65535 (12-bit data) keeps under 16 of the
    256 levels Pillow reads; stretch those few levels rather than show a black square."""
    values = np.asarray(rgb)
    low, high = int(values.min()), int(values.max())
    if high >= 16 or high == low:
        return rgb, None
    stretched = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
    note = (f"This file stores 16 bits per channel, but its values stay below "
            f"{(high + 1) * 256:,} of 65,535; Pillow reads the top 8 bits of each, which leaves "
            f"{high - low + 1} levels ({low}-{high} of 255). They were stretched to 0-255, so "
            "expect banding: for the full detail, stretch the levels to 8-bit colour in an "
            "image editor and upload that.")
    return Image.fromarray(stretched), note


def _high_depth_to_rgb8(name: str, image: Image.Image) -> tuple[Image.Image, str | None]:
    """Grey levels of a 16/32-bit integer or float image scaled to 8 bits (Pillow would clip).

    Values inside the mode's full range (0-65535 for integers, 0-1 for floats) that reach its
    upper half are scaled from that range, as any viewer shows them. Values that stay in its
    lower half (12-bit data in a 16-bit file: 0-4095 of 0-65535 would come out black) or fall
    outside it are stretched from their min to their max, and the note says so, since their
    brightness is then relative. NaN is shown as the lowest value, infinities at their end.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageInputError(f"{name!r} holds no numbers (every pixel is NaN or infinite); "
                              "save it with real values and upload again.")
    low, high = float(values[finite].min()), float(values[finite].max())
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    floats = image.mode == "F"
    kind = ("floating-point" if floats else "16-bit" if image.mode.startswith("I;16")
            else "32-bit integer")
    full = 1.0 if floats else 65535.0
    show = (lambda v: f"{v:.4g}") if floats else (lambda v: f"{v:,.0f}")
    inside = low >= 0 and high <= full
    notes = []
    if inside and high >= full / 2:
        scaled = values * (255.0 / full)
    elif high == low:
        level = round(low * 255.0 / full) if inside else 128
        scaled = np.full_like(values, level)
        notes.append(f"Every pixel of this {kind} image has the value {show(low)}; shown as grey "
                     f"level {level} of 255.")
    else:
        scaled = (values - low) * (255.0 / (high - low))
        if inside:
            bits = "" if floats else f" (they fit in {math.ceil(math.log2(high + 1))} bits)"
            where = f"a small part of {show(0)} to {show(full)}{bits}"
        else:
            where = f"beyond {show(0)} to {show(full)}"
        notes.append(f"The {kind} grey values run from {show(low)} to {show(high)}, {where}; "
                     f"they were stretched so that {show(low)} is black and {show(high)} white, "
                     "so the brightness is relative.")
    if not finite.all():
        notes.append(f"{np.count_nonzero(~finite):,} pixels are NaN or infinite: NaN is shown as "
                     "the lowest value, infinities at their end of the range.")
    grey = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # A single grey level marked transparent (PNG tRNS): composite those pixels on white.
        grey = np.where(np.asarray(image) == transparent, np.uint8(255), grey)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)), " ".join(notes) or None
