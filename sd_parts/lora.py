"""LoRA: low-rank changes to the UNet's and the text encoder's weights, read as people share them.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). Fine-tuning trains, beside
a layer's frozen weight W (out, in), two thin matrices: A (r, in), "down", and B (out, r), "up",
with a rank r of 4 to 128 against 320 to 1280 channels. The layer then computes with

    W' = W + scale * (alpha / r) * B A

``alpha`` is a number saved with each layer that fixes the size of the change the training saw
(kohya's scripts default to alpha = 1 with r = 4 or more, so the change is divided down); a file
without one means alpha = r. ``scale`` is the user's strength. A convolution (LyCORIS' "LoCon")
stores A as a convolution (r, in, kh, kw) and B as a 1x1 one (out, r, 1, 1): B A is then
(out, in * kh * kw), the kernel's shape once reshaped.

Two layouts are shared, both read here, for the UNet and the text encoder:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` and ``lora_B``, ``text_encoder.text_model.
  <module>...``, optionally ``<module>.alpha`` or a ``lora_adapter_metadata`` entry in the file's
  header; older diffusers files say ``<module>.lora.down.weight`` / ``up``, or
  ``attn1.processor.to_q_lora.down.weight``.
- kohya-ss / AUTOMATIC1111: ``lora_unet_<module with _ for .>.lora_down.weight``, ``lora_up``,
  ``.alpha``, ``lora_te_text_model_encoder_layers_0_...``. Some name the UNet's modules as the
  original LDM code did (``lora_unet_input_blocks_1_1_...``): those names go through the same
  rename rules as single-file checkpoints (``single_file.unet_ldm_rules``).

What this package cannot apply is refused with the keys named: LyCORIS' LoHa (``hada_w1_a``) and
LoKr (``lokr_w1``), DoRA, SDXL LoRAs (a second text encoder, ``lora_te2_``), a layer the model
lacks and factors that do not fit the layer.

Fused, not unfused. A LoRA can be *fused* (W' computed once and put in place of W; W kept aside so
that unloading gives the model back bit for bit) or kept *unfused* (an extra low-rank path
x -> B(A x) per layer at every call, or W' recomputed at every call). This UNet reads its weights
directly in its fast paths (``runtime.linear``, ``runtime.conv3x3``), so the unfused LoRA it
allows without changes is a weight recomputed at each access (``torch.nn.utils.parametrize``).
``benchmarks/lora.py`` measured, on 2 shared AMD EPYC cores (full-size UNet, 256 px, batch 2,
rank 16 on all 128 attention projections): a fused LoRA runs the very computation of the plain
UNet (2.8 s a call), so it adds nothing per call; unfused adds 0.048 s a call recomputing the
weights (1.7%), and the classic low-rank path would add 0.041 s (1.4%) - about a second per
20-step image with guidance. (Whole calls differed by up to 10% between rounds on the busy
machine, more than these costs, so the costs were timed alone.) Fusing took 0.9-1.5 s; unloading
20 ms. The app loads a LoRA rarely and calls the UNet 20-50 times per image, so it fuses. The
price is memory: the kept W, 380-410 MB more for that LoRA in float32 (a second checkpoint
instead: 4.4-4.8 s and 5.6 GB). A new scale is fused again from the kept W, so scales never
pile up rounding.

The state of what is loaded lives on the pipeline (``pipe._loras``); several LoRAs add up, each
with its own scale.

Length: about 530 lines, because reading a file's keys in two layouts, matching them to the
model's layers and fusing them share one resolver and one record of the original weights; the
measures of how much a layer changed are in ``weight_changes.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .single_file import PICKLE_SUFFIXES, UNET_FIXED_NAMES, UNET_RESNET_NAMES, unet_ldm_rules
from .weight_changes import WeightChange, _relative, layer_kind
from .weights import TEXT_ENCODER_RENAME_RULES, WeightsError, fetch_files, rename_key

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers saves a LoRA under
PARTS = {"unet": "UNet", "text_encoder": "text encoder"}

# Key formats that are LoRA-like but are not W + B A: refused by name (LyCORIS' algorithms, DoRA).
UNSUPPORTED = [
    (r"\.hada_(w|t)\d", "LyCORIS LoHa (a Hadamard product of two low-rank pairs)"),
    (r"\.lokr_(w|t)\d", "LyCORIS LoKr (a Kronecker product)"),
    (r"\.lora_mid\.", "LyCORIS LoCon with a Tucker core (lora_mid)"),
    (r"\.(dora_scale|lora_magnitude_vector)", "DoRA (a learned magnitude per output)"),
    (r"\.oft_|\.boft_", "OFT/BOFT (orthogonal fine-tuning)"),
    (r"\.(diff|diff_b|w_norm|b_norm)$", "LyCORIS full weight or norm differences"),
    (r"\.lora_B\.bias$", "a LoRA with a bias in lora_B"),
]
# Keys of a second text encoder: SDXL's OpenCLIP ViT-bigG, which SD v1 has no place for.
SDXL_PREFIXES = ("lora_te2_", "text_encoder_2.")
# Context widths that name the family a cross-attention LoRA was trained for.
CONTEXT_FAMILIES = {1024: "SD 2.x (a 1024-wide OpenCLIP context)",
                    2048: "SDXL (a 2048-wide context from two text encoders)"}

# kohya: "<name>.<suffix>", the name a module path with "_" for "."
_KOHYA = re.compile(r"^lora_(unet|te1?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# diffusers: PEFT's lora_A/lora_B, the older lora.down/lora_linear_layer.down, and alpha
_DIFFUSERS = re.compile(r"^(.+?)\.(?:lora_(A|B)\.weight|(?:lora|lora_linear_layer)\.(down|up)"
                        r"\.weight|(alpha))$")
# the oldest diffusers files: attention processors, "attn1.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"^(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                     "to_out": "out_proj"}}
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up", "lora_down.weight": "down",
          "lora_up.weight": "up", "alpha": "alpha"}
# LDM's names of the UNet's parts, as segments (for reading kohya's underscores back into dots)
LDM_SEGMENTS = {segment for name in (*UNET_RESNET_NAMES, *UNET_FIXED_NAMES)
                for segment in name.split(".")} | {"middle_block", "output_blocks"}


class LoraLayer(NamedTuple):
    """One layer's change as the file gives it, matched to a module of the model."""

    part: str  # "unet" or "text_encoder"
    module: str  # the module's name in the model, e.g. "down_blocks.0.resnets.0.conv1"
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float
    key: str  # the file's name for the layer, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """scale * (alpha / r) * B A, in float32 on ``weight``'s device, in ``weight``'s shape."""
        up = self.up.to(weight.device, torch.float32).flatten(1)  # (out, r)
        down = self.down.to(weight.device, torch.float32).flatten(1)  # (r, in * kh * kw)
        return (scale * self.alpha / self.rank) * (up @ down).view(weight.shape)


