"""Looking inside the UNet during one call: layer outputs, skip connections, attention maps.

    probe = UNetProbe(keep=["down_blocks.1", "mid_block"], queries=[(20, 31)],
                      cross_attention=True)
    eps = unet(latents, t, context, probe=probe)   # the same eps as without the probe
    probe.outputs["mid_block"]                      # (B, 1280, h/8, w/8)
    probe.self_attention[path]                      # (B, heads, 1, h_l * w_l) for each attn1
    probe.cross_attention[path]                     # (B, heads, h_l * w_l, 77) for each attn2

Paths are the checkpoint's module names, so a recorded output is what a forward hook on the
same-named module of diffusers' ``UNet2DConditionModel`` sees (the first tensor where a module
returns several). The probe is forward hooks, registered for the one call and removed after it,
that only read: without a probe nothing is registered and nothing is kept.

Most layers run as modules and their hooks see their outputs directly. A few are computed by a
fused kernel without being called (the 3x3 convolutions through ``runtime.conv3x3``, the
upsampler's phase kernels): their outputs are taken from a neighbour that does run, the
resampler's own output, or recomputed from the norm before a residual block's conv.

Attention probabilities are computed beside the fused attention from the same projected queries
and keys (``attention_probabilities``), so recording them does not change the output; for a few
query positions only their rows are computed, never the whole (h*w)^2 matrix. For a view that
draws the UNet, ``unet_blocks(config)`` lists its top-level blocks.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .unet_transformer import BasicTransformerBlock, attention_probabilities

if TYPE_CHECKING:
    from .unet import UNet2DConditionModel

__all__ = ["CrossAttentionHook", "UNetBlock", "UNetProbe", "observe", "unet_blocks"]

# (probs (B, heads, h*w, T) float32, (h, w)) for each cross-attention layer, in forward order
CrossAttentionHook = Callable[[torch.Tensor, tuple[int, int]], None]


class UNetBlock(NamedTuple):
    """One top-level block of the UNet, as a diagram draws it."""

    path: str  # the module's path: "conv_in", "down_blocks.0", "mid_block", "up_blocks.3", ...
    kind: str  # "encoder", "bottleneck" or "decoder"
    level: int  # the resolution its layers run at: 0 is the latent's, each level halves h and w
    channels: int  # its output channels


def unet_blocks(config: UNetConfig) -> list[UNetBlock]:
    """The blocks in forward order: conv_in, the down blocks (each but the last halves the
    resolution at its end), the middle block, the up blocks (each but the last doubles it at its
    end, and up block i takes down block last - i's skips), conv_out."""
    widths = config.block_out_channels
    last = len(widths) - 1
    return ([UNetBlock("conv_in", "encoder", 0, widths[0])]
            + [UNetBlock(f"down_blocks.{i}", "encoder", i, widths[i]) for i in range(last + 1)]
            + [UNetBlock("mid_block", "bottleneck", last, widths[last])]
            + [UNetBlock(f"up_blocks.{i}", "decoder", last - i, widths[last - i])
               for i in range(last + 1)]
            + [UNetBlock("conv_out", "decoder", 0, config.out_channels)])


class UNetProbe:
    """What to record during one UNet call and, after it, what was recorded.

    ``keep``: module paths whose outputs to keep (``conv_in``, ``time_embedding``,
    ``down_blocks.1``, ``down_blocks.1.attentions.0.transformer_blocks.0.attn1``, ...).
    ``queries``: (row, col) positions on the input latent's grid whose self-attention to record
    in every attn1 layer; at a level s = 2^l times coarser, position (row // s, col // s).
    ``cross_attention``: whether to record every attn2 layer's probabilities (B, heads, h*w, T);
    for SD v1 at 512 pixels and batch 1 that is 16 layers, about 45 MB in float32.

    After the call (each call starts afresh): ``outputs[path]``, a copy of that module's output;
    ``skips``, the tensors the encoder hands to the decoder, in the order it makes them (the
    tensors themselves: nothing changes them after they are made); ``self_attention[path]``
    (B, heads, len(queries), h_l * w_l) for each attn1 if queries were given;
    ``cross_attention[path]`` for each attn2 if asked. Probabilities are float32.
    """

    def __init__(self, keep: Iterable[str] = (), queries: Iterable[tuple[int, int]] = (),
                 cross_attention: bool = False):
        if isinstance(keep, str):
            raise TypeError(f"keep must be a list of module paths, not one string: [{keep!r}]")
        self.keep = tuple(dict.fromkeys(keep))
        if any(not isinstance(path, str) for path in self.keep):
            raise TypeError(f"keep must hold module paths (strings); got {self.keep!r}")
        self.queries = tuple(_query(position) for position in queries)
        self.record_cross_attention = bool(cross_attention)
        self.outputs: dict[str, torch.Tensor] = {}
        self.skips: list[torch.Tensor] = []
        self.self_attention: dict[str, torch.Tensor] = {}
        self.cross_attention: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"UNetProbe(keep={list(self.keep)!r}, queries={list(self.queries)!r}, "
                f"cross_attention={self.record_cross_attention})")


