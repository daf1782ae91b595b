"""Bad input, generated on the spot: the files and prompts a stranger might send the app.

Each image case says what a person should get back: either the size of the image the encoder
sees (the upload was usable) or words the error message must contain (it was refused, and says
why). Everything is made with Pillow in a few milliseconds; nothing is downloaded or stored.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOLID = (200, 100, 50)  # an orange that survives JPEG and CMYK round trips within a few levels


@dataclass(frozen=True)
class ImageCase:
    name: str  # the file name, as uploaded
    data: bytes
    size: tuple[int, int] | None = None  # width x height the encoder sees, when usable
    error: str | None = None  # a regex the message must match, when refused


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


def image_cases() -> list[ImageCase]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    png, jpeg = encode(noise, "PNG"), encode(noise, "JPEG", quality=90)

    palette = Image.new("P", (40, 30), 0)  # index 0 is transparent red, index 1 opaque green
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 20))
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the stored pixels rotated 90°
    grey16 = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))

    return [
        ImageCase("empty.png", b"", error=r"empty \(0 bytes\)"),
        ImageCase("notes.png", b"this is a text file with an image's name\n",
                  error=r"not an image .*PNG, JPEG"),
        ImageCase("truncated.png", png[: len(png) // 2], error="truncated or damaged"),
        ImageCase("truncated.jpg", jpeg[: len(jpeg) // 2], error="truncated or damaged"),
        ImageCase("drawing.svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
                  b'width="64" height="64"><rect width="64" height="64" fill="red"/></svg>',
                  error="SVG.*Export it as PNG"),
        # Pillow's own guard refuses the first (over 2 x its 89-megapixel limit) as it opens the
        # file; the second passes Pillow and must be stopped by the app's 40-megapixel limit.
        ImageCase("bomb.png", bomb_png(), error=r"far too large.* at most 40,000,000 pixels"),
        ImageCase("bomb-48-megapixels.png", bomb_png(8000, 6000),
                  error=r"8000x6000 = 48,000,000 pixels, more than the 40,000,000 allowed"),
        ImageCase("1x1.png", encode(Image.new("RGB", (1, 1), SOLID), "PNG"), size=(8, 8)),
        ImageCase("7x13.png", encode(Image.new("RGB", (7, 13), SOLID), "PNG"), size=(8, 8)),
        ImageCase("10000x10.png", encode(Image.new("RGB", (10_000, 10), SOLID), "PNG"),
                  size=(256, 8)),
        ImageCase("16-bit.png", encode(grey16, "PNG"), size=(64, 48)),
        ImageCase("cmyk.jpg", encode(Image.new("RGB", (64, 48), SOLID).convert("CMYK"), "JPEG",
                                     quality=95), size=(64, 48)),
        ImageCase("palette-transparent.png", encode(palette, "PNG", transparency=0),
                  size=(40, 24)),
        ImageCase("animated.gif", encode(frames[0], "GIF", save_all=True,
                                         append_images=frames[1:], duration=100, loop=0),
                  size=(32, 24)),
        ImageCase("exif-rotated.jpg", encode(Image.new("RGB", (64, 32), SOLID), "JPEG",
                                             exif=exif.tobytes()), size=(32, 64)),
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
