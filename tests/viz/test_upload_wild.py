"""Uploads from the wild: the files other projects' test corpora hold (Pillow's Tests/images is the
model), written here on the spot with Pillow, or by hand as bytes where Pillow cannot write them.

Each test is one promise of ``viz.upload``: every decoder error becomes a message that names the
file, a format that needs a missing program says so, Pillow's jargon is put in plain words, files
are read by content and the upload filter lists everything Pillow opens, high bit depths are
not shown as a black square, and an animation says which frame it gave.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from tests.helpers.corpus import SOLID, encode, near
from viz.upload import (
    ImageInputError,
    LoadedImage,
    accepted_file_types,
    load_image,
    load_image_with_notes,
)

MAX_PIXELS = 2_000_000  # an ICNS icon opens at its largest size, 1024x1024
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour), each row behind filter 0."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    stride = len(rows) // height
    data = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def _noise(width: int = 24, height: int = 16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _frames(*colours: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (16, 12), colour) for colour in colours]


def _pillow_error(path: Path) -> BaseException | None:
    """What Pillow alone raises reading the file as the loader does: open, count the frames,
    go to the first animation frame, load, convert."""
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1 and getattr(image, "default_image", False):
                image.seek(1)
            image.load()
            image.convert("RGB")
    except Exception as exc:  # the point is to see which kind
        return exc
    return None


# ---------------------------------------------------------------------------------------------
# 1. Every kind of decoder error, at open, while counting frames, seeking, loading: a message


def _cut_gif(offset_in_second_frame: int) -> bytes:
    """A two-frame GIF cut inside its second frame's image descriptor (10 bytes from ',')."""
    data = encode(_frames(RED)[0], "GIF", save_all=True, append_images=_frames(BLUE))
    descriptor = b",\x00\x00\x00\x00"
    second = data.index(descriptor, data.index(descriptor) + 1)
    return data[:second + offset_in_second_frame]


def _png_with_a_broken_chunk() -> bytes:
    """A PNG whose image data continue into a chunk with an impossible type."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(range(48)) for _ in range(16)))
    header = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows[:len(rows) // 2])
            + b"\x00\x00\x00\x10\xff\xe4\x22\x79" + bytes(20) + _chunk(b"IEND", b""))


def _tiff_without_its_second_page() -> bytes:
    """A two-page TIFF that ends where its second page's directory should begin."""
    data = encode(_frames(RED)[0], "TIFF", save_all=True, append_images=_frames(BLUE))
    first = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first:first + 2])[0]
    next_at = first + 2 + 12 * entries
    return data[:struct.unpack("<I", data[next_at:next_at + 4])[0]]


def _apng_without_its_frames() -> bytes:
    """An APNG whose first animation frame has its control chunk (fcTL) but no image data."""
    data = encode(_frames(YELLOW)[0], "PNG", save_all=True, default_image=True,
                  append_images=_frames(RED, BLUE))
    control = data.index(b"fcTL", data.index(b"IDAT")) - 4  # the chunk's length field
    return data[:control + 4 + 4 + 26 + 4] + _chunk(b"IEND", b"")


def _dds(fourcc: bytes) -> bytes:
    """A DXT1 DDS texture whose pixel format FourCC (at byte 84 of the header) is replaced."""
    data = bytearray(encode(_noise(16, 16), "DDS", pixel_format="DXT1"))
    assert data[84:88] == b"DXT1"
    data[84:88] = fourcc
    return bytes(data)


def _emf(frame: tuple[int, int, int, int] = (0, 0, 2000, 1000)) -> bytes:
    """An EMF header: record type 1, bounds in pixels, frame in 0.01 mm, the " EMF" signature."""
    bounds = struct.pack("<4i", 0, 0, 80, 40)
    return struct.pack("<II", 1, 108) + bounds + struct.pack("<4i", *frame) + b" EMF" + bytes(64)