def _query(position: object) -> tuple[int, int]:
    try:
        row, col = position  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"a query is a (row, col) position; got {position!r}") from None
    for value in (row, col):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"a query is a (row, col) pair of ints >= 0; got {position!r}")
    return row, col


def module_paths(unet: nn.Module) -> list[str]:
    """Every path a probe can keep: each module but the model itself and the lists of modules."""
    return [name for name, module in unet.named_modules()
            if name and not isinstance(module, nn.ModuleList)]


def check_paths(unet: nn.Module, paths: Iterable[str]) -> None:
    """Refuse a path that names no module, saying which valid paths are close to it."""
    modules = dict(unet.named_modules())
    valid = None
    for path in paths:
        module = modules.get(path) if path else None
        if isinstance(module, nn.ModuleList):
            children = [f"{path}.{name}" for name, _ in module.named_children()]
            raise ValueError(f"{path!r} is a list of modules; keep one of them: "
                             + ", ".join(children))
        if module is None:
            valid = module_paths(unet) if valid is None else valid
            close = difflib.get_close_matches(path, valid, n=6, cutoff=0.6) or \
                [p for p in valid if "." not in p or p.count(".") == 1]
            raise ValueError(f"the UNet has no module {path!r}; valid paths close to it: "
                             + ", ".join(close))


