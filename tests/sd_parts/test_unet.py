"""The noise predictor (UNet): parity with diffusers on full-size random weights (its output and
what the probe records), cross-attention probabilities, SD 2.x layouts, loading, and behaviour
on a tiny config."""

from __future__ import annotations

import pytest
import torch

from sd_parts import UNetProbe
from sd_parts.runtime import IM2COL_MAX_POSITIONS, ONEDNN_MIN_ROWS, conv3x3, linear
from sd_parts.unet import TINY_UNET, UNet2DConditionModel, UNetConfig, guidance_embedding
from sd_parts.weights import load_unet
from tests.helpers.references import TINY_UNET_OVERRIDES, reference_unet
from tests.helpers.unet_reference import (
    TOL,
    assert_close_to,
    assert_probe_matches,
    diffusers_run,
    inputs,
)


@pytest.fixture(scope="module")
def tiny_reference():
    return reference_unet(**TINY_UNET_OVERRIDES)


@pytest.fixture(scope="module")
def tiny_unet(tiny_reference) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(TINY_UNET).eval()
    unet.load_state_dict(tiny_reference.state_dict(), strict=True)
    return unet


@pytest.fixture(scope="module")
def full_size(sd_unet_folder) -> tuple[object, UNet2DConditionModel]:
    """diffusers' SD v1.5 UNet with random weights and ours loaded from its folder: built once
    here for both full-size parity tests (whichever test worker runs this module)."""
    reference, folder = sd_unet_folder
    return reference, load_unet(str(folder))


def test_matches_diffusers(full_size):
    reference, unet = full_size
    assert unet.config == UNetConfig()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert len(unet.state_dict()) == 686
    # a square latent with one int timestep; a non-square one with a float timestep per sample,
    # through the explicit cross-attention path, whose probabilities are collected. Between them
    # they take both paths of sd_parts.runtime at batch 2: Linears over at least 256 rows as 1x1
    # convolutions (12x12 and up) and not (8x12, 6x6 and below, the text's 77 tokens), 3x3
    # convolutions over at most 128 outputs as one matrix product (6x6, 4x6 and below) and
    # through oneDNN (12x12, 8x12 and up)
    sizes: list[tuple[int, int]] = []

    def collect(probs: torch.Tensor, size: tuple[int, int]) -> None:
        assert probs.shape == (2, 8, size[0] * size[1], 77) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        sizes.append(size)

    cases = [((24, 24), 981, None), ((16, 24), torch.tensor([0.5, 640.25]), collect)]
    for (h, w), timestep, hook in cases:
        latents, context = inputs(2, h, w, 768)
        with torch.no_grad():
            expected = reference(latents, timestep, context).sample
        eps = unet(latents, timestep, context, on_cross_attention=hook)
        assert eps.shape == latents.shape and eps.dtype == latents.dtype
        assert_close_to(eps, expected)
    # 16 cross-attention layers in forward order: 6 down, 1 in the middle, 9 up
    assert sizes == [(16, 24)] * 2 + [(8, 12)] * 2 + [(4, 6)] * 2 + [(2, 3)] \
        + [(4, 6)] * 3 + [(8, 12)] * 3 + [(16, 24)] * 3


def test_full_size_probe_matches_diffusers(full_size):
    """SD v1.5's UNet at a 16 x 16 latent, its coarsest level 2 x 2: the probe records what
    hooks on diffusers' same-named modules see (tiny configurations: test_unet_probe.py)."""
    reference, unet = full_size
    paths = ["conv_in", "time_proj", "time_embedding", "down_blocks.0", "down_blocks.1",
             "down_blocks.2", "down_blocks.3", "down_blocks.1.resnets.0",
             "down_blocks.1.attentions.0", "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
             "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3",
             "up_blocks.2.attentions.1.proj_in", "conv_out"]
    queries = [(0, 0), (13, 6)]
    latents, context = inputs(1, 16, 16, 768)
    expected = diffusers_run(reference, paths, latents, 700, context, queries)
    probe = UNetProbe(keep=paths, queries=queries, cross_attention=True)
    eps = unet(latents, 700, context, probe=probe)
    assert_close_to(eps, expected["eps"])
    assert_probe_matches(probe, expected, paths)
    assert len(probe.skips) == 12 and len(probe.cross_attention) == 16
    assert probe.self_attention["mid_block.attentions.0.transformer_blocks.0.attn1"].shape \
        == (1, 8, 2, 2 * 2)
    assert probe.cross_attention["up_blocks.3.attentions.2.transformer_blocks.0.attn2"].shape \
        == (1, 8, 16 * 16, 77)


class ProbsRecorder:
    """diffusers' own explicit-softmax attention processor, keeping the probabilities it makes."""

    def __init__(self, store: list[torch.Tensor]):
        from diffusers.models.attention_processor import AttnProcessor

        class Recording(AttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
                scores = attn.get_attention_scores

                def keep(*args, **kw):
                    probs = scores(*args, **kw)  # (B * heads, N, T)
                    store.append(probs.view(-1, attn.heads, *probs.shape[1:]))
                    return probs

                attn.get_attention_scores = keep
                try:
                    return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)
                finally:
                    del attn.get_attention_scores

        self.processor = Recording()


