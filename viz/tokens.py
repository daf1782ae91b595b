"""The prompt as CLIP's text encoder sees it: 77 positions as table rows, readable pieces, notes.

A prompt's pieces are what ``CLIPTokenizer.tokenize`` returns (no BOS or EOS); the cut to 75
tokens and the padding to 77 follow ``sd_parts.tokenizer.context_ids``, the one place that rule
is written. Pieces are vocabulary entries spelled in CLIP's byte symbols, so an emoji comes out as
``'ðŁĲ±</w>'``; ``readable_pieces`` shows the characters the bytes stand for, and says so where a
piece holds only some of a character's bytes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import sd_parts
from sd_parts.tokenizer import (
    BOS_ID,
    BOS_TOKEN,
    END_OF_WORD,
    EOS_ID,
    EOS_TOKEN,
    MAX_LENGTH,
    context_ids,
    piece_bytes,
    tokens_kept,
)

TOKEN_ROWS_HEADERS = ["position", "text", "piece", "id", "kind"]
SPECIAL = (BOS_TOKEN, EOS_TOKEN)
TOKEN_KINDS = ("BOS", "token", "EOS", "padding")


def positions_used(n_tokens: int, max_length: int = MAX_LENGTH) -> int:
    """How many of the positions are real (BOS + kept tokens + EOS); the rest are padding."""
    return tokens_kept(n_tokens, max_length) + 2


def token_kinds(n_tokens: int, max_length: int = MAX_LENGTH) -> list[str]:
    """The kind of each of the ``max_length`` positions: BOS, token, EOS or padding."""
    kept = tokens_kept(n_tokens, max_length)
    return ["BOS"] + ["token"] * kept + ["EOS"] + ["padding"] * (max_length - 2 - kept)


def token_rows(
    pieces: Sequence[str], ids: Sequence[int], max_length: int = MAX_LENGTH
) -> list[list]:
    """The ``max_length`` positions SD v1's text encoder sees, as rows for ``TOKEN_ROWS_HEADERS``.

    ``pieces`` and ``ids`` are the prompt's tokens as ``tokenize`` and ``convert_tokens_to_ids``
    give them, untruncated and without BOS/EOS. Rows are [position, readable text, piece, id,
    kind]; the piece is the vocabulary entry exactly as stored (a word's last piece ends in
    "</w>"), never HTML.
    """
    if len(ids) != len(pieces):
        raise ValueError(f"{len(ids)} ids but {len(pieces)} pieces")
    ids_seen = context_ids(ids, max_length, BOS_ID, EOS_ID, EOS_ID)
    kinds = token_kinds(len(pieces), max_length)
    kept = list(pieces[: tokens_kept(len(pieces), max_length)])
    all_pieces = [BOS_TOKEN, *kept] + [EOS_TOKEN] * (max_length - 1 - len(kept))
    texts = readable_pieces(all_pieces)
    return [
        [position, text, piece, int(token), kind]
        for position, (text, piece, token, kind) in enumerate(
            zip(texts, all_pieces, ids_seen, kinds, strict=True)
        )
    ]


# ---------------------------------------------------------------------------------------------
# Readable pieces


def _characters(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, visible text) of each UTF-8 character in ``data``.

    A byte that does not start a valid character is an entry of its own, ``<byte 0xff>``.
    """
    found, start = [], 0
    while start < len(data):
        lead = data[start]
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
        try:
            text = _visible(data[start : start + length].decode("utf-8"))
        except UnicodeDecodeError:
            length, text = 1, f"<byte 0x{lead:02x}>"
        found.append((start, start + length, text))
        start += length
    return found


def _visible(character: str) -> str:
    """A character as it can be seen: controls, format marks and odd spaces as their code point."""
    if character != " " and unicodedata.category(character)[0] in "CZ":
        return f"<U+{ord(character):04X}>"
    return character


def _describe(start: int, end: int, character: tuple[int, int, str]) -> str:
    """The part of ``character`` that bytes start..end of the stream hold: all of it, or which."""
    c_start, c_end, text = character
    if start <= c_start and c_end <= end:
        return text
    first, last = max(start, c_start) - c_start + 1, min(end, c_end) - c_start
    which = f"byte {first}" if first == last else f"bytes {first}-{last}"
    return f"<{which}/{c_end - c_start} of {text}>"


