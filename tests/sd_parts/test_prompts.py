"""Prompt habits of the web UIs: the weighting syntax, chunks of 75 tokens, and the mean-restoring
scaling of the context."""

from __future__ import annotations

import pytest
import torch

from sd_parts import TINY_CLIP, CLIPTextEncoder, load_tokenizer
from sd_parts.prompts import (
    apply_weights,
    chunk_ids,
    encode_long,
    encode_prompts,
    parse_prompt,
    parse_weights,
    prompt_runs,
    token_weights,
)

UP = 1.1  # one pair of ( )
DOWN = 1 / 1.1  # one pair of [ ]

# (prompt, expected spans, number of notes): the reading of the AUTOMATIC1111 web UI
PARSE_TABLE = [
    ("a photo of a cat", [("a photo of a cat", 1.0)], 0),
    ("", [], 0),
    ("()", [], 0),
    ("(cat)", [("cat", 1.1)], 0),
    ("((cat))", [("cat", 1.21)], 0),
    ("(((cat)))", [("cat", 1.331)], 0),
    ("[cat]", [("cat", DOWN)], 0),
    ("[[cat]]", [("cat", DOWN * DOWN)], 0),
    ("(cat:1.3)", [("cat", 1.3)], 0),
    ("(cat:.5)", [("cat", 0.5)], 0),
    ("(cat:-1)", [("cat", -1.0)], 0),
    ("(cat : 2 )", [("cat ", 2.0)], 0),
    ("a (red:1.5) [cat]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", DOWN)], 0),
    ("(a:1.2) (b:0.8)", [("a", 1.2), (" ", 1.0), ("b", 0.8)], 0),
    ("((cat:1.5))", [("cat", 1.65)], 0),
    ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)], 0),
    ("(a [b] c:1.2)", [("a ", 1.2), ("b", 1.2 * DOWN), (" c", 1.2)], 0),
    ("x ([cat]) y", [("x cat y", 1.0)], 0),
    (r"\(cat\)", [("(cat)", 1.0)], 0),
    (r"(\(cat\))", [("(cat)", 1.1)], 0),
    (r"\[x\] and \\", [("[x] and \\", 1.0)], 0),
    # a backslash before any other character is dropped, as the web UI drops it (with a note)
    ("a \\ b", [("a  b", 1.0)], 1),
    (r"a\b", [("ab", 1.0)], 1),
    ("cat\\", [("cat", 1.0)], 1),
    (r"(a\:1.2)", [("a", 1.2)], 1),
    (r"\\\(x", [("\\(x", 1.0)], 0),
    ("style: photo", [("style: photo", 1.0)], 0),
    # malformed: read as the UIs read it, with a note each
    ("(cat", [("cat", 1.1)], 1),
    ("cat)", [("cat)", 1.0)], 1),
    ("[cat", [("cat", DOWN)], 1),
    ("cat]", [("cat]", 1.0)], 1),
    ("(cat:abc)", [("cat:abc", 1.1)], 1),
    ("(cat:)", [("cat:", 1.1)], 1),
    ("(cat:1.2.3)", [("cat:1.2.3", 1.1)], 1),
    ("(cat:.)", [("cat:.", 1.1)], 1),
    ("[cat:1.3]", [("cat:1.3", DOWN)], 1),
    ("(cat:1.3", [("cat:1.3", 1.1)], 1),
    ("cat:1.3)", [("cat:1.3)", 1.0)], 1),
    ("(a]", [("a]", 1.1)], 2),
    ("((cat:1.5)", [("cat", 1.65)], 1),
]


@pytest.mark.parametrize(("prompt", "spans", "n_notes"), PARSE_TABLE)
def test_parse_weights(prompt, spans, n_notes):
    got, notes = parse_weights(prompt)
    assert [text for text, _ in got] == [text for text, _ in spans]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in spans])
    assert len(notes) == n_notes, notes


