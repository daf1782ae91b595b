"""Loading checkpoints: the Hub cache layout offline, variants, configs, and every bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_parts import WeightsError, load_text_encoder, load_vae, weights
from tests.helpers.hub_cache import build_hub_cache
from tests.helpers.references import reference_text_encoder, tiny_reference_vae

VAE_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def small_read_groups(monkeypatch):
    """Every load here reads its file in many passes of a few tensors, as a full-size model is
    read, so that each test below (every bad file) also holds for a file read in passes."""
    monkeypatch.setattr(weights, "READ_GROUP_BYTES", 1024)


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_vae")
    tiny_reference_vae().save_pretrained(folder)
    return folder


def copy_with_state(src: Path, dst: Path, state: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(state, dst / VAE_FILE)
    return dst


def test_missing_tensor_is_named(tiny_vae_folder, tmp_path):
    state = load_file(tiny_vae_folder / VAE_FILE)
    del state["decoder.conv_out.bias"]
    with pytest.raises(WeightsError, match=r"missing tensors: decoder\.conv_out\.bias"):
        load_vae(str(copy_with_state(tiny_vae_folder, tmp_path, state)))


def test_extra_tensor_is_named(tiny_vae_folder, tmp_path):
    state = load_file(tiny_vae_folder / VAE_FILE) | {"decoder.extra.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=r"unexpected tensors: decoder\.extra\.weight"):
        load_vae(str(copy_with_state(tiny_vae_folder, tmp_path, state)))


def test_wrong_shape_is_named(tiny_vae_folder, tmp_path):
    state = load_file(tiny_vae_folder / VAE_FILE)
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    message = r"wrong shapes: quant_conv\.weight: file \(8, 8, 3, 3\)"
    with pytest.raises(WeightsError, match=message):
        load_vae(str(copy_with_state(tiny_vae_folder, tmp_path, state)))


def test_truncated_file_is_refused(tiny_vae_folder, tmp_path):
    copy_with_state(tiny_vae_folder, tmp_path, load_file(tiny_vae_folder / VAE_FILE))
    data = (tmp_path / VAE_FILE).read_bytes()
    (tmp_path / VAE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_vae(str(tmp_path))


def test_pickle_is_never_loaded(tiny_vae_folder, tmp_path):
    copy_with_state(tiny_vae_folder, tmp_path, load_file(tiny_vae_folder / VAE_FILE))
    torch.save(load_file(tiny_vae_folder / VAE_FILE), tmp_path / VAE_FILE)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_vae(str(tmp_path))


def test_tampered_tensor_data_is_refused(tiny_vae_folder, tmp_path):
    """A header that promises more data than the file holds must not load."""
    copy_with_state(tiny_vae_folder, tmp_path, load_file(tiny_vae_folder / VAE_FILE))
    path = tmp_path / VAE_FILE
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["decoder.conv_out.bias"]["data_offsets"][1] += 4  # claims 4 more bytes than it has
    new_header = json.dumps(header).encode().ljust(header_len)[:header_len]
    path.write_bytes(bytes(data[:8]) + new_header + bytes(data[8 + header_len :]))
    with pytest.raises(WeightsError):
        load_vae(str(tmp_path))


def count_opens(monkeypatch, before_open: Callable[[int], None] = lambda count: None) -> list:
    """The files ``sd_parts.weights`` opens from now on; ``before_open`` sees how many so far."""
    opened = []

    def counted(*args, **kwargs):
        before_open(len(opened))
        opened.append(args[0])
        return safe_open(*args, **kwargs)

    monkeypatch.setattr(weights, "safe_open", counted)
    return opened


def test_file_is_read_in_groups(tiny_vae_folder, tmp_path, monkeypatch):
    """Each group of tensors is read in a pass of its own, so that only its part of the file is
    mapped at a time; the tensors are the file's, whatever the grouping."""
    path = tmp_path / "tensors.safetensors"
    in_file = {"a": torch.arange(100.0), "b": torch.arange(300.0), "c": torch.ones(2, 3),
               "d": torch.zeros(500, dtype=torch.float16), "e": torch.arange(4)}
    save_file(in_file, path)
    opened = count_opens(monkeypatch)
    monkeypatch.setattr(weights, "READ_GROUP_BYTES", 1000)
    read = list(weights.read_tensors(path, ["a", "c", "b", "d", "e"]))
    # a group ends with the tensor that brings it to 1000 bytes: a+c+b (424 bytes, then 1624)
    # in the first pass, d (1000 bytes) alone, then e
    assert len(opened) == 3
    assert [key for key, _ in read] == ["a", "c", "b", "d", "e"]
    for key, tensor in read:
        assert tensor.dtype == in_file[key].dtype and torch.equal(tensor, in_file[key])

    # a whole model: every tensor in its own pass, loaded as the file holds it
    monkeypatch.setattr(weights, "READ_GROUP_BYTES", 1)
    opened.clear()
    vae = load_vae(str(tiny_vae_folder))
    state = load_file(tiny_vae_folder / VAE_FILE)
    assert len(opened) == 1 + len(state)  # the keys first, then one pass per tensor
    assert vae.state_dict().keys() == state.keys()
    for key, tensor in vae.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_file_changed_between_passes_is_refused(tiny_vae_folder, tmp_path, monkeypatch):
    """A later pass checks the header again: a file replaced meanwhile by one cut short is refused
    as it is at first."""
    state = load_file(tiny_vae_folder / VAE_FILE)
    folder = copy_with_state(tiny_vae_folder, tmp_path / "vae", state)
    path = folder / VAE_FILE
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def replace_before_third(count: int) -> None:  # the keys, one group, then a new file
        if count == 2:
            os.replace(cut, path)  # a new file; the one already mapped stays whole

    opened = count_opens(monkeypatch, replace_before_third)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_vae(str(folder))
    assert len(opened) == 3