def test_cross_attention_probabilities_match_diffusers(tiny_reference, tiny_unet):
    expected: list[torch.Tensor] = []
    recorder = ProbsRecorder(expected)
    for name, module in tiny_reference.named_modules():
        if name.endswith("attn2"):
            module.set_processor(recorder.processor)
    latents, context = inputs(2, 8, 12, 32)
    with torch.no_grad():
        tiny_reference(latents, 10, context)
    got, sizes = [], []
    eps = tiny_unet(latents, 10, context,
                    on_cross_attention=lambda probs, size: (got.append(probs), sizes.append(size)))
    # forward order: 1 in the down level, 1 in the middle, 2 in the up level of TINY_UNET
    assert sizes == [(8, 12), (4, 6), (8, 12), (8, 12)]
    assert len(got) == len(expected) == 4
    for probs, reference_probs, (h, w) in zip(got, expected, sizes, strict=True):
        assert probs.dtype == torch.float32 and probs.shape == (2, 2, h * w, 77)
        torch.testing.assert_close(probs, reference_probs, rtol=0, atol=1e-6)
    # the probabilities are computed beside the fused attention: the prediction is unchanged
    assert torch.equal(eps, tiny_unet(latents, 10, context))


@pytest.mark.parametrize("h, w", [(7, 9), (5, 4)])
def test_odd_latent_sizes_match_diffusers(tiny_reference, tiny_unet, h, w):
    """An image side that is a multiple of 8 but not of 64 gives odd latent sides: the encoder's
    stride-2 convs round up, and each upsampler resizes to its skip connection's size."""
    latents, context = inputs(1, h, w, 32)
    with torch.no_grad():
        expected = tiny_reference(latents, 500, context).sample
    eps = tiny_unet(latents, 500, context)
    assert eps.shape == (1, 4, h, w)
    assert_close_to(eps, expected)


def test_sd2_layout_matches_diffusers(tmp_path):
    """Linear proj_in/proj_out and a different head count per level, as in SD 2.x configs."""
    reference = reference_unet(**TINY_UNET_OVERRIDES | {"use_linear_projection": True,
                                                        "attention_head_dim": (2, 4)})
    reference.save_pretrained(tmp_path)
    unet = load_unet(str(tmp_path))
    assert unet.config.num_attention_heads == (2, 4) and unet.config.use_linear_projection
    latents, context = inputs(2, 8, 8, 32)
    with torch.no_grad():
        expected = reference(latents, 300, context).sample
    assert_close_to(unet(latents, 300, context), expected)