def _first_tensor(output: object) -> torch.Tensor:
    """A module's output, or the first of several (a down block's (hidden, skips))."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a probed module returned {type(output).__name__}, not a tensor")
    return output


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # a copy: the UNet adds residuals in place on many outputs once their module has returned
    return tensor.clone(memory_format=torch.contiguous_format)


@contextmanager
def observe(unet: UNet2DConditionModel, probe: UNetProbe | None,
            on_cross_attention: CrossAttentionHook | None,
            latent_size: tuple[int, int]) -> Iterator[None]:
    """Register ``probe``'s hooks (and ``on_cross_attention``'s) on ``unet`` for one call.

    The hooks act only in the thread that registered them, so another call to the same model
    from another thread is neither recorded nor disturbed. With neither, this does nothing.
    """
    if probe is None and on_cross_attention is None:
        yield
        return
    handles = _Recorder(unet, probe, on_cross_attention, latent_size).register()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Recorder:
    """The hooks of one call: which module each recorded value comes from, and how."""

    def __init__(self, unet: UNet2DConditionModel, probe: UNetProbe | None,
                 on_cross_attention: CrossAttentionHook | None, latent_size: tuple[int, int]):
        self.unet, self.probe, self.on_cross_attention = unet, probe, on_cross_attention
        self.modules = dict(unet.named_modules())
        self.thread = threading.get_ident()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        if probe is not None:
            check_paths(unet, probe.keep)
            height, width = latent_size
            for row, col in probe.queries:
                if row >= height or col >= width:
                    raise ValueError(f"query ({row}, {col}) lies outside the {height}x{width} "
                                     "latent (rows and columns count from 0)")
            probe.outputs, probe.skips = {}, []
            probe.self_attention, probe.cross_attention = {}, {}
        # the level each top-level block runs at, for mapping query positions onto its grid
        self.levels = {block.path: block.level for block in unet_blocks(unet.config)}
        self.grids: dict[str, tuple[int, int]] = {}  # transformer path -> its (h, w) this call
        self.queries: dict[str, torch.Tensor] = {}  # attention path -> its projected queries

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        probe = self.probe
        if probe is not None:
            for path in probe.keep:
                self._keep(path)
            self._hook("conv_in", lambda out: setattr(probe, "skips", [out]))
            for i in range(len(self.unet.down_blocks)):
                self._hook(f"down_blocks.{i}", lambda out: probe.skips.extend(out[1]),
                           whole=True)
        self_attention = probe is not None and bool(probe.queries)
        cross_attention = self.on_cross_attention is not None or (
            probe is not None and probe.record_cross_attention)
        for path, module in self.modules.items():
            if isinstance(module, BasicTransformerBlock) and (self_attention or cross_attention):
                transformer = path.rsplit(".", 2)[0]  # ...attentions.j, around the block
                self._grid_hook(transformer)
                if self_attention:
                    self._attention_hooks(f"{path}.attn1", transformer, self._self_attention)
                if cross_attention:
                    self._attention_hooks(f"{path}.attn2", transformer, self._cross_attention)
        return self.handles

    def _hook(self, path: str, action: Callable[[object], None], whole: bool = False) -> None:
        """Call ``action`` with the output of the module at ``path`` (its first tensor, or
        the whole output with ``whole``), in this recorder's thread only."""
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if threading.get_ident() == self.thread:
                action(output if whole else _first_tensor(output))

        self.handles.append(self.modules[path].register_forward_hook(hook))

    def _keep(self, path: str) -> None:
        from .unet import Downsample2D, ResnetBlock2D, Upsample2D  # unet.py imports this file

        parent, _, name = path.rpartition(".")
        owner = self.modules.get(parent)
        outputs = self.probe.outputs

        def store(tensor: torch.Tensor) -> None:
            outputs[path] = _copy(tensor)

        if isinstance(owner, (Downsample2D, Upsample2D)) and name == "conv":
            # the resampler is its conv (after the nearest-neighbour resize, for an upsampler)
            self._hook(parent, store)
        elif isinstance(owner, ResnetBlock2D) and name in ("conv1", "conv2"):
            # conv1 reads SiLU(norm1(x)), conv2 reads SiLU(norm2(h)): convolve that again
            conv = self.modules[path]
            self._hook(f"{parent}.norm{name[-1]}", lambda out: store(conv(F.silu(out))))
        else:
            self._hook(path, store)

    def _grid_hook(self, transformer: str) -> None:
        def before(module: nn.Module, args: tuple) -> None:
            if threading.get_ident() == self.thread:
                self.grids[transformer] = tuple(args[0].shape[-2:])

        self.handles.append(self.modules[transformer].register_forward_pre_hook(before))

    def _attention_hooks(self, path: str, transformer: str,
                         record: Callable[[str, str, torch.Tensor, torch.Tensor], None]) -> None:
        """Keep the layer's projected queries, then, once its keys are made, ``record`` them."""
        self._hook(f"{path}.to_q", lambda q: self.queries.__setitem__(path, q))
        self._hook(f"{path}.to_k",
                   lambda k: record(path, transformer, self.queries.pop(path), k))

    def _self_attention(self, path: str, transformer: str, q: torch.Tensor,
                        k: torch.Tensor) -> None:
        height, width = self.grids[transformer]
        top = "mid_block" if path.startswith("mid_block") else ".".join(path.split(".")[:2])
        scale = 2 ** self.levels[top]
        rows = [(row // scale) * width + col // scale for row, col in self.probe.queries]
        if any(row // scale >= height or col // scale >= width for row, col in self.probe.queries):
            raise RuntimeError(f"{path}: a query falls outside its {height}x{width} grid")
        picked = q[:, torch.tensor(rows, device=q.device)]  # (B, len(queries), C)
        heads = self.modules[path].heads
        self.probe.self_attention[path] = attention_probabilities(picked, k, heads)

    def _cross_attention(self, path: str, transformer: str, q: torch.Tensor,
                         k: torch.Tensor) -> None:
        probs = attention_probabilities(q, k, self.modules[path].heads)  # (B, nh, h*w, T)
        if self.probe is not None and self.probe.record_cross_attention:
            self.probe.cross_attention[path] = probs
        if self.on_cross_attention is not None:
            self.on_cross_attention(probs, self.grids[transformer])
