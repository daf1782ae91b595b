"""The VAE: parity with diffusers on full-size random weights, and behaviour on a tiny config."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_parts import TINY_VAE, AutoencoderKL, load_vae
from tests.helpers.references import tiny_reference_vae

TOL = 1e-4


@pytest.mark.parametrize("size", [(48, 80), (40, 24)])  # not square, not powers of 2
def test_matches_diffusers(sd_vae_folder, size):
    reference, folder = sd_vae_folder
    vae = load_vae(str(folder))
    torch.manual_seed(1)
    images = torch.rand(2, 3, *size) * 2 - 1
    with torch.inference_mode():
        expected = reference.encode(images).latent_dist
        posterior = vae.encode(images)
        torch.testing.assert_close(posterior.mean, expected.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(posterior.logvar, expected.logvar, atol=TOL, rtol=0)
        torch.testing.assert_close(posterior.std, expected.std, atol=TOL, rtol=0)
        decoded = vae.decode(posterior.mean)
        expected_images = reference.decode(expected.mean).sample
        torch.testing.assert_close(decoded, expected_images, atol=TOL, rtol=0)
    assert decoded.shape == images.shape


def test_old_attention_names_load(tmp_path):
    """SD v1.5's own VAE file names the mid-block attention query/key/value/proj_attn."""
    reference = tiny_reference_vae()
    folder = tmp_path / "written"
    reference.save_pretrained(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    old = {}
    for key, tensor in state.items():
        for new_name, old_name in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                                   ("to_out.0", "proj_attn")]:
            key = key.replace(f".{new_name}.", f".{old_name}.")
        old[key] = tensor
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file(old, renamed / "diffusion_pytorch_model.safetensors")
    (renamed / "config.json").write_text((folder / "config.json").read_text())
    vae = load_vae(str(renamed))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(vae.encode(images).mean,
                                   reference.encode(images).latent_dist.mean, atol=TOL, rtol=0)


def test_config_and_scaling_factor(sd_vae_folder):
    _, folder = sd_vae_folder
    vae = load_vae(str(folder))
    assert vae.config.scaling_factor == 0.18215
    assert vae.config.block_out_channels == (128, 256, 512, 512)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


def test_tiny_shapes_and_no_in_place_change(tiny_vae):
    images = torch.rand(1, 3, 24, 40) * 2 - 1
    before = images.clone()
    with torch.inference_mode():
        posterior = tiny_vae.encode(images)
        assert posterior.mean.shape == (1, 4, 12, 20)  # two levels: one downsample
        assert tiny_vae.decode(posterior.mean).shape == images.shape
    assert torch.equal(images, before)


def test_seeded_sampling_is_reproducible(tiny_vae):
    with torch.inference_mode():
        posterior = tiny_vae.encode(torch.zeros(1, 3, 16, 16))
        a = posterior.sample(torch.Generator().manual_seed(7))
        b = posterior.sample(torch.Generator().manual_seed(7))
        c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # z = mean + std * eps: the noise that was added is exactly standard normal draws
    eps = (a - posterior.mean) / posterior.std
    expected = torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(eps, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 4, 16, 16), (1, 3, 13, 16)])
def test_bad_image_shapes_are_refused(tiny_vae, shape):
    with pytest.raises(ValueError, match="multiples of"):
        tiny_vae.encode(torch.zeros(shape))