def test_guidance_distilled_unet_matches_diffusers(tmp_path):
    """An LCM UNet (time_cond_proj_dim) adds the guidance scale's sinusoids to the timestep's."""
    from diffusers import LatentConsistencyModelPipeline

    reference = reference_unet(**TINY_UNET_OVERRIDES | {"time_cond_proj_dim": 16})
    reference.save_pretrained(tmp_path)
    unet = load_unet(str(tmp_path))
    assert unet.config.time_cond_proj_dim == 16
    assert unet.time_embedding.cond_proj.weight.shape == (32, 16)
    scales = torch.tensor([8.0, 1.5])
    cond = guidance_embedding(scales, 16)
    # diffusers' function takes w = scale - 1 (it uses no pipeline state, so no pipeline is made)
    expected_cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, scales - 1, embedding_dim=16)
    torch.testing.assert_close(cond, expected_cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(guidance_embedding(8.0, 16), expected_cond[:1], rtol=0, atol=1e-6)
    assert guidance_embedding(8.0, 17, torch.bfloat16).shape == (1, 17)
    latents, context = inputs(2, 8, 8, 32)
    with torch.no_grad():
        expected = reference(latents, 300, context, timestep_cond=cond).sample
        without = reference(latents, 300, context).sample
    eps = unet(latents, 300, context, timestep_cond=cond)
    assert_close_to(eps, expected)
    assert_close_to(unet(latents, 300, context), without)
    assert not torch.allclose(eps, without, atol=1e-3)  # the condition changes the prediction
    with pytest.raises(ValueError, match=r"timestep_cond must be .* \(batch 2, 16\)"):
        unet(latents, 300, context, timestep_cond=cond[:1])


def test_timestep_cond_needs_a_distilled_unet(tiny_unet):
    latents, context = inputs(1, 8, 8, 32)
    with pytest.raises(ValueError, match="time_cond_proj_dim; this UNet has none"):
        tiny_unet(latents, 1, context, timestep_cond=torch.zeros(1, 16))


def test_tiny_config_equals_reference_overrides(tiny_reference):
    assert UNetConfig.from_dict(dict(tiny_reference.config)) == TINY_UNET


def test_config_from_sd_files():
    sd15 = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3
            + ["DownBlock2D"], "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64}
    assert UNetConfig.from_dict(sd15) == UNetConfig()
    # SD 2.x: "attention_head_dim" is still read as head counts (64-wide heads)
    sd21 = sd15 | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                   "use_linear_projection": True, "upcast_attention": True}
    config = UNetConfig.from_dict(sd21)
    assert config.num_attention_heads == (5, 10, 20, 20) and config.cross_attention_dim == 1024
    # with num_attention_heads given, attention_head_dim is the head width and is not used
    assert UNetConfig.from_dict(sd15 | {"num_attention_heads": 4}).num_attention_heads == (4,) * 4


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time' means an SDXL"),
    ({"transformer_layers_per_block": [1, 2, 10]}, "transformer_layers_per_block"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep' means class embeddings"),
    ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types"),
    ({"layers_per_block": [2, 2, 2, 2]}, "layers_per_block"),
    ({"num_attention_heads": 3}, "320 channels do not split into 3 heads"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({"block_out_channels": [320, 640, 1280, 1280]} | change)


def test_timestep_forms_agree(tiny_unet):
    latents, context = inputs(2, 8, 8, 32)
    eps = tiny_unet(latents, 10, context)
    assert eps.shape == (2, 4, 8, 8)
    for timestep in (10.0, torch.tensor(10), torch.tensor([10, 10]), torch.tensor([10.0])):
        torch.testing.assert_close(tiny_unet(latents, timestep, context), eps, rtol=0, atol=0)
    # one timestep per sample: each sample is predicted as if alone with its own timestep
    # (up to float rounding, which depends on the batch size)
    per_sample = tiny_unet(latents, torch.tensor([10, 900]), context)
    assert_close_to(per_sample[:1], eps[:1], tol=1e-5)
    assert_close_to(per_sample[1:], tiny_unet(latents[1:], 900, context[1:]), tol=1e-5)
    assert not torch.allclose(per_sample[1], eps[1], atol=1e-3)


@pytest.mark.parametrize("latent_shape, context_shape, timestep, message", [
    ((2, 4, 8), (2, 77, 32), 1, r"latents must be .* got \(2, 4, 8\)"),
    ((2, 3, 8, 8), (2, 77, 32), 1, r"latents must be a float tensor \(batch, 4, h, w\)"),
    ((2, 4, 8, 8), (2, 77, 768), 1, r"context must be .* \(batch 2, tokens, 32\)"),
    ((2, 4, 8, 8), (1, 77, 32), 1, r"context must be .* got \(1, 77, 32\)"),
    ((2, 4, 8, 8), (2, 77, 32), torch.tensor([1, 2, 3]), r"timestep must be .* 2 numbers"),
    ((2, 4, 8, 8), (2, 77, 32), True, r"timestep must be"),
])
def test_bad_inputs_are_refused(tiny_unet, latent_shape, context_shape, timestep, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(torch.zeros(latent_shape), timestep, torch.zeros(context_shape))


def test_inputs_are_not_modified(tiny_unet):
    latents, context = inputs(2, 8, 8, 32)
    for x in (latents, latents.to(memory_format=torch.channels_last)):
        before, context_before = x.clone(), context.clone()
        tiny_unet(x, torch.tensor([5, 7]), context)
        assert torch.equal(x, before) and torch.equal(context, context_before)


def test_fp16_file_loads_into_float32_and_bfloat16(tmp_path):
    half = reference_unet(**TINY_UNET_OVERRIDES).half()
    half.save_pretrained(tmp_path, variant="fp16")
    reference = half.float()  # the weights the file holds, run in float32
    latents, context = inputs(2, 8, 8, 32)
    with torch.no_grad():
        expected = reference(latents, 250, context).sample
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, 5e-2)):
        unet = load_unet(str(tmp_path), variant="fp16", dtype=dtype)
        assert {p.dtype for p in unet.parameters()} == {dtype}
        # channels-last conv weights, like the activations, or each call would convert them
        conv = unet.down_blocks[0].resnets[0].conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
        eps = unet(latents, 250, context)
        assert eps.dtype == torch.float32
        assert_close_to(eps, expected, tol=tol)


@pytest.mark.parametrize("size, stride", [((3, 5), 1), ((3, 5), 2), ((8, 8), 2), ((6, 10), 1)])
def test_im2col_convolution_equals_conv2d(size, stride):
    conv = torch.nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, *size).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        assert expected[:, 0].numel() <= IM2COL_MAX_POSITIONS  # small enough for im2col
        torch.testing.assert_close(conv3x3(x, conv), expected, rtol=0, atol=1e-5)


def test_linear_as_convolution_equals_linear():
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(2, ONEDNN_MIN_ROWS // 2 + 3, 24)  # enough rows for the 1x1-conv path
    with torch.no_grad():
        torch.testing.assert_close(linear(x, layer.weight, layer.bias), layer(x), rtol=0,
                                   atol=1e-5)