def test_parse_notes_name_the_place():
    assert "character 4" in parse_weights("cat)")[1][0]
    assert "never closed" in parse_weights("a (cat")[1][0]
    assert "'1.2.3'" in parse_weights("(cat:1.2.3)")[1][0]
    assert "square brackets" in parse_weights("[cat:1.3]")[1][0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder() -> CLIPTextEncoder:
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(TINY_CLIP).eval()
    # A trained final LayerNorm has a bias, which gives the context the non-zero mean that
    # weighting restores; a fresh one (bias 0) leaves every row with mean 0.
    with torch.no_grad():
        encoder.final_layer_norm.bias.normal_(0.0, 0.5)
    return encoder


def test_token_weights(tokenizer):
    pieces, weights = token_weights(tokenizer, parse_weights("a photo of (red:1.5) [cats]")[0])
    assert pieces == ["a</w>", "photo</w>", "of</w>", "red</w>", "cats</w>"]
    assert weights == pytest.approx([1.0, 1.0, 1.0, 1.5, DOWN])
    # a bracket ends a word, so "(b)" inside "a(b)c" is a word of its own
    pieces, weights = token_weights(tokenizer, parse_weights("hot(dog)")[0])
    assert pieces == ["hot</w>", "dog</w>"] and weights == pytest.approx([1.0, 1.1])


def test_chunks_of_a_200_token_prompt(tokenizer):
    words = ["cat", "dog", "tree", "house"] * 50
    prompt = " ".join(words)
    ids = tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in words])  # one token each
    chunks = chunk_ids(tokenizer, prompt)
    assert chunks.shape == (3, 77) and chunks.dtype == torch.long
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert chunks[:, 0].tolist() == [bos] * 3
    assert chunks[0, 76] == eos and chunks[1, 76] == eos
    # the last chunk: 50 tokens, its EOS, then 25 padding (EOS in SD v1)
    assert chunks[2, 51:].tolist() == [eos] * 26
    inner = [*chunks[0, 1:76].tolist(), *chunks[1, 1:76].tolist(), *chunks[2, 1:51].tolist()]
    assert inner == ids
    # the first chunk is what SD v1 sees without chunking
    assert torch.equal(chunks[:1], tokenizer(prompt))
    assert chunk_ids(tokenizer, "a cat").shape == (1, 77)
    assert chunk_ids(tokenizer, "a cat", min_chunks=3).tolist()[1:] == [[bos, eos] + [eos] * 75] * 2


def test_encode_long_is_each_chunk_side_by_side(encoder, tokenizer):
    chunks = chunk_ids(tokenizer, " ".join(["a photo of a red cat"] * 30))  # 180 tokens
    with torch.inference_mode():
        context = encode_long(encoder, chunks, clip_skip=1)
        for i in range(len(chunks)):
            alone = encoder(chunks[i: i + 1], clip_skip=1).last_hidden_state[0]
            torch.testing.assert_close(context[0, 77 * i: 77 * (i + 1)], alone)
    assert context.shape == (1, 77 * 3, TINY_CLIP.hidden_size)


