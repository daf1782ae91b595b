"""Bad input, generated on the spot: the files and prompts a stranger might send the app.

One corpus serves the unit tests of ``viz.upload.load_image`` and the tests against the running
server. Each image case says what a person should get back: the size of the image as loaded
(the upload was usable, and ``check`` says what a person would see by eye) or words the error
message must contain (it was refused, and says why). Everything is made with Pillow in a few
milliseconds; nothing is downloaded or stored.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOLID = (200, 100, 50)  # an orange that survives JPEG and CMYK round trips within a few levels
MAX_PIXELS = 40_000_000  # the app's limit (ui.tabs.encoding.MAX_PIXELS)


@dataclass(frozen=True)
class ImageCase:
    name: str  # the file name, as uploaded
    data: bytes
    size: tuple[int, int] | None = None  # width x height as loaded, when usable
    error: str | None = None  # a regex the message must match, when refused
    check: Callable[[np.ndarray], bool] | None = None  # on the loaded (H, W, 3) pixels


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header declares width x height pixels but holds only a few rows of data.

    Decoded, it would take width x height x 3 bytes (7.5 GB for the default); on disk it is a few
    kilobytes.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool(np.abs(pixels.astype(int) - colour).max() <= tolerance)


def ramp(pixels: np.ndarray) -> bool:
    """A left-to-right 0-255 ramp came through whole: not clipped, not flattened."""
    row = pixels[0, :, 0].astype(int)
    return row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1 and bool(
        np.all(np.diff(row) >= 0))


def white(pixels: np.ndarray) -> bool:
    return bool((pixels == 255).all())


def palette_on_white(pixels: np.ndarray) -> bool:
    """The transparent red background became white; the opaque green block stayed green."""
    return pixels[0, 0].tolist() == [255, 255, 255] and pixels[15, 20].tolist() == [0, 255, 0]


def black_at_three_alphas(pixels: np.ndarray) -> bool:
    """Black at alpha 0, 128 and 255 over white: white, mid grey, black."""
    grey = pixels[0, :, 0].astype(int)
    return grey[0] == 255 and abs(grey[1] - 127) <= 1 and grey[2] == 0


def image_cases() -> list[ImageCase]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    png, jpeg = encode(noise, "PNG"), encode(noise, "JPEG", quality=90)
    gradient16 = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)
    palette = Image.new("P", (40, 30), 0)  # index 0 is transparent red, index 1 opaque green
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 20))
    alpha = np.zeros((4, 3, 2), dtype=np.uint8)
    alpha[:, :, 1] = [[0, 128, 255]]  # black at alpha 0, 128 and 255
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the stored pixels rotated 90°
    svg = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" '
           b'height="64"><rect width="64" height="64" fill="red"/></svg>')
    solid = lambda size: encode(Image.new("RGB", size, SOLID), "PNG")  # noqa: E731

    return [
        ImageCase("empty.png", b"", error=r"empty \(0 bytes\)"),
        ImageCase("notes.png", b"this is a text file with an image's name\n",
                  error=r"not an image Pillow can read.*PNG, JPEG"),
        ImageCase("truncated.png", png[: len(png) // 2], error="truncated or damaged"),
        ImageCase("truncated.jpg", jpeg[: len(jpeg) // 2], error="truncated or damaged"),
        ImageCase("drawing.svg", svg, error="SVG.*Export it as PNG"),
        ImageCase("drawing-named.png", svg, error="SVG.*Export it as PNG"),
        # Pillow's own guard refuses the first (over 2 x its 89-megapixel limit) as it opens the
        # file; the others pass Pillow and are stopped by the app's 40-megapixel limit.
        ImageCase("bomb.png", bomb_png(), error=r"far too large.* at most 40,000,000 pixels"),
        ImageCase("bomb-48-megapixels.png", bomb_png(8000, 6000),
                  error=r"8000x6000 = 48,000,000 pixels, more than the 40,000,000 allowed"),
        ImageCase("bomb-100-megapixels.png", bomb_png(10_000, 10_000),
                  error=r"10000x10000 = 100,000,000 pixels"),
        ImageCase("1x1.png", solid((1, 1)), (1, 1), check=lambda p: near(p, SOLID)),
        ImageCase("7x13.png", solid((7, 13)), (7, 13), check=lambda p: near(p, SOLID)),
        ImageCase("10000x10.png", solid((10_000, 10)), (10_000, 10),
                  check=lambda p: near(p, SOLID)),
        ImageCase("16-bit.png", encode(Image.fromarray(gradient16), "PNG"), (256, 4), check=ramp),
        ImageCase("16-bit-big-endian.tif", encode(Image.frombytes(
            "I;16B", (256, 4), gradient16.astype(">u2").tobytes()), "TIFF"), (256, 4), check=ramp),
        ImageCase("32-bit.tif", encode(Image.fromarray(gradient16.astype(np.int32)), "TIFF"),
                  (256, 4), check=ramp),
        ImageCase("float.tif", encode(Image.fromarray(
            np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)), "TIFF"), (256, 4),
            check=ramp),
        ImageCase("cmyk.jpg", encode(Image.new("RGB", (64, 48), SOLID).convert("CMYK"), "JPEG",
                                     quality=95), (64, 48), check=lambda p: near(p, SOLID)),
        # transparency is composited on white
        ImageCase("palette-transparent.png", encode(palette, "PNG", transparency=0), (40, 30),
                  check=palette_on_white),
        ImageCase("grey-alpha.png", encode(Image.fromarray(alpha, "LA"), "PNG"), (3, 4),
                  check=black_at_three_alphas),
        ImageCase("grey-transparent.png", encode(Image.new("L", (4, 4), 0), "PNG",
                                                 transparency=0), (4, 4), check=white),
        ImageCase("rgba-transparent.png", encode(Image.new("RGBA", (4, 4), (0, 0, 255, 0)),
                                                 "PNG"), (4, 4), check=white),
        ImageCase("1-bit.png", encode(Image.new("1", (5, 5), 1), "PNG"), (5, 5), check=white),
        ImageCase("animated.gif", encode(frames[0], "GIF", save_all=True,
                                         append_images=frames[1:], duration=100, loop=0),
                  (32, 24), check=lambda p: near(p, (255, 0, 0), 0)),  # the first frame
        ImageCase("exif-rotated.jpg", encode(Image.new("RGB", (64, 32), SOLID), "JPEG",
                                             exif=exif.tobytes()), (32, 64),
                  check=lambda p: near(p, SOLID)),
    ]


def write_image_cases(folder: Path) -> dict[str, tuple[Path, ImageCase]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for case in image_cases():
        path = folder / case.name
        path.write_bytes(case.data)
        written[case.name] = (path, case)
    return written


SCRIPT = "<script>alert(1)</script>"
IMG_ONERROR = "<img src=x onerror=alert(1)>"

PROMPTS = {  # id -> prompt
    "empty": "",
    "whitespace": " \t\n  \u3000 ",
    "5000-words": " ".join(f"word{i % 97}" for i in range(5000)),
    "emoji": "an astronaut 👩‍🚀 riding a horse 🐎 on the moon 🌕",
    "cjk": "一只猫坐在木桌上 猫が木のテーブルに座っている 나무 탁자 위의 고양이",
    "right-to-left": "قطة تجلس على طاولة خشبية חתול יושב על שולחן",
    "control-characters": "a cat\x00 on\x07 a \x1b[31mred\x1b[0m mat\x7f\u200b\ufeff\u202e",
    "script": SCRIPT,
    "img-onerror": IMG_ONERROR,
}