class LayerInfo(NamedTuple):
    part: str
    module: str
    kind: str  # what the layer is, see layer_kind
    rank: int
    alpha: float


@dataclass(frozen=True)
class LoraSummary:
    """What a LoRA file held and changed: its layers, their ranks and alphas."""

    name: str
    path: str
    layout: str  # "diffusers/PEFT", "kohya", "kohya (LDM names)", or several
    scale: float
    layers: tuple[LayerInfo, ...]

    def per_block(self) -> dict[str, int]:
        """Layers per block: ``{"unet down_blocks.0": 24, ..., "text_encoder layers.11": 4}``."""
        return dict(Counter(f"{layer.part} {block_of(layer.module)}" for layer in self.layers))

    def __str__(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        alphas = sorted({layer.alpha for layer in self.layers})
        parts = Counter(PARTS[layer.part] for layer in self.layers)
        blocks = ", ".join(f"{block} {n}" for block, n in self.per_block().items())
        return (f"{self.name} ({self.layout}, scale {self.scale:g}): {len(self.layers)} layers "
                f"({', '.join(f'{part} {n}' for part, n in parts.items())}); rank "
                f"{'/'.join(map(str, ranks))}, alpha {'/'.join(f'{a:g}' for a in alphas)}. "
                f"Per block: {blocks}")


def block_of(module: str) -> str:
    """The block of a module: ``down_blocks.1``, ``mid_block``, ``layers.3``, ``conv_in``."""
    segments = module.split(".")
    if segments[0] in ("down_blocks", "up_blocks"):
        return ".".join(segments[:2])
    if segments[:2] == ["encoder", "layers"]:
        return ".".join(segments[1:3])
    return segments[0]


# --- Finding and reading the file -------------------------------------------------------------

def adapter_file(source: str | Path, default_name: str, weight_name: str | None = None) -> Path:
    """The safetensors file of an adapter: ``source`` itself, the file in a folder (``weight_name``,
    ``default_name`` or its only ``.safetensors``), or ``weight_name``/``default_name`` in a Hub
    repo. Pickled files (``.ckpt``, ``.pt``, ``.bin``) are refused: unpickling can run any code."""
    source = str(source)
    for name in (source, weight_name or ""):
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(f"{name} is a pickled file: pickled weights are never loaded "
                               "(unpickling a file can run any code in it); use a .safetensors "
                               "version of it")
    if os.path.isfile(source):
        return Path(source)
    if os.path.isdir(source):
        folder = Path(source)
        if weight_name or (folder / default_name).is_file():
            return folder / (weight_name or default_name)
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            what = ", ".join(p.name for p in found) if found else "no .safetensors file"
            raise WeightsError(f"{folder} has {what}: pass weight_name= to say which file to "
                               f"load (the default name is {default_name})")
        return found[0]
    return fetch_files(source, [weight_name or default_name])[weight_name or default_name]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) safetensors file and its header's metadata; never unpickles."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except SafetensorError as exc:
        with path.open("rb") as f:
            head = f.read(2)
        kind = ("a pickled file (torch.save format), which is never loaded"
                if head == b"PK" or head[:1] == b"\x80" else "not a valid safetensors file")
        raise WeightsError(f"{path} is {kind} ({exc}); use a .safetensors version of it") from exc


