"""The UNet probe: what it records equals what hooks on diffusers' same-named modules see, its
attention rows equal the softmax of diffusers' own queries and keys, and it changes nothing."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from sd_parts import UNetProbe, unet_blocks
from sd_parts.unet import TINY_UNET, UNet2DConditionModel, UNetConfig
from sd_parts.unet_probe import module_paths
from sd_parts.unet_transformer import Attention, attention_probabilities
from sd_parts.weights import load_unet
from tests.helpers.references import TINY_UNET_OVERRIDES, reference_unet

TOL = 1e-4


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """Equal within ``tol`` of the reference's largest value (an absolute scale, rtol alike)."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def inputs(batch: int, h: int, w: int, context_dim: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, h, w, generator=generator)
    return latents, torch.randn(batch, 77, context_dim, generator=generator)


def level_of(path: str, levels: int) -> int:
    """The resolution level an attention layer runs at, read from its top-level block."""
    block, index = path.split(".")[:2]
    if block == "mid_block":
        return levels - 1
    return int(index) if block == "down_blocks" else levels - 1 - int(index)


def first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def diffusers_run(reference: nn.Module, paths: list[str], latents: torch.Tensor, timestep: int,
                  context: torch.Tensor, queries: list[tuple[int, int]]) -> dict:
    """diffusers' UNet with forward hooks on ``paths``, the skip connections, and every
    attention layer's inputs (through an attention processor that records them), from which
    the probabilities are computed here with diffusers' own to_q and to_k."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    modules = dict(reference.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    skips: list[torch.Tensor] = []
    attention_inputs: dict[str, tuple] = {}
    grids: dict[str, tuple[int, int]] = {}

    class Recording(AttnProcessor2_0):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            attention_inputs[self.name] = (hidden_states.clone(), encoder_hidden_states)
            return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)

    handles, processors = [], reference.attn_processors
    for path in paths:
        handles.append(modules[path].register_forward_hook(
            lambda m, a, out, path=path: outputs.__setitem__(path, first(out).clone())))
    handles.append(modules["conv_in"].register_forward_hook(
        lambda m, a, out: skips.append(out.clone())))
    for block in reference.down_blocks:
        handles.append(block.register_forward_hook(
            lambda m, a, out: skips.extend(s.clone() for s in out[1])))
    for name, module in modules.items():
        if name.endswith(("attn1", "attn2")):
            module.set_processor(Recording(name))
            transformer = name.rsplit(".", 3)[0]
            handles.append(modules[transformer].register_forward_pre_hook(
                lambda m, a, t=transformer: grids.__setitem__(t, tuple(a[0].shape[-2:]))))
    try:
        with torch.no_grad():
            eps = reference(latents, timestep, context).sample
    finally:
        for handle in handles:
            handle.remove()
        reference.set_attn_processor(processors)

    levels = len(reference.config.block_out_channels)
    self_attention, cross_attention = {}, {}
    with torch.no_grad():
        for name, (x, text) in attention_inputs.items():
            attn = modules[name]
            B, N, C = x.shape
            q = attn.to_q(x).view(B, N, attn.heads, -1).transpose(1, 2)  # (B, nh, N, hs)
            keys = attn.to_k(x if text is None else text)
            k = keys.view(B, keys.shape[1], attn.heads, -1).transpose(1, 2)
            if name.endswith("attn1"):
                h, w = grids[name.rsplit(".", 3)[0]]
                s = 2 ** level_of(name, levels)
                q = q[:, :, [(r // s) * w + c // s for r, c in queries]]
                self_attention[name] = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
            else:
                cross_attention[name] = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    return dict(eps=eps, outputs=outputs, skips=skips, self_attention=self_attention,
                cross_attention=cross_attention)


def assert_probe_matches(probe: UNetProbe, expected: dict, paths: list[str]) -> None:
    assert sorted(probe.outputs) == sorted(paths)
    for path in paths:
        assert_close_to(probe.outputs[path], expected["outputs"][path])
    assert len(probe.skips) == len(expected["skips"])
    for ours, theirs in zip(probe.skips, expected["skips"], strict=True):
        assert_close_to(ours, theirs)
    for kind in ("self_attention", "cross_attention"):
        got = getattr(probe, kind)
        assert sorted(got) == sorted(expected[kind]) and got
        for path, probs in expected[kind].items():
            assert got[path].dtype == torch.float32
            torch.testing.assert_close(got[path], probs, rtol=0, atol=1e-5)


def test_full_size_probe_matches_diffusers(sd_unet_folder):
    """SD v1.5's UNet at a 16 x 16 latent: its coarsest level is 2 x 2."""
    reference, folder = sd_unet_folder
    unet = load_unet(str(folder))
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
