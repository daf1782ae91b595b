"""Image input, sizing for the VAE, pixel conversions, metrics, latent colours and export.

``load_image`` is tested on a corpus of awkward files generated here: empty, not an image, SVG,
truncated, decompression bombs, 16-bit, CMYK, transparency, animation and EXIF rotation.
"""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd_parts.images import (
    CHANNEL_STATS_HEADERS,
    LATENT_RGB_FACTORS,
    ImageInputError,
    apply_latent_rgb_map,
    channel_stats,
    embeddings_to_safetensors,
    fit_for_vae,
    fit_latent_to_rgb,
    image_to_tensor,
    latent_to_rgb,
    latent_to_safetensors,
    load_image,
    psnr,
    ssim,
    tensor_to_image,
)
from tests.corpus import bomb_png

MAX_PIXELS = 16_000_000
SCALE = 0.18215


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every awkward file once, by name."""
    folder = tmp_path_factory.mktemp("corpus")
    gradient16 = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))  # left half red, right half index 0 (transparent)
    la = np.zeros((4, 3, 2), dtype=np.uint8)
    la[:, :, 1] = [[0, 128, 255]]  # black at alpha 0, 128 and 255
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "lime", "blue")]
    pngs = _save(_noise(64, 64), "PNG")
    jpeg = _save(_noise(64, 64), "JPEG")
    files: dict[str, bytes] = {
        "empty.png": b"",
        "notes.png": b"just some text, not pixels\n" * 4,
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"></svg>',
        "xml_drawing.png": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
        "truncated.png": pngs[: len(pngs) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb_huge.png": bomb_png(50_000, 50_000),
        "bomb_large.png": bomb_png(6_000, 6_000),
        "bomb_over_pillow.png": bomb_png(10_000, 10_000),
        "one.png": _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "small.png": _save(_noise(7, 13), "PNG"),
        "strip.png": _save(_noise(10_000, 10), "PNG"),
        "gradient16.png": _save(Image.fromarray(gradient16), "PNG"),
        "gradient16b.tif": _save(
            Image.frombytes("I;16B", (256, 4), gradient16.astype(">u2").tobytes()), "TIFF"
        ),
        "gradient32.tif": _save(Image.fromarray(gradient16.astype(np.int32)), "TIFF"),
        "float.tif": _save(
            Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)), "TIFF"
        ),
        "cmyk.jpg": _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "palette.png": _save(palette, "PNG", transparency=0),
        "la.png": _save(Image.fromarray(la, "LA"), "PNG"),
        "grey_transparent.png": _save(Image.new("L", (4, 4), 0), "PNG", transparency=0),
        "rgba.png": _save(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "PNG"),
        "bits.png": _save(Image.new("1", (5, 5), 1), "PNG"),
        "animated.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rotated.jpg": _save(_noise(40, 20), "JPEG", exif=exif.tobytes()),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


# ---------------------------------------------------------------------------------------------
# load_image: files that must be refused


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("empty.png", "empty (0 bytes)"),
        ("notes.png", "not an image Pillow can read"),
        ("drawing.svg", "SVG"),
        ("xml_drawing.png", "SVG"),
        ("truncated.png", "truncated or damaged"),
        ("truncated.jpg", "truncated or damaged"),
    ],
)
def test_unreadable_files_are_refused_with_a_reason(
    corpus: dict[str, Path], name: str, words: str
) -> None:
    with pytest.raises(ImageInputError, match=re.escape(words)):
        load_image(corpus[name], MAX_PIXELS)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="upload the image again"):
        load_image(tmp_path / "gone.png", MAX_PIXELS)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("bomb_huge.png", "far too large"),  # over twice Pillow's limit: Image.open refuses it
        ("bomb_large.png", "6000x6000 = 36,000,000 pixels"),  # our check on the header size
    ],
)
def test_decompression_bombs_are_refused_from_the_header(
    corpus: dict[str, Path], name: str, words: str
) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match=words):
        load_image(corpus[name], MAX_PIXELS)
    assert time.perf_counter() - start < 1.0  # decoding 36 Mpx or more would take far longer
    assert corpus[name].stat().st_size < 2_000


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_reported(corpus: dict[str, Path]) -> None:
    with pytest.raises(ImageInputError, match="far too large"):
        load_image(corpus["bomb_over_pillow.png"], 10**9)


def test_max_pixels_is_the_callers_limit(corpus: dict[str, Path]) -> None:
    assert load_image(corpus["small.png"], 91).size == (7, 13)
    with pytest.raises(ImageInputError, match="7x13 = 91 pixels"):
        load_image(corpus["small.png"], 90)


# ---------------------------------------------------------------------------------------------
# load_image: files that must load, as 8-bit RGB


def _pixels(corpus: dict[str, Path], name: str) -> np.ndarray:
    image = load_image(corpus[name], MAX_PIXELS)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    ("name", "size"),
    [("one.png", (1, 1)), ("small.png", (7, 13)), ("strip.png", (10_000, 10))],
)
def test_tiny_and_thin_images_load(corpus: dict[str, Path], name: str, size: tuple) -> None:
    assert load_image(corpus[name], MAX_PIXELS).size == size


@pytest.mark.parametrize("name", ["gradient16.png", "gradient16b.tif", "gradient32.tif"])
def test_16_bit_images_are_scaled_not_clipped(corpus: dict[str, Path], name: str) -> None:
    row = _pixels(corpus, name)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert abs(row[128] - 128) <= 1  # Pillow's own conversion would give 255 here
    assert np.all(np.diff(row) >= 0)


def test_float_image_in_unit_range_is_scaled(corpus: dict[str, Path]) -> None:
    row = _pixels(corpus, "float.tif")[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def test_cmyk_jpeg_becomes_rgb(corpus: dict[str, Path]) -> None:
    red = _pixels(corpus, "cmyk.jpg")[8, 8]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_transparency_is_composited_on_white(corpus: dict[str, Path]) -> None:
    palette = _pixels(corpus, "palette.png")
    assert palette[0, 0].tolist() == [255, 0, 0] and palette[0, 7].tolist() == [255, 255, 255]
    la = _pixels(corpus, "la.png")[0, :, 0]  # black at alpha 0, 128, 255
    assert la[0] == 255 and abs(la[1] - 127) <= 1 and la[2] == 0
    assert np.all(_pixels(corpus, "grey_transparent.png") == 255)
    assert np.all(_pixels(corpus, "rgba.png") == 255)


def test_one_bit_image_loads(corpus: dict[str, Path]) -> None:
    assert np.all(_pixels(corpus, "bits.png") == 255)


def test_animated_gif_gives_its_first_frame(corpus: dict[str, Path]) -> None:
    assert _pixels(corpus, "animated.gif")[4, 4].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(corpus: dict[str, Path]) -> None:
    assert load_image(corpus["rotated.jpg"], MAX_PIXELS).size == (20, 40)


# ---------------------------------------------------------------------------------------------
# fit_for_vae


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize(
    "size", [(1024, 768), (1000, 700), (513, 257), (300, 200), (7, 13), (1, 1), (10_000, 10)]
)
def test_fit_for_vae_gives_multiples_of_8(size: tuple[int, int], mode: str) -> None:
    image = Image.new("RGB", size, (40, 80, 120))
    fitted, note = fit_for_vae(image, max_side=512, mode=mode)
    width, height = fitted.size
    assert width % 8 == 0 and height % 8 == 0
    assert max(width, height) <= 512
    assert fitted.mode == "RGB" and image.size == size
    assert f"{size[0]}x{size[1]}" in note and f"{width // 8}x{height // 8}" in note


def test_fit_for_vae_describes_what_it_did() -> None:
    fitted, note = fit_for_vae(Image.new("RGB", (1024, 768)), max_side=512)
    assert fitted.size == (512, 384)
    assert note.startswith("Resized 1024x768 -> 512x384")
    assert "no crop needed" in note and "64x48" in note
    cropped, note = fit_for_vae(Image.new("RGB", (1000, 700)), max_side=512)
    assert cropped.size == (512, 352) and "cropped 6 px of height" in note
    padded, note = fit_for_vae(Image.new("RGB", (1000, 700)), max_side=512, mode="pad")
    assert padded.size == (512, 360) and "padded 2 px of height" in note
    kept, note = fit_for_vae(Image.new("RGB", (300, 200)), max_side=512)
    assert kept.size == (296, 200) and note.startswith("Kept 300x200")


def test_fit_for_vae_pads_tiny_images_with_their_edge_pixels() -> None:
    pixels = np.arange(7 * 13 * 3, dtype=np.uint8).reshape(13, 7, 3)
    fitted, note = fit_for_vae(Image.fromarray(pixels), max_side=512)
    out = np.asarray(fitted)
    assert fitted.size == (8, 8)  # width padded 7 -> 8, height cropped 13 -> 8
    assert "padded 1 px of width" in note and "cropped 5 px of height" in note
    assert np.array_equal(out[:, :7], pixels[2:10]) and np.array_equal(out[:, 7], pixels[2:10, 6])


def test_fit_for_vae_does_not_touch_its_input() -> None:
    image = _noise(100, 60)
    before = image.tobytes()
    fitted, _ = fit_for_vae(image, max_side=64)
    assert image.tobytes() == before and fitted is not image


def test_fit_for_vae_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        fit_for_vae(Image.new("RGB", (16, 16)), 512, mode="stretch")
    with pytest.raises(ValueError, match="RGB"):
        fit_for_vae(Image.new("L", (16, 16)), 512)


# ---------------------------------------------------------------------------------------------
# Pixel convention


def test_image_tensor_round_trip_is_exact() -> None:
    image = _noise(24, 16)
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 16, 24) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), np.asarray(image))
    assert np.array_equal(np.asarray(tensor_to_image(tensor[0])), np.asarray(image))


def test_tensor_to_image_clamps_and_rounds() -> None:
    tensor = torch.tensor([3.0, -5.0, 0.0, float("nan")]).view(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(tensor_to_image(tensor))[0, :, 0].tolist() == [255, 0, 128, 128]
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_image(torch.zeros(4, 8, 8))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_psnr_known_answers() -> None:
    a = np.asarray(_noise(32, 16)).copy()
    a[a == 255] = 254
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255))
    assert psnr(a, a.astype(int) + 0) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:8])


def _structured(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 32 * 8])
    noisy = base.transpose(1, 2, 0) + rng.normal(0, 12, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(7, 7), (16, 16), (33, 71), (64, 48), (128, 128)])
def test_ssim_matches_scikit_image(size: tuple[int, int]) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    height, width = size
    noise_a, noise_b = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in "ab")
    pairs = [(noise_a, noise_b), (_structured(height, width, 1), _structured(height, width, 2))]
    for a, b in pairs:
        expected = metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)
        assert ssim(a, b) == pytest.approx(expected, abs=1e-6)  # required: 1e-3
    grey_a, grey_b = pairs[1][0][:, :, 0], pairs[1][1][:, :, 0]
    expected = metrics.structural_similarity(grey_a, grey_b, data_range=255)
    assert ssim(grey_a, grey_b) == pytest.approx(expected, abs=1e-6)


def test_ssim_of_identical_images_is_one_and_tiny_images_are_refused() -> None:
    a = _structured(20, 30, 0)
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(a[:6], a[:6])


# ---------------------------------------------------------------------------------------------
# Latent colours and numbers


def test_latent_to_rgb_uses_the_published_matrix() -> None:
    latent = torch.randn(1, 4, 16, 24)
    rgb = latent_to_rgb(latent, SCALE)
    assert rgb.shape == (16, 24, 3) and rgb.dtype == np.uint8
    assert np.all(latent_to_rgb(torch.zeros(4, 2, 2), SCALE) == 128)  # 0 -> the middle grey
    pixel = latent[0, :, 3, 5].double().numpy() * SCALE @ np.array(LATENT_RGB_FACTORS)
    expected = np.rint((np.clip(pixel, -1, 1) + 1) * 127.5)
    assert rgb[3, 5].tolist() == expected.tolist()


def test_fit_latent_to_rgb_recovers_a_known_linear_map() -> None:
    rng = np.random.default_rng(0)
    height, width = 12, 20
    truth = rng.normal(0, 0.5, (5, 3))
    truth[:3] += np.eye(3)  # keep the first three rows invertible
    # Choose pixels first, then solve for latent channels 0-2 that map onto them exactly.
    pixels = rng.integers(0, 256, (height * width, 3)).astype(np.float64)
    channel3 = rng.normal(0, 1, height * width)
    target = pixels / 127.5 - 1
    rest = target - np.outer(channel3, truth[3]) - truth[4]
    first3 = rest @ np.linalg.inv(truth[:3])
    scaled = np.concatenate([first3, channel3[:, None]], axis=1).T.reshape(4, height, width)
    latent = torch.from_numpy(scaled / SCALE)
    small = Image.fromarray(pixels.reshape(height, width, 3).astype(np.uint8))
    image = small.resize((width * 8, height * 8), Image.Resampling.NEAREST)
    matrix = fit_latent_to_rgb(latent, image, SCALE)
    assert matrix.shape == (5, 3)
    np.testing.assert_allclose(matrix, truth, atol=1e-6)
    drawn = apply_latent_rgb_map(latent, SCALE, matrix).astype(int)
    assert np.abs(drawn - pixels.reshape(height, width, 3)).max() <= 1


def test_fit_latent_to_rgb_is_fast_and_checks_the_aspect_ratio() -> None:
    latent = torch.randn(4, 128, 128)
    image = _noise(1024, 1024)
    start = time.perf_counter()
    fit_latent_to_rgb(latent, image, SCALE)
    latent_to_rgb(latent, SCALE)
    assert time.perf_counter() - start < 0.5  # about 40 ms on a busy 2-core machine
    with pytest.raises(ValueError, match="aspect"):
        fit_latent_to_rgb(latent, _noise(1024, 512), SCALE)


def test_apply_latent_rgb_map_accepts_weights_with_or_without_bias() -> None:
    latent = torch.randn(4, 6, 6)
    weights = np.array(LATENT_RGB_FACTORS)
    with_zero_bias = np.vstack([weights, np.zeros(3)])
    same = apply_latent_rgb_map(latent, SCALE, with_zero_bias)
    assert np.array_equal(same, latent_to_rgb(latent, SCALE))
    with pytest.raises(ValueError, match="shape"):
        apply_latent_rgb_map(latent, SCALE, np.zeros((3, 3)))


def test_channel_stats_rows() -> None:
    latent = torch.randn(4, 8, 8) * 5 + torch.arange(4.0).view(4, 1, 1)
    rows = channel_stats(latent, SCALE)
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "all"]
    assert all(len(row) == len(CHANNEL_STATS_HEADERS) for row in rows)
    channel2 = latent[2].double()
    assert rows[2][1] == pytest.approx(channel2.mean().item(), abs=1e-4)
    assert rows[2][2] == pytest.approx(channel2.std(unbiased=False).item(), abs=1e-4)
    assert rows[4][3] == pytest.approx(latent.min().item(), abs=1e-4)
    assert rows[4][6] == pytest.approx(rows[4][2] * SCALE, abs=1e-3)


def test_latent_functions_reject_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, h, w\)"):
        latent_to_rgb(torch.zeros(3, 8, 8), SCALE)


# ---------------------------------------------------------------------------------------------
# Export


def test_latent_to_safetensors_round_trip(tmp_path: Path) -> None:
    latent = torch.randn(4, 6, 10)
    before = latent.clone()
    path = latent_to_safetensors(latent, SCALE, (80, 48), tmp_path / "latent.safetensors")
    with safe_open(str(path), framework="pt") as file:
        saved = file.get_tensor("latent")
        metadata = file.metadata()
    assert torch.equal(saved, latent.unsqueeze(0)) and torch.equal(latent, before)
    assert float(metadata["scaling_factor"]) == SCALE
    assert (metadata["source_width"], metadata["source_height"]) == ("80", "48")
    assert "unscaled" in metadata["note"]


def test_embeddings_to_safetensors_round_trip(tmp_path: Path) -> None:
    hidden = torch.randn(77, 32)
    ids = torch.arange(77)
    prompt = "a café at night, $5 «neon»"
    path = embeddings_to_safetensors(hidden, ids, tmp_path / "emb.safetensors", prompt=prompt)
    with safe_open(str(path), framework="pt") as file:
        assert torch.equal(file.get_tensor("last_hidden_state"), hidden.unsqueeze(0))
        assert torch.equal(file.get_tensor("input_ids"), ids.unsqueeze(0))
        assert file.metadata()["prompt"] == prompt
    with pytest.raises(ValueError, match="expected hidden"):
        embeddings_to_safetensors(hidden, ids[:10], tmp_path / "bad.safetensors")
