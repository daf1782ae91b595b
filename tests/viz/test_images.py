"""The pixel side: safe upload reading, sizing for the VAE, the tensor convention, metrics, files.

``load_image`` is tested on the corpus of awkward files in ``tests/helpers/corpus.py``: empty,
not an image, SVG, truncated, decompression bombs, 16-bit, CMYK, transparency, animation, EXIF
rotation.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers.corpus import MAX_PIXELS, ImageCase, image_cases, write_image_cases
from viz.export import embeddings_to_safetensors, latent_to_safetensors
from viz.heatmap import colorize
from viz.metrics import SSIM_MIN_SIDE, abs_error_map, error_view, psnr, ssim
from viz.pixels import fit_for_vae, image_to_tensor, tensor_to_image
from viz.upload import ImageInputError, load_image

CASES = {case.name: case for case in image_cases()}


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ImageCase]]:
    return write_image_cases(tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------------------------------------
# load_image


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused: see below
@pytest.mark.parametrize("name", list(CASES))
def test_every_upload_is_loaded_or_refused_with_a_reason(corpus: dict, name: str) -> None:
    path, case = corpus[name]
    start = time.perf_counter()
    if case.error:
        with pytest.raises(ImageInputError, match=case.error) as refused:
            load_image(path, MAX_PIXELS)
        assert repr(name) in str(refused.value)  # says which file
    else:
        image = load_image(path, MAX_PIXELS)
        assert image.mode == "RGB" and image.size == case.size
        assert case.check(np.asarray(image)), name
    assert time.perf_counter() - start < 1.0  # bombs are refused from the header, undecoded


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="upload the image again"):
        load_image(tmp_path / "gone.png", MAX_PIXELS)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_reported(corpus: dict) -> None:
    with pytest.raises(ImageInputError, match="far too large"):
        load_image(corpus["bomb-100-megapixels.png"][0], 10**9)


def test_max_pixels_is_the_callers_limit(corpus: dict) -> None:
    path = corpus["7x13.png"][0]
    assert load_image(path, 91).size == (7, 13)
    with pytest.raises(ImageInputError, match=re.escape("7x13 = 91 pixels")):
        load_image(path, 90)


# ---------------------------------------------------------------------------------------------
# fit_for_vae


@pytest.mark.parametrize("multiple", [8, 2])
@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize(
    "size", [(1024, 768), (1000, 700), (513, 257), (300, 200), (7, 13), (1, 1), (10_000, 10)]
)
def test_fit_for_vae_gives_multiples(size: tuple[int, int], mode: str, multiple: int) -> None:
    image = Image.new("RGB", size, (40, 80, 120))
    fitted, note = fit_for_vae(image, 512, multiple, mode=mode)
    width, height = fitted.size
    assert width % multiple == 0 and height % multiple == 0
    assert max(width, height) <= 512
    assert fitted.mode == "RGB" and image.size == size
    assert f"{size[0]}x{size[1]}" in note and f"multiples of {multiple}" in note


def test_fit_for_vae_describes_what_it_did() -> None:
    fitted, note = fit_for_vae(Image.new("RGB", (1024, 768)), 512, 8)
    assert fitted.size == (512, 384)
    assert note == ("Resized 1024x768 -> 512x384 (longer side at most 512 px); no crop needed: "
                    "both sides are multiples of 8.")
    cropped, note = fit_for_vae(Image.new("RGB", (1000, 700)), 512, 8)
    assert cropped.size == (512, 352) and "cropped 6 px of height" in note
    padded, note = fit_for_vae(Image.new("RGB", (1000, 700)), 512, 8, mode="pad")
    assert padded.size == (512, 360) and "padded 2 px of height" in note
    kept, note = fit_for_vae(Image.new("RGB", (300, 200)), 512, 8)
    assert kept.size == (296, 200) and note.startswith("Kept 300x200")
    assert fit_for_vae(Image.new("RGB", (301, 201)), 512, 2)[0].size == (300, 200)


def test_fit_for_vae_pads_tiny_images_with_their_edge_pixels() -> None:
    pixels = np.arange(7 * 13 * 3, dtype=np.uint8).reshape(13, 7, 3)
    fitted, note = fit_for_vae(Image.fromarray(pixels), 512, 8)
    out = np.asarray(fitted)
    assert fitted.size == (8, 8)  # width padded 7 -> 8, height cropped 13 -> 8
    assert "padded 1 px of width" in note and "cropped 5 px of height" in note
    assert np.array_equal(out[:, :7], pixels[2:10]) and np.array_equal(out[:, 7], pixels[2:10, 6])


def test_fit_for_vae_does_not_touch_its_input() -> None:
    image = _noise(100, 60)
    before = image.tobytes()
    fitted, _ = fit_for_vae(image, 64, 8)
    assert image.tobytes() == before and fitted is not image


def test_fit_for_vae_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        fit_for_vae(Image.new("RGB", (16, 16)), 512, 8, mode="stretch")
    with pytest.raises(ValueError, match="RGB"):
        fit_for_vae(Image.new("L", (16, 16)), 512, 8)


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
    # tensors of any shape, with their own range: latents, images in [-1, 1]
    x = torch.zeros(1, 4, 8, 8)
    assert psnr(x, x + 0.02, data_range=2.0) == pytest.approx(20 * math.log10(100))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:8])


def _structured(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 32 * 8])
    noisy = base.transpose(1, 2, 0) + rng.normal(0, 12, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(7, 7), (33, 71), (128, 128)])
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
    with pytest.raises(ValueError, match=f"at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE}"):
        ssim(a[:6], a[:6])


def test_error_view_draws_the_error_map() -> None:
    original = _structured(40, 60, 3)
    reconstruction = np.clip(original.astype(int) + np.random.default_rng(4).integers(
        -9, 10, original.shape), 0, 255).astype(np.uint8)
    error = abs_error_map(original, reconstruction)
    assert error.shape == (40, 60)
    assert error[5, 7] == pytest.approx(np.abs(original[5, 7].astype(int)
                                               - reconstruction[5, 7]).mean())
    picture = error_view(original, reconstruction)
    (box,) = picture.maps
    assert box.cell_height == 384 // 60  # small images are enlarged
    top = max(np.quantile(error, 0.995), 1.0)
    np.testing.assert_array_equal(box.cells(picture.pixels), colorize(error, "magma", 0.0, top))


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("channels", [4, 16])
def test_latent_to_safetensors_round_trip(tmp_path: Path, channels: int) -> None:
    latent = torch.randn(channels, 6, 10)
    before = latent.clone()
    path = latent_to_safetensors(latent, 0.18215, (80, 48), tmp_path / "latent.safetensors",
                                 shift_factor=0.0609)
    with safe_open(str(path), framework="pt") as file:
        saved = file.get_tensor("latent")
        metadata = file.metadata()
    assert torch.equal(saved, latent.unsqueeze(0)) and torch.equal(latent, before)
    assert float(metadata["scaling_factor"]) == 0.18215
    assert float(metadata["shift_factor"]) == 0.0609
    assert (metadata["source_width"], metadata["source_height"]) == ("80", "48")
    assert "raw" in metadata["note"]


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
