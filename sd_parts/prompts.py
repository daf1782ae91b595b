"""Two prompt habits of the popular web UIs, written as rules on CLIP's token embeddings.

SD v1's text encoder has 77 positions: BOS, 75 tokens, EOS (``tokenizer.context_ids``), so the
words past the 75th are cut. The web UIs get round this by cutting the prompt's tokens into chunks
of 75, encoding each chunk on its own with its own BOS, EOS and padding, and concatenating the
results: the UNet's cross-attention accepts any number of context vectors, so it then attends to
154, 231, ... of them. No chunk sees another (each is a separate causal sequence), which is why a
word near a boundary loses the words before it.

The AUTOMATIC1111 web UI cuts differently (``chunking="webui"``): where the 76th token of a chunk
would not fit and the chunk's last comma is among its last 20 tokens (its setting
``comma_padding_backtrack``), the cut moves back to just after that comma, so the phrase after it
starts the next chunk whole; ``BREAK`` (in capitals, a word of its own) ends a chunk there, the
rest padded; a multi-vector textual-inversion token is never split over two chunks.

The same UIs read a weighting syntax: ``(word:1.3)`` multiplies the embeddings of the tokens of
``word`` by 1.3, ``(word)`` by 1.1, ``[word]`` divides by 1.1, nested brackets multiply, and
``\\(`` writes a literal bracket (a backslash before any other character is dropped, ``a\\b`` is
``ab``; ``\\\\`` is a backslash). A weight is applied to the encoder's *output*, not its
input: the other tokens were encoded without knowing it. Then, in the web UI's emphasis mode
"Original" (``emphasis="original"``), each 77-position chunk is rescaled so that its mean is what
it was, so that a weight moves the emphasis between tokens rather than the overall level; "No
norm" (``emphasis="no norm"``) leaves the product as it is.

All of this is off in the pipeline by default, because diffusers does none of it. The parser never
raises: malformed input (unmatched brackets, a weight that is not a number) is read the way the
web UI reads it (an unclosed bracket weights the rest of the prompt; a bracket with nothing to
close is text), and each such place gets a readable note. One difference: a ``BREAK`` inside
brackets is read as the word "break" with the brackets' weight (the web UI's marker for it would
get the brackets' weight times -1 there, by accident of how it marks a BREAK), with a note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from .clip import CLIPTextEncoder
from .tokenizer import MAX_LENGTH, CLIPTokenizer

ROUND_FACTOR = 1.1  # "(word)": the weight the web UIs give one pair of round brackets
SQUARE_FACTOR = 1 / 1.1  # "[word]": one pair of square brackets
# apply_weights refuses a mean smaller than this fraction of the mean absolute value
MEAN_TOLERANCE = 1e-3
# the web UI's comma_padding_backtrack: a cut moves back to a comma at most this many tokens
# before the end of a chunk (0 turns the rule off)
COMMA_BACKTRACK = 20
CHUNKINGS = ("plain", "webui")  # plain: a cut after every 75 tokens, as diffusers' long prompts
EMPHASES = ("original", "no norm")  # the web UI's emphasis modes that multiply weights

Spans = list[tuple[str, float]]

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
# the web UI's BREAK: a whole word in capitals, and the spaces around it
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(prompt: str) -> tuple[Spans, list[str]]:
    """Split a prompt into text spans with their weights, and notes on what was malformed.

    ``"a (red:1.5) [cat]"`` gives ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1/1.1)]``.
    Neighbouring spans of equal weight are joined; an empty prompt gives no spans. Never raises.
    ``BREAK`` is text here; ``parse_prompt`` reads it.
    """
    segments, notes = _parse(prompt, breaks=False)
    return segments[0], notes


def parse_prompt(prompt: str) -> tuple[list[Spans], list[str]]:
    """The prompt's spans as ``parse_weights`` reads them, in segments that ``BREAK`` separates:
    ``"a (cat) BREAK dog"`` gives ``[[("a ", 1.0), ("cat", 1.1)], [("dog", 1.0)]]``."""
    return _parse(prompt, breaks=True)


def _parse(prompt: str, breaks: bool) -> tuple[list[Spans], list[str]]:
    pieces: list[list | None] = []  # [text, weight], multiplied as brackets close; None: BREAK
    notes: list[str] = []
    round_open: list[tuple[int, int]] = []  # (first piece inside, character position)
    square_open: list[tuple[int, int]] = []

    def weigh_from(first: int, factor: float) -> None:
        for piece in pieces[first:]:
            if piece is not None:
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
        elif char == "\\":  # before anything else, dropped, as the web UI drops it
            after = repr(prompt[pos + 1]) if pos + 1 < len(prompt) else "the end"
            notes.append(f"the backslash at character {pos + 1} escapes nothing (before {after}): "
                         "dropped; write \\\\ for a backslash")
            pos += 1
        else:
            match = _TEXT.match(prompt, pos)
            parts = _BREAK.split(match.group()) if breaks else [match.group()]
            if len(parts) > 1 and (round_open or square_open):
                notes.append(f"BREAK at character {pos + 1} is inside brackets: read as the word "
                             "'break', with the brackets' weight")
                parts = [match.group()]
            for n, part in enumerate(parts):
                if n:
                    pieces.append(None)
                if part:
                    pieces.append([part, 1.0])
            pos = match.end()
    # An unclosed bracket weights everything after it, as if closed at the end.
    for stack, char, factor in ((round_open, "(", ROUND_FACTOR),
                                (square_open, "[", SQUARE_FACTOR)):
        for first, where in stack:
            notes.append(f"'{char}' at character {where + 1} is never closed: the rest of the "
                         f"prompt is weighted x{factor:.3g}")
            weigh_from(first, factor)
    segments: list[Spans] = [[]]
    for piece in pieces:
        if piece is None:
            segments.append([])
            continue
        text, weight = piece
        spans = segments[-1]
        if spans and spans[-1][1] == weight:
            spans[-1] = (spans[-1][0] + text, weight)
        else:
            spans.append((text, weight))
    return segments, notes


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


Run = tuple[list[int], list[float]]  # a chunk's token ids and weights, without BOS/EOS/padding


def webui_runs(
    segments: Sequence[tuple[Sequence[int], Sequence[float]]], comma_id: int,
    size: int = MAX_LENGTH - 2, backtrack: int = COMMA_BACKTRACK,
    groups: Mapping[int, int] | None = None,
) -> list[Run]:
    """The AUTOMATIC1111 web UI's chunks of a prompt's tokens (``sd_hijack_clip.tokenize_line``).

    ``segments``: each BREAK-separated part's ids and weights. A chunk ends after ``size`` tokens,
    except that when the next token does not fit and is not a comma, and the chunk's last comma
    is at most ``backtrack`` tokens before its end, the tokens after that comma move to the next
    chunk. A BREAK ends the chunk (an empty one stays, all padding). ``groups`` maps the first id
    of a multi-vector token to its length: such a group moves whole to the next chunk rather than
    be split. A prompt with no tokens gives one empty chunk.
    """
    groups = groups or {}
    runs: list[Run] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        runs.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for n, (segment_ids, segment_weights) in enumerate(segments):
        if n:
            close()  # BREAK
        i = 0
        while i < len(segment_ids):
            length = groups.get(segment_ids[i], 1)
            length = length if length <= size else 1  # a group that no chunk holds is split
            unit = slice(i, i + length)
            if segment_ids[i] == comma_id:
                last_comma = len(ids)
            elif (backtrack and len(ids) == size and last_comma >= 0
                  and len(ids) - last_comma <= backtrack):
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                del ids[cut:], weights[cut:]
                close()
                ids, weights = moved
            if len(ids) == size or len(ids) + length > size:
                close()
            ids += segment_ids[unit]
            weights += segment_weights[unit]
            i += length
    if ids or not runs:
        close()
    return runs


def plain_runs(ids: Sequence[int], weights: Sequence[float], size: int = MAX_LENGTH - 2
               ) -> list[Run]:
    """The tokens in runs of ``size``, cut wherever they fall (one empty run for no tokens)."""
    return [(list(ids[i: i + size]), list(weights[i: i + size]))
            for i in range(0, len(ids), size)] or [([], [])]


def emphasize(
    context: torch.Tensor, weights: torch.Tensor, emphasis: str = "original",
    chunk_length: int = MAX_LENGTH,
) -> torch.Tensor:
    """``context`` (B, 77 n, D) with each position's vector times its weight (``weights``:
    (B, 77 n)), in one of the web UI's emphasis modes. "original": then each chunk of 77 rescaled
    to its own mean before the weights (a chunk with all weights 1 is unchanged, exactly);
    "no norm": the product alone. Returns a new tensor."""
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {', '.join(map(repr, EMPHASES))}; "
                         f"got {emphasis!r}")
    weights = torch.as_tensor(weights, dtype=torch.float32, device=context.device)
    B, T, D = context.shape
    if weights.shape != (B, T) or T % chunk_length:
        raise ValueError(f"weights must be (B, T) = {(B, T)} for chunks of {chunk_length}, got "
                         f"{tuple(weights.shape)}")
    if emphasis == "no norm":
        return (context.float() * weights.unsqueeze(-1)).to(context.dtype)
    chunks = context.reshape(-1, chunk_length, D)  # (B n, 77, D)
    chunk_weights = weights.reshape(-1, chunk_length)
    weighted = (chunk_weights != 1).any(dim=1)
    out = chunks.clone()
    if weighted.any():
        out[weighted] = apply_weights(chunks[weighted], chunk_weights[weighted])
    return out.reshape(B, T, D)


def prompt_runs(tokenizer: CLIPTokenizer, prompt: str, weighting: bool, chunking: str
                ) -> tuple[list[Run], list[str]]:
    """A prompt's chunks of token ids and weights, before BOS, EOS and padding, and the notes.

    Without ``weighting`` brackets are text (weights 1); ``chunking="webui"`` reads BREAK either
    way, and a multi-vector textual-inversion token is kept in one chunk.
    """
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking must be one of {', '.join(map(repr, CHUNKINGS))}; "
                         f"got {chunking!r}")
    notes: list[str] = []
    if weighting:
        segments, notes = parse_prompt(prompt) if chunking == "webui" else parse_weights(prompt)
        segments = segments if chunking == "webui" else [segments]
    else:
        parts = _BREAK.split(prompt) if chunking == "webui" else [prompt]
        segments = [[(part, 1.0)] for part in parts]
    tokenized = []
    for spans in segments:
        pieces, weights = token_weights(tokenizer, spans)
        tokenized.append((tokenizer.convert_tokens_to_ids(pieces), weights))
    if chunking == "plain":
        return plain_runs(*tokenized[0], tokenizer.model_max_length - 2), notes
    groups = {tokenizer.vocab[names[0]]: len(names) for names in tokenizer.expansions.values()}
    return webui_runs(tokenized, tokenizer.vocab[",</w>"], tokenizer.model_max_length - 2,
                      groups=groups), notes


def encode_prompts(
    text_encoder: CLIPTextEncoder,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    long: bool = False,
    weighting: bool = False,
    clip_skip: int | None = None,
    chunking: str = "plain",
    emphasis: str = "original",
) -> tuple[torch.Tensor, list[str]]:
    """(B, 77 * n, hidden) context for the UNet, and the weighting notes of all prompts.

    With the options off this is ``text_encoder(tokenizer(prompts))``, as diffusers encodes.
    ``long``: every prompt in chunks (n is the most any prompt needs; the others get chunks of the
    empty prompt, as the web UI pads); without it only the first chunk is kept. ``chunking``:
    "plain" cuts after every 75 tokens, "webui" as the AUTOMATIC1111 web UI does (a cut moved
    back to a comma, BREAK; see ``webui_runs``). ``weighting``: ``(word:1.3)`` and the brackets
    are read and applied in the ``emphasis`` mode ("original": each chunk's mean restored, "no
    norm"); otherwise they are text.
    """
    device = next(text_encoder.parameters()).device
    limit = tokenizer.model_max_length
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {', '.join(map(repr, EMPHASES))}; "
                         f"got {emphasis!r}")
    notes: list[str] = []
    all_runs = []
    for prompt in prompts:
        runs, prompt_notes = prompt_runs(tokenizer, prompt, weighting, chunking)
        notes += [f"{prompt[:40]!r}: {note}" for note in prompt_notes]
        all_runs.append(runs)
    n_chunks = max(len(runs) for runs in all_runs) if long else 1
    contexts = []
    for runs in all_runs:
        runs = (runs + [([], [])] * n_chunks)[:n_chunks]
        id_rows = [[bos, *ids, eos] + [pad] * (limit - 2 - len(ids)) for ids, _ in runs]
        context = encode_long(text_encoder, torch.tensor(id_rows, device=device), clip_skip)
        if weighting:
            flat = [w for _, weights in runs
                    for w in [1.0, *weights, 1.0] + [1.0] * (limit - 2 - len(weights))]
            context = emphasize(context, torch.tensor([flat]), emphasis, limit)
        contexts.append(context)
    return torch.cat(contexts), notes
