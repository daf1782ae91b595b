"""Two prompt habits of the popular web UIs, written as rules on CLIP's token embeddings.

SD v1's text encoder has 77 positions: BOS, 75 tokens, EOS (``tokenizer.context_ids``), so the
words past the 75th are cut. The web UIs get round this by cutting the prompt's tokens into chunks
of 75, encoding each chunk on its own with its own BOS, EOS and padding, and concatenating the
results: the UNet's cross-attention accepts any number of context vectors, so it then attends to
154, 231, ... of them. No chunk sees another (each is a separate causal sequence), which is why a
word near a boundary loses the words before it.

The same UIs read a weighting syntax: ``(word:1.3)`` multiplies the embeddings of the tokens of
``word`` by 1.3, ``(word)`` by 1.1, ``[word]`` divides by 1.1, nested brackets multiply, and
``\\(`` writes a literal bracket. After the scaling, the context is rescaled so that its mean is
what it was, so that a weight moves the emphasis between tokens rather than the overall level.
A weight is thus applied to the encoder's *output*, not its input: the other tokens were encoded
without knowing the weight.

Both are off in the pipeline by default, because diffusers does neither. The parser never raises:
malformed input (unmatched brackets, a weight that is not a number) is read the way the UIs read
it, and each such place gets a readable note. The UIs differ in details; this follows the rule the
AUTOMATIC1111 web UI popularised (an unclosed bracket weights the rest of the prompt; a bracket
with nothing to close is text), without its ``BREAK`` keyword or its habit of moving a chunk
boundary back to a comma.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

import torch

from .clip import CLIPTextEncoder
from .tokenizer import MAX_LENGTH, CLIPTokenizer

ROUND_FACTOR = 1.1  # "(word)": the weight the web UIs give one pair of round brackets
SQUARE_FACTOR = 1 / 1.1  # "[word]": one pair of square brackets
# apply_weights refuses a mean smaller than this fraction of the mean absolute value
MEAN_TOLERANCE = 1e-3

T = TypeVar("T", int, float)

# ":1.3)" closing a round bracket with an explicit weight; the number is checked afterwards, so
# that "1.2.3" or "." gets a note rather than an error.
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
# ":anything)": a colon that looks like a weight but is not a number (read as text)
_NOT_A_WEIGHT = re.compile(r":([^()\[\]\\:]*)\)")
# ":1.3]": a weight written in square brackets, which the UIs read as text
_SQUARE_WEIGHT = re.compile(r":\s*[+-]?[.\d]+\s*\]")
_TEXT = re.compile(r"[^\\()\[\]:]+")
_ESCAPABLE = "()[]\\"


def parse_weights(prompt: str) -> tuple[list[tuple[str, float]], list[str]]:
    """Split a prompt into text spans with their weights, and notes on what was malformed.

    ``"a (red:1.5) [cat]"`` gives ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1/1.1)]``.
    Neighbouring spans of equal weight are joined; an empty prompt gives no spans. Never raises.
    """
    pieces: list[list] = []  # [text, weight], multiplied as brackets close
    notes: list[str] = []
    round_open: list[tuple[int, int]] = []  # (first piece inside, character position)
    square_open: list[tuple[int, int]] = []

    def weigh_from(first: int, factor: float) -> None:
        for piece in pieces[first:]:
            piece[1] *= factor

    pos = 0
    while pos < len(prompt):
        char = prompt[pos]
        if char == "\\" and prompt[pos + 1: pos + 2] and prompt[pos + 1] in _ESCAPABLE:
            pieces.append([prompt[pos + 1], 1.0])
            pos += 2
        elif char == "(":
            round_open.append((len(pieces), pos))
            pos += 1
        elif char == "[":
            square_open.append((len(pieces), pos))
            pos += 1
        elif char == ":" and round_open and (match := _WEIGHT.match(prompt, pos)):
            try:
                weight = float(match.group(1))
            except ValueError:
                where = match.start(1) + 1
                notes.append(f"'{match.group(1)}' at character {where} is not a number: "
                             "':' and what follows are read as text, the brackets as x1.1")
                pieces.append([":", 1.0])
                pos += 1
                continue
            weigh_from(round_open.pop()[0], weight)
            pos = match.end()
        elif char == ":":
            if round_open and (match := _NOT_A_WEIGHT.match(prompt, pos)):
                notes.append(f"':{match.group(1)}' at character {pos + 1} is not a weight: "
                             "it is read as text, the brackets as x1.1")
            elif square_open and _SQUARE_WEIGHT.match(prompt, pos):
                notes.append(f"a weight in square brackets (character {pos + 1}) is read as "
                             "text: [ ] always divides by 1.1; write (word:0.9) for a weight")
            pieces.append([":", 1.0])
            pos += 1
        elif char in ")]":
            stack, factor = (round_open, ROUND_FACTOR) if char == ")" else \
                (square_open, SQUARE_FACTOR)
            if stack:
                weigh_from(stack.pop()[0], factor)
            else:
                notes.append(f"'{char}' at character {pos + 1} closes no bracket: read as text")
                pieces.append([char, 1.0])
            pos += 1
        elif char == "\\":
            pieces.append([char, 1.0])  # a backslash before anything else is text
            pos += 1
        else:
            match = _TEXT.match(prompt, pos)
            pieces.append([match.group(), 1.0])
            pos = match.end()
    # An unclosed bracket weights everything after it, as if closed at the end.
    for stack, char, factor in ((round_open, "(", ROUND_FACTOR),
                                (square_open, "[", SQUARE_FACTOR)):
        for first, where in stack:
            notes.append(f"'{char}' at character {where + 1} is never closed: the rest of the "
                         f"prompt is weighted x{factor:.3g}")
            weigh_from(first, factor)
    spans: list[tuple[str, float]] = []
    for text, weight in pieces:
        if spans and spans[-1][1] == weight:
            spans[-1] = (spans[-1][0] + text, weight)
        else:
            spans.append((text, weight))
    return spans, notes


def token_weights(
    tokenizer: CLIPTokenizer, spans: Sequence[tuple[str, float]]
) -> tuple[list[str], list[float]]:
    """The BPE pieces of the spans (without BOS/EOS) and each piece's weight.

    Each span is tokenized on its own, as the UIs do, so a bracket always ends a word:
    ``"a(b)"`` is two words.
    """
    pieces: list[str] = []
    weights: list[float] = []
    for text, weight in spans:
        span_pieces = tokenizer.tokenize(text)
        pieces += span_pieces
        weights += [weight] * len(span_pieces)
    return pieces, weights


def chunk(
    values: Sequence[T], start: T, end: T, pad: T, max_length: int = MAX_LENGTH,
    min_chunks: int = 1,
) -> list[list[T]]:
    """``values`` in runs of ``max_length - 2``, each as ``[start, *run, end, pad...]``.

    The first chunk is what ``tokenizer.context_ids`` gives (SD v1's cut); ``min_chunks`` adds
    chunks of an empty prompt, so that a prompt and its negative prompt can have as many.
    """
    if max_length < 3:
        raise ValueError(f"max_length must leave room for BOS, EOS and a token, got {max_length}")
    size = max_length - 2
    runs = [list(values[i: i + size]) for i in range(0, len(values), size)] or [[]]
    runs += [[]] * (min_chunks - len(runs))
    return [[start, *run, end] + [pad] * (size - len(run)) for run in runs]


def chunk_ids(tokenizer: CLIPTokenizer, prompt: str, min_chunks: int = 1) -> torch.Tensor:
    """(n_chunks, 77) token ids: the prompt's tokens in chunks of 75, each with BOS, EOS, padding.

    A 200-token prompt gives 3 chunks; one of 75 tokens or fewer gives ``tokenizer(prompt)``.
    """
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(prompt))
    rows = chunk(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                 tokenizer.model_max_length, min_chunks)
    return torch.tensor(rows, dtype=torch.long)


def encode_long(
    text_encoder: CLIPTextEncoder, chunk_ids: torch.Tensor, clip_skip: int | None = None
) -> torch.Tensor:
    """(1, 77 * n_chunks, hidden): each chunk encoded on its own, the results side by side."""
    if chunk_ids.ndim != 2:
        raise ValueError(
            f"chunk_ids must be (n_chunks, 77) token ids from chunk_ids(), got shape "
            f"{tuple(chunk_ids.shape)}"
        )
    # The chunks are a batch: no chunk attends to another, as if each were its own prompt.
    context = text_encoder(chunk_ids, clip_skip=clip_skip).last_hidden_state  # (n, 77, D)
    return context.reshape(1, -1, context.shape[-1])


def apply_weights(
    context: torch.Tensor, weights: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """``context`` (B, T, D) with each position's vector times its weight, the mean restored.

    ``weights`` is (T,) or (B, T), one per context position (1 at BOS, EOS and padding). The mean
    over each sample's T x D values is scaled back to what it was, as the web UIs do (their mean
    is over the whole batch, the same for one prompt). Returns a new tensor.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32, device=context.device)
    if context.ndim != 3 or weights.shape not in {context.shape[1:2], context.shape[:2]}:
        raise ValueError(
            f"weights must be (T,) or (B, T) for a (B, T, D) context; got weights "
            f"{tuple(weights.shape)} for context {tuple(context.shape)}"
        )
    original = context.float()
    scaled = original * weights.expand(context.shape[:2]).unsqueeze(-1)
    old_mean = original.mean(dim=(1, 2), keepdim=True)
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    # A mean near 0 next to the values' size cannot be restored: the ratio is noise. The trained
    # CLIP's final LayerNorm has a bias that keeps the mean away from 0; a freshly initialised
    # one (bias 0) makes every row's mean 0, and so the context's.
    size = scaled.abs().mean(dim=(1, 2), keepdim=True)
    if torch.any(new_mean.abs() <= MEAN_TOLERANCE * size) or torch.any(
        old_mean.abs() <= MEAN_TOLERANCE * original.abs().mean(dim=(1, 2), keepdim=True)
    ):
        raise ValueError(
            "the context's mean is about 0 (before or after weighting), so it cannot be restored: "
            "use weights that do not cancel out, and a text encoder whose final LayerNorm has a "
            "bias (an untrained one has none)"
        )
    return (scaled * (old_mean / new_mean)).to(context.dtype)