ERROR_FILES: dict[str, tuple[type[BaseException], Callable[[], bytes]]] = {
    # name: (what Pillow raises, the file)
    "truncated.png": (OSError, lambda: encode(_noise(), "PNG")[:200]),
    "broken-chunk.png": (SyntaxError, _png_with_a_broken_chunk),
    "truncated.dds": (ValueError, lambda: encode(_noise(16, 16), "DDS")[:400]),
    "second-page-missing.tif": (TypeError, _tiff_without_its_second_page),
    "cut-in-descriptor.gif": (struct.error, lambda: _cut_gif(4)),
    "cut-after-descriptor.gif": (IndexError, lambda: _cut_gif(10)),
    "frames-missing.png": (EOFError, _apng_without_its_frames),
    "zero-frame.emf": (ZeroDivisionError, lambda: _emf(frame=(0, 0, 0, 0))),
    "unknown-fourcc.dds": (NotImplementedError, lambda: _dds(b"XYZW")),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, on the cut TIFF
@pytest.mark.parametrize("name", list(ERROR_FILES))
def test_every_decoder_error_becomes_a_message(tmp_path: Path, name: str) -> None:
    raised, make = ERROR_FILES[name]
    path = _write(tmp_path, name, make())
    assert isinstance(_pillow_error(path), raised)  # the file does trigger that kind of error
    with pytest.raises(ImageInputError) as refused:
        load_image_with_notes(path, MAX_PIXELS)
    message = str(refused.value)
    assert message.startswith(repr(name))
    assert re.search(r"upload (the new file|that)\.$", message), message  # says what to do


def test_a_bomb_that_runs_out_of_memory_becomes_a_message(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # No small file makes the allocator fail on demand; the decoder is made to fail as it would.
    def out_of_memory(self: ImageFile.ImageFile) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    path = _write(tmp_path, "huge.png", encode(Image.new("RGB", (900, 700)), "PNG"))
    with pytest.raises(ImageInputError, match=r"^'huge.png' needs more memory .* declares "
                                              r"900x700 pixels\)\. Upload a smaller image\.$"):
        load_image_with_notes(path, MAX_PIXELS)


# ---------------------------------------------------------------------------------------------
# 2. A format Pillow reads only with a program this machine lacks says so


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 80 40\n%%EndComments\n"
            b"newpath 0 0 moveto 80 40 lineto stroke\nshowpage\n%%EOF\n")


def _placeable_wmf() -> bytes:
    """A placeable WMF header: key, handle, bounds, 1440 units per inch, reserved, checksum, then
    the standard header (type 1, 9 words)."""
    header = struct.pack("<IH4hHIH", 0x9AC6CDD7, 0, 0, 0, 1440, 720, 1440, 0, 0)
    return header + struct.pack("<HHH", 1, 9, 0x300) + bytes(16)


@pytest.mark.parametrize("name, data, fmt, expected", [
    ("figure.eps", _eps(), "EPS",
     r"is an EPS \(PostScript\) file; Pillow needs the Ghostscript program to read it"),
    ("figure.wmf", _placeable_wmf(), "WMF",
     r"is a WMF \(Windows Metafile\) drawing; Pillow can draw these only on Windows"),
    ("figure.emf", _emf(), "WMF",
     r"is an EMF \(Enhanced Metafile\) drawing; Pillow can draw these only on Windows"),
    ("weather.bufr", b"BUFR" + bytes(60), "BUFR",
     r"is a BUFR data file; Pillow reads it only through a plugin that is not installed"),
    ("clip.mpg", b"\x00\x00\x01\xb3\x02\x00\x18\x13" + bytes(8), "MPEG",
     r"is an MPEG video; Pillow recognises MPEG files but cannot decode them"),
])
def test_a_format_needing_a_missing_program_says_so(tmp_path: Path, name: str, data: bytes,
                                                    fmt: str, expected: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if fmt == "WMF" and hasattr(Image.core, "drawwmf"):
        pytest.skip("Windows draws WMF/EMF")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", False)  # as on a machine without Ghostscript
    path = _write(tmp_path, name, data)
    with Image.open(path) as opened:
        assert opened.format == fmt  # Pillow recognises the header
    with pytest.raises(ImageInputError) as refused:
        load_image(path, MAX_PIXELS)
    message = str(refused.value)
    assert re.search(f"^'{re.escape(name)}' {expected}", message), message
    assert message.endswith(". Export it as PNG and upload that.")
    assert "truncated" not in message and "damaged" not in message


# ---------------------------------------------------------------------------------------------
# 3. Pillow's jargon is put in plain words


def _lzw_tiff_with_zeroed_data() -> bytes:
    data = bytearray(encode(_noise(64, 48), "TIFF", compression="tiff_lzw"))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    return bytes(data)


def _png_with_zeroed_data() -> bytes:
    data = bytearray(encode(_noise(), "PNG"))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    return bytes(data)


@pytest.mark.parametrize("name, make, raw, plain", [
    ("cut.jpg", lambda: encode(_noise(64, 48), "JPEG")[:1200], r"bytes not processed",
     r"is truncated or damaged: its JPEG data stop before the image is complete"),
    ("lzw.tif", _lzw_tiff_with_zeroed_data, r"decoder error -2",
     r"is damaged: its TIFF data are corrupt and cannot be decoded"),
    ("zeroed.png", _png_with_zeroed_data, r"broken data stream when reading image file",
     r"is damaged: its PNG data are corrupt"),
    ("texture.dds", lambda: _dds(b"XYZW"), r"Unimplemented pixel format",
     r"is in DDS format, stored in a variant that Pillow cannot decode \(an unsupported "
     r"compression"),
])
def test_pillow_jargon_is_put_in_plain_words(tmp_path: Path, name: str,
                                             make: Callable[[], bytes], raw: str,
                                             plain: str) -> None:
    path = _write(tmp_path, name, make())
    pillow_said = str(_pillow_error(path))
    assert re.search(raw, pillow_said), pillow_said
    with pytest.raises(ImageInputError) as refused:
        load_image(path, MAX_PIXELS)
    message = str(refused.value)
    assert re.search(f"^'{re.escape(name)}' {plain}", message), message
    assert pillow_said not in message and not re.search(raw, message)
    assert not re.search(r"\.\.|\.\)|decoder error|when reading image file|errno", message)


# ---------------------------------------------------------------------------------------------
# 4. Files are read by content; the upload filter accepts every extension Pillow opens


def _cur() -> bytes:
    """A Windows cursor: an ICO with BMP entries and image type 2 in its header."""
    data = bytearray(encode(Image.new("RGB", (32, 32), SOLID), "ICO", bitmap_format="bmp",
                            sizes=[(32, 32)]))
    data[2] = 2
    return bytes(data)


WILD_FORMATS: dict[str, tuple[str, Callable[[], bytes], tuple[int, int]]] = {
    # extension: (Pillow's format, the file, size as loaded)
    ".tga": ("TGA", lambda: encode(Image.new("RGB", (20, 10), SOLID), "TGA",
                                   compression="tga_rle"), (20, 10)),
    ".dds": ("DDS", lambda: encode(Image.new("RGB", (16, 8), SOLID), "DDS"), (16, 8)),
    ".icns": ("ICNS", lambda: encode(Image.new("RGB", (16, 16), SOLID), "ICNS",
                                     sizes=[(16, 16)]), None),
    ".cur": ("CUR", _cur, (32, 32)),
    ".j2k": ("JPEG2000", lambda: encode(Image.new("RGB", (20, 12), SOLID), "JPEG2000",
                                        no_jp2=True), (20, 12)),
}


def test_upload_filter_lists_what_pillow_opens_and_reading_goes_by_content(
        tmp_path: Path) -> None:
    from gradio_client.utils import is_valid_file  # the check gr.File runs on every upload

    types = accepted_file_types()
    assert types[0] == "image" and all(kind.startswith(".") for kind in types[1:])
    registered = Image.registered_extensions()
    assert all(registered[kind] in Image.OPEN or registered[kind] == "MPO" for kind in types[1:])
    assert ".pdf" not in types  # Pillow writes PDF but cannot read it
    assert {".png", ".jpg", ".webp", ".eps", ".wmf", ".mpo"} <= set(types)
    for extension, (fmt, make, size) in WILD_FORMATS.items():
        assert extension in types and is_valid_file(f"upload{extension}", types)
        data = make()
        # the right name, a wrong one, none: Pillow reads the content the same way
        for name in (f"file{extension}", "file.png" if fmt != "PNG" else "file.jpg", "file"):
            path = _write(tmp_path, name, data)
            with Image.open(path) as opened:
                assert opened.format == fmt
            image = load_image(path, MAX_PIXELS)
            assert image.mode == "RGB" and (size is None or image.size == size), (name, fmt)
            assert near(np.asarray(image), SOLID, tolerance=3), (name, fmt)
    png = _write(tmp_path, "really-a-png.tga", encode(Image.new("RGB", (5, 4), SOLID), "PNG"))
    assert near(np.asarray(load_image(png, MAX_PIXELS)), SOLID, tolerance=0)


# ---------------------------------------------------------------------------------------------
# 5. High bit depths: a narrow range is stretched and said so, not shown as a black square


def _ramp16(low: int = 291, high: int = 694) -> np.ndarray:
    """Three rows of a 64-step left-to-right ramp of 16-bit values from low to high."""
    return np.linspace(low, high, 64).round().astype(np.uint16)[None].repeat(3, 0)


def _ramp(low: float, high: float, dtype: type, last: float | None = None) -> np.ndarray:
    """Three rows of a 64-step ramp from low to high; ``last`` is appended as its final value."""
    row = np.linspace(low, high, 64) if last is None else np.append(np.linspace(low, high, 63),
                                                                     last)
    return row.astype(dtype)[None].repeat(3, 0)


def _saved(array: np.ndarray, fmt: str) -> bytes:
    return encode(Image.fromarray(array), fmt)


def _big_endian_tiff() -> bytes:
    data = _ramp16(100, 4000).astype(">u2").tobytes()
    return encode(Image.frombytes("I;16B", (64, 3), data), "TIFF")


def _12_bit_colour_png() -> bytes:
    return _png(64, 3, 16, 2, np.repeat(_ramp16(), 3, axis=1).astype(">u2").tobytes())


DEPTH_FILES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    # name: (the file, words the note must contain; None: nothing to say)
    "12-bit-in-16.png": (lambda: _saved(_ramp16(), "PNG"),
                         r"^The 16-bit grey values run from 291 to 694, a small part of 0 to "
                         r"65,535 \(they fit in 10 bits\); they were stretched so that 291 is "
                         r"black and 694 white"),
    "12-bit-in-16.tif": (lambda: _saved(_ramp16(), "TIFF"),
                         r"run from 291 to 694, a small part of 0 to 65,535"),
    "16-bit-big-endian.tif": (_big_endian_tiff,
                              r"run from 100 to 4,000, a small part of 0 to 65,535 \(they fit "
                              r"in 12 bits\)"),
    "full-16-bit.png": (lambda: _saved(_ramp16(0, 65535), "PNG"), None),
    "int32-beyond.tif": (lambda: _saved(_ramp(-5000, 70000, np.int32), "TIFF"),
                         r"^The 32-bit integer grey values run from -5,000 to 70,000, beyond 0 "
                         r"to 65,535; they were stretched so that -5,000 is black"),
    "dim-float.tif": (lambda: _saved(_ramp(0.07, 0.17, np.float32), "TIFF"),
                      r"^The floating-point grey values run from 0.07 to 0.17, a small part of "
                      r"0 to 1;"),
    "float-with-nan.tif": (lambda: _saved(_ramp(-2, 3, np.float32, last=np.nan), "TIFF"),
                           r"run from -2 to 3, beyond 0 to 1; .* 3 pixels are NaN or infinite"),
    "12-bit-colour.png": (_12_bit_colour_png,
                          r"^This file stores 16 bits per channel, but its values stay "
                          r"below 768 of 65,535; .* 2 levels \(1-2 of 255\)"),
}


@pytest.mark.parametrize("name", list(DEPTH_FILES))
def test_high_bit_depth_is_stretched_and_said_so(tmp_path: Path, name: str) -> None:
    make, note = DEPTH_FILES[name]
    loaded = load_image_with_notes(_write(tmp_path, name, make()), MAX_PIXELS)
    pixels = np.asarray(loaded.image)
    assert loaded.image.mode == "RGB" and loaded.image.size == (64, 3)
    row = pixels[0, :, 0].astype(int)
    assert row[0] == 0 and row.max() == 255 and np.all(np.diff(row[:63]) >= 0)  # not black
    if note is None:
        assert loaded.notes == () and loaded.note == ""
    else:
        assert len(loaded.notes) == 1 and re.search(note, loaded.note), loaded.note
    if name == "12-bit-in-16.png":  # stretched linearly from min to max
        expected = (_ramp16()[0].astype(float) - 291) * 255 / (694 - 291)
        assert np.abs(row - expected).max() <= 0.5 + 1e-9


# ---------------------------------------------------------------------------------------------
# 6. An animation gives its first animation frame, and says which frame of how many


ANIMATIONS: dict[str, tuple[Callable[[], bytes], tuple[int, int, int], str]] = {
    # name: (the file, the colour of the first animation frame, the note)
    "still-differs.png": (lambda: encode(_frames(YELLOW)[0], "PNG", save_all=True,
                                         default_image=True, append_images=_frames(RED, GREEN,
                                                                                   BLUE)),
                          RED, r"^Read frame 1 of 3 of an animated PNG; its separate still image"),
    "animated.png": (lambda: encode(_frames(RED)[0], "PNG", save_all=True,
                                    append_images=_frames(GREEN, BLUE)),
                     RED, r"^Read frame 1 of 3 of an animated PNG\.$"),
    "animated.gif": (lambda: encode(_frames(RED)[0], "GIF", save_all=True,
                                    append_images=_frames(*[GREEN, BLUE] * 5 + [GREEN])),
                     RED, r"^Read frame 1 of 12 of an animated GIF\.$"),
    "animated.webp": (lambda: encode(_frames(RED)[0], "WEBP", save_all=True, lossless=True,
                                     append_images=_frames(GREEN, BLUE)),
                      RED, r"^Read frame 1 of 3 of an animated WebP\.$"),
    "stereo.mpo": (lambda: encode(_frames(RED)[0], "MPO", save_all=True, quality=95,
                                  append_images=_frames(BLUE)),
                   RED, r"^Read image 1 of 2 of an MPO file \(a JPEG holding several pictures"),
    "pages.tif": (lambda: encode(_frames(RED)[0], "TIFF", save_all=True,
                                 append_images=_frames(GREEN, BLUE)),
                  RED, r"^Read page 1 of 3 of a multi-page TIFF\.$"),
}


@pytest.mark.parametrize("name", list(ANIMATIONS))
def test_animation_gives_its_first_frame_and_says_which(tmp_path: Path, name: str) -> None:
    make, colour, note = ANIMATIONS[name]
    path = _write(tmp_path, name, make())
    loaded = load_image_with_notes(path, MAX_PIXELS)
    assert isinstance(loaded, LoadedImage) and loaded.image.size == (16, 12)
    assert near(np.asarray(loaded.image), colour, tolerance=4), np.asarray(loaded.image)[0, 0]
    assert len(loaded.notes) == 1 and re.search(note, loaded.note), loaded.note
    if name == "still-differs.png":  # what a viewer that does not animate shows is yellow
        with Image.open(path) as still:
            assert still.convert("RGB").getpixel((0, 0)) == YELLOW
    still = _write(tmp_path, "still.png", encode(_frames(RED)[0], "PNG"))
    assert load_image_with_notes(still, MAX_PIXELS).notes == ()
