"""One probed UNet call of a run's step, kept for the last few (run, step) pairs, and the views
drawn from it; ``ui/sections/unet_inside.py`` lays them out under the generation tab's scrubber.

For a finished or stopped run, the UNet is run once more on the latent that step fed it, at its
timestep, with both guidance branches (negative prompt and prompt) when the run was guided, and a
``sd_parts.UNetProbe`` records every top-level block's output, the skip connections, each
residual block's conv1 output, the queries and keys of every self-attention layer and every
cross-attention map. Every view of the step is drawn from that one call: the blocks as the
diagram draws them (timed on this machine), a block's channels and how much of a decoder block's
input comes across the skip, where any position looks in every self-attention layer, where a word
is looked at, how far the text branch moves from the unconditional one at each block, and the
timestep's offsets, computed from time_embedding and the residual blocks' time_emb_proj alone.
The denoising loss of an image under captions is the training objective, evaluated at ten
timesteps. The drawing itself is in ``viz/unet.py``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import sd_parts
from sd_parts.unet_probe import UNetBlock, unet_blocks
from sd_parts.unet_transformer import attention_probabilities
from ui.models import Models
from ui.runs import RunRecord
from viz import diffusion, pixels, unet

NO_RUN = "Generate an image first (or let a run stop); then the UNet of any step can be opened."
OFFSET_TIMESTEPS = (50, 250, 500, 750, 950)
LOSS_TIMESTEPS = tuple(50 + 100 * i for i in range(10))  # ten, evenly spread over 0..999
KEPT = 2  # probed calls kept: (run, step) pairs, each a few tens of MB at 512 px


@dataclass
class Probed:
    """What one probed UNet call of a run's step recorded (CPU, float32). Batch item -1 is the
    text branch; with guidance item 0 is the unconditional one."""

    record: RunRecord  # kept, so that id(record) stays this run's while the entry lives
    step: int
    timestep: float
    blocks: list[UNetBlock]
    outputs: dict[str, torch.Tensor]  # every kept module's output, whole batch
    skips: list[torch.Tensor]
    queries: dict[str, torch.Tensor]  # attn1 path -> (N, C) the text branch's queries
    keys: dict[str, torch.Tensor]  # attn1 path -> (N, C)
    heads: dict[str, int]
    cross: dict[str, torch.Tensor]  # attn2 path -> (heads, h*w, T), text branch
    sizes: dict[str, tuple[int, int]]  # attention path -> its grid
    seconds: dict[str, float] = field(default_factory=dict)  # top-level block -> its time
    total: float = 0.0  # the whole call

    @property
    def guided(self) -> bool:
        return self.outputs["conv_in"].shape[0] == 2

    def shares(self) -> dict[str, float]:
        return {path: s / self.total for path, s in self.seconds.items()} if self.total else {}

    def text(self, path: str) -> torch.Tensor:
        return self.outputs[path][-1]


_cache: OrderedDict[tuple[int, int, bool], Probed] = OrderedDict()
_cache_lock = threading.Lock()


def chosen_step(record: RunRecord | None, step: float | None) -> int:
    """The scrubber's value as a step 1..record.steps (0, the start noise, shows step 1)."""
    if record is None or not record.steps:
        raise ValueError(NO_RUN)
    if step is None or not np.isfinite(step):
        raise ValueError(f"Choose a step from 1 to {record.steps}.")
    return min(max(int(step), 1), record.steps)


def kept_paths(model: sd_parts.UNet2DConditionModel) -> list[str]:
    """Every top-level block, each residual block's conv1 (the features its time offset moves),
    each decoder resnet's input from below, and every self-attention's queries and keys."""
    paths = [b.path for b in unet_blocks(model.config)]
    for name, module in model.named_modules():
        if isinstance(module, sd_parts.unet.ResnetBlock2D):
            paths.append(f"{name}.conv1")
        if name.endswith(".attn1"):
            paths += [f"{name}.to_q", f"{name}.to_k"]
    for i, block in enumerate(model.up_blocks):
        inner = "attentions" if len(block.attentions) else "resnets"
        paths += [f"up_blocks.{i}.{inner}.{j}" for j in range(len(block.resnets) - 1)]
    return paths


