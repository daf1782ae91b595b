"""Single-file checkpoints in the LDM layout: rename rules, parity with diffusers, bad files.

The tests write their own LDM-layout file from random diffusers/transformers weights, with models
of SD v1's exact block structure at a tiny width. That the file is right is shown by diffusers'
own single-file conversion functions, which must give the original weights back exactly.
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_parts.config import TINY_CLIP, VAEConfig
from sd_parts.single_file import (
    UNET_PREFIX,
    load_single_file,
    unet_config_for,
    unet_ldm_rules,
    vae_ldm_rules,
)
from sd_parts.unet import UNetConfig
from sd_parts.weights import RenameRule, WeightsError, rename_key, squeeze_1x1
from tests.helpers.references import reference_text_encoder, reference_unet, reference_vae

TOL = 1e-4
# SD v1's structure (four levels, two layers per level, a channel change at every level but the
# last, so the same residual blocks have shortcut convs) at a tiny width
UNET = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
            norm_num_groups=8, sample_size=8)
UNET_CONFIG = UNetConfig(num_attention_heads=2, **UNET)
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8)
CONFIGS = dict(unet_config=UNET_CONFIG, vae_config=VAEConfig(**VAE), text_encoder_config=TINY_CLIP)


# --- diffusers -> LDM: the inverse rules, test code --------------------------------------------

def apply(rules: list[tuple], key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def ldm_unet(state: dict, layers_per_block: int) -> dict:
    steps = layers_per_block + 1
    attention_levels = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.att", k)}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    part = {"resnets": 0, "attentions": 1}
    rules = [
        (r"(resnets\.\d+)\.(\w+)\.", lambda m: f"{m[1]}.{resnet[m[2]]}."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^time_embedding\.linear_([12])\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * steps}.0.op."),
        (r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * steps + int(m[3])}.{part[m[2]]}."),
        (r"^mid_block\.resnets\.([01])\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"output_blocks.{int(m[1]) * steps + steps - 1}."
                   f"{2 if int(m[1]) in attention_levels else 1}.conv."),
        (r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"output_blocks.{int(m[1]) * steps + int(m[3])}.{part[m[2]]}."),
    ]
    return {UNET_PREFIX + apply(rules, k): v for k, v in state.items()}


def ldm_vae(state: dict, levels: int) -> dict:
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}
    rules = [
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"mid.attn_1.{attention[m[1]]}."),
        (r"mid_block\.resnets\.([01])\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}."
                   f"{'block' if m[2] == 'resnets' else 'upsample'}."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, tensor in state.items():
        key = "first_stage_model." + apply(rules, key)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[key] = tensor
    return out


def ldm_text_encoder(state: dict) -> dict:
    prefix = "cond_stage_model.transformer.text_model."
    # SD v1 files also carry CLIP's position-id buffer, as int64
    return {prefix + k: v for k, v in state.items()} | {
        prefix + "embeddings.position_ids": torch.arange(77)[None]}


# what a real SD v1 file holds besides the three models: the noise schedule and EMA bookkeeping
EXTRAS = {"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000),
          "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
          "model_ema.diffusion_modelout2bias": torch.zeros(4)}


@pytest.fixture(scope="module")
def references() -> dict:
    return {"unet": reference_unet(attention_head_dim=2, **UNET), "vae": reference_vae(**VAE),
            "text_encoder": reference_text_encoder(32, 64, 2, 4)}


@pytest.fixture(scope="module")
def ldm_state(references) -> dict:
    """The three reference models as one LDM-layout state dict, in float32."""
    return (ldm_unet(references["unet"].state_dict(), UNET["layers_per_block"])
            | ldm_vae(references["vae"].state_dict(), len(VAE["block_out_channels"]))
            | ldm_text_encoder(references["text_encoder"].state_dict()) | EXTRAS)


def write(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


# --- the rule mechanism ------------------------------------------------------------------------

def test_rule_with_index_remap_and_reshape():
    """A rule's replacement may compute an index, and its reshape follows the key it matched."""
    rule = RenameRule(r"(^|\.)layers\.(\d+)\.", lambda m: f"{m[1]}blocks.{9 - int(m[2])}.",
                      reshape=squeeze_1x1)
    assert rename_key("net.layers.2.proj.weight", [rule]) == ("net.blocks.7.proj.weight",
                                                              (squeeze_1x1,))
    # whole segments only, and a key no rule matched needs no reshape
    assert rename_key("net.sublayers.2.proj.weight", [rule]) == ("net.sublayers.2.proj.weight", ())
    conv = torch.randn(6, 5, 1, 1)
    before = conv.clone()
    torch.testing.assert_close(squeeze_1x1(conv), conv[:, :, 0, 0], atol=0, rtol=0)
    assert squeeze_1x1(conv).shape == (6, 5) and torch.equal(conv, before)
    wide = torch.randn(6, 5, 3, 3)  # a real 3x3 kernel is left for the shape check to refuse
    assert squeeze_1x1(wide) is wide