def _dotted(name: str, segments: set[str]) -> str:
    """kohya's ``down_blocks_0_attentions_0_to_q`` back into ``down_blocks.0.attentions.0.to_q``:
    underscores are dots except inside a known segment name (the longest match wins)."""
    atoms, out, i = name.split("_"), [], 0
    longest = max(segment.count("_") for segment in segments) + 1
    while i < len(atoms):
        for n in range(min(longest, len(atoms) - i), 1, -1):
            if "_".join(atoms[i:i + n]) in segments:
                out.append("_".join(atoms[i:i + n]))
                i += n
                break
        else:
            out.append(atoms[i])
            i += 1
    return ".".join(out)


class _Resolver:
    """Module names of the model's two parts, and the renames from a file's names to them."""

    def __init__(self, models: Mapping[str, nn.Module], layers_per_block: int):
        self.modules = {part: dict(model.named_modules()) for part, model in models.items()}
        self.segments = {part: {s for name in modules for s in name.split(".") if "_" in s}
                         for part, modules in self.modules.items()}
        self.segments["unet"] |= LDM_SEGMENTS
        self.segments["text_encoder"].add("text_model")
        self.ldm_rules = unet_ldm_rules(layers_per_block)

    def resolve(self, part: str, name: str, kohya: bool) -> tuple[str, str]:
        """The model's module for a file's layer name, and how it was read: "" (as it is), "LDM"
        (LDM's UNet names, converted) or, where no module has it, the name that was looked for."""
        if kohya:
            name = _dotted(name, self.segments[part])
        if part == "text_encoder":
            name = rename_key(name, TEXT_ENCODER_RENAME_RULES)[0]
        if name in self.modules[part]:
            return name, ""
        if part == "unet":
            converted = rename_key(name + ".weight", self.ldm_rules)[0].removesuffix(".weight")
            if converted != name and converted in self.modules[part]:
                return converted, "LDM"
        return "", name


