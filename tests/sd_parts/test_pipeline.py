"""The pipeline: equal to diffusers' StableDiffusion(Img2Img)Pipeline step by step, on tiny random
components that diffusers writes in the Hub layout; then stopping, tracing and bad arguments."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sd_parts.pipeline import StableDiffusionPipeline, load_pipeline

TOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 32  # pixels; the tiny VAE halves it once, so the latent is 16 x 16
DIFFUSERS_SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
                        "euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}
@pytest.fixture(scope="module")
def pipes(tiny_folder: Path) -> tuple[object, StableDiffusionPipeline]:
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder)
    reference.set_progress_bar_config(disable=True)
    return reference, load_pipeline(str(tiny_folder))


def run_reference(reference, kind: str, image: torch.Tensor | None = None, **kwargs) -> tuple:
    """diffusers' images and the latents after each of its steps."""
    import diffusers

    scheduler_class = getattr(diffusers, DIFFUSERS_SCHEDULERS[kind])
    scheduler = scheduler_class.from_config(reference.scheduler.config)
    steps: list[torch.Tensor] = []

    def keep(pipe, index, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    common = dict(generator=torch.Generator().manual_seed(kwargs.pop("seed")), output_type="pt",
                  callback_on_step_end=keep, **kwargs)
    if image is None:
        pipe = diffusers.StableDiffusionPipeline(**reference.components | {"scheduler": scheduler})
        images = pipe(height=SIZE, width=SIZE, **common).images
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline(
            **reference.components | {"scheduler": scheduler})
        images = pipe(image=image, **common).images
    return images, steps


def run_ours(pipe: StableDiffusionPipeline, kind: str, image: torch.Tensor | None = None,
             **kwargs) -> tuple:
    steps: list[torch.Tensor] = []
    size = {} if image is not None else dict(height=SIZE, width=SIZE)
    result = pipe(generator=torch.Generator().manual_seed(kwargs.pop("seed")), scheduler=kind,
                  image=image, callback=lambda i, t, state: steps.append(state.latents.clone()),
                  **size, **kwargs)
    return result, steps


def assert_same_run(expected: tuple, actual: tuple) -> None:
    images, steps = expected
    result, our_steps = actual
    assert len(our_steps) == len(steps) and len(steps) > 0
    for ours, theirs in zip(our_steps, steps, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)
    torch.testing.assert_close(result.images, images, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind, guidance, negative", [
    ("pndm", 7.5, ""),
    ("pndm", 7.5, "blurry, low quality"),
    ("ddim", 1.0, ""),  # guidance 1: no unconditional branch at all
    ("euler", 7.5, "blurry"),
    ("dpm++2m", 3.0, ""),
])
def test_text_to_image_matches_diffusers(pipes, kind, guidance, negative):
    reference, ours = pipes
    args = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=4,
                guidance_scale=guidance, seed=3)
    assert_same_run(run_reference(reference, kind, **args), run_ours(ours, kind, **args))


@pytest.mark.parametrize("kind, strength", [("pndm", 0.8), ("euler", 0.5), ("ddim", 0.6)])
def test_image_to_image_matches_diffusers(pipes, kind, strength):
    reference, ours = pipes
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    args = dict(prompt=PROMPT, num_inference_steps=5, strength=strength, guidance_scale=7.5,
                seed=4)
    assert_same_run(run_reference(reference, kind, image, **args),
                    run_ours(ours, kind, image, **args))


def test_image_to_image_ends(pipes):
    """Strength 0 is the VAE's reconstruction of the image; strength 1 does not use it."""
    _, pipe = pipes
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    seed = dict(num_inference_steps=3)
    kept = pipe(PROMPT, image=image, strength=0.0, generator=torch.Generator().manual_seed(1),
                **seed)
    assert kept.steps_done == 0
    latent = pipe.vae.encode(image * 2 - 1).sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(kept.images, (pipe.vae.decode(latent) / 2 + 0.5).clamp(0, 1))
    ignored = pipe(PROMPT, image=image, strength=1.0, generator=torch.Generator().manual_seed(1),
                   **seed)
    plain = pipe(PROMPT, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(1),
                 **seed)
    assert torch.equal(ignored.images, plain.images)


def test_callback_stops_the_run(pipes):
    _, pipe = pipes
    seen = []

    def stop_after_two(index: int, t: float, state) -> bool:
        seen.append((index, t, state.noise_uncond is not None))
        return index < 1

    result = pipe(PROMPT, num_inference_steps=6, height=SIZE, width=SIZE, callback=stop_after_two,
                  generator=torch.Generator().manual_seed(0), trace=True)
    assert result.stopped and result.steps_done == 2 and [s[0] for s in seen] == [0, 1]
    assert all(guided for *_, guided in seen)
    assert len(result.trace.latents) == 3 and len(result.trace.pred_original) == 2
    assert result.images.shape == (1, 3, SIZE, SIZE)


