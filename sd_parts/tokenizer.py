"""The CLIP byte-pair-encoding (BPE) tokenizer that turns a Stable Diffusion v1 prompt into ids.

Text goes through four steps:

1. *Clean*: repair broken Unicode with ftfy, turn HTML entities such as ``&amp;`` back into
   characters, collapse runs of whitespace and lowercase everything.
2. *Pre-tokenize*: a regular expression splits the text into words, single digits and runs of
   punctuation; whitespace is dropped here, so it never becomes a token.
3. *Bytes to symbols*: each word's UTF-8 bytes are spelled with 256 printable stand-in characters,
   so any text, emoji included, can be encoded without an "unknown" token.
4. *BPE*: starting from single symbols (the last one marked with ``</w>``, "end of word"), the
   learned merges are applied, earliest learned first, until no learned pair is left.

The ids are then wrapped as ``<|startoftext|> ... <|endoftext|>`` and, for SD v1, cut and padded to
77 positions with ``<|endoftext|>``: ``context_ids`` is that rule, the one place it is written.

Tokens added for textual inversion (``with_added_tokens``) are cut out of the cleaned text before
step 2, wherever they stand, as transformers does with added tokens: ``x<cat-toy>y`` is ``x``, the
token, ``y``. They are matched lowercased, like the rest of the prompt.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP); Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units" (BPE). The vocabulary is the one SD v1 was trained with: the Hub's ``tokenizer/vocab.json``
and ``merges.txt``, or the bundled ``bpe_simple_vocab_16e6.txt.gz`` (CLIP's merges, MIT licence,
as shipped in the open-clip-torch 3.3.0 wheel), from which the same 49,408-entry vocabulary is
built.
"""

from __future__ import annotations

import copy
import gzip
import heapq
import html
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from sd_parts.weights import WeightsError, fetch_files

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406  # the ids of the two special tokens in CLIP's 49,408-entry vocabulary
EOS_ID = 49407
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # SD v1's text encoder has 77 position embeddings

BUNDLED_VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# The bundled file holds more merges than CLIP used: its vocabulary has room for 49,408 entries,
# of which 2 * 256 are byte symbols and 2 are special tokens, which leaves 48,894 merges.
BUNDLED_MERGE_COUNT = 49408 - 2 * 256 - 2

# Special tokens typed into a prompt are cut out first, as transformers does. CLIP instead lists
# them in its pre-tokenizer regex, which then reads ",<|endoftext|>" as the punctuation run ",<|"
# followed by letters.
_SPECIAL_TOKENS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# CLIP's pre-tokenizer: English contractions, runs of letters, single digits (so "2024" is four
# tokens), and runs of anything else that is not whitespace.
_PRE_TOKENIZER = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_WHITESPACE = regex.compile(r"\s+")
# Words seen before are looked up rather than merged again; the cache is emptied when it reaches
# this size so a long-running app cannot grow it without bound.
_WORD_CACHE_SIZE = 100_000


def _byte_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable character, so BPE can work on ordinary strings.

    Bytes that are already printable (and not a space) stand for themselves; the other 68 (control
    characters, space, non-breaking space, soft hyphen) are moved to the characters from U+0100 on,
    in byte order. The dict's order is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {symbol: b for b, symbol in BYTE_TO_UNICODE.items()}


def context_ids(
    ids: Sequence[int],
    max_length: int = MAX_LENGTH,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    pad_id: int = EOS_ID,
) -> list[int]:
    """The ``max_length`` ids SD v1's text encoder sees for a prompt's ids (given without BOS/EOS).

    BOS, the first ``max_length - 2`` ids, EOS, then ``pad_id`` up to ``max_length``: a longer
    prompt loses its end, and its EOS still closes the sequence, because CLIP was trained that way.
    """
    if max_length < 2:
        raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
    kept = list(ids[: tokens_kept(len(ids), max_length)])
    return [bos_id, *kept, eos_id] + [pad_id] * (max_length - 2 - len(kept))


def tokens_kept(n_tokens: int, max_length: int = MAX_LENGTH) -> int:
    """How many of a prompt's ``n_tokens`` fit between BOS and EOS (75 for SD v1)."""
    return min(n_tokens, max_length - 2)


def piece_bytes(piece: str) -> bytes:
    """The UTF-8 bytes a vocabulary piece stands for, without its end-of-word mark.

    ``'catâĢ¢</w>'`` gives ``b'cat\xe2\x80\xa2'``. A piece may hold only part of a character:
    BPE merges bytes, not characters, so an emoji's four bytes can be split over two pieces.
    """
    return bytes(UNICODE_TO_BYTE[symbol] for symbol in piece.removesuffix(END_OF_WORD))