def test_apply_weights_scales_rows_and_keeps_the_mean():
    context = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    before = context.clone()
    weights = torch.ones(77)
    weights[3], weights[5] = 1.5, 0.5
    out = apply_weights(context, weights)
    assert torch.equal(context, before)  # not in place
    torch.testing.assert_close(out.mean(), context.mean(), atol=1e-6, rtol=0)
    # every row is its input times its weight times one common factor, the mean's correction
    factor = out / context  # (1, 77, 8)
    common = factor[0, 0, 0]
    assert common != 1
    expected = (weights * common).view(1, 77, 1).expand(1, 77, 8)
    torch.testing.assert_close(factor, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weights must be"):
        apply_weights(context, torch.ones(76))


def test_apply_weights_refuses_a_mean_of_about_zero():
    # rows of mean 0, as an untrained final LayerNorm gives: the ratio of means would be noise
    context = torch.nn.functional.layer_norm(torch.randn(1, 77, 8), (8,))
    with pytest.raises(ValueError, match="mean is about 0"):
        apply_weights(context, torch.linspace(0.5, 1.5, 77))


def test_encode_prompts_options(encoder, tokenizer):
    prompts = ["a photo of a cat", " ".join(["a red house"] * 40)]  # 5 and 120 tokens
    with torch.inference_mode():
        plain, notes = encode_prompts(encoder, tokenizer, prompts)
        torch.testing.assert_close(plain, encoder(tokenizer(prompts)).last_hidden_state)
        assert notes == []
        # long: both prompts get two chunks, the short one an empty prompt's as the second
        long, _ = encode_prompts(encoder, tokenizer, prompts, long=True)
        assert long.shape == (2, 154, TINY_CLIP.hidden_size)
        torch.testing.assert_close(long[:, :77], plain)
        empty = encoder(tokenizer([""])).last_hidden_state[0]
        torch.testing.assert_close(long[0, 77:], empty)
        # weight 1 changes nothing; a real weight changes the context; a typo gives a note
        same, _ = encode_prompts(encoder, tokenizer, ["a photo of a (cat:1)"], weighting=True)
        torch.testing.assert_close(same, plain[:1])
        heavier, notes = encode_prompts(encoder, tokenizer, ["a photo of a (cat:1.4)"],
                                        weighting=True)
        assert notes == []
        weights = torch.ones(77)
        weights[5] = 1.4  # BOS, a, photo, of, a, cat
        torch.testing.assert_close(heavier, apply_weights(plain[:1], weights))
        _, notes = encode_prompts(encoder, tokenizer, ["a photo of a (cat:1.4"], weighting=True)
        assert len(notes) == 1 and "never closed" in notes[0]
        # without weighting, brackets are text, as diffusers reads them
        as_text, _ = encode_prompts(encoder, tokenizer, ["a (cat:1.4)"])
        torch.testing.assert_close(as_text, encoder(tokenizer(["a (cat:1.4)"])).last_hidden_state)


# (prompt, its BREAK-separated segments, number of notes)
BREAK_TABLE = [
    ("a cat BREAK a dog", [[("a cat", 1.0)], [("a dog", 1.0)]], 0),
    ("BREAK a", [[], [("a", 1.0)]], 0),
    ("a BREAK", [[("a", 1.0)], []], 0),
    ("a BREAK BREAK b", [[("a", 1.0)], [], [("b", 1.0)]], 0),
    ("a,BREAK,b", [[("a,", 1.0)], [(",b", 1.0)]], 0),
    ("(red) BREAK [cat]", [[("red", 1.1)], [("cat", DOWN)]], 0),
    ("aBREAK b, break c", [[("aBREAK b, break c", 1.0)]], 0),  # a word of its own, in capitals
    ("(a BREAK b)", [[("a BREAK b", 1.1)]], 1),  # inside brackets: a word, with a note
]


@pytest.mark.parametrize(("prompt", "segments", "n_notes"), BREAK_TABLE)
def test_parse_prompt_reads_break(prompt, segments, n_notes):
    got, notes = parse_prompt(prompt)
    assert got == [[(text, pytest.approx(weight)) for text, weight in spans]
                   for spans in segments]
    assert len(notes) == n_notes, notes


def words(*counts: tuple[str, int]) -> str:
    """A prompt of one-token words: words(("cat", 2), (",", 1)) is "cat cat ,"."""
    return " ".join(word for word, n in counts for _ in range(n))


# (prompt, the chunks by hand: plain 75-token cuts, the web UI's), in one-token words
CHUNK_TABLE = [
    # the comma is 15 tokens before the cut: the web UI moves the 14 dogs after it on
    (words(("cat", 60), (",", 1), ("dog", 20)),
     [[("cat", 60), (",", 1), ("dog", 14)], [("dog", 6)]],
     [[("cat", 60), (",", 1)], [("dog", 20)]]),
    # 20 tokens before the cut: still moved; 25: too far back, the plain cut
    (words(("cat", 55), (",", 1), ("dog", 25)),
     [[("cat", 55), (",", 1), ("dog", 19)], [("dog", 6)]],
     [[("cat", 55), (",", 1)], [("dog", 25)]]),
    (words(("cat", 50), (",", 1), ("dog", 30)),
     [[("cat", 50), (",", 1), ("dog", 24)], [("dog", 6)]],
     [[("cat", 50), (",", 1), ("dog", 24)], [("dog", 6)]]),
    # a comma as the 76th token goes to the next chunk in both
    (words(("cat", 75), (",", 1), ("dog", 2)),
     [[("cat", 75)], [(",", 1), ("dog", 2)]],
     [[("cat", 75)], [(",", 1), ("dog", 2)]]),
    # BREAK: read by the web UI's rule only ("break" is then no token)
    ("a cat BREAK a dog, BREAK BREAK tree",
     [[("a", 1), ("cat", 1), ("break", 1), ("a", 1), ("dog", 1), (",", 1), ("break", 2),
       ("tree", 1)]],
     [[("a", 1), ("cat", 1)], [("a", 1), ("dog", 1), (",", 1)], [], [("tree", 1)]]),
    ("BREAK cat", [[("break", 1), ("cat", 1)]], [[], [("cat", 1)]]),
    ("", [[]], [[]]),
]


@pytest.mark.parametrize(("prompt", "plain", "webui"), CHUNK_TABLE)
@pytest.mark.parametrize("weighting", [False, True])
def test_chunking_rules(tokenizer, prompt, plain, webui, weighting):
    vocab = tokenizer.vocab
    for chunking, expected in (("plain", plain), ("webui", webui)):
        runs, _ = prompt_runs(tokenizer, prompt, weighting, chunking)
        want = [[vocab[f"{word}</w>"] for word, n in run for _ in range(n)] for run in expected]
        assert [ids for ids, _ in runs] == want, chunking
        assert all(weights == [1.0] * len(ids) for ids, weights in runs)


def test_webui_chunks_as_the_encoder_sees_them(encoder, tokenizer):
    vocab, bos, eos = tokenizer.vocab, tokenizer.bos_token_id, tokenizer.eos_token_id
    a, cat, dog = vocab["a</w>"], vocab["cat</w>"], vocab["dog</w>"]
    rows = [[bos, a, cat, eos] + [eos] * 73, [bos, a, dog, eos] + [eos] * 73]
    with torch.inference_mode():
        context, _ = encode_prompts(encoder, tokenizer, ["a cat BREAK a dog"], long=True,
                                    chunking="webui")
        torch.testing.assert_close(context, encode_long(encoder, torch.tensor(rows)))
    # weights travel with their tokens into the chunks
    runs, _ = prompt_runs(tokenizer, "(cat:1.5) BREAK [dog]", True, "webui")
    assert runs == [([cat], [1.5]), ([dog], [pytest.approx(DOWN)])]


def test_webui_keeps_a_multi_vector_token_in_one_chunk(tokenizer):
    extended = tokenizer.with_added_tokens("<thing>", 3)
    first = extended.vocab["<thing>"]
    prompt = words(("cat", 74)) + " <thing>"
    plain, _ = prompt_runs(extended, prompt, False, "plain")
    assert [ids[-1:] for ids, _ in plain] == [[first], [first + 2]]  # split 1 + 2
    webui, _ = prompt_runs(extended, prompt, False, "webui")
    assert [len(ids) for ids, _ in webui] == [74, 3]
    assert webui[1][0] == [first, first + 1, first + 2]


def test_emphasis_restores_each_chunks_mean(encoder, tokenizer):
    """The web UI's "Original": a chunk's mean is restored within that chunk, not over the joined
    context; "No norm" multiplies only. Hand-worked positions: cat is token 0 (chunk 0, row 1),
    tree token 81 (chunk 1, row 1 + 81 - 75 = 7)."""
    weighted = "(cat:1.5) " + words(("dog", 80)) + " (tree:0.5)"
    plain_text = "cat " + words(("dog", 80)) + " tree"
    weights = torch.ones(2, 77)
    weights[0, 1], weights[1, 7] = 1.5, 0.5
    with torch.inference_mode():
        plain, _ = encode_prompts(encoder, tokenizer, [plain_text], long=True)
        original, _ = encode_prompts(encoder, tokenizer, [weighted], long=True, weighting=True)
        no_norm, _ = encode_prompts(encoder, tokenizer, [weighted], long=True, weighting=True,
                                    emphasis="no norm")
    chunks = plain.reshape(2, 77, -1)
    scaled = chunks * weights[..., None]
    expected = scaled * (chunks.mean(dim=(1, 2)) / scaled.mean(dim=(1, 2)))[:, None, None]
    torch.testing.assert_close(original, expected.reshape(1, 154, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(original.reshape(2, 77, -1).mean(dim=(1, 2)),
                               chunks.mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(no_norm, scaled.reshape(1, 154, -1))
    joined = apply_weights(plain, weights.reshape(1, 154))  # the mean over both chunks at once
    assert not torch.allclose(original, joined, atol=1e-4)
    with pytest.raises(ValueError, match="emphasis must be one of"):
        encode_prompts(encoder, tokenizer, ["a"], emphasis="none")
    with pytest.raises(ValueError, match="chunking must be one of"):
        encode_prompts(encoder, tokenizer, ["a"], chunking="comma")
