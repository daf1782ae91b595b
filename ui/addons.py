"""One add-on per visitor: a LoRA, a textual inversion or a second checkpoint, loaded for the
"What changed" tab, kept in the visitor's ``gr.State`` and released when the session ends.

The models of ``ui/models.py`` are shared by every visitor, so an add-on must never be written
into them. A LoRA or an embedding is therefore applied to a *per-session copy of the module tree*
(``shared_copy``): new module objects and new ``Parameter`` objects whose tensors are the shared
ones, until ``sd_parts.lora`` fuses a layer (it sets that layer's ``weight.data`` to W + ΔW) or
``sd_parts.textual_inversion`` grows the token table. Only the changed tensors take memory of their
own (a rank-16 LoRA on the full UNet's 128 attention projections: about 380 MB in float32), the
shared weights are never touched, and no lock is needed: another visitor's run at the same moment
reads the very tensors it always read. The other way, fusing into the shared model under a lock
for the length of a run and unloading bit for bit afterwards, would make every other tab's run
wait for that lock (or, if it did not take it, see the LoRA), and an interrupted run would leave
the LoRA in. Fused rather than unfused, because ``benchmarks/lora.py`` measured the unfused LoRA
at 0.04-0.05 s more per UNet call and the fused at nothing more; the copy is fused once per load
and again only for a new scale (from the kept W, so scales never pile up rounding).

A visitor names an add-on by uploading it or by a Hub repo id; a path on the server only inside
the folders the operator lists in ``SD_PARTS_ADDON_DIRS`` (``source_of``). A second checkpoint
is a whole pipeline of its own, in float32 when the machine's available
memory holds it with room to spare, else in bfloat16 (``checkpoint_dtype``); the page says which.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import sd_parts
from ui.models import HUB, Models

KINDS = ("LoRA", "textual inversion", "second checkpoint")
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"  # the LCM-LoRA of SD v1.5 (Luo et al., 2023)
LCM_PRESET = {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
# a second checkpoint loads in float32 only if this many times its float32 size is available
MEMORY_HEADROOM = 1.5
ADDON_DIRS = "SD_PARTS_ADDON_DIRS"  # folders whose files a visitor may name by path
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


@dataclass
class AddOn:
    """What one visitor loaded, and the pipeline that runs with it."""

    kind: str  # one of KINDS
    name: str
    pipe: sd_parts.StableDiffusionPipeline  # the pipeline with the add-on
    base: sd_parts.StableDiffusionPipeline  # the same models without it (the shared ones)
    exact: bool
    summary: str  # what was loaded, in words
    lora: sd_parts.LoraSummary | None = None
    embedding: sd_parts.Embedding | None = None
    dtype_note: str = ""  # for a second checkpoint: which dtype, and why
    layers: list[sd_parts.lora.LoraLayer] = field(default_factory=list)  # a LoRA's factors
    cached_changes: list | None = None  # a second checkpoint's weight changes, once computed
    # one scale change or run of this add-on at a time (a new scale while a run is going)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def scale(self) -> float:
        return self.lora.scale if self.lora else 1.0


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules whose parameters and buffers are new objects holding
    the very same tensors: setting a copied parameter's ``.data`` changes the copy only, and no
    weight is duplicated until then."""
    memo: dict[int, object] = {}
    for tensor in module.parameters():
        memo[id(tensor)] = nn.Parameter(tensor.data, requires_grad=tensor.requires_grad)
    for tensor in module.buffers():
        memo[id(tensor)] = tensor
    return copy.deepcopy(module, memo)


def session_pipeline(base: sd_parts.StableDiffusionPipeline) -> sd_parts.StableDiffusionPipeline:
    """A pipeline for one visitor: copies (``shared_copy``) of the UNet and the text encoder, the
    shared VAE and tokenizer (neither is written by an add-on; a textual inversion replaces the
    copy's tokenizer with an extended one)."""
    return sd_parts.StableDiffusionPipeline(base.tokenizer, shared_copy(base.text_encoder),
                                            shared_copy(base.unet), base.vae,
                                            base.scheduler_config)


def allowed_folders() -> list[Path]:
    """The folders whose files a visitor may name by path (``SD_PARTS_ADDON_DIRS``, separated by
    ``os.pathsep``); none unless the operator lists them."""
    listed = os.environ.get(ADDON_DIRS, "")
    return [Path(folder).expanduser().resolve() for folder in listed.split(os.pathsep) if folder]


def source_of(upload: str | None, source: str | None) -> str:
    """The file uploaded, else the Hub repo id or the local path typed; a message if neither.

    A typed path is read only inside ``allowed_folders()``: the page is open to anyone who can
    reach the app, and a path outside them would let a visitor read (or probe for) the server's
    own files. Whether a path exists is said only inside them.
    """
    if upload:
        return str(upload)
    source = (source or "").strip()
    if not source:
        raise ValueError("Upload a .safetensors file or type a Hub repo id (owner/name).")
    path = Path(source).expanduser()
    if HUB_ID.fullmatch(source) and not path.exists():
        return source
    resolved = path.resolve()
    if not any(resolved.is_relative_to(folder) for folder in allowed_folders()):
        raise ValueError(f"{source}: files on the server are read by path only inside the "
                         f"folders it was started with ({ADDON_DIRS}); upload the file instead, "
                         "or give a Hub repo id (owner/name).")
    if not resolved.exists():
        raise ValueError(f"{source}: no such file or folder.")
    return str(resolved)


