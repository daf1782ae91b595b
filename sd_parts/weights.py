"""Getting checkpoint files from the Hugging Face Hub (or a local folder) and loading them strictly.

A *source* is either a Hub repo id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or a path
to a folder with the same layout. Files are fetched with ``huggingface_hub`` (so they are cached and
``HF_HUB_OFFLINE=1`` works) and read with ``safetensors``: nothing is ever unpickled.

The modules in this package name their parameters exactly as the Hub checkpoints do, so loading is
a few whole-segment rename rules followed by a strict key and shape check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from torch import nn

from .clip import CLIPTextEncoder
from .config import CLIPTextConfig, TinyVAEConfig, VAEConfig
from .tiny_vae import AutoencoderTiny
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched or loaded; the message says what to do."""


def _hub_failure(exc: Exception) -> str:
    """One line that says why the Hub could not give us a file."""
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return "no such repository (check the name, or log in if it is private)"
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return "no such revision"
    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        return "not in the local cache and the Hub could not be reached (offline?)"
    if isinstance(exc, hub_errors.EntryNotFoundError):
        return "no such file in the repository"
    if isinstance(exc, hub_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set and the file is not cached"
    return f"{type(exc).__name__}: {exc}"


def gated_message(repo: str) -> str:
    """What to do about a gated repo: its files are given only to accounts that accepted its
    licence (SD3's VAE lives in one), so both the acceptance and a login are needed."""
    return (
        f"{repo!r} is a gated repository: the Hub gives its files only to logged-in accounts that"
        f" have accepted its licence. To fix: open https://huggingface.co/{repo}, accept the"
        " licence there, then log in on this machine with `hf auth login` (`huggingface-cli"
        " login` in older huggingface_hub versions) or set the HF_TOKEN environment variable to"
        " an access token of that account."
    )


def fetch_files(
    source: str,
    filenames: Sequence[str],
    subfolder: str | None = None,
    default_subfolder: str = "",
    revision: str | None = None,
) -> dict[str, Path]:
    """Return local paths of ``filenames`` from a local folder or a Hub repo.

    With ``subfolder=None`` the files are looked for at the top of the source first and then in
    ``default_subfolder`` (``vae``, ``text_encoder``, ``tokenizer``), so that both a standalone
    repo (``stabilityai/sd-vae-ft-mse``) and a full pipeline repo work without extra arguments.
    """
    if subfolder is not None:
        candidates = [subfolder]
    else:
        candidates = list(dict.fromkeys(["", default_subfolder]))
    tried: list[str] = []
    for folder in candidates:
        found = _fetch_from(source, filenames, folder, revision, tried)
        if found is not None:
            return found
    where = f"revision {revision!r} of " if revision else ""
    raise WeightsError(
        f"Could not get {', '.join(filenames)} from {where}{source!r}. Tried:\n  "
        + "\n  ".join(tried)
        + "\nTo fix: check the repo id or folder and subfolder; if you are offline, download the"
        " files once while online (they are then cached and HF_HUB_OFFLINE=1 uses the cache),"
        " pass a local folder with the same layout, or use random weights."
    )


def _fetch_from(
    source: str, filenames: Sequence[str], folder: str, revision: str | None, tried: list[str]
) -> dict[str, Path] | None:
    if os.path.isdir(source):
        paths = {name: Path(source, folder, name) for name in filenames}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            tried.append(f"{', '.join(missing)}: no such file")
            return None
        return paths
    paths = {}
    for name in filenames:
        try:
            local = hf_hub_download(source, name, subfolder=folder or None, revision=revision)
        except hub_errors.GatedRepoError as exc:  # the whole repo is closed: no other folder helps
            raise WeightsError(gated_message(source)) from exc
        except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError,
                hub_errors.OfflineModeIsEnabled, hub_errors.HFValidationError, OSError) as exc:
            tried.append(f"{source}/{folder + '/' if folder else ''}{name}: {_hub_failure(exc)}")
            return None
        paths[name] = Path(local)
    return paths


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not a readable JSON config: {exc}") from exc


def weights_filename(stem: str, variant: str | None) -> str:
    """``model`` + ``fp16`` -> ``model.fp16.safetensors``, the Hub's variant naming."""
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


Reshape = Callable[[torch.Tensor], torch.Tensor]


class RenameRule(NamedTuple):
    """One step from a checkpoint's key to a module's parameter name.

    ``pattern`` is a regex matched on whole dot-separated segments (anchored with ``^``, ``(^|\\.)``
    and ``(\\.|$)``), so ``key`` never matches inside ``monkey``. ``replacement`` is what
    ``re.sub`` takes: a string with group references, or a function of the match, which is how a
    rule remaps an index (the original LDM layout numbers blocks differently from diffusers).
    ``reshape``, if given, is applied to the tensor of every key the rule matched (LDM stores some
    linear layers as 1x1 convolutions). A plain ``(pattern, replacement)`` pair is a rule too.
    """

    pattern: str
    replacement: str | Callable[[re.Match[str]], str]
    reshape: Reshape | None = None