def test_unsupported_config_is_refused(tiny_vae_folder, tmp_path):
    copy_with_state(tiny_vae_folder, tmp_path, load_file(tiny_vae_folder / VAE_FILE))
    config = json.loads((tmp_path / "config.json").read_text()) | {"act_fn": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="act_fn='relu'"):
        load_vae(str(tmp_path))


def test_variant_dtype_and_config_scaling_factor(tiny_vae_folder, tmp_path):
    """An fp16 variant loads into any dtype; a config's scaling_factor (SDXL: 0.13025) is used."""
    state = {k: v.half() for k, v in load_file(tiny_vae_folder / VAE_FILE).items()}
    save_file(state, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    config = json.loads((tiny_vae_folder / "config.json").read_text()) | {"scaling_factor": 0.13025}
    (tmp_path / "config.json").write_text(json.dumps(config))
    vae = load_vae(str(tmp_path), variant="fp16")
    assert vae.config.scaling_factor == 0.13025
    assert vae.decoder.conv_out.weight.dtype == torch.float32
    expected = state["decoder.conv_out.weight"].float()
    torch.testing.assert_close(vae.decoder.conv_out.weight, expected)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors"):
        load_vae(str(tmp_path))  # no fp32 file there


def test_missing_folder_says_what_was_tried(tmp_path):
    with pytest.raises(WeightsError, match="Tried:") as info:
        load_text_encoder(str(tmp_path))
    assert "text_encoder" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_hub_cache_offline(tiny_vae_folder, tmp_path):
    """Through the repo id, as the app does, with HF_HUB_OFFLINE=1 and the files in the cache."""
    te_folder = tmp_path / "te"
    reference_text_encoder(hidden_size=32, intermediate_size=64, layers=2, heads=4).save_pretrained(
        te_folder)
    cache = tmp_path / "cache"
    build_hub_cache(cache, "org/sd-like", {
        "vae/config.json": tiny_vae_folder / "config.json",
        f"vae/{VAE_FILE}": tiny_vae_folder / VAE_FILE,
        "text_encoder/config.json": te_folder / "config.json",
        "text_encoder/model.safetensors": te_folder / "model.safetensors",
    })
    script = textwrap.dedent("""
        import sd_parts
        vae = sd_parts.load_vae("org/sd-like")  # found in the vae/ subfolder
        te = sd_parts.load_text_encoder("org/sd-like", subfolder="text_encoder")
        print("loaded", vae.config.block_out_channels, te.config.hidden_size)
        try:
            sd_parts.load_vae("org/not-cached")
        except sd_parts.WeightsError as exc:
            print("ERROR", exc)
    """)
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert "loaded (16, 32) 32" in result.stdout
    assert "ERROR Could not get config.json" in result.stdout
    assert "org/not-cached/vae/config.json: not in the local cache" in result.stdout