def load_lora(models: Models, source: str, scale: float, exact: bool) -> AddOn:
    base = models.pipeline(exact)
    pipe = session_pipeline(base)
    layers, _, path = HUB.load(source, lambda: sd_parts.read_lora(base, source),
                               f"the LoRA {source!r}")
    summary = sd_parts.load_lora_weights(pipe, path, scale=scale)
    return AddOn("LoRA", summary.name, pipe, base, exact, str(summary), lora=summary,
                 layers=layers)


def load_embedding(models: Models, source: str, token: str | None, exact: bool) -> AddOn:
    base = models.pipeline(exact)
    pipe = session_pipeline(base)
    embedding = HUB.load(source, lambda: sd_parts.load_textual_inversion(
        pipe, source, token=token or None), f"the textual inversion {source!r}")
    summary = (f"{embedding.token} ({embedding.layout} layout): {len(embedding.tokens)} vector"
               f"{'s' if len(embedding.tokens) > 1 else ''}, tokens {', '.join(embedding.tokens)}")
    return AddOn("textual inversion", embedding.token, pipe, base, exact, summary,
                 embedding=embedding)


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def float32_size(source: str) -> int:
    """The bytes a local checkpoint's weights take in float32, read from its safetensors headers
    (a half-precision file counts double); 0 when nothing local is found."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors")) if path.is_dir() \
        else []
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def checkpoint_dtype(needed: int, available: int) -> tuple[torch.dtype, str]:
    """float32 when ``MEMORY_HEADROOM`` times the float32 size is available, else bfloat16; and
    the sentence the page shows. A ``ValueError`` when not even the bfloat16 copy fits."""
    gib = 2**30
    if needed / 2 * MEMORY_HEADROOM > available:
        raise ValueError(f"Not enough memory for a second checkpoint: it needs {needed / gib:.2f} "
                         f"GiB in float32 ({needed / 2 / gib:.2f} GiB in bfloat16), and only "
                         f"{available / gib:.1f} GiB are available. Try again later, or compare "
                         "a LoRA instead.")
    if needed * MEMORY_HEADROOM <= available:
        return torch.float32, (f"Loaded in float32 ({needed / gib:.2f} GiB; "
                               f"{available / gib:.1f} GiB were available).")
    return torch.bfloat16, (f"Loaded in bfloat16, half its float32 size of {needed / gib:.2f} "
                            f"GiB: only {available / gib:.1f} GiB of memory were available. "
                            "Its outputs differ from float32 ones by bfloat16's rounding.")


def load_checkpoint(models: Models, source: str, exact: bool) -> AddOn:
    if not os.path.exists(source):
        raise ValueError(f"{source!r} is not a file or folder on this machine: give one LDM "
                         ".safetensors checkpoint or a diffusers pipeline folder (with unet/, "
                         "text_encoder/, vae/).")
    dtype, note = checkpoint_dtype(float32_size(source), available_memory())
    fast = sd_parts.fast_dtype(models.device)
    if not exact and dtype == torch.float32 and fast != torch.float32:
        # compared like with like: fast mode runs the base in bfloat16 too
        dtype, note = fast, ("Loaded in bfloat16, as fast mode runs the base; tick Exact mode "
                             "for float32.")
    pipe = HUB.load(source, lambda: sd_parts.load_pipeline(source, dtype=dtype,
                                                           device=models.device),
                    f"the checkpoint {source!r}")
    base = models.pipeline(exact)
    for part in ("unet", "text_encoder"):
        mine, theirs = getattr(base, part).config, getattr(pipe, part).config
        if mine != theirs:
            raise ValueError(f"the checkpoint's {part} is another architecture than this app's "
                             f"({theirs} against {mine}): compare fine-tunes of the same model")
    return AddOn("second checkpoint", Path(source).name, pipe, base, exact,
                 f"{Path(source).name}: UNet, text encoder and VAE of its own", dtype_note=note)


def load_addon(models: Models, kind: str, source: str, token: str | None, scale: float,
               exact: bool) -> AddOn:
    """The add-on of ``kind`` from ``source``; ``ModelUnavailable`` or ``ValueError`` (with a
    readable message) when it cannot be loaded."""
    if kind == "LoRA":
        return load_lora(models, source, scale, exact)
    if kind == "textual inversion":
        return load_embedding(models, source, token, exact)
    if kind == "second checkpoint":
        return load_checkpoint(models, source, exact)
    raise ValueError(f"Choose what to load: one of {', '.join(KINDS)}; got {kind!r}.")


def set_scale(addon: AddOn, scale: float) -> None:
    """Fuse the session's LoRA again at ``scale`` (from the kept weights)."""
    if addon.lora is not None and addon.lora.scale != scale:
        addon.lora = sd_parts.set_lora_scale(addon.pipe, addon.lora.name, scale)
        addon.summary = str(addon.lora)


def release(addon: AddOn | None) -> None:
    """Drop what a session loaded (``gr.State``'s delete_callback, at the session's end)."""
    if isinstance(addon, AddOn):
        addon.pipe = addon.base  # the copy's own tensors go with the last reference to it
        gc.collect()
