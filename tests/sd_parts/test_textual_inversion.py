"""Textual inversion files of both layouts, against diffusers' own load_textual_inversion (which
works without peft): the same tokens, the same context, the same image; then unloading and the
files that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_parts import WeightsError, load_pipeline

SIZE = 32
WIDTH = 32  # the tiny text encoder's hidden size


@pytest.fixture(scope="module")
def pipe(tiny_folder: Path):  # noqa: F811
    return load_pipeline(str(tiny_folder))


@pytest.fixture
def reference(tiny_folder: Path):  # noqa: F811
    """A fresh diffusers pipeline per test: its load_textual_inversion changes it in place."""
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


def vectors(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (file name, its tensors, token= passed to ours (None: from the file), the token to type)
LAYOUTS = {
    "diffusers, 3 vectors": ("learned_embeds.safetensors", {"<cat-toy>": vectors(3, WIDTH)},
                             None, "<cat-toy>"),
    "diffusers, one (768,)-style vector": ("learned_embeds.safetensors",
                                           {"<sketch>": vectors(WIDTH)}, None, "<sketch>"),
    "AUTOMATIC1111, token from the file name": ("MyStyle.safetensors",
                                                {"emb_params": vectors(2, WIDTH)}, None,
                                                "mystyle"),
    "AUTOMATIC1111, token given": ("embedding.safetensors", {"emb_params": vectors(1, WIDTH)},
                                   "<x-1>", "<x-1>"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_textual_inversion_matches_diffusers(pipe, reference, tmp_path, layout):
    filename, tensors, token, typed = LAYOUTS[layout]
    path = tmp_path / filename
    save_file(tensors, path)
    prompt = f"a photo of {typed}, in the style of x{typed}y"
    before = pipe.encode_prompt([prompt])
    tokenizer, table = pipe.tokenizer, pipe.text_encoder.embeddings.token_embedding.weight
    embedding = pipe.load_textual_inversion(str(path), token=token)
    assert embedding.token == typed and len(embedding.tokens) == len(embedding.vectors)
    # diffusers takes an AUTOMATIC1111 file's token from token= only
    reference.load_textual_inversion(str(path), token=token or typed)
    ours = pipe.encode_prompt([prompt])
    # diffusers' encode_prompt expands the multi-vector token itself (maybe_convert_prompt)
    theirs = reference.encode_prompt(prompt, "cpu", 1, False)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, before)
    run = dict(num_inference_steps=2, height=SIZE, width=SIZE)
    image = pipe(prompt, scheduler="ddim", generator=torch.Generator().manual_seed(0), **run)
    expected = reference(prompt, generator=torch.Generator().manual_seed(0), output_type="pt",
                         **run).images
    torch.testing.assert_close(image.images, expected, atol=1e-4, rtol=0)
    pipe.unload_textual_inversion()
    assert pipe.tokenizer is tokenizer
    assert pipe.text_encoder.embeddings.token_embedding.weight is table
    assert torch.equal(pipe.encode_prompt([prompt]), before)


def test_several_embeddings_and_unloading_one(pipe, tmp_path):
    save_file({"<a-thing>": vectors(2, WIDTH, seed=1)}, tmp_path / "a.safetensors")
    save_file({"emb_params": vectors(1, WIDTH, seed=2)}, tmp_path / "bstyle.safetensors")
    rows = pipe.text_encoder.embeddings.token_embedding.num_embeddings
    pipe.load_textual_inversion(str(tmp_path / "bstyle.safetensors"))
    alone = pipe.encode_prompt(["bstyle and bstyle"])
    pipe.unload_textual_inversion("bstyle")
    pipe.load_textual_inversion(str(tmp_path / "a.safetensors"))
    pipe.load_textual_inversion(str(tmp_path / "bstyle.safetensors"))
    ids = pipe.tokenizer(["<a-thing> bstyle"])[0, :4].tolist()
    assert ids == [pipe.tokenizer.bos_token_id, rows, rows + 1, rows + 2]
    with pytest.raises(WeightsError, match="'bstyle' already in the vocabulary"):
        pipe.load_textual_inversion(str(tmp_path / "bstyle.safetensors"))
    pipe.unload_textual_inversion("<a-thing>")  # b's row moves up to the first new id
    assert pipe.tokenizer(["bstyle"])[0, 1] == rows
    torch.testing.assert_close(pipe.encode_prompt(["bstyle and bstyle"]), alone, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no textual inversion '<a-thing>' is loaded"):
        pipe.unload_textual_inversion("<a-thing>")
    pipe.unload_textual_inversion()
    assert pipe.text_encoder.embeddings.token_embedding.num_embeddings == rows


@pytest.mark.parametrize("filename, tensors, message", [
    ("xl.safetensors", {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, "SDXL embedding"),
    ("wide.safetensors", {"emb_params": vectors(2, 1280)}, "1280 wide, the width of SDXL"),
    ("two.safetensors", {"<a>": vectors(WIDTH), "<b>": vectors(WIDTH)},
     "not a textual inversion file.*<a>, <b>"),
    ("a.safetensors", {"emb_params": vectors(WIDTH)}, "'a' already in the vocabulary"),
    ("cube.safetensors", {"<c>": vectors(2, 2, WIDTH)}, r"must be \(n, 32\) floats"),
])
def test_bad_embeddings_are_refused(pipe, tmp_path, filename, tensors, message):
    path = tmp_path / filename
    save_file(tensors, path)
    tokenizer = pipe.tokenizer
    with pytest.raises(WeightsError, match=message):
        pipe.load_textual_inversion(str(path))
    assert pipe.tokenizer is tokenizer


def test_pickled_embeddings_are_refused(pipe, tmp_path):
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": vectors(1, WIDTH)}}, path)
    with pytest.raises(WeightsError, match="pickled"):
        pipe.load_textual_inversion(str(path))