def level_of(path: str, blocks: list[UNetBlock]) -> int:
    """The level a layer runs at: its top-level block's (0 is the latent's grid)."""
    top = "mid_block" if path.startswith("mid_block") else ".".join(path.split(".")[:2])
    return {b.path: b.level for b in blocks}[top]


def grid_of(path: str, blocks: list[UNetBlock], size: tuple[int, int]) -> tuple[int, int]:
    """The grid an attention layer runs on: its level's halving of the latent's."""
    return unet.level_sizes(*size, max(b.level for b in blocks) + 1)[level_of(path, blocks)]


def probe_step(models: Models, record: RunRecord, step: int, exact: bool) -> Probed:
    """The probed UNet call of ``step`` (1-based), or the one kept from before."""
    key = (id(record), step, bool(exact))
    with _cache_lock:
        kept = _cache.get(key)
        if kept is not None and kept.record is record:
            _cache.move_to_end(key)
            return kept
    pipe = models.pipeline(exact)
    model, request = pipe.unet, record.request
    # as the run called it: a guidance-distilled UNet (an LCM) takes the scale as an embedding
    # and makes one pass on the prompt alone
    dim = model.config.time_cond_proj_dim
    guided = request.guidance_scale > 1 and dim is None
    guidance_cond = None if dim is None else \
        sd_parts.guidance_embedding(request.guidance_scale, dim).to(pipe.device)
    sampler, timesteps, start = pipe.plan(request.num_inference_steps, request.scheduler,
                                          strength=request.strength if request.image else 1.0,
                                          **request.sampler_options())
    # a sampler that walks its noise levels by position (Euler, DPM-Solver++) scales the UNet's
    # input by the sigma at its index, which a fresh sampler would take to be the run's first
    sampler.begin_at(start + step - 1)
    t = timesteps[step - 1]
    latent = record.trace.latents[step - 1][None].to(pipe.device)
    x = sampler.scale_model_input(torch.cat([latent] * 2) if guided else latent, t)
    context = pipe.encode_prompt([request.negative_prompt, request.prompt] if guided
                                 else [request.prompt])
    blocks = unet_blocks(model.config)
    probe = sd_parts.UNetProbe(kept_paths(model), cross_attention=True)
    seconds, hooks = timed(model, blocks)
    try:
        started = time.perf_counter()
        model(x, t, context, probe=probe, timestep_cond=guidance_cond)
        synchronize()
        total = time.perf_counter() - started
    finally:
        for hook in hooks:
            hook.remove()
    size = tuple(latent.shape[-2:])
    modules = dict(model.named_modules())
    attn1 = [p[:-len(".to_q")] for p in probe.outputs if p.endswith("attn1.to_q")]
    outputs = {p: v.float().cpu() for p, v in probe.outputs.items()
               if not p.endswith((".to_q", ".to_k"))}
    probed = Probed(
        record, step, float(t), blocks, outputs, [s.float().cpu() for s in probe.skips],
        {p: probe.outputs[f"{p}.to_q"][-1].float().cpu() for p in attn1},
        {p: probe.outputs[f"{p}.to_k"][-1].float().cpu() for p in attn1},
        {p: modules[p].heads for p in attn1},
        {p: v[-1].cpu() for p, v in probe.cross_attention.items()},
        {p: grid_of(p, blocks, size) for p in [*attn1, *probe.cross_attention]},
        seconds, total)
    with _cache_lock:
        _cache[key] = probed
        while len(_cache) > KEPT:
            _cache.popitem(last=False)
    return probed


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model: torch.nn.Module, blocks: list[UNetBlock]
          ) -> tuple[dict[str, float], list[torch.utils.hooks.RemovableHandle]]:
    """Hooks that time each top-level block during the next call, in this thread only (the
    probe's own recording inside a block counts in its time)."""
    seconds: dict[str, float] = {}
    starts: dict[str, float] = {}
    thread = threading.get_ident()
    modules = dict(model.named_modules())
    hooks = []
    for block in blocks:
        def before(module, args, path=block.path):
            if threading.get_ident() == thread:
                synchronize()
                starts[path] = time.perf_counter()

        def after(module, args, output, path=block.path):
            if threading.get_ident() == thread:
                synchronize()
                seconds[path] = time.perf_counter() - starts[path]

        hooks += [modules[block.path].register_forward_pre_hook(before),
                  modules[block.path].register_forward_hook(after)]
    return seconds, hooks


# ---------------------------------------------------------------------------------------------
# The views, each from the probed call