def clean_text(text: str) -> str:
    """CLIP's text clean-up: fix mojibake, unescape HTML (twice, for ``&amp;amp;``), lowercase.

    ftfy also straightens curly quotes and folds full-width letters and ligatures, so "don’t" and
    "don't" get the same tokens.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's BPE tokenizer, cut and padded the way SD v1 feeds its text encoder.

    Built from a vocabulary (piece -> id) and the ordered list of merges; a merge's position in the
    list is its rank, and lower ranks (learned earlier, more frequent) are applied first.
    """

    bos_token_id: int = BOS_ID
    eos_token_id: int = EOS_ID
    pad_token_id: int = EOS_ID  # SD v1 pads with <|endoftext|> (SD 2 later used "!", id 0)
    model_max_length: int = MAX_LENGTH

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        _check_vocabulary(vocab, merges)
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.id_to_token = {i: token for token, i in self.vocab.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.bos_token_id = self.vocab[BOS_TOKEN]
        self.eos_token_id = self.vocab[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id
        self._word_cache: dict[str, list[str]] = {}
        # tokens added for textual inversion: token -> id, and what a typed token stands for
        self.added: dict[str, int] = {}
        self.expansions: dict[str, list[str]] = {}
        self._split = _SPECIAL_TOKENS  # cuts out the special and the added tokens

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of ``text``, e.g. ``['a</w>', 'photo</w>']``, without BOS and EOS."""
        pieces: list[str] = []
        # Splitting on a captured pattern keeps the special and added tokens, at the odd positions.
        for n, chunk in enumerate(self._split.split(clean_text(text))):
            if n % 2 == 1:
                pieces.extend(self.expansions.get(chunk, [chunk]))
                continue
            for word in _PRE_TOKENIZER.findall(chunk):
                pieces.extend(self._bpe("".join(BYTE_TO_UNICODE[b] for b in word.encode("utf-8"))))
        return pieces

    def _bpe(self, word: str) -> list[str]:
        """Split one word, already spelled in byte symbols, into vocabulary pieces.

        Repeatedly merge the neighbouring pair that was learned first (lowest rank), leftmost
        occurrence first, until no neighbouring pair is a learned merge. The symbols form a linked
        list and the candidate pairs sit in a heap ordered by (rank, position), so a long word
        costs O(n log n) rather than a rescan of all pairs after every merge.
        """
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        # Start from single symbols. The last carries the end-of-word mark, so "a" ending a word
        # and "a" inside one ("a</w>" vs "a") are different pieces, as CLIP was trained.
        parts: list[str | None] = [*word[:-1], word[-1] + END_OF_WORD]
        before = list(range(-1, len(parts) - 1))  # index of the previous symbol, -1 at the start
        after = [*range(1, len(parts)), -1]  # index of the next symbol, -1 at the end
        heap: list[tuple[int, int, str, str]] = []

        def push_pair(i: int) -> None:
            j = after[i]
            if j != -1 and (rank := self.merge_ranks.get((parts[i], parts[j]))) is not None:
                heapq.heappush(heap, (rank, i, parts[i], parts[j]))

        for i in range(len(parts) - 1):
            push_pair(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = after[i]
            # Skip pairs that an earlier merge has changed: symbols only grow, so a match means
            # the pair is still there.
            if parts[i] != left or j == -1 or parts[j] != right:
                continue
            parts[i], parts[j] = left + right, None
            after[i] = after[j]
            if after[j] != -1:
                before[after[j]] = i
            if before[i] != -1:
                push_pair(before[i])
            push_pair(i)
        pieces = [p for p in parts if p is not None]
        if len(self._word_cache) >= _WORD_CACHE_SIZE:
            self._word_cache.clear()
        self._word_cache[word] = pieces
        return pieces

    def with_added_tokens(self, token: str, count: int = 1) -> CLIPTokenizer:
        """A copy of this tokenizer that also knows ``token``, as ``count`` new tokens.

        Several tokens are named ``token``, ``token_1``, ``token_2``, ... (diffusers' names for a
        multi-vector textual inversion), with the next free ids, and ``token`` in a prompt stands
        for all of them, as diffusers' ``maybe_convert_prompt`` expands it. This tokenizer is
        left as it is (it may be shared: the bundled one is).
        """
        token = clean_text(token)  # matched in the cleaned, lowercased prompt
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        taken = [name for name in names if name in self.vocab]
        if not token or count < 1 or taken:
            why = f"{', '.join(map(repr, taken))} already in the vocabulary" if taken else \
                f"an empty token or a count of {count}"
            raise ValueError(f"cannot add the token {token!r}: {why}; choose another token name")
        first = max(self.id_to_token) + 1
        new = copy.copy(self)
        new.vocab, new.id_to_token = dict(self.vocab), dict(self.id_to_token)
        new.added, new.expansions = dict(self.added), dict(self.expansions)
        for i, name in enumerate(names, start=first):
            new.vocab[name], new.id_to_token[i], new.added[name] = i, name, i
        if count > 1:
            new.expansions[token] = names
        # longest first, so "tok_1" is not read as "tok" and "_1"
        alternatives = sorted([BOS_TOKEN, EOS_TOKEN, *new.added], key=len, reverse=True)
        new._split = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")
        return new

    def encode(self, text: str) -> list[int]:
        """``[BOS, ...ids..., EOS]`` for one text, neither truncated nor padded."""
        return [self.bos_token_id, *(self.vocab[p] for p in self.tokenize(text)), self.eos_token_id]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids of shape (B, 77) and dtype long, ready for SD v1's text encoder.

        Longer texts keep BOS, the first 75 tokens and EOS; shorter ones are padded with EOS
        (``context_ids``).
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = [
            context_ids(self.convert_tokens_to_ids(self.tokenize(text)), self.model_max_length,
                        self.bos_token_id, self.eos_token_id, self.pad_token_id)
            for text in batch
        ]
        return torch.tensor(rows, dtype=torch.long).view(len(batch), self.model_max_length)

    def convert_ids_to_tokens(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The vocabulary pieces for ``ids`` (a list or a 1-D tensor)."""
        tokens = []
        for i in _as_id_list(ids):
            if i not in self.id_to_token:
                raise ValueError(f"token id {i} is not in the vocabulary (ids 0..{len(self) - 1})")
            tokens.append(self.id_to_token[i])
        return tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """The ids of vocabulary pieces such as ``'photo</w>'``."""
        missing = [t for t in tokens if t not in self.vocab]
        if missing:
            raise ValueError(f"not in the vocabulary: {', '.join(map(repr, missing))}")
        return [self.vocab[t] for t in tokens]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Readable text for ``ids``: ``</w>`` becomes a space, BOS/EOS/padding are dropped.

        With ``skip_special_tokens=False`` they are kept as ``<|startoftext|>``/``<|endoftext|>``.
        The text is the cleaned, lowercased prompt, e.g. ``"hello , world !"``.
        """
        data = bytearray()
        for token in self.convert_ids_to_tokens(ids):
            if token in (BOS_TOKEN, EOS_TOKEN):
                if not skip_special_tokens:
                    data += token.encode("utf-8")
                continue
            if token in self.added:  # written as typed, not in byte symbols
                data += token.encode("utf-8") + b" "
                continue
            data += piece_bytes(token)
            if token.endswith(END_OF_WORD):
                data += b" "
        # A cut-off sequence can end inside a multi-byte character; show it as U+FFFD.
        return data.decode("utf-8", errors="replace").strip()

    def save(self, folder: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` as in the Hub's ``tokenizer/`` folder (without
        added tokens: they belong to their textual inversion files)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {token: i for token, i in self.vocab.items() if token not in self.added}
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _check_vocabulary(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """Refuse a vocabulary that could fail halfway through encoding or decode ambiguously."""
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError("the vocabulary must map token strings to integer ids")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError("the vocabulary gives the same id to more than one token")
    needed = [BOS_TOKEN, EOS_TOKEN]
    # Every byte must be spellable on its own, inside a word and at its end.
    needed += [s + end for s in BYTE_TO_UNICODE.values() for end in ("", END_OF_WORD)]
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise ValueError(
            f"the vocabulary lacks {len(missing)} required tokens, e.g. {missing[0]!r}"
        )
    unknown = [f"{a} {b}" for a, b in merges if a + b not in vocab]
    if unknown:
        raise ValueError(
            f"{len(unknown)} merges make tokens missing from the vocabulary, e.g. {unknown[0]!r}"
        )


def _parse_merges(lines: Sequence[str], where: str) -> list[tuple[str, str]]:
    """``"a b"`` lines to pairs, skipping a ``#version`` header and blank lines."""
    # The Hub's merges.txt (and the bundled file, after its name) starts with "#version: 0.2".
    first = 1 if lines and "#version" in lines[0] else 0
    merges = []
    for number, line in enumerate(lines[first:], start=first + 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise WeightsError(f"{where}: line {number} is not a merge ('a b'): {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


@lru_cache(maxsize=1)
def _bundled_tokenizer() -> CLIPTokenizer:
    with gzip.open(BUNDLED_VOCAB_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # After the header line, only the first BUNDLED_MERGE_COUNT merges are in CLIP's vocabulary.
    merges = _parse_merges(lines[: 1 + BUNDLED_MERGE_COUNT], str(BUNDLED_VOCAB_FILE))
    symbols = list(BYTE_TO_UNICODE.values())
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges),
              BOS_TOKEN, EOS_TOKEN]
    return CLIPTokenizer({token: i for i, token in enumerate(tokens)}, merges)


def load_tokenizer(
    source: str | None = None, subfolder: str | None = None, revision: str | None = None
) -> CLIPTokenizer:
    """The bundled SD v1 tokenizer (``source=None``, offline), or one from a Hub repo or folder.

    A source needs ``vocab.json`` and ``merges.txt``, at its top or in ``tokenizer/`` (or in
    ``subfolder``). Unreadable or inconsistent files raise ``WeightsError``.
    """
    if source is None:
        return _bundled_tokenizer()
    paths = fetch_files(
        source, ["vocab.json", "merges.txt"], subfolder=subfolder, default_subfolder="tokenizer",
        revision=revision,
    )
    vocab_path, merges_path = paths["vocab.json"], paths["merges.txt"]
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"could not read the tokenizer files {vocab_path}, {merges_path}: {exc}"
        ) from exc
    try:
        return CLIPTokenizer(vocab, _parse_merges(lines, str(merges_path)))
    except ValueError as exc:
        raise WeightsError(
            f"{vocab_path} and {merges_path} are not a CLIP vocabulary: {exc}"
        ) from exc
