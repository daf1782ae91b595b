"""The CLIP tokenizer: known ids, the bundled vocabulary, parity with transformers, errors."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from sd_parts.tokenizer import (
    BOS_ID,
    EOS_ID,
    CLIPTokenizer,
    clean_text,
    context_ids,
    load_tokenizer,
    piece_bytes,
)
from sd_parts.weights import WeightsError

# Pieces that exercise each step: punctuation runs, digits (one token each), accents, scripts
# without spaces, emoji (multi-byte, with joiners and flags), contractions, special tokens.
PIECES = [
    "a", "photo", "of", "cat", "astronaut", "riding", "horse", "on", "Mars", "highly", "detailed",
    "portrait", "Greg", "Rutkowski", "trending", "ArtStation", "4K", "8k", "HDR", "octane",
    "render", "(masterpiece:1.2)", "[[blue]]", "{red|green}", "café", "naïve", "Zürich", "São",
    "crème", "brûlée", "東京", "日本語の文章", "北京烤鸭", "서울", "Москва", "γάτα", "مرحبا",
    "שלום", "हिन्दी", "ไทย", "🐱", "🚀🌕", "\U0001f469\u200d\U0001f680", "❤\ufe0f", "🇯🇵",
    "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "DON'T", "rock'n'roll", "3.14",
    "1,000,000", "2024-01-01", "50%", "$100", "#hashtag", "@user", "e-mail", "C++", "...", "!!!",
    "http://example.com/a?b=c", "?!", ":-)", "—", "…",
    "\\", "/", "|", "~", "`", "_under_score_", "CamelCase", "MiXeD", "x²", "½", "Ⅻ", "١٢٣", "①",
    "<|endoftext|>", "<|startoftext|>", "supercalifragilisticexpialidocious",
]
# Pieces that CLIP's clean-up changes beyond whitespace and case: HTML entities, curly quotes,
# a ligature, full-width letters.
CLEANUP_PIECES = ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&amp;amp;", "“quoted”", "’",
                  "ﬁne", "ＦＵＬＬ"]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", ", ", ",", "\r\n", "\u00a0", "\u3000", ""]


def make_prompts(count: int = 300, seed: int = 0) -> list[str]:
    """Deterministic varied prompts: short and long (truncated), plus edge cases."""
    rng = random.Random(seed)
    prompts = ["", "   ", "\t\n", "a photo of a cat", "A PHOTO OF A CAT", "aaaaaaaaaaaaaaaaaaaa"]
    while len(prompts) < count:
        n_words = rng.choice([1, 2, 5, 10, 20, 40]) if rng.random() < 0.85 else rng.randint(60, 200)
        pieces = PIECES + CLEANUP_PIECES if rng.random() < 0.3 else PIECES
        words = [rng.choice(pieces) for _ in range(n_words)]
        if rng.random() < 0.2:
            # Special tokens stay lowercase: transformers 5 matches them before lowercasing, so
            # "<|ENDOFTEXT|>" is plain text to it but the token to CLIP (see test_known_ids).
            words = [w if "<|" in w else w.upper() for w in words]
        prompts.append("".join(w + rng.choice(SEPARATORS) for w in words))
    return prompts


PROMPTS = make_prompts()


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def hub_folder(tokenizer: CLIPTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled vocabulary written as the Hub's tokenizer/vocab.json and merges.txt."""
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    tokenizer.save(folder)
    return folder.parent


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("Hello, world!", [49406, 3306, 267, 1002, 256, 49407]),
        ("don't stop 42 times", [49406, 847, 713, 1691, 275, 273, 1661, 49407]),
        # A typed special token is one token, even after punctuation and in capitals.
        ("cat,<|EndOfText|>", [49406, 2368, 267, 49407, 49407]),
    ],
)
def test_known_ids(tokenizer: CLIPTokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer.encode(text) == ids
    pieces = tokenizer.tokenize(text)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", *pieces, "<|endoftext|>"]


def test_bundled_vocabulary(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID, EOS_ID, EOS_ID
    ) == (49406, 49407, 49407)
    assert tokenizer.convert_ids_to_tokens([0, 255, 256, 511, 49405]) == [
        "!", "Ń", "!</w>", "Ń</w>", "jekyll</w>"
    ]
    assert load_tokenizer() is tokenizer  # cached: the app can call it per request


def test_truncation_and_padding(tokenizer: CLIPTokenizer) -> None:
    long_prompt = " ".join(["word"] * 500)
    ids = tokenizer([long_prompt, "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == 2653).all()
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and (ids[1, 4:] == 49407).all()
    assert tokenizer(long_prompt).shape == (1, 77)


@pytest.mark.parametrize("n_tokens", [0, 1, 75, 76, 300])
def test_context_ids_cut_and_pad(n_tokens: int) -> None:
    ids = list(range(1000, 1000 + n_tokens))
    seen = context_ids(ids)
    kept = min(n_tokens, 75)
    assert len(seen) == 77 and seen[0] == BOS_ID and seen[kept + 1] == EOS_ID
    assert seen[1 : kept + 1] == ids[:kept] and seen[kept + 2 :] == [EOS_ID] * (75 - kept)
    assert context_ids([5, 6, 7], max_length=4, bos_id=1, eos_id=2, pad_id=0) == [1, 5, 6, 2]
    assert context_ids([5], max_length=5, bos_id=1, eos_id=2, pad_id=0) == [1, 5, 2, 0, 0]
    with pytest.raises(ValueError, match="room for BOS and EOS"):
        context_ids([5], max_length=1)


def test_piece_bytes(tokenizer: CLIPTokenizer) -> None:
    pieces = tokenizer.tokenize("café 🐱")
    assert b"".join(piece_bytes(p) for p in pieces) == "café🐱".encode()
    assert piece_bytes("cat</w>") == b"cat"


def test_decode(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("Fish &amp; Chips, 🐟!")[0]
    assert tokenizer.decode(ids) == "fish & chips , 🐟!"
    assert tokenizer.decode(ids[:5], skip_special_tokens=False) == "<|startoftext|>fish & chips ,"


def test_long_word_is_fast(tokenizer: CLIPTokenizer) -> None:
    """A pasted 20,000-letter "word" must not stall the app (BPE is O(n log n) per word)."""
    word = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20_000))
    start = time.perf_counter()
    pieces = tokenizer.tokenize(word)
    # About 0.1 s here; rescanning every pair after each merge takes about 20 s.
    assert time.perf_counter() - start < 3.0
    assert "".join(pieces) == word + "</w>"


def test_matches_transformers(tokenizer: CLIPTokenizer, hub_folder: Path) -> None:
    """Same ids as transformers' CLIPTokenizer built from our files in the Hub layout.

    transformers 5 only has the tokenizers-library CLIP tokenizer, whose clean-up is NFC,
    whitespace and lowercase: it skips CLIP's ftfy and HTML unescaping, and lowercases a final
    capital sigma as "σ" where Python (and CLIP) give "ς". So it is given our cleaned text; the
    rest (pre-tokenizer, byte symbols, BPE, special tokens, truncation, padding) must agree.
    """
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(hub_folder / "tokenizer")
    cleaned = [clean_text(p) for p in PROMPTS]

    ours = [tokenizer.encode(p) for p in PROMPTS]
    assert ours == reference(cleaned)["input_ids"]
    # Where the clean-up only touches whitespace and case, raw prompts agree too.
    plain = [i for i, p in enumerate(PROMPTS) if clean_text(p) == " ".join(p.split()).lower()]
    assert len(plain) > len(PROMPTS) // 2
    assert [ours[i] for i in plain] == reference([PROMPTS[i] for i in plain])["input_ids"]

    batch = reference(
        cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    assert reference.pad_token_id == 49407
    assert torch.equal(tokenizer(PROMPTS), batch)
    assert [tokenizer.decode(ids) for ids in ours] == reference.batch_decode(
        ours, skip_special_tokens=True
    )


def test_load_from_hub_layout(tokenizer: CLIPTokenizer, hub_folder: Path) -> None:
    loaded = load_tokenizer(str(hub_folder))  # finds tokenizer/ by itself
    assert loaded.vocab == tokenizer.vocab and loaded.merges == tokenizer.merges
    assert torch.equal(loaded(PROMPTS[:50]), tokenizer(PROMPTS[:50]))


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("vocab.json", "{not json", "could not read the tokenizer files"),
        ("vocab.json", json.dumps({"a": 0}), "not a CLIP vocabulary"),
        ("merges.txt", "#version: 0.2\ni n\nthree parts here\n", "line 3 is not a merge"),
        ("merges.txt", "#version: 0.2\nzq xj\n", "merges make tokens missing"),
    ],
)
def test_bad_files(hub_folder: Path, tmp_path: Path, file: str, content: str, message: str) -> None:
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((hub_folder / "tokenizer" / name).read_bytes())
    (tmp_path / file).write_text(content, encoding="utf-8")
    with pytest.raises(WeightsError, match=message):
        load_tokenizer(str(tmp_path))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="merges.txt"):
        load_tokenizer(str(tmp_path))