def inside_views(models: Models, probed: Probed, exact: bool) -> dict[str, object]:
    blocks = probed.blocks
    texts = {b.path: probed.text(b.path) for b in blocks}
    diagram = unet.unet_diagram(blocks, texts, probed.shares())
    views = {
        "diagram": diagram.picture,
        "slots": diagram.slots,
        "table": unet.block_table(blocks, texts, probed.shares()),
        "block": gr.Dropdown(choices=[b.path for b in blocks], value=None),
        "image": probed.record.image,
        "word": gr.Dropdown(choices=[label for label, _ in word_groups(probed)], value=None),
        "layer": gr.Dropdown(choices=list(probed.cross), value=None),
        "status": (f"Step {probed.step} of {probed.record.steps}, timestep "
                   f"{probed.timestep:g}: one UNet call of batch {2 if probed.guided else 1} "
                   f"took {probed.total:.2f} s here."),
    }
    if probed.guided:
        ratios = unet.guidance_ratios({b.path: probed.outputs[b.path] for b in blocks})
        views["guidance"] = unet.bar_chart([b.path for b in blocks], list(ratios.values()),
                                           "||out_text - out_uncond|| / ||out_uncond||")
        views["guidance_table"] = [[p, unet.significant(r)] for p, r in ratios.items()]
    else:
        views["guidance"] = views["guidance_table"] = None
        distilled = models.unet(exact).config.time_cond_proj_dim is not None
        views["status"] += (" This UNet has guidance distilled into it: no unconditional pass "
                            "to compare." if distilled
                            else " Guidance scale 1: no unconditional pass to compare.")
    return views | timestep_views(models, probed, exact)


def word_groups(probed: Probed) -> list[tuple[str, list[int]]]:
    tokens = next(iter(probed.cross.values())).shape[-1]
    return diffusion.word_groups(probed.record.pieces, tokens)


def timestep_views(models: Models, probed: Probed, exact: bool) -> dict[str, object]:
    """The sinusoids and the MLP at this step's t; each resnet's time offset relative to its
    conv1 features at this step, for a few t (time_embedding and time_emb_proj alone)."""
    model = models.unet(exact)
    resnets = [p[:-len(".conv1")] for p in probed.outputs if p.endswith(".conv1")]
    modules = dict(model.named_modules())
    ts = (*OFFSET_TIMESTEPS, probed.timestep)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        sinusoids = model.time_proj(torch.tensor(ts, device=device))
        embedding = model.time_embedding(sinusoids.to(dtype))
        temb = F.silu(embedding)
        offsets = {p: modules[f"{p}.time_emb_proj"](temb).float().cpu() for p in resnets}
    ratios = np.array([[unet.time_offsets({p: offsets[p][i]},
                                          {p: probed.text(f"{p}.conv1")})[p]
                        for i in range(len(ts))] for p in resnets])
    return {"timestep": unet.timestep_strips(sinusoids[-1].float().cpu(),
                                             embedding[-1].float().cpu(), probed.timestep),
            "offsets": unet.offset_table(resnets, ts, ratios)}


def block_views(probed: Probed, block: str) -> dict[str, object]:
    """A block's channels, their statistics and, for a decoder block, its skip share."""
    paths = [b.path for b in probed.blocks]
    if block not in paths:
        raise ValueError(f"No block {block!r}: choose one of {', '.join(paths)}.")
    output = probed.text(block)
    note = f"**{block}** ({unet.short_name(block)}): output {' x '.join(map(str, output.shape))}"
    if block.startswith("up_blocks."):
        i = int(block.split(".")[1])
        n = len([p for p in probed.outputs if p.startswith(f"{block}.resnets.")
                 and p.endswith(".conv1")])
        total = len(probed.skips)
        lines = []
        for j in range(n):
            below = (paths[paths.index(block) - 1] if j == 0 else
                     next(p for p in (f"{block}.attentions.{j - 1}", f"{block}.resnets.{j - 1}")
                          if p in probed.outputs))
            skip = probed.skips[total - i * n - 1 - j][-1]
            hidden_norm, skip_norm, share = unet.skip_split(probed.text(below), skip)
            lines.append(f"resnet {j}: input = cat(from below ({below}) ||{hidden_norm:.4g}||, "
                         f"skip ||{skip_norm:.4g}||): {100 * share:.1f}% of its squared norm "
                         "comes across the skip")
        note += ". " + "; ".join(lines) + "."
    else:
        note += "."
    return {"channels": unet.channel_grid(output), "stats": unet.channel_statistics(output),
            "block_note": note}


