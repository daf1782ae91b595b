"""The tiny autoencoder (TAESD family): parity with diffusers' AutoencoderTiny through its own
save_pretrained files, strict loading, the configs it refuses, and bfloat16."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_parts import (
    TAESD,
    TAESD3,
    TINY_TAESD,
    TINY_TAESD_16,
    TINY_VAE,
    AutoencoderKL,
    AutoencoderTiny,
    TinyVAEConfig,
    WeightsError,
    load_tiny_vae,
)

TOL = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"


def reference_tiny_vae(config: TinyVAEConfig):
    """diffusers' AutoencoderTiny with the same fields as ``config``, seeded."""
    from diffusers import AutoencoderTiny as DiffusersAutoencoderTiny

    torch.manual_seed(0)
    return DiffusersAutoencoderTiny(**dataclasses.asdict(config)).eval()


@pytest.fixture(scope="module", params=[TAESD, TAESD3], ids=["taesd", "taesd3-16ch"])
def saved_full(request, tmp_path_factory) -> tuple[object, Path]:
    reference = reference_tiny_vae(request.param)
    folder = tmp_path_factory.mktemp("taesd")
    reference.save_pretrained(folder)
    return reference, folder


def test_matches_diffusers(saved_full):
    reference, folder = saved_full
    vae = load_tiny_vae(str(folder))
    assert vae.config.latent_channels == reference.config.latent_channels
    count = sum(p.numel() for p in vae.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 48) * 2 - 1  # not square
    # latents up to about 3x the unit scale, so the decoder's tanh clamp is exercised
    latents = torch.randn(2, vae.config.latent_channels, 8, 6) * 3
    with torch.inference_mode():
        encoded = vae.encode(images)
        torch.testing.assert_close(encoded, reference.encode(images).latents, atol=TOL, rtol=0)
        decoded = vae.decode(latents)
        torch.testing.assert_close(decoded, reference.decode(latents).sample, atol=TOL, rtol=0)
    assert encoded.shape == (2, vae.config.latent_channels, 8, 6)
    assert decoded.shape == (2, 3, 64, 48)


def test_bfloat16_runs_and_stays_close(saved_full):
    _, folder = saved_full
    exact = load_tiny_vae(str(folder))
    fast = load_tiny_vae(str(folder), dtype=torch.bfloat16)
    assert next(fast.parameters()).dtype == torch.bfloat16
    torch.manual_seed(2)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = torch.randn(1, exact.config.latent_channels, 8, 8) * 2
    with torch.inference_mode():
        for run in ("encode", "decode"):
            x = images if run == "encode" else latents
            want, got = getattr(exact, run)(x), getattr(fast, run)(x)
            assert got.dtype == torch.float32  # the caller's dtype
            # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, some dozens of them
            error = (got - want).abs().max() / want.abs().max()
            assert error < 0.05, f"{run}: relative error {error:.3f}"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> tuple[object, Path]:
    reference = reference_tiny_vae(TINY_TAESD)
    folder = tmp_path_factory.mktemp("tiny-taesd")
    reference.save_pretrained(folder)
    return reference, folder


def rewritten(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the saved model whose tensors went through ``change(state)``."""
    state = load_file(folder / WEIGHTS)
    change(state)
    out = tmp_path / "changed"
    out.mkdir()
    save_file(state, out / WEIGHTS)
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("decoder.layers.2.conv.4.bias"),
     "missing tensors: decoder.layers.2.conv.4.bias"),
    (lambda s: s.update({"encoder.layers.9.weight": torch.zeros(1)}),
     "unexpected tensors: encoder.layers.9.weight"),
    (lambda s: s.update({"encoder.layers.0.weight": torch.zeros(16, 3, 5, 5)}),
     "wrong shapes: encoder.layers.0.weight: file (16, 3, 5, 5), model (16, 3, 3, 3)"),
], ids=["missing", "extra", "reshaped"])
def test_loading_is_strict(saved_tiny, tmp_path, change, named):
    _, folder = saved_tiny
    with pytest.raises(WeightsError) as caught:
        load_tiny_vae(str(rewritten(folder, tmp_path, change)))
    assert named in str(caught.value)


def test_pipeline_layout_loads_from_vae_folder(saved_tiny, tmp_path):
    """A pipeline repo keeps its autoencoder in ``vae/``: found without naming the subfolder."""
    reference, folder = saved_tiny
    (tmp_path / "vae").mkdir()
    for name in ("config.json", WEIGHTS):
        (tmp_path / "vae" / name).write_bytes((folder / name).read_bytes())
    vae = load_tiny_vae(str(tmp_path))
    assert vae.config == TINY_TAESD
    latents = torch.randn(1, 4, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(vae.decode(latents), reference.decode(latents).sample,
                                   atol=TOL, rtol=0)


@pytest.mark.parametrize("change, named", [
    ({"act_fn": "silu"}, "act_fn='silu'"),
    ({"upsample_fn": "bilinear"}, "upsample_fn='bilinear'"),
    ({"scaling_factor": 0.13025}, "scaling_factor=0.13025"),
    ({"_class_name": "AutoencoderKL"}, "is for AutoencoderKL"),
    ({"encoder_block_out_channels": [32, 64]}, "same width"),
    ({"num_decoder_blocks": [1, 1, 1]}, "one value per level"),
])
def test_configs_it_does_not_build_are_refused(saved_tiny, tmp_path, change, named):
    _, folder = saved_tiny
    config = json.loads((folder / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes())
    with pytest.raises(WeightsError, match="config.json") as caught:
        load_tiny_vae(str(tmp_path))
    assert named in str(caught.value)


@pytest.mark.parametrize("config", [TINY_TAESD, TINY_TAESD_16], ids=["4ch", "16ch"])
def test_tiny_configs_match_the_tiny_vae(config):
    """The app's tiny mode pairs TINY_TAESD with TINY_VAE: same downscale, same latent shape."""
    torch.manual_seed(0)
    vae = AutoencoderTiny(config).eval()
    assert vae.downscale == AutoencoderKL(TINY_VAE).downscale == 2
    images = torch.rand(1, 3, 24, 40) * 2 - 1
    before = images.clone()
    with torch.inference_mode():
        latents = vae.encode(images)
        assert latents.shape == (1, config.latent_channels, 12, 20)
        assert vae.decode(latents).shape == images.shape
    assert torch.equal(images, before)


@pytest.mark.parametrize("run, shape", [
    ("encode", (1, 3, 15, 16)),  # not a multiple of the downscale
    ("encode", (3, 16, 16)),  # no batch
    ("decode", (1, 16, 8, 8)),  # 16 channels to a 4-channel model
])
def test_bad_shapes_are_refused(run, shape):
    vae = AutoencoderTiny(TINY_TAESD)
    with pytest.raises(ValueError, match=r"must have shape \(batch"):
        getattr(vae, run)(torch.zeros(shape))