def test_ldm_rules_on_sd_v1_names():
    """Index remaps and the attention reshape on names of the SD v1.5 file (4 levels, 2 layers)."""
    unet, vae = unet_ldm_rules(2), vae_ldm_rules(4)
    pairs = {
        "input_blocks.4.1.proj_in.weight": "down_blocks.1.attentions.0.proj_in.weight",
        "input_blocks.9.0.op.bias": "down_blocks.2.downsamplers.0.conv.bias",
        "output_blocks.11.0.skip_connection.weight": "up_blocks.3.resnets.2.conv_shortcut.weight",
        # up block 0 has no transformer, so its upsampler is step .1, the others' .2
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    }
    for ldm, diffusers in pairs.items():
        assert rename_key(ldm, unet) == (diffusers, ())
    assert rename_key("decoder.up.3.block.0.conv1.weight", vae) == (
        "decoder.up_blocks.0.resnets.0.conv1.weight", ())
    assert rename_key("encoder.mid.attn_1.proj_out.weight", vae) == (
        "encoder.mid_block.attentions.0.to_out.0.weight", (squeeze_1x1,))


# --- the file is right, and loads to the same outputs ------------------------------------------

@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_loads_an_ldm_file_like_diffusers(references, ldm_state, tmp_path, file_dtype):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    state = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in ldm_state.items()}
    path = write(state, tmp_path / "sd.safetensors")
    # diffusers' own conversion of the file gives every original tensor back, exactly
    on_disk = load_file(path)
    clip = convert_ldm_clip_checkpoint(on_disk)
    back = {"unet": convert_ldm_unet_checkpoint(on_disk, references["unet"].config),
            "vae": convert_ldm_vae_checkpoint(on_disk, references["vae"].config),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in clip.items()
                             if not k.endswith("position_ids")}}
    expect = {}
    for name, reference in references.items():
        original = reference.state_dict()
        assert back[name].keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(back[name][key], tensor.to(file_dtype)), key
        # the reference computes with the file's weights (rounded, for a float16 file)
        expect[name] = copy.deepcopy(reference)
        expect[name].load_state_dict({k: v.float() for k, v in back[name].items()})

    models = load_single_file(path, **CONFIGS)
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    timesteps = torch.tensor([10, 700])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 49408, (2, 77))
    with torch.inference_mode():
        torch.testing.assert_close(
            models.unet(latents, timesteps, context),
            expect["unet"](latents, timesteps, encoder_hidden_states=context).sample,
            atol=TOL, rtol=0)
        mean = expect["vae"].encode(images).latent_dist.mean
        torch.testing.assert_close(models.vae.encode(images).mean, mean, atol=TOL, rtol=0)
        torch.testing.assert_close(models.vae.decode(mean), expect["vae"].decode(mean).sample,
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(models.text_encoder(ids).last_hidden_state,
                                   expect["text_encoder"](ids).last_hidden_state,
                                   atol=TOL, rtol=0)
    assert all(not p.requires_grad and p.dtype == torch.float32
               for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())
    # the UNet's conv weights channels-last, like its activations, as load_unet leaves them
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in models.unet.modules() if isinstance(m, torch.nn.Conv2d))

    # each tensor is cast as it is read: any file dtype loads into any model dtype
    half = load_single_file(path, dtype=torch.bfloat16, **CONFIGS)
    to_q = half.vae.encoder.mid_block.attentions[0].to_q.weight
    expected_q = on_disk["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0]
    assert to_q.dtype == torch.bfloat16 and torch.equal(to_q, expected_q.to(torch.bfloat16))


def test_text_encoder_without_text_model_level(references, ldm_state, tmp_path):
    """Files from early transformers versions keep CLIP's keys without ``text_model.``."""
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."):
           v for k, v in ldm_state.items()}
    models = load_single_file(write(old, tmp_path / "old.safetensors"), **CONFIGS)
    ids = torch.randint(0, 49408, (1, 77))
    with torch.inference_mode():
        torch.testing.assert_close(models.text_encoder(ids).last_hidden_state,
                                   references["text_encoder"](ids).last_hidden_state,
                                   atol=TOL, rtol=0)