def test_trace(pipes):
    """The trace holds each step, and its word maps are the cross-attention of the prompt's half:
    for every pixel and layer the 77 probabilities sum to 1, so the maps sum to layers x steps."""
    _, pipe = pipes
    steps = 3
    run = dict(num_inference_steps=steps, height=SIZE, width=SIZE, scheduler="ddim")
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **run)
    traced = pipe(PROMPT, generator=torch.Generator().manual_seed(2), trace=True, **run)
    torch.testing.assert_close(traced.images, plain.images, atol=1e-5, rtol=0)
    trace = traced.trace
    assert len(trace.timesteps) == len(trace.noise_levels) == steps
    assert trace.noise_levels == sorted(trace.noise_levels, reverse=True)
    torch.testing.assert_close(trace.latents[-1], traced.latents)
    grid = SIZE // pipe.latent_downscale
    calls = []
    pipe.unet(torch.zeros(1, 4, grid, grid), 500, pipe.encode_prompt([PROMPT]),
              on_cross_attention=lambda probs, size: calls.append(size))
    assert len(calls) >= 2
    assert trace.word_maps.shape == (1, 77, grid, grid)
    per_pixel = trace.word_maps.sum(dim=1)
    expected = torch.full_like(per_pixel, float(len(calls) * steps))
    torch.testing.assert_close(per_pixel, expected, atol=1e-4, rtol=1e-5)
    assert len(trace.step_maps) == steps and trace.step_maps[0].shape == (1, 77, 16, 16)
    torch.testing.assert_close(sum(trace.step_maps).mean(dim=(-1, -2)),
                               trace.word_maps.mean(dim=(-1, -2)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arguments, message", [
    (dict(num_inference_steps=0), "from 1 to 1000"),
    (dict(num_inference_steps=10_000), "from 1 to 1000"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(height=33), "multiples of 2"),
    (dict(strength=1.5, image=torch.zeros(1, 3, SIZE, SIZE)), "strength"),
    (dict(image=torch.full((1, 3, SIZE, SIZE), 2.0)), r"\[0, 1\]"),
    (dict(negative_prompt=["a", "b"]), "one negative prompt per prompt"),
])
def test_bad_arguments_are_refused(pipes, arguments, message):
    _, pipe = pipes
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, **{"height": SIZE, "width": SIZE} | arguments)


def test_word_maps_keep_only_the_last_complete_pass():
    """A 16-bit UNet call that overflows is repeated in float32 and calls the hook again: the
    collector sums the second, finite pass only."""
    from sd_parts.pipeline import CrossAttentionCollector

    collector = CrossAttentionCollector(batch=1, grid=(4, 4), layers=2)
    probs = torch.full((2, 1, 16, 77), 1 / 77)
    for value in (float("nan"), float("nan")):  # the overflowing pass
        collector(torch.full_like(probs, value), (4, 4))
    for _ in range(2):
        collector(probs, (4, 4))
    torch.testing.assert_close(collector.total, torch.full((1, 77, 4, 4), 2 / 77))


def test_prompt_options(pipes):
    """Off by default (the parity tests above); on, they change the context the UNet sees."""
    _, pipe = pipes
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    skipped = encoder(tokenizer([PROMPT]), clip_skip=1).last_hidden_state
    torch.testing.assert_close(pipe.encode_prompt([PROMPT], clip_skip=1), skipped)
    assert not torch.allclose(skipped, pipe.encode_prompt([PROMPT]))
    long_prompt = " ".join(["a red cat"] * 60)  # 180 tokens: three chunks of 75
    run = dict(num_inference_steps=2, height=SIZE, width=SIZE, scheduler="ddim")
    result = pipe(long_prompt, long_prompts=True, trace=True,
                  generator=torch.Generator().manual_seed(0), **run)
    assert result.trace.word_maps.shape[1] == 3 * 77
    # restoring the mean needs a context whose mean is not 0: a trained final LayerNorm has a
    # bias, a freshly initialised one has none
    biased = copy.copy(pipe)
    biased.text_encoder = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        biased.text_encoder.final_layer_norm.bias.normal_(generator=torch.Generator().manual_seed(0))
    weighted = biased("a ((red cat", weighting=True, generator=torch.Generator().manual_seed(0),
                      **run)
    assert weighted.notes and not pipe(PROMPT, generator=torch.Generator().manual_seed(0),
                                       **run).notes