def readable_pieces(pieces: Sequence[str]) -> list[str]:
    """Each piece as the text its bytes stand for, keeping the end-of-word mark "</w>".

    BOS and EOS stay as they are. Where a piece holds part of a multi-byte character, it says so:
    the emoji 🐱 is four bytes, and if BPE splits them 3 + 1 the pieces read
    ``<bytes 1-3/4 of 🐱>`` and ``<byte 4/4 of 🐱>``. Invisible characters (controls, zero-width
    marks) read as their code point, e.g. ``<U+200B>``.
    """
    # Characters never cross a special token, so the other pieces form one byte stream.
    spans, stream = [], bytearray()
    for piece in pieces:
        data = b"" if piece in SPECIAL else piece_bytes(piece)
        spans.append((len(stream), len(stream) + len(data)))
        stream += data
    characters = _characters(bytes(stream))
    texts, first = [], 0
    for piece, (start, end) in zip(pieces, spans, strict=True):
        if piece in SPECIAL:
            texts.append(piece)
            continue
        while first < len(characters) and characters[first][1] <= start:
            first += 1
        last = first
        while last < len(characters) and characters[last][0] < end:
            last += 1
        text = "".join(_describe(start, end, c) for c in characters[first:last])
        texts.append(text + (END_OF_WORD if piece.endswith(END_OF_WORD) else ""))
    return texts


# ---------------------------------------------------------------------------------------------
# Notes


def words(pieces: Sequence[str]) -> list[tuple[str, int, int]]:
    """Words rebuilt from BPE pieces: (readable word, first piece index, end piece index)."""
    words, start = [], 0
    for index, piece in enumerate(pieces):
        if piece.endswith(END_OF_WORD) or piece in SPECIAL or index == len(pieces) - 1:
            data = b"".join(piece_bytes(p) for p in pieces[start : index + 1] if p not in SPECIAL)
            text = piece if piece in SPECIAL else data.decode("utf-8", errors="replace")
            words.append((text, start, index + 1))
            start = index + 1
    return words


def truncation_note(pieces: Sequence[str], max_length: int = MAX_LENGTH) -> str:
    """A sentence naming the words the text encoder never sees; empty when the prompt fits.

    ``pieces`` are the prompt's BPE pieces, untruncated, without BOS/EOS. A word cut in the middle
    is named with "(partly)".
    """
    room = max_length - 2
    if len(pieces) <= room:
        return ""
    cut = [word if start >= room else f"{word} (partly)"
           for word, start, end in words(pieces) if end > room]
    shown = ", ".join(f"“{word}”" for word in cut[:40])
    more = f" and {len(cut) - 40} more" if len(cut) > 40 else ""
    return (
        f"The prompt has {len(pieces)} tokens but only {room} fit between BOS and EOS, so the last "
        f"{len(pieces) - room} are cut and the text encoder never sees these words: {shown}{more}."
    )


def token_count_note(pieces: Sequence[str], max_length: int = MAX_LENGTH) -> str:
    """For example "12 of 77 positions used (BOS + 10 tokens + EOS); 65 are padding."."""
    kept = tokens_kept(len(pieces), max_length)
    used = positions_used(len(pieces), max_length)
    noun = "token" if kept == 1 else "tokens"
    note = f"{used} of {max_length} positions used (BOS + {kept} {noun} + EOS)"
    if len(pieces) > kept:
        return f"{note}; {len(pieces) - kept} more tokens were cut."
    return f"{note}; {max_length - used} are padding."


@dataclass(frozen=True)
class Tokens:
    """A prompt as the text encoder sees it."""

    pieces: list[str]  # every BPE piece of the prompt, untruncated, without BOS/EOS
    rows: list[list]  # the 77 positions, as token_rows gives them
    n_real: int  # BOS + kept tokens + EOS

    @property
    def labels(self) -> list[str]:
        return [row[1] for row in self.rows]  # the readable text of each position

    @property
    def kinds(self) -> list[str]:
        return [row[4] for row in self.rows]  # BOS, token, EOS or padding

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(row[3] for row in self.rows)


def read_tokens(tokenizer: sd_parts.CLIPTokenizer, prompt: str | None) -> Tokens:
    pieces = tokenizer.tokenize(prompt or "")
    rows = token_rows(pieces, tokenizer.convert_tokens_to_ids(pieces))
    return Tokens(pieces, rows, positions_used(len(pieces)))