def self_attention_views(probed: Probed, x: float, y: float) -> dict[str, object]:
    """Where the position at pixel (x, y) of the final image looks, in every attn1 layer."""
    image = probed.record.image
    height, width = image.shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"Click inside the image: x from 0 to {width - 1}, y from 0 to "
                         f"{height - 1}; got ({x:g}, {y:g}).")
    h, w = probed.record.trace.latents[0].shape[-2:]
    row, col = int(y * h / height), int(x * w / width)
    rows = {}
    for path, q in probed.queries.items():
        # at level l the probe's query (row, col) is the cell (row // 2^l, col // 2^l)
        scale = 2 ** level_of(path, probed.blocks)
        index = (row // scale) * probed.sizes[path][1] + col // scale
        rows[path] = attention_probabilities(q[None, index:index + 1], probed.keys[path][None],
                                             probed.heads[path])[0, :, 0]
    maps = unet.self_attention_maps(rows, probed.sizes)
    if not maps:
        raise ValueError("This UNet has no self-attention layers.")
    return {"self_maps": unet.attention_grid(image, maps, ((x + 0.5) / width,
                                                           (y + 0.5) / height)),
            "self_note": f"Latent position (row {row}, col {col}) of {h} x {w}: where it looks "
                         "in each self-attention layer, averaged over heads."}


def cross_attention_views(probed: Probed, word: str, layer: str | None) -> dict[str, object]:
    groups = dict(word_groups(probed))
    if word not in groups:
        raise ValueError(f"Choose a word of the prompt: {', '.join(groups)}.")
    positions = groups[word]
    image = probed.record.image
    maps = unet.word_maps(probed.cross, probed.sizes, positions)
    run_maps = probed.record.trace.word_maps
    if run_maps is not None:
        maps = [("the run: all layers and steps", run_maps[positions].double().sum(0).numpy()),
                *maps]
    views = {"word_maps": unet.attention_grid(image, maps), "head_maps": None}
    if layer:
        if layer not in probed.cross:
            raise ValueError(f"No cross-attention layer {layer!r}: choose one of "
                             f"{', '.join(probed.cross)}.")
        views["head_maps"] = unet.attention_grid(
            image, unet.head_maps(probed.cross[layer], probed.sizes[layer], positions))
    return views


def denoising_losses(models: Models, image: Image.Image, captions: list[str], exact: bool,
                     stop: threading.Event) -> Iterator[tuple[int, dict[str, list[float]]]]:
    """``pipe.denoising_loss`` of the image at LOSS_TIMESTEPS for the empty prompt and each
    caption (one batched UNet call per t, one noise draw, seed 0, shared by all), run in a worker
    thread: yields (calls done, {}) after each call, then (calls done, the losses measured);
    a set ``stop`` ends it after the current call."""
    pipe = models.pipeline(exact)
    fitted, _ = pixels.fit_for_vae(image.convert("RGB"), models.settings.generate_size,
                                   pipe.vae.downscale)
    picture = (pixels.image_to_tensor(fitted) + 1) / 2  # [0, 1], as the pipeline takes it
    prompts = ["", *captions]
    progress: queue.Queue[int] = queue.Queue()
    result: list[torch.Tensor | BaseException] = []

    def on_call(done: int, total: int) -> bool:
        progress.put(done)
        return not stop.is_set()

    def work() -> None:
        try:
            result.append(pipe.denoising_loss(picture, prompts, list(LOSS_TIMESTEPS),
                                              generator=torch.Generator().manual_seed(0),
                                              callback=on_call))
        except BaseException as exc:  # noqa: BLE001 - raised again in the handler's thread
            result.append(exc)
        progress.put(-1)

    worker = threading.Thread(target=work, name="denoising-loss", daemon=True)
    worker.start()
    done = 0
    try:
        while (event := progress.get()) != -1:
            done = event
            yield done, {}
    finally:
        stop.set()  # a client that left: the worker ends after its current call
        worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    losses = result[0][:, :done]  # the timesteps not reached are NaN
    yield done, {p: [float(v) for v in row] for p, row in zip(prompts, losses, strict=True)}
