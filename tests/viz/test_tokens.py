"""The prompt as the text encoder sees it: 77 rows, readable pieces, and the notes."""

from __future__ import annotations

import pytest

from sd_parts.tokenizer import BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN, load_tokenizer
from viz.tokens import (
    TOKEN_ROWS_HEADERS,
    positions_used,
    readable_pieces,
    token_count_note,
    token_rows,
    truncation_note,
)


def _prompt(n_tokens: int) -> tuple[list[str], list[int]]:
    """A synthetic prompt of n tokens: two-piece words "wa" + "b</w>", ids from 1000 up."""
    pieces = [f"w{i // 2}a" if i % 2 == 0 else f"b{i // 2}</w>" for i in range(n_tokens)]
    return pieces, list(range(1000, 1000 + n_tokens))


@pytest.mark.parametrize("n_tokens", [0, 1, 10, 75, 76, 77, 200])
def test_token_rows_are_what_sd_v1_sees(n_tokens: int) -> None:
    pieces, ids = _prompt(n_tokens)
    rows = token_rows(pieces, ids)
    kept = min(n_tokens, 75)
    assert len(rows) == 77 and all(len(row) == len(TOKEN_ROWS_HEADERS) for row in rows)
    assert [row[0] for row in rows] == list(range(77))
    kinds = [row[4] for row in rows]
    assert kinds == ["BOS"] + ["token"] * kept + ["EOS"] + ["padding"] * (75 - kept)
    assert rows[0][2:4] == [BOS_TOKEN, BOS_ID] and rows[kept + 1][2:4] == [EOS_TOKEN, EOS_ID]
    assert [row[3] for row in rows[1 : kept + 1]] == list(range(1000, 1000 + kept))
    assert [row[2] for row in rows[1 : kept + 1]] == pieces[:kept]
    assert all(row[2:4] == [EOS_TOKEN, EOS_ID] for row in rows[kept + 2 :])
    assert positions_used(n_tokens) == kept + 2


def test_token_rows_follow_the_tokenizer() -> None:
    """The rows' ids are exactly the ids the text encoder gets from the tokenizer."""
    tokenizer = load_tokenizer()
    for prompt in ["a photo of a cat", "cat,<|endoftext|>", " ".join(["zebra"] * 100), ""]:
        pieces = tokenizer.tokenize(prompt)
        rows = token_rows(pieces, tokenizer.convert_tokens_to_ids(pieces))
        assert [row[3] for row in rows] == tokenizer(prompt)[0].tolist()


def test_token_rows_keep_pieces_as_text() -> None:
    rows = token_rows(["<b>bold</w>", "&amp;</w>"], [1, 2], max_length=6)
    assert [row[2] for row in rows[1:3]] == ["<b>bold</w>", "&amp;</w>"] and len(rows) == 6
    with pytest.raises(ValueError, match="2 ids but 1 pieces"):
        token_rows(["a</w>"], [1, 2])


def test_readable_pieces_name_the_bytes_of_split_characters() -> None:
    tokenizer = load_tokenizer()
    pieces = tokenizer.tokenize("cat 🐱 一只 é\u200b")
    assert readable_pieces([BOS_TOKEN, *pieces, EOS_TOKEN]) == [
        BOS_TOKEN, "cat</w>", "🐱</w>",  # a whole emoji in one piece
        # "一" and "只" are 3 bytes each, and BPE splits each 2 + 1
        "<bytes 1-2/3 of 一>", "<byte 3/3 of 一>", "<bytes 1-2/3 of 只>", "<byte 3/3 of 只></w>",
        "é</w>", "<U+200B></w>",  # an invisible character by its code point
        EOS_TOKEN,
    ]


def test_readable_pieces_of_an_emoji_split_over_two_pieces() -> None:
    # the four bytes of 🐱 spelled in CLIP's byte symbols, split 3 + 1
    first, last = "ðŁĲ", "±</w>"
    assert readable_pieces([first, last]) == ["<bytes 1-3/4 of 🐱>", "<byte 4/4 of 🐱></w>"]
    assert readable_pieces(["a", first + last]) == ["a", "🐱</w>"]


@pytest.mark.parametrize("n_tokens", [0, 10, 75])
def test_truncation_note_is_empty_when_the_prompt_fits(n_tokens: int) -> None:
    assert truncation_note(_prompt(n_tokens)[0]) == ""


def test_truncation_note_names_the_cut_words() -> None:
    # 76 tokens: the 76th is "b37</w>", the second half of word 37, so that word is cut partly.
    note = truncation_note(_prompt(76)[0])
    assert "76 tokens" in note and "only 75 fit" in note and "last 1 " in note
    assert "“w37ab37 (partly)”" in note and "w36ab36" not in note
    note = truncation_note(_prompt(78)[0])  # words 37 (partly) and 38 (whole) are cut
    assert "“w37ab37 (partly)”, “w38ab38”" in note
    note = truncation_note(_prompt(200)[0])  # 63 words cut: 40 named, then a count
    assert "“w99ab99”" not in note and "and 23 more" in note


def test_truncation_note_shows_cut_emoji_as_text() -> None:
    pieces = load_tokenizer().tokenize("cat " * 75 + "🐱")
    assert "“🐱”" in truncation_note(pieces)


def test_token_count_note() -> None:
    assert token_count_note(_prompt(10)[0]) == (
        "12 of 77 positions used (BOS + 10 tokens + EOS); 65 are padding."
    )
    assert token_count_note(["cat</w>"]).startswith("3 of 77 positions used (BOS + 1 token + EOS)")
    assert token_count_note(_prompt(80)[0]) == (
        "77 of 77 positions used (BOS + 75 tokens + EOS); 5 more tokens were cut."
    )
