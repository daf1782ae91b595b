"""SD v1's successors' VAEs (SDXL, SD3, FLUX): parity with diffusers on full-size random weights
written by its own ``save_pretrained``, the configs read from those files, the optional quant
convs, and the message for a gated repo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import hf_raise_for_status

import sd_parts
from sd_parts import FLUX_VAE, SD3_VAE, SDXL_VAE, TINY_VAE, VAEConfig, WeightsError, load_vae
from sd_parts import weights as weights_module
from tests.helpers.references import diffusers_vae

TOL = 1e-4
FAMILY = {"sdxl": SDXL_VAE, "sd3": SD3_VAE, "flux": FLUX_VAE}


@pytest.mark.parametrize("name", list(FAMILY))
def test_matches_diffusers(name, tmp_path):
    named = FAMILY[name]
    reference = diffusers_vae(named)
    reference.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    vae = load_vae(str(tmp_path))

    # every field comes from the file diffusers wrote (SDXL's has "shift_factor": null)
    assert vae.config == named
    assert saved["shift_factor"] == (named.shift_factor or None)
    quant = {k for k in vae.state_dict() if "quant_conv" in k}
    assert bool(quant) == named.use_quant_conv
    assert quant == {k for k in reference.state_dict() if "quant_conv" in k}

    torch.manual_seed(1)
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        expected = reference.encode(images).latent_dist
        posterior = vae.encode(images)
        assert posterior.mean.shape == (1, named.latent_channels, 4, 6)
        torch.testing.assert_close(posterior.mean, expected.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(posterior.std, expected.std, atol=TOL, rtol=0)
        decoded = vae.decode(posterior.mean)
        torch.testing.assert_close(decoded, reference.decode(expected.mean).sample, atol=TOL,
                                   rtol=0)


def tiny_folder(folder: Path, config: VAEConfig, edit_config: dict | None = None) -> Path:
    """A tiny VAE written by diffusers, its config.json then changed by ``edit_config``."""
    diffusers_vae(config).save_pretrained(folder)
    if edit_config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit_config}))
    return folder


@pytest.mark.parametrize("flag", ["use_quant_conv", "use_post_quant_conv"])
def test_quant_conv_in_file_but_not_in_config_is_refused(flag, tmp_path):
    folder = tiny_folder(tmp_path, TINY_VAE, {flag: False})
    name = flag.removeprefix("use_")
    with pytest.raises(WeightsError, match=rf"unexpected tensors: {name}\.bias, {name}\.weight"):
        load_vae(str(folder))


def test_quant_conv_in_config_but_not_in_file_is_refused(tmp_path):
    no_quant = dataclasses.replace(TINY_VAE, use_quant_conv=False, use_post_quant_conv=False)
    folder = tiny_folder(tmp_path, no_quant, {"use_quant_conv": True})
    with pytest.raises(WeightsError, match=r"missing tensors: quant_conv\.bias, quant_conv\.wei"):
        load_vae(str(folder))


def test_config_keys():
    hub_sd3 = {  # stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305,
        "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False, "use_quant_conv": False,
    }
    assert VAEConfig.from_dict(hub_sd3) == SD3_VAE
    assert VAEConfig.from_dict({"shift_factor": None}).shift_factor == 0.0
    with pytest.raises(ValueError, match=r"latents_mean=\[0\.1, 0\.2"):
        VAEConfig.from_dict({**hub_sd3, "latents_mean": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(ValueError, match="mid_block_add_attention=False"):
        VAEConfig.from_dict({"mid_block_add_attention": False})


def test_tiny_16_channel_config():
    vae = sd_parts.AutoencoderKL(sd_parts.TINY_VAE_16).eval()
    assert not any("quant_conv" in k for k in vae.state_dict())
    with torch.inference_mode():
        latent = vae.encode(torch.zeros(1, 3, 16, 16)).mean
        assert latent.shape == (1, 16, 8, 8)
        assert vae.decode(latent).shape == (1, 3, 16, 16)
    assert (sd_parts.TINY_VAE_16.scaling_factor, sd_parts.TINY_VAE_16.shift_factor) == (0.5, 0.1)


GATED_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"


def gated_error(repo: str, filename: str) -> Exception:
    """The GatedRepoError that huggingface_hub raises for a 403 from the Hub on a gated repo."""
    import httpx2

    url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
    response = httpx2.Response(403, headers={"X-Error-Code": "GatedRepo"},
                               request=httpx2.Request("HEAD", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001 - the type is checked by the caller
        return exc
    raise AssertionError("hf_raise_for_status accepted a 403")


def test_gated_repo_message(monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    calls = []

    def download(repo_id: str, filename: str, subfolder: str | None = None, **kwargs) -> str:
        calls.append((repo_id, subfolder, filename))
        raise gated_error(repo_id, f"{subfolder}/{filename}" if subfolder else filename)

    assert isinstance(gated_error(GATED_REPO, "x"), GatedRepoError)
    monkeypatch.setattr(weights_module, "hf_hub_download", download)
    with pytest.raises(WeightsError) as info:
        load_vae(GATED_REPO)
    message = str(info.value)
    assert "gated" in message
    assert f"https://huggingface.co/{GATED_REPO}" in message
    for how in ("hf auth login", "huggingface-cli login", "HF_TOKEN", "licence"):
        assert how in message
    assert calls == [(GATED_REPO, None, "config.json")]  # no other folder is tried
