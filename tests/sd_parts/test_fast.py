"""Fast mode and tiles: 16-bit results against float32, the float32 fallback, and tile blending."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd_parts import TINY_VAE, AutoencoderKL, fast_dtype, load_vae, runtime
from sd_parts.runtime import cpu_has_native_bfloat16
from sd_parts.vae import blend_tiles, tile_spans
from viz.metrics import psnr
from viz.pixels import image_to_tensor

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# bfloat16 keeps 8 significant bits; measured on the full-size VAE with random weights the
# difference to float32 is 45-50 dB, and 8-bit rounding of an image is about 59 dB
FAST_MODE_MIN_PSNR_DB = 40.0


def load_image(name: str, size: int) -> torch.Tensor:
    """An asset as a (1, 3, size, size) tensor in [-1, 1]."""
    image = Image.open(ASSETS / name).convert("RGB").resize((size, size), Image.BICUBIC)
    return image_to_tensor(image)


def test_fast_dtype_follows_the_hardware():
    faster = runtime.bfloat16_is_faster_on_cpu()
    assert fast_dtype("cpu") == (torch.bfloat16 if faster else torch.float32)
    assert not faster or cpu_has_native_bfloat16()
    assert fast_dtype("meta") == torch.float32


@pytest.mark.parametrize(("float32_s", "bfloat16_s", "expected"), [
    (0.020, 0.010, torch.bfloat16),  # twice as fast (AMD EPYC's convolutions)
    (0.011, 0.019, torch.float32),  # slower (an Intel Xeon with AVX-512 BF16, no AMX)
    (0.010, 0.0095, torch.float32),  # within the margin: not worth 8 bits of mantissa
])
def test_fast_mode_is_bfloat16_only_where_it_is_faster(monkeypatch, float32_s, bfloat16_s,
                                                       expected):
    timed = {torch.float32: float32_s, torch.bfloat16: bfloat16_s}
    monkeypatch.setattr(runtime, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(runtime, "layer_seconds", lambda dtype: timed[dtype])
    runtime.bfloat16_is_faster_on_cpu.cache_clear()
    try:
        assert fast_dtype("cpu") == expected
    finally:
        runtime.bfloat16_is_faster_on_cpu.cache_clear()


def test_layer_timing_runs_both_dtypes():
    assert 0 < runtime.layer_seconds(torch.float32, rounds=1) < 10
    assert 0 < runtime.layer_seconds(torch.bfloat16, rounds=1) < 10


def test_fast_mode_is_close_to_exact_mode(sd_vae_folder):
    _, folder = sd_vae_folder
    exact = load_vae(str(folder))
    fast = load_vae(str(folder), dtype=torch.bfloat16)
    images = load_image("astronaut.png", 64)
    latents = exact.encode(images).mean
    fast_latents = fast.encode(images).mean
    assert fast_latents.dtype == torch.float32  # the caller's dtype, whatever the model's
    peak = (latents.max() - latents.min()).item()
    assert psnr(fast_latents, latents, peak) > FAST_MODE_MIN_PSNR_DB
    decoded = fast.decode(latents)
    assert decoded.dtype == torch.float32 and decoded.is_contiguous()
    expected = exact.decode(latents)
    assert psnr(decoded.clamp(-1, 1), expected.clamp(-1, 1), 2.0) > FAST_MODE_MIN_PSNR_DB


def test_half_precision_overflow_falls_back_to_float32():
    """float16 overflows above 65504; the guard must notice and repeat the call in float32."""
    torch.manual_seed(0)
    exact = AutoencoderKL(TINY_VAE).eval()
    with torch.no_grad():  # weights that fit float16 but whose products do not
        exact.encoder.conv_in.weight.mul_(6e4 / exact.encoder.conv_in.weight.abs().max())
    half = AutoencoderKL(TINY_VAE).eval().half()
    half.load_state_dict(exact.state_dict())
    exact.load_state_dict(half.state_dict())  # both now hold the same float16-rounded weights
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.warns(RuntimeWarning, match="repeated in float32"):
        latents = half.encode(images).mean
    assert all(p.dtype == torch.float16 for p in half.parameters())  # back in fast mode
    torch.testing.assert_close(latents, exact.encode(images).mean)
    with warnings.catch_warnings():  # a call that does not overflow stays in float16, silently
        warnings.simplefilter("error")
        half.decode(torch.zeros(1, 4, 8, 8))


def smooth_image(size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(3 * x + y), torch.cos(2 * y - x), x * y]).unsqueeze(0)


def test_one_tile_is_exactly_untiled():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    # the tiny VAE halves the size once: 192 pixels are 96 latents, exactly one default tile
    images = smooth_image(192)
    posterior = vae.encode(images)
    assert torch.equal(vae.encode(images, tiled=True).mean, posterior.mean)
    assert torch.equal(vae.decode(posterior.mean, tiled=True), vae.decode(posterior.mean))


def overlaps(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each tile overlaps the next one."""
    return [(start, end) for (_, end), (start, _) in zip(spans, spans[1:], strict=False)]