def rename_key(
    key: str, rules: Sequence[RenameRule | tuple[str, str]]
) -> tuple[str, tuple[Reshape, ...]]:
    """Apply ``rules`` in order to ``key``: the new key and the reshapes its tensor needs."""
    reshapes: list[Reshape] = []
    for rule in rules:
        rule = RenameRule(*rule)
        key, count = re.subn(rule.pattern, rule.replacement, key)
        if count and rule.reshape is not None:
            reshapes.append(rule.reshape)
    return key, tuple(reshapes)


def squeeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight (out, in, 1, 1) as the equal linear weight (out, in).

    Any other tensor is returned as it is, so that a real mismatch still fails the shape check.
    """
    if tensor.ndim > 2 and all(size == 1 for size in tensor.shape[2:]):
        return tensor.reshape(tensor.shape[:2])
    return tensor


def _name_list(names: Sequence[str], separator: str = ", ", limit: int = 40) -> str:
    """Names joined for an error message; a long list (a whole model missing) is cut short."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return separator.join(names[:limit]) + more


# Reading a tensor maps its part of the file into the process, and those pages stay resident (and
# count in its memory) for as long as the file is open: reading a whole 1.7 GB UNet file in one
# pass into bfloat16 peaked at twice the model's size. Reopening the file after every group of this
# many bytes keeps only one group mapped, so the peak is the model plus a group. Each pass opens
# the file again (about a millisecond for SD's files), and safetensors checks its header again.
READ_GROUP_BYTES = 64 * 2**20


