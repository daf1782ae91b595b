"""diffusers' UNet as the reference for ours: inputs, a closeness check on the reference's own
scale, and a run with hooks that records what the probe records (block outputs, skips, attention
rows), so that parity tests of the UNet and of its probe share one recording."""

from __future__ import annotations

import torch
from torch import nn

from sd_parts import UNetProbe

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
