"""Textual inversion: new words for the text encoder, each one or a few learned input vectors.

Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion" (2022). Training leaves every network frozen and learns only the input embedding of a
new token (``<cat-toy>``): a row added to CLIP's token-embedding table, 768 numbers for SD v1.
Several vectors per token let a concept take several positions of the 77.

Two files are shared, both read here (safetensors only; pickled ``.pt``/``.bin`` are refused):

- diffusers' ``learned_embeds.safetensors``: one key, the token, holding (768,) or (n, 768);
- the AUTOMATIC1111 web UI's: ``emb_params`` (n, 768); the token is ``token=`` or the file's name.

As diffusers does, n vectors become the tokens ``tok``, ``tok_1``, ..., ``tok_{n-1}`` with the next
free ids, ``tok`` in a prompt expands to all of them (``CLIPTokenizer.with_added_tokens``), and the
text encoder's table grows by n rows. Unloading gives back the very tokenizer and table it had.
The state lives on the pipeline (``pipe._textual_inversion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .lora import adapter_file, read_safetensors
from .tokenizer import CLIPTokenizer, clean_text
from .weights import WeightsError

EMBEDDING_FILE = "learned_embeds.safetensors"  # the name diffusers saves an embedding under
A1111_KEY = "emb_params"
# widths of other families' token embeddings, to say what a wrong file is for
WIDTHS = {1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)"}


@dataclass(frozen=True)
class Embedding:
    """One textual inversion: its token, the tokens it became and their vectors."""

    token: str  # as typed in a prompt (lowercased: prompts are read lowercased)
    tokens: tuple[str, ...]  # token, token_1, ...: one per vector
    vectors: torch.Tensor  # (n, hidden)
    path: str
    layout: str  # "diffusers" or "AUTOMATIC1111"


def read_embedding(source: str | Path, token: str | None = None, weight_name: str | None = None,
                   width: int = 768) -> Embedding:
    """The embedding of a file, folder or Hub repo, checked against the text encoder's ``width``."""
    path = adapter_file(source, EMBEDDING_FILE, weight_name)
    tensors, _ = read_safetensors(path)
    keys = sorted(tensors)
    if {"clip_l", "clip_g"} <= set(keys):
        raise WeightsError(f"{path} is an SDXL embedding (clip_l and clip_g vectors, for its two "
                           "text encoders); SD v1 has one text encoder of width "
                           f"{width}: use an embedding trained for SD 1.x")
    if A1111_KEY in tensors:
        layout, vectors, name = "AUTOMATIC1111", tensors[A1111_KEY], token or path.stem
    elif len(keys) == 1:
        layout, vectors, name = "diffusers", tensors[keys[0]], token or keys[0]
    else:
        raise WeightsError(f"{path} is not a textual inversion file: it should hold one tensor "
                           f"named after its token (diffusers) or '{A1111_KEY}' (AUTOMATIC1111), "
                           f"but holds {', '.join(keys[:10]) or 'nothing'}")
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise WeightsError(f"{path}: the vectors must be (n, {width}) floats, got "
                           f"{tuple(vectors.shape)} {vectors.dtype}")
    if vectors.shape[1] != width:
        family = f", the width of {WIDTHS[vectors.shape[1]]}" if vectors.shape[1] in WIDTHS else ""
        raise WeightsError(f"{path}: its vectors are {vectors.shape[1]} wide{family}; this text "
                           f"encoder's token embeddings are {width} wide")
    if not torch.isfinite(vectors).all():
        raise WeightsError(f"{path}: its vectors hold NaN or infinite values")
    name = clean_text(name)
    names = (name,) + tuple(f"{name}_{i}" for i in range(1, len(vectors)))
    return Embedding(name, names, vectors, str(path), layout)


@dataclass
class _State:
    tokenizer: CLIPTokenizer  # the pipeline's tokenizer before any embedding
    table: nn.Embedding  # the text encoder's token embedding, and its weight before
    original: torch.Tensor
    embeddings: list[Embedding] = field(default_factory=list)


def load_textual_inversion(pipe: object, source: str | Path, token: str | None = None,
                           weight_name: str | None = None) -> Embedding:
    """Add the token(s) of a textual inversion to ``pipe``'s tokenizer and their vectors to its
    text encoder's embedding table; earlier embeddings stay."""
    table = pipe.text_encoder.embeddings.token_embedding
    embedding = read_embedding(source, token, weight_name, table.embedding_dim)
    state = vars(pipe).get("_textual_inversion")
    if state is None:
        state = _State(pipe.tokenizer, table, table.weight.data)
    _apply(pipe, state, [*state.embeddings, embedding])  # checks everything before changing
    pipe._textual_inversion = state
    return embedding


def unload_textual_inversion(pipe: object, token: str | None = None) -> None:
    """Remove one embedding (by the token it was loaded as) or, with none named, all: then the
    tokenizer and the embedding table are exactly those from before any was loaded."""
    state = vars(pipe).get("_textual_inversion")
    if state is None:
        if token is None:
            return
        raise ValueError(f"no textual inversion is loaded, so none named {token!r}")
    kept = [e for e in state.embeddings if token is not None and e.token != clean_text(token)]
    if token is not None and len(kept) == len(state.embeddings):
        loaded = ", ".join(repr(e.token) for e in state.embeddings)
        raise ValueError(f"no textual inversion {token!r} is loaded (loaded: {loaded})")
    if kept:
        _apply(pipe, state, kept)
        return
    pipe.tokenizer = state.tokenizer
    current = state.table.weight.data
    state.table.weight.data = state.original.to(current.device, current.dtype)
    state.table.num_embeddings = state.original.shape[0]
    del pipe._textual_inversion


def loaded_embeddings(pipe: object) -> list[Embedding]:
    state = vars(pipe).get("_textual_inversion")
    return list(state.embeddings) if state else []


@torch.no_grad()
def _apply(pipe: object, state: _State, embeddings: list[Embedding]) -> None:
    """Tokenizer and table = the originals plus ``embeddings``, rows in the tokens' id order."""
    tokenizer = state.tokenizer
    for embedding in embeddings:
        try:
            tokenizer = tokenizer.with_added_tokens(embedding.token, len(embedding.vectors))
        except ValueError as exc:
            raise WeightsError(f"{embedding.path}: {exc} (pass it as token=)") from exc
    rows = state.original.shape[0]
    first = min((i for i in tokenizer.added.values()), default=rows)
    if first != rows:
        raise WeightsError(f"the tokenizer's new ids start at {first}, but the text encoder's "
                           f"embedding table has {rows} rows: they are not one vocabulary")
    current = state.table.weight.data
    base = state.original.to(current.device, current.dtype)
    new_rows = [e.vectors.to(current.device, current.dtype) for e in embeddings]
    state.table.weight.data = torch.cat([base, *new_rows])
    state.table.num_embeddings = state.table.weight.shape[0]
    pipe.tokenizer = tokenizer
    state.embeddings = embeddings