def read_tensors(path: Path, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for each of ``keys`` in turn, from a safetensors file opened once per
    group: a group ends with the tensor that brings it to ``READ_GROUP_BYTES`` or more."""
    done = 0
    while done < len(keys):
        with safe_open(str(path), framework="pt") as f:
            group_bytes = 0
            while done < len(keys) and group_bytes < READ_GROUP_BYTES:
                tensor = f.get_tensor(keys[done])
                group_bytes += tensor.nbytes
                yield keys[done], tensor
                done += 1


def load_state_dict_strict(
    model: nn.Module,
    path: Path,
    rename_rules: Sequence[RenameRule | tuple[str, str]] = (),
    drop: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype = torch.float32,
    prefix: str = "",
) -> None:
    """Load a safetensors file into ``model`` after renaming its keys; every mismatch is an error.

    ``model`` may live on the ``meta`` device: tensors are then assigned, not copied, so loading
    needs no memory beyond the weights themselves (each tensor is reshaped and cast as it is read,
    and the file is read in groups, see ``read_tensors``). With a ``prefix`` (a file holding
    several models), only the keys under it are this model's; the prefix is removed before the
    rules run. ``drop`` sees the renamed key. Errors name a tensor by its key in the file and,
    where a rule changed it, by the name it was given.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    renamed_from: dict[str, str] = {}
    to_read: dict[str, tuple[str, tuple[Reshape, ...]]] = {}  # file key -> model key, reshapes
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if not key.startswith(prefix):
                continue
            new_key, reshapes = rename_key(key.removeprefix(prefix), rename_rules)
            if drop(new_key):
                continue
            if new_key in renamed_from:
                first = renamed_from[new_key]
                raise WeightsError(f"{path}: {first!r} and {key!r} both map to {new_key!r}")
            renamed_from[new_key] = key
            if new_key in expected:
                to_read[key] = new_key, reshapes
        for key, tensor in read_tensors(path, list(to_read)):
            new_key, reshapes = to_read[key]
            for reshape in reshapes:
                tensor = reshape(tensor)
            state[new_key] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    except SafetensorError as exc:
        raise WeightsError(
            f"{path} is not a valid safetensors file ({exc}). It may be truncated or in another"
            " format (pickled .bin/.ckpt files are never loaded); delete it and download again."
        ) from exc

    def named(new_key: str) -> str:  # the file's key, and the model's name where they differ
        key = renamed_from[new_key]
        return key if key == new_key else f"{key} (as {new_key})"

    missing = sorted(set(expected) - set(renamed_from))
    unexpected = sorted(named(k) for k in set(renamed_from) - set(expected))
    wrong_shape = sorted(
        f"{named(k)}: file {tuple(v.shape)}, model {tuple(expected[k])}"
        for k, v in state.items()
        if v.shape != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_name_list(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_name_list(wrong_shape, '; ')}")
    if problems:
        subject = f"{path} (its keys under {prefix!r})" if prefix else str(path)
        raise WeightsError(
            f"{subject} does not match {type(model).__name__} (is it the right model and config?): "
            + " | ".join(problems)
        )
    model.load_state_dict(state, strict=True, assign=True)


# Old diffusers files (SD v1.5's own VAE, sd-vae-ft-mse) name the mid-block attention like this.
VAE_RENAME_RULES: list[RenameRule] = [
    RenameRule(rf"(^|\.){old}(\.|$)", rf"\g<1>{new}\g<2>")
    for old, new in [("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                     ("proj_attn", "to_out.0")]
]
# The Hub's text encoder files prefix every key with ``text_model.``; transformers 5 writes none.
TEXT_ENCODER_RENAME_RULES: list[RenameRule] = [RenameRule(r"^text_model\.", "")]
# Parts of a full CLIP checkpoint that are not the text tower, and the position-id buffer that
# older files carry (positions are always 0..T-1, so it holds no information).
_NOT_TEXT_TOWER = {"vision_model", "visual_projection", "text_projection", "logit_scale"}


def _not_text_tower(key: str) -> bool:
    return key == "embeddings.position_ids" or key.split(".")[0] in _NOT_TEXT_TOWER


@dataclass(frozen=True)
class CheckpointLayout:
    """How one model is stored on the Hub: folder, file stem, config and key conventions."""

    default_subfolder: str
    weights_stem: str
    config_class: type
    model_class: type[nn.Module]
    rename_rules: Sequence[RenameRule]
    drop: Callable[[str], bool] = lambda key: False


VAE_LAYOUT = CheckpointLayout("vae", "diffusion_pytorch_model", VAEConfig, AutoencoderKL,
                              VAE_RENAME_RULES)
TEXT_ENCODER_LAYOUT = CheckpointLayout("text_encoder", "model", CLIPTextConfig, CLIPTextEncoder,
                                       TEXT_ENCODER_RENAME_RULES, _not_text_tower)


def load_model(
    layout: CheckpointLayout,
    source: str,
    subfolder: str | None,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> nn.Module:
    """Fetch ``config.json`` + weights, build the module from the config, load it strictly."""
    weights = weights_filename(layout.weights_stem, variant)
    files = fetch_files(source, ["config.json", weights], subfolder, layout.default_subfolder,
                        revision)
    config = _parse_config(layout.config_class, files["config.json"])
    with torch.device("meta"):  # no memory is allocated until the weights are assigned
        model = layout.model_class(config)
    load_state_dict_strict(model, files[weights], layout.rename_rules, layout.drop, dtype)
    return model.to(device).eval().requires_grad_(False)


def load_vae(
    source: str = DEFAULT_REPO,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKL:
    """The VAE from a diffusers-layout folder (``config.json`` + ``diffusion_pytorch_model``)."""
    return load_model(VAE_LAYOUT, source, subfolder, revision, variant, dtype, device)


def load_text_encoder(
    source: str = DEFAULT_REPO,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CLIPTextEncoder:
    """The CLIP text encoder from a transformers-layout folder (``config.json`` + ``model``)."""
    return load_model(TEXT_ENCODER_LAYOUT, source, subfolder, revision, variant, dtype, device)


def _parse_config(cls: type, path: Path) -> object:
    try:
        return cls.from_dict(read_config(path))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from exc


# The Hub's unet file uses today's diffusers names, which are the module's: no rename rules.
UNET_LAYOUT = CheckpointLayout("unet", "diffusion_pytorch_model", UNetConfig, UNet2DConditionModel,
                               [])


def load_unet(
    source: str = DEFAULT_REPO,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> UNet2DConditionModel:
    """The noise predictor from a diffusers-layout folder (``config.json`` +
    ``diffusion_pytorch_model``), e.g. ``variant="fp16"`` for the half-size file."""
    return channels_last(load_model(UNET_LAYOUT, source, subfolder, revision, variant, dtype,
                                    device))


def channels_last(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """``unet`` (changed in place) with its conv weights in the channels-last layout that its
    activations use, or each call would convert them.

    Called by the loaders once loading is done: each weight is then converted alone, as no other
    reference to it is held, so the peak memory grows by one tensor, not by a model.
    """
    return unet.to(memory_format=torch.channels_last)


# The tiny autoencoders' files are written by diffusers under today's names: no rename rules.
# Standalone repos (madebyollin/taesd) hold them at the top, pipelines in ``vae``.
TINY_VAE_LAYOUT = CheckpointLayout("vae", "diffusion_pytorch_model", TinyVAEConfig, AutoencoderTiny,
                                   [])
TAESD_REPO = "madebyollin/taesd"


def load_tiny_vae(
    source: str = TAESD_REPO,
    subfolder: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderTiny:
    """A TAESD-family autoencoder (madebyollin/taesd, taesdxl, taesd3, taef1) from a
    diffusers-layout folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    return load_model(TINY_VAE_LAYOUT, source, subfolder, revision, None, dtype, device)
