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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from torch import nn

from .clip import CLIPTextEncoder
from .config import CLIPTextConfig, VAEConfig
from .vae import AutoencoderKL

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched or loaded; the message says what to do."""


def _hub_failure(exc: Exception) -> str:
    """One line that says why the Hub could not give us a file."""
    if isinstance(exc, hub_errors.GatedRepoError):
        return "the repository is gated: accept its licence on the Hub and log in (hf auth login)"
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


RenameRule = tuple[str, str]
"""(pattern, replacement): a regex applied to each key; patterns match whole dot-separated
segments (anchored with ``(^|\\.)`` and ``(\\.|$)``) so ``key`` never matches inside ``monkey``."""


def load_state_dict_strict(
    model: nn.Module,
    path: Path,
    rename_rules: Sequence[RenameRule] = (),
    drop: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Load a safetensors file into ``model`` after renaming its keys; every mismatch is an error.

    ``model`` may live on the ``meta`` device: tensors are then assigned, not copied, so loading
    needs no memory beyond the weights themselves (each tensor is cast as it is read).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    renamed_from: dict[str, str] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                new_key = key
                for pattern, replacement in rename_rules:
                    new_key = re.sub(pattern, replacement, new_key)
                if drop(new_key):
                    continue
                if new_key in renamed_from:
                    first = renamed_from[new_key]
                    raise WeightsError(f"{path}: {first!r} and {key!r} both map to {new_key!r}")
                renamed_from[new_key] = key
                if new_key in expected:
                    tensor = f.get_tensor(key)
                    state[new_key] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    except SafetensorError as exc:
        raise WeightsError(
            f"{path} is not a valid safetensors file ({exc}). It may be truncated or in another"
            " format (pickled .bin/.ckpt files are never loaded); delete it and download again."
        ) from exc
    missing = sorted(set(expected) - set(renamed_from))
    unexpected = sorted(renamed_from[k] for k in set(renamed_from) - set(expected))
    wrong_shape = sorted(
        f"{renamed_from[k]}: file {tuple(v.shape)}, model {tuple(expected[k])}"
        for k, v in state.items()
        if v.shape != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
    if problems:
        raise WeightsError(
            f"{path} does not match {type(model).__name__} (is it the right model and config?): "
            + " | ".join(problems)
        )
    model.load_state_dict(state, strict=True, assign=True)


# Old diffusers files (SD v1.5's own VAE, sd-vae-ft-mse) name the mid-block attention like this.
VAE_RENAME_RULES: list[RenameRule] = [
    (rf"(^|\.){old}(\.|$)", rf"\g<1>{new}\g<2>")
    for old, new in [("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                     ("proj_attn", "to_out.0")]
]
# The Hub's text encoder files prefix every key with ``text_model.``; transformers 5 writes none.
TEXT_ENCODER_RENAME_RULES: list[RenameRule] = [(r"^text_model\.", "")]
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
