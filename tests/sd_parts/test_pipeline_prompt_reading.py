"""The pipeline passes the web UI's prompt options (chunking, emphasis) to the prompt reading: the
context its UNet receives is the one ``encode_prompts`` makes with the same options."""

from __future__ import annotations

import pytest
import torch

from sd_parts import (
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    AutoencoderKL,
    CLIPTextEncoder,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    encode_prompts,
    load_tokenizer,
)

# 74 tokens, a comma, then three more: the plain cut splits "red cat sat" from the 75-token
# chunk; the web UI moves the cut back to the comma. BREAK then starts a third chunk.
PROMPT = " ".join(["dog"] * 73) + " , red cat sat BREAK tree"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(TINY_CLIP).eval()
    with torch.no_grad():  # a trained final LayerNorm has a bias: "original" then rescales
        encoder.final_layer_norm.bias.normal_(generator=torch.Generator().manual_seed(1))
    return StableDiffusionPipeline(load_tokenizer(), encoder,
                                   UNet2DConditionModel(TINY_UNET).eval(),
                                   AutoencoderKL(TINY_VAE).eval())


def unet_context(pipe: StableDiffusionPipeline, prompt: str, **options) -> torch.Tensor:
    """The context of the run's first UNet call (guidance off: the prompt's alone)."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
             scheduler="ddim", generator=torch.Generator().manual_seed(0), **options)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("chunking", ["plain", "webui"])
@pytest.mark.parametrize("emphasis", ["original", "no norm"])
def test_the_unet_gets_the_context_of_the_chosen_reading(pipe, chunking, emphasis):
    weighted = PROMPT.replace("red", "(red:1.6)")
    options = dict(long_prompts=True, weighting=True, chunking=chunking, emphasis=emphasis)
    with torch.inference_mode():
        expected, _ = encode_prompts(pipe.text_encoder, pipe.tokenizer, [weighted],
                                     long=True, weighting=True, chunking=chunking,
                                     emphasis=emphasis)
    context = unet_context(pipe, weighted, **options)
    # the plain cut: 78 tokens in 2 chunks (BREAK is a word); the web UI's: 74 | 4 | 1
    assert context.shape[1] == (2 if chunking == "plain" else 3) * 77
    torch.testing.assert_close(context, expected)
    assert torch.allclose(pipe.encode_prompt([weighted], **options), expected)


def test_the_options_change_the_context(pipe):
    weighted = PROMPT.replace("red", "(red:1.6)")
    base = dict(long_prompts=True, weighting=True)
    original = unet_context(pipe, weighted, **base)
    assert not torch.allclose(original, unet_context(pipe, weighted, emphasis="no norm", **base))
    with pytest.raises(ValueError, match="chunking must be one of"):
        unet_context(pipe, weighted, chunking="comfy", **base)
    with pytest.raises(ValueError, match="emphasis must be one of"):
        unet_context(pipe, weighted, emphasis="none", **base)