def test_inpainting_in_channels(ldm_state, tmp_path):
    """9 input channels: read from the file by default, refused where a given config differs."""
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    state = ldm_state | {key: torch.randn(16, 9, 3, 3)}
    path = write(state, tmp_path / "inpainting.safetensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert unet_config_for(path, shapes, None) == UNetConfig(in_channels=9)
    with pytest.raises(WeightsError, match=r"takes 9 input channels \(an inpainting model.*"
                                           r"unet_config\.in_channels is 4"):
        load_single_file(path, **CONFIGS)
    config = UNetConfig(in_channels=9, num_attention_heads=2, **UNET)
    models = load_single_file(path, **CONFIGS | {"unet_config": config})
    assert torch.equal(models.unet.conv_in.weight, state[key])


# --- bad files ---------------------------------------------------------------------------------

class Trap:
    """Unpickling this object creates a file: the proof that a loader unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["model.ckpt", "disguised.safetensors"])
def test_pickle_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    if name.endswith(".ckpt"):
        path.write_bytes(pickle.dumps({"state_dict": Trap(marker)}))
    else:
        torch.save({"state_dict": Trap(marker)}, path)  # a zip archive with a pickle inside
    with pytest.raises(WeightsError, match="pickled checkpoints are never loaded; use a "
                                           r"\.safetensors version"):
        load_single_file(path, **CONFIGS)
    assert not marker.exists()


def only(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


# edit of a good file -> the error it must give
BAD_FILES = {
    "sd2": (lambda s: without(s, "cond_stage_model.")
            | {"cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4)},
            r"an SD 2\.x checkpoint \(its text encoder is OpenCLIP ViT-H, under "
            r"cond_stage_model\.model\., with a 1024-wide context\)"),
    "sd2 unet": (lambda s: {k: torch.zeros(v.shape[0], 1024) if k.endswith("attn2.to_k.weight")
                            else v for k, v in s.items()},
                 r"an SD 2\.x checkpoint: its UNet reads a 1024-wide text context"),
    "sdxl": (lambda s: s | {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)},
             r"an SDXL checkpoint \(its text encoders are under conditioner\.embedders\.\)"),
    "vae only": (lambda s: only(s, "first_stage_model."),
                 r"holds only the VAE: it has no UNet \(model\.diffusion_model\.\*\) and no text "
                 r"encoder \(cond_stage_model\.transformer\.\*\)"),
    "unet only": (lambda s: only(s, UNET_PREFIX),
                  r"holds only the UNet: it has no VAE \(first_stage_model\.\*\) and no text "
                  r"encoder"),
    "ldm vae alone": (lambda s: {k.removeprefix("first_stage_model."): v
                                 for k, v in only(s, "first_stage_model.").items()},
                      r"holds a VAE alone, in the LDM layout, not a whole SD v1 checkpoint"),
    "stray tensor": (lambda s: s | {"cond_stage_model.extra": torch.zeros(1)},
                     r"tensors outside the UNet, VAE and text encoder .*: cond_stage_model\.extra"),
    "missing block": (lambda s: without(s, UNET_PREFIX + "output_blocks.5."),
                      r"\(its keys under 'model\.diffusion_model\.'\) does not match "
                      r"UNet2DConditionModel .*missing tensors: up_blocks\.1\.attentions\.2\."),
    "unexpected": (lambda s: s | {UNET_PREFIX + "input_blocks.1.0.extra.weight": torch.zeros(1)},
                   r"unexpected tensors: model\.diffusion_model\.input_blocks\.1\.0\.extra\.weight"
                   r" \(as down_blocks\.0\.resnets\.0\.extra\.weight\)"),
    "wrong shape": (lambda s: s | {"first_stage_model.decoder.up.0.block.0.conv1.weight":
                                   torch.zeros(16, 16, 3, 3)},
                    r"wrong shapes: first_stage_model\.decoder\.up\.0\.block\.0\.conv1\.weight "
                    r"\(as decoder\.up_blocks\.3\.resnets\.0\.conv1\.weight\): "
                    r"file \(16, 16, 3, 3\), model \(16, 32, 3, 3\)"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_is_refused_by_name(ldm_state, tmp_path, kind):
    edit, message = BAD_FILES[kind]
    path = write(edit(ldm_state), tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=message):
        load_single_file(path, **CONFIGS)


def test_truncated_or_absent_file(ldm_state, tmp_path):
    path = write(ldm_state, tmp_path / "sd.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_single_file(truncated, **CONFIGS)
    with pytest.raises(WeightsError, match="no such file"):
        load_single_file(tmp_path / "absent.safetensors", **CONFIGS)
