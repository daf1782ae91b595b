"""Tensors saved as .safetensors files, with metadata that says what they are and how to use them.

safetensors stores only tensors and string metadata: nothing is pickled, so the files are safe to
open anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from viz.latents import latent_to_numpy


def latent_to_safetensors(
    latent: torch.Tensor,
    scaling_factor: float,
    source_size: tuple[int, int],
    path: str | Path,
    shift_factor: float = 0.0,
) -> Path:
    """Write a raw latent to a .safetensors file as ``latent`` of shape (1, C, h, w), float32.

    The metadata (safetensors allows only strings) records the scaling and shift factors, the
    width and height of the encoded image, and that the tensor is raw, as the encoder gave it:
    the diffusion model takes (latent - shift_factor) x scaling_factor, and the decoder the raw
    latent back.
    """
    values = torch.from_numpy(latent_to_numpy(latent).astype(np.float32)).unsqueeze(0)
    width, height = source_size
    metadata = {
        "content": "Stable Diffusion VAE latent",
        "scaling_factor": repr(float(scaling_factor)),
        "shift_factor": repr(float(shift_factor)),
        "source_width": str(int(width)),
        "source_height": str(int(height)),
        "note": "raw: the diffusion model takes (latent - shift_factor) * scaling_factor; "
                "decode it as it is",
    }
    path = Path(path)
    save_file({"latent": values.contiguous()}, str(path), metadata=metadata)
    return path


def embeddings_to_safetensors(
    last_hidden_state: torch.Tensor, input_ids: torch.Tensor, path: str | Path, prompt: str = ""
) -> Path:
    """Write CLIP text embeddings to a .safetensors file with the ids and prompt they came from.

    Tensors: ``last_hidden_state`` (1, T, D) float32 and ``input_ids`` (1, T) int64, a batch of
    one as SD v1's U-Net takes them (T = 77, D = 768). A missing batch dimension is added.
    """
    hidden = last_hidden_state.detach().to("cpu", torch.float32)
    ids = input_ids.detach().to("cpu", torch.int64)
    hidden = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    if hidden.dim() != 3 or ids.dim() != 2 or hidden.shape[:2] != ids.shape:
        raise ValueError(
            f"expected hidden (1, T, D) and ids (1, T), got {tuple(hidden.shape)} and "
            f"{tuple(ids.shape)}"
        )
    metadata = {
        "content": "CLIP text encoder last hidden state (after the final layer norm)",
        "prompt": prompt,
        "positions": str(ids.shape[1]),
        "note": "SD v1's U-Net cross-attends to every position, padding included",
    }
    path = Path(path)
    tensors = {"last_hidden_state": hidden.contiguous(), "input_ids": ids.contiguous()}
    save_file(tensors, str(path), metadata=metadata)
    return path