def encode_prompts(
    text_encoder: CLIPTextEncoder,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    long: bool = False,
    weighting: bool = False,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """(B, 77 * n, hidden) context for the UNet, and the weighting notes of all prompts.

    With both options off this is ``text_encoder(tokenizer(prompts))``, as diffusers encodes.
    ``long``: every prompt in chunks of 75 (n is the most any prompt needs; the others get chunks
    of the empty prompt, as the UIs pad). ``weighting``: ``(word:1.3)`` and the brackets are read
    and applied; otherwise they are text.
    """
    device = next(text_encoder.parameters()).device
    limit = tokenizer.model_max_length
    notes: list[str] = []
    rows: list[tuple[list[int], list[float]]] = []
    for prompt in prompts:
        if weighting:
            spans, prompt_notes = parse_weights(prompt)
            pieces, weights = token_weights(tokenizer, spans)
            notes += [f"{prompt[:40]!r}: {note}" for note in prompt_notes]
        else:
            pieces = tokenizer.tokenize(prompt)
            weights = [1.0] * len(pieces)
        rows.append((tokenizer.convert_tokens_to_ids(pieces), weights))
    per_chunk = limit - 2
    n_chunks = max(max(1, -(-len(ids) // per_chunk)) for ids, _ in rows) if long else 1
    contexts = []
    for ids, weights in rows:
        id_chunks = chunk(ids, tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id, limit, n_chunks)[:n_chunks]
        context = encode_long(text_encoder, torch.tensor(id_chunks, device=device), clip_skip)
        if weighting:
            flat = [w for row in chunk(weights, 1.0, 1.0, 1.0, limit, n_chunks)[:n_chunks]
                    for w in row]
            context = apply_weights(context, flat)
        contexts.append(context)
    return torch.cat(contexts), notes
