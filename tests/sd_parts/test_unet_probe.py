"""The UNet probe: what it records equals what hooks on diffusers' same-named modules see, its
attention rows equal the softmax of diffusers' own queries and keys, and it changes nothing."""

from __future__ import annotations

import threading

import pytest
import torch

from sd_parts import UNetProbe, unet_blocks
from sd_parts.unet import TINY_UNET, UNet2DConditionModel, UNetConfig
from sd_parts.unet_probe import module_paths
from sd_parts.unet_transformer import Attention, attention_probabilities
from tests.helpers.references import TINY_UNET_OVERRIDES, reference_unet
from tests.helpers.unet_reference import (
    assert_close_to,
    assert_probe_matches,
    diffusers_run,
    inputs,
)


@pytest.mark.parametrize("overrides, size", [({}, (7, 9)), ({"use_linear_projection": True},
                                                             (12, 20))])
def test_every_module_of_the_tiny_unet_matches_diffusers(overrides, size):
    """Every path a probe can keep, at an odd size (7 x 9 halves to 4 x 5) and, with SD 2.x's
    linear projections, a non-square one."""
    reference = reference_unet(**TINY_UNET_OVERRIDES | overrides)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(reference.config))).eval()
    unet.load_state_dict(reference.state_dict(), strict=True)
    paths = module_paths(unet)
    assert set(paths) <= {name for name, _ in reference.named_modules()}  # diffusers' names
    assert len(paths) > 80
    queries = [(0, 0), (size[0] - 1, size[1] - 1), (3, 2)]
    latents, context = inputs(2, *size, 32)
    expected = diffusers_run(reference, paths, latents, 420, context, queries)
    probe = UNetProbe(keep=paths, queries=queries, cross_attention=True)
    eps = unet(latents, 420, context, probe=probe)
    assert_close_to(eps, expected["eps"])
    assert_probe_matches(probe, expected, paths)
    # the probe changes nothing, and nothing stays registered after the call
    assert torch.equal(eps, unet(latents, 420, context))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    unet = UNet2DConditionModel(TINY_UNET).eval()
    unet.load_state_dict(reference_unet(**TINY_UNET_OVERRIDES).state_dict(), strict=True)
    return unet


def test_explicit_attention_equals_fused():
    """probs @ v, from the probabilities the probe records, is what the fused layer computes."""
    torch.manual_seed(0)
    attention = Attention(32, 24, heads=4).eval()
    x, context = torch.randn(2, 30, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        probs = attention_probabilities(attention.to_q(x), attention.to_k(context), 4)
        v = attention.to_v(context).view(2, 7, 4, 8).transpose(1, 2)
        y = (probs @ v).transpose(1, 2).reshape(2, 30, 32)
        torch.testing.assert_close(attention.to_out[0](y), attention(x, context), rtol=0,
                                   atol=1e-5)
    assert probs.shape == (2, 4, 30, 7)


def test_each_call_records_afresh_and_only_what_is_asked(tiny_unet):
    latents, context = inputs(1, 8, 8, 32)
    probe = UNetProbe(keep=["mid_block"])
    tiny_unet(latents, 3, context, probe=probe)
    assert list(probe.outputs) == ["mid_block"] and len(probe.skips) == 4
    assert probe.self_attention == {} and probe.cross_attention == {}
    first_skip = probe.skips[0]
    tiny_unet(latents[:, :, :4], 3, context, probe=probe)
    assert probe.skips[0].shape == (1, 32, 4, 8) and first_skip.shape == (1, 32, 8, 8)
    assert len(probe.skips) == 4


def test_other_threads_are_not_recorded(tiny_unet):
    """A call from another thread while a probed call runs is not recorded by the probe."""
    latents, context = inputs(1, 8, 8, 32)
    other: list[torch.Tensor] = []

    def call_from_another_thread(probs: torch.Tensor, size: tuple[int, int]) -> None:
        if not other:
            worker = threading.Thread(target=lambda: other.append(
                tiny_unet(torch.zeros(3, 4, 4, 4), 1, torch.zeros(3, 77, 32))))
            worker.start()
            worker.join()

    probe = UNetProbe(keep=["conv_out"], queries=[(1, 1)], cross_attention=True)
    tiny_unet(latents, 5, context, probe=probe, on_cross_attention=call_from_another_thread)
    assert other[0].shape == (3, 4, 4, 4)
    assert probe.outputs["conv_out"].shape == (1, 4, 8, 8)
    assert all(p.shape[0] == 1 for p in [*probe.self_attention.values(),
                                         *probe.cross_attention.values(), *probe.skips])


def test_hooks_are_removed_when_the_call_fails(tiny_unet):
    latents, context = inputs(1, 8, 8, 32)

    def fail(probs: torch.Tensor, size: tuple[int, int]) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tiny_unet(latents, 5, context, probe=UNetProbe(keep=["conv_in"]), on_cross_attention=fail)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_unet.modules())


@pytest.mark.parametrize("probe, message", [
    (lambda: UNetProbe(keep=["down_blocks.0.resnet.0"]),
     r"no module 'down_blocks.0.resnet.0'; valid paths close to it: down_blocks.0.resnets.0"),
    (lambda: UNetProbe(keep=["down_blocks"]), r"'down_blocks' is a list .* down_blocks.0, "
                                              r"down_blocks.1"),
    (lambda: UNetProbe(queries=[(8, 0)]), r"query \(8, 0\) lies outside the 8x8 latent"),
])
def test_bad_probes_are_refused(tiny_unet, probe, message):
    latents, context = inputs(1, 8, 8, 32)
    with pytest.raises(ValueError, match=message):
        tiny_unet(latents, 5, context, probe=probe())
    assert not any(m._forward_hooks for m in tiny_unet.modules())


@pytest.mark.parametrize("arguments, error", [
    (dict(keep="conv_in"), TypeError), (dict(keep=[3]), TypeError),
    (dict(queries=[(1, -1)]), ValueError), (dict(queries=[(1.5, 2)]), ValueError),
    (dict(queries=[3]), ValueError),
])
def test_bad_probe_arguments_are_refused(arguments, error):
    with pytest.raises(error):
        UNetProbe(**arguments)


def test_block_paths_follow_the_config(tiny_unet):
    blocks = unet_blocks(UNetConfig())
    assert [(b.path, b.kind, b.level, b.channels) for b in blocks] == [
        ("conv_in", "encoder", 0, 320), ("down_blocks.0", "encoder", 0, 320),
        ("down_blocks.1", "encoder", 1, 640), ("down_blocks.2", "encoder", 2, 1280),
        ("down_blocks.3", "encoder", 3, 1280), ("mid_block", "bottleneck", 3, 1280),
        ("up_blocks.0", "decoder", 3, 1280), ("up_blocks.1", "decoder", 2, 1280),
        ("up_blocks.2", "decoder", 1, 640), ("up_blocks.3", "decoder", 0, 320),
        ("conv_out", "decoder", 0, 4)]
    # in the tiny UNet every listed path is a module, and runs at its level's size
    probe = UNetProbe(keep=[b.path for b in tiny_unet.block_paths()])
    latents, context = inputs(1, 8, 8, 32)
    tiny_unet(latents, 5, context, probe=probe)
    for block in tiny_unet.block_paths():
        out = probe.outputs[block.path]
        assert out.shape[1] == block.channels
        if block.kind == "bottleneck" or block.path in ("conv_in", "conv_out"):
            assert out.shape[-1] == 8 // 2 ** block.level