@pytest.mark.parametrize(
    "length, tile, overlap", [(37, 8, 2), (37, 16, 8), (37, 10, 7), (256, 96, 16)]
)
def test_tiles_cover_with_the_overlap_asked_for(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert len({end - start for start, end in spans}) == 1 and spans[0][1] - spans[0][0] <= tile
    assert all(end - start >= overlap for start, end in overlaps(spans))


@pytest.mark.parametrize("tile, overlap", [(8, 2), (16, 8), (10, 7)])
def test_blending_is_seamless_for_a_local_network(tile, overlap):
    """Where the network's output at a pixel depends only on the input there, the tiled result must
    be the untiled one: the blending weights cover every pixel and add up to 1."""
    latents = torch.randn(2, 4, 37, 53)
    upsample = lambda z: F.interpolate(z, scale_factor=8, mode="nearest") * 2 + 1  # noqa: E731
    tiled = blend_tiles(upsample, latents, tile, overlap, in_scale=1, out_scale=8)
    torch.testing.assert_close(tiled, upsample(latents))
    images = torch.randn(1, 3, 64, 96)
    pool = lambda x: F.avg_pool2d(x, 8)  # noqa: E731
    tiled = blend_tiles(pool, images, tile // 2, overlap // 2, in_scale=8, out_scale=1)
    torch.testing.assert_close(tiled, pool(images))


def row_steps(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute change from each row to the next: a seam shows up as a spike."""
    return (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def test_tiled_vae_has_no_seams():
    """Tiles see only themselves, so neighbours disagree; across the overlaps the blended image
    must change little faster than the untiled one does there. Measured steps in excess of the
    untiled image's, over its median step: 2.7 here; 7-18 when cutting at the middle of each
    overlap; 23 with a linear ramp across the whole overlap, which lets the tile borders in."""
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    vae.tile_size, vae.tile_overlap = 40, 16  # 3 x 3 tiles of a 96 x 96 latent
    images = smooth_image(192)
    latents = vae.encode(images).mean
    tiled, untiled = vae.decode(latents, tiled=True), vae.decode(latents)
    typical = row_steps(untiled).median()
    for start, end in overlaps(tile_spans(96, 40, 16)):
        for dims in ((2, 3), (3, 2)):  # rows, then columns
            excess = row_steps(tiled.permute(0, 1, *dims)) - row_steps(untiled.permute(0, 1, *dims))
            assert excess[2 * start:2 * end].max() < 4 * typical
    # each tile's own GroupNorm statistics and borders change the result a little everywhere
    assert (tiled - untiled).abs().mean() < 0.5 * untiled.std()
    assert (vae.encode(images, tiled=True).mean - latents).abs().mean() < 0.5 * latents.std()