def _split_key(key: str) -> tuple[str, str, str, bool] | None:
    """(part, the file's layer name, role, kohya?) for a LoRA key, None if it is not one."""
    if match := _KOHYA.match(key):
        part = "unet" if match[1] == "unet" else "text_encoder"
        return part, match[2], _ROLES[match[3]], True
    part, _, rest = key.partition(".")
    if part not in PARTS:  # files of the UNet alone leave the prefix out
        part, rest = ("text_encoder", key) if key.startswith("text_model.") else ("unet", key)
    if match := _PROCESSOR.match(rest):
        return part, f"{match[1]}.{_PROCESSOR_NAMES[part][match[2]]}", match[3], False
    if match := _DIFFUSERS.match(rest):
        role = next(group for group in match.groups()[1:] if group)
        return part, match[1], _ROLES[role], False
    return None


def _metadata_alpha(config: Mapping[str, object], part: str, module: str) -> float | None:
    """alpha from diffusers' ``lora_adapter_metadata``: PEFT's LoraConfig per part, its keys
    prefixed ``unet.`` or ``text_encoder.``; ``alpha_pattern`` entries match a name's end."""
    patterns = config.get(f"{part}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    alpha = config.get(f"{part}.lora_alpha")
    return None if alpha is None else float(alpha)


def _adapter_config(path: Path, metadata: Mapping[str, str]) -> dict[str, object]:
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: its lora_adapter_metadata is not JSON ({exc})") from exc
    flags = sorted(key for key, value in config.items()
                   if key.rsplit(".", 1)[-1] in ("use_dora", "use_rslora") and value)
    if flags:
        raise WeightsError(f"{path} sets {', '.join(flags)} in its metadata: DoRA and "
                           "rank-stabilised LoRA are not supported")
    return config


def read_lora(pipe: object, source: str | Path, weight_name: str | None = None
              ) -> tuple[list[LoraLayer], str, Path]:
    """A LoRA's layers matched to ``pipe``'s UNet and text encoder, its layout and its file.

    Nothing is applied. Every key that cannot be read is an error naming it.
    """
    path = adapter_file(source, LORA_FILE, weight_name)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise WeightsError(f"{path} holds no tensors")
    config = _adapter_config(path, metadata)
    sdxl = [key for key in tensors if key.startswith(SDXL_PREFIXES)]
    if sdxl:
        raise WeightsError(f"{path} is an SDXL LoRA: it changes a second text encoder, which SD v1 "
                           f"does not have ({_names(sdxl)}). Use a LoRA trained for SD 1.x.")
    problems: list[str] = []
    for pattern, what in UNSUPPORTED:
        keys = [key for key in tensors if re.search(pattern, key)]
        if keys:
            problems.append(f"{what} is not supported: {_names(keys)}")
    if problems:
        raise WeightsError(f"{path} cannot be applied as W + B A. " + " | ".join(problems))

    groups: dict[tuple[str, str, bool], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        part, name, role, kohya = split
        group = groups.setdefault((part, name, kohya), {})
        if role in group:
            problems.append(f"{key} and {group[role][0]} are the same layer's {role}")
        group[role] = key, tensor
    if unknown:
        problems.append(f"not LoRA tensors in a layout this package reads: {_names(unknown)}")

    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    resolver = _Resolver(models, pipe.unet.config.layers_per_block)
    layers: dict[tuple[str, str], LoraLayer] = {}
    layouts = set()
    for (part, name, kohya), group in groups.items():
        first = next(iter(group.values()))[0]
        if "down" not in group or "up" not in group:
            lacking = "down (A)" if "down" not in group else "up (B)"
            problems.append(f"{first}: the layer has no {lacking} matrix")
            continue
        module, read_as = resolver.resolve(part, name, kohya)
        if not module:
            problems.append(f"{first}: the {PARTS[part]} has no layer {read_as!r}")
            continue
        layouts.add(("kohya (LDM names)" if read_as else "kohya") if kohya else "diffusers/PEFT")
        target = resolver.modules[part][module]
        down, up = group["down"][1], group["up"][1]
        problem = _shape_problem(target, module, down, up)
        if problem:
            problems.append(f"{first}: {problem}")
            continue
        alpha = _alpha(group.get("alpha"), config, part, module, down.shape[0], problems)
        if (part, module) in layers:
            problems.append(f"{first} and {layers[part, module].key} change the same layer")
        layers[part, module] = LoraLayer(part, module, down, up, alpha, first)
    if problems:
        raise WeightsError(f"{path} cannot be loaded: " + " | ".join(problems))
    return list(layers.values()), " + ".join(sorted(layouts)), path


def _alpha(entry: tuple[str, torch.Tensor] | None, config: Mapping[str, object], part: str,
           module: str, rank: int, problems: list[str]) -> float:
    if entry is None:
        alpha = _metadata_alpha(config, part, module)
        return float(rank) if alpha is None else alpha
    key, tensor = entry
    if tensor.numel() != 1 or not math.isfinite(float(tensor.flatten()[0])):
        problems.append(f"{key}: alpha must be one finite number, got shape {tuple(tensor.shape)}")
        return float(rank)
    return float(tensor.flatten()[0])


def _shape_problem(target: nn.Module, module: str, down: torch.Tensor, up: torch.Tensor
                   ) -> str | None:
    """Why lora_down (r, in[, kh, kw]) and lora_up (out, r[, 1, 1]) do not fit the layer, if so."""
    if not isinstance(target, nn.Linear | nn.Conv2d):
        return f"{module} is a {type(target).__name__}, not a Linear or Conv2d layer"
    weight = target.weight  # (out, in) or (out, in, kh, kw)
    shapes = f"lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}"
    kernel, down_kernel = tuple(weight.shape[2:]), tuple(down.shape[2:])
    fits = (
        down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[2:] in ((), (1, 1))
        and up.shape[1] == down.shape[0] and up.shape[0] == weight.shape[0]
        and down.shape[1] == weight.shape[1]
        and (down_kernel == kernel or set(down_kernel + kernel) <= {1})
    )
    if fits:
        return None
    if module.endswith(("attn2.to_k", "attn2.to_v")) and down.shape[-1] in CONTEXT_FAMILIES:
        return f"it was trained for {CONTEXT_FAMILIES[down.shape[-1]]}, not SD v1 ({shapes})"
    return f"{shapes} do not fit the layer's weight {tuple(weight.shape)}"


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- Applying: fused into the weights, the originals kept -------------------------------------

@dataclass
class _Adapter:
    summary: LoraSummary
    layers: dict[tuple[str, str], LoraLayer]
    scale: float


@dataclass
class _LoraState:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    # (part, module) -> the module and its weight before any LoRA, for unloading bit for bit
    originals: dict[tuple[str, str], tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)


def _state(pipe: object) -> _LoraState:
    if "_loras" not in vars(pipe):
        pipe._loras = _LoraState()
    return pipe._loras


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (1: as trained, 0: off); got {scale!r}")
    return float(scale)


def load_lora_weights(pipe: object, source: str | Path, scale: float = 1.0,
                      adapter_name: str | None = None, weight_name: str | None = None
                      ) -> LoraSummary:
    """Add a LoRA (a Hub repo id, a folder or one ``.safetensors`` file) to ``pipe``'s UNet and
    text encoder at ``scale``; returns what it changed. Other loaded LoRAs stay, and add up."""
    scale = _check_scale(scale)
    state = _state(pipe)
    layers, layout, path = read_lora(pipe, source, weight_name)
    name = adapter_name or path.stem
    if name in state.adapters:
        raise ValueError(f"a LoRA named {name!r} is loaded already: pass another adapter_name, "
                         "or unload it first")
    info = tuple(LayerInfo(layer.part, layer.module, layer_kind(layer.module), layer.rank,
                           layer.alpha) for layer in layers)
    summary = LoraSummary(name, str(path), layout, scale, info)
    state.adapters[name] = _Adapter(summary, {(l.part, l.module): l for l in layers}, scale)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for layer in layers:
        key = (layer.part, layer.module)
        if key not in state.originals:
            module = models[layer.part].get_submodule(layer.module)
            state.originals[key] = module, module.weight.data
        _fuse(state, key)
    return summary


@torch.no_grad()
def _fuse(state: _LoraState, key: tuple[str, str]) -> None:
    """Set one layer's weight to W + the sum of the loaded LoRAs' changes, from the kept W."""
    module, original = state.originals[key]
    current = module.weight.data
    # the model may have been cast or moved since: W as it would be now
    base = original.to(current.device, current.dtype)
    changes = [(a.layers[key], a.scale) for a in state.adapters.values() if key in a.layers]
    if not changes:
        module.weight.data = base
        del state.originals[key]
        return
    total = base.float()
    for layer, scale in changes:
        total = total + layer.delta(base, scale)
    fused = torch.empty_like(base)  # keeps the weight's memory format (channels-last convs)
    module.weight.data = fused.copy_(total)


def set_lora_scale(pipe: object, adapter_name: str, scale: float) -> LoraSummary:
    """Change a loaded LoRA's scale; its layers are fused again from the original weights."""
    adapter = _adapter(pipe, adapter_name)
    adapter.scale = _check_scale(scale)
    adapter.summary = LoraSummary(adapter.summary.name, adapter.summary.path,
                                  adapter.summary.layout, adapter.scale, adapter.summary.layers)
    for key in adapter.layers:
        _fuse(_state(pipe), key)
    return adapter.summary


def unload_lora_weights(pipe: object, adapter_name: str | None = None) -> None:
    """Take one LoRA (or, with no name, all) out again; the other LoRAs stay. With none left,
    every changed weight is the very tensor it was before loading."""
    state = _state(pipe)
    names = list(state.adapters) if adapter_name is None else [adapter_name]
    for name in names:
        keys = _adapter(pipe, name).layers
        del state.adapters[name]
        for key in keys:
            _fuse(state, key)


def loaded_loras(pipe: object) -> list[LoraSummary]:
    return [adapter.summary for adapter in _state(pipe).adapters.values()]


def _adapter(pipe: object, name: str) -> _Adapter:
    adapters = _state(pipe).adapters
    if name not in adapters:
        raise ValueError(f"no LoRA named {name!r} is loaded (loaded: "
                         f"{', '.join(map(repr, adapters)) or 'none'})")
    return adapters[name]


def lora_deltas(layers: Iterable[LoraLayer], models: Mapping[str, nn.Module], scale: float = 1.0
                ) -> dict[str, torch.Tensor]:
    """Each layer's change ``scale * (alpha / r) * B A`` without applying it, in float32, keyed
    ``"unet.<module>.weight"`` / ``"text_encoder.<module>.weight"``; ``models`` maps the parts
    to the modules (for the weights' shapes and device)."""
    scale = _check_scale(scale)
    return {f"{layer.part}.{layer.module}.weight":
            layer.delta(models[layer.part].get_submodule(layer.module).weight, scale)
            for layer in layers}


def lora_changes(pipe: object, source: str | Path, scale: float = 1.0,
                 weight_name: str | None = None) -> list[WeightChange]:
    """How much a LoRA would change each of its layers, ||ΔW|| / ||W||, without applying it.
    W is the weight before any loaded LoRA."""
    layers, _, _ = read_lora(pipe, source, weight_name)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    originals = _state(pipe).originals
    changes = []
    for name, delta in lora_deltas(layers, models, scale).items():
        part, module = name.removesuffix(".weight").split(".", 1)
        kept = originals.get((part, module))
        weight = kept[1] if kept else models[part].get_submodule(module).weight
        changes.append(WeightChange(name, _relative(weight, delta), layer_kind(module)))
    return changes
