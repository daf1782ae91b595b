"""The denoising loop's pictures and files, read back: previews, the noise-level chart, the
schedule, the forward process, guidance, the word maps, the strip of steps, the PNG and the
latents file. Each test places something known in the input and finds it in the output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sd_parts
from sd_parts.schedulers import SchedulerConfig
from sd_parts.schedulers.schedule import make_alphas_cumprod
from viz import diffusion
from viz.heatmap import INK, colorize

ALPHAS_CUMPROD = make_alphas_cumprod(SchedulerConfig())  # SD v1.5's schedule, T = 1000
MARKER = (220, 60, 40)  # the step chart's current-step dot


def test_latent_preview_colours_each_block_by_the_linear_map():
    # channel c -> colour c for the first three channels; the fourth is ignored; no bias
    matrix = np.vstack([np.eye(3), np.zeros((1, 3)), np.zeros((1, 3))])
    latent = torch.linspace(-1, 1, 4 * 2 * 3).reshape(4, 2, 3)
    preview = diffusion.latent_preview(latent.to(torch.bfloat16), matrix, (12, 8))
    assert preview.shape == (8, 12, 3) and preview.dtype == np.uint8
    expected = np.rint((latent[:3].to(torch.bfloat16).double().numpy() + 1) * 127.5)
    for y in range(2):
        for x in range(3):
            block = preview[4 * y: 4 * y + 4, 4 * x: 4 * x + 4]  # one latent pixel, 4 x 4
            assert (block == expected[:, y, x]).all(), (y, x)


def marker_centre(chart: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero((chart == MARKER).all(axis=-1))
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


def test_step_chart_marks_the_current_step_on_the_curve():
    levels = [14.6, 8.0, 4.0, 1.5, 0.6, 0.2, 0.08, 0.03]
    n = len(levels)
    first = diffusion.step_chart(levels, 0)
    ink = (first == INK).all(axis=-1)
    axis_x = int(ink.sum(axis=0).argmax())  # the vertical axis: the column with most ink
    axis_y = int(ink.sum(axis=1).argmax())  # the horizontal axis
    end_x = int(np.nonzero(ink[axis_y])[0].max())
    centres = [marker_centre(diffusion.step_chart(levels, i)) for i in range(n)]
    xs = np.array([c[0] for c in centres])
    ys = np.array([c[1] for c in centres])
    # x: the first step on the vertical axis, the last at the end of the horizontal one,
    # evenly spaced in between
    np.testing.assert_allclose(xs, np.linspace(axis_x, end_x, n), atol=1.0)
    # y: linear in log10(sigma), higher noise higher up
    slope, offset = np.polyfit(np.log10(levels), ys, 1)
    assert slope < 0
    np.testing.assert_allclose(ys, slope * np.log10(levels) + offset, atol=1.0)
    assert marker_centre(diffusion.step_chart(levels, None)) is None
    assert marker_centre(diffusion.step_chart(levels, n)) is None  # past the end: no dot


def test_schedule_figure_draws_the_schedule_with_t_marked():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    figure = diffusion.schedule_figure(ALPHAS_CUMPROD, 250)
    left, right = figure.axes
    abar_line, beta_line, marker = left.lines
    np.testing.assert_array_equal(abar_line.get_xdata(), np.arange(1, 1001))
    np.testing.assert_allclose(abar_line.get_ydata(), ALPHAS_CUMPROD.numpy(), rtol=1e-6)
    # beta_t recovered from abar_t is the schedule's own beta_t (drawn x 50)
    np.testing.assert_allclose(beta_line.get_ydata() / 50, reference.betas.numpy(), rtol=1e-4)
    snr = ALPHAS_CUMPROD.double() / (1 - ALPHAS_CUMPROD.double())
    np.testing.assert_allclose(right.lines[0].get_ydata(), snr.numpy(), rtol=1e-9)
    for axes in (left, right):
        assert list(axes.lines[-1].get_xdata()) == [250, 250]


def test_forward_noise_matches_diffusers_and_t0_is_the_input():
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    before = latent.clone()
    clean = diffusion.forward_noise(latent, noise, ALPHAS_CUMPROD, 0)
    assert clean.equal(latent) and clean is not latent
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for t in (1, 500, 1000):  # t counts from 1; diffusers' index is t - 1
        expected = reference.add_noise(latent, noise, torch.tensor([t - 1]))
        noisy = diffusion.forward_noise(latent, noise, ALPHAS_CUMPROD, t)
        torch.testing.assert_close(noisy, expected)
        # and back: the exact noise gives the exact clean latent
        torch.testing.assert_close(
            diffusion.predicted_original(noisy, noise, ALPHAS_CUMPROD, t), latent,
            atol=1e-3 if t == 1000 else 1e-5, rtol=1e-4)
    assert latent.equal(before)
    with pytest.raises(ValueError, match="t must be from 0 to 1000; got 1001"):
        diffusion.forward_noise(latent, noise, ALPHAS_CUMPROD, 1001)


def test_guidance_view_shows_the_two_predictions_and_where_they_differ():
    uncond = torch.full((4, 6, 5), 0.5)
    text = uncond.clone()
    text[:, 4, 1] += 2.0  # the prompt changes one latent pixel
    picture = diffusion.guidance_view(uncond, text, 7.5)
    norms = [uncond.norm(dim=0), text.norm(dim=0), (text - uncond).norm(dim=0)]
    shared = float(max(norms[0].max(), norms[1].max()))  # both predictions on one scale
    limits = [shared, shared, float(norms[2].max())]
    assert len(picture.maps) == 3
    for box, values, high in zip(picture.maps, norms, limits, strict=True):
        np.testing.assert_array_equal(box.cells(picture.pixels),
                                      colorize(values.numpy(), "viridis", 0.0, high))
    difference = picture.maps[2].cells(picture.pixels).astype(int).sum(axis=-1)
    assert np.unravel_index(difference.argmax(), difference.shape) == (4, 1)


def test_word_groups_merge_pieces_and_show_bos_eos_and_padding():
    pieces = sd_parts.load_tokenizer().tokenize("a hyperdetailed cat")
    assert pieces == ["a</w>", "hyper", "detailed</w>", "cat</w>"]
    groups = diffusion.word_groups(pieces, 77)
    assert groups == [("<start>", [0]), ("a", [1]), ("hyperdetailed", [2, 3]), ("cat", [4]),
                      ("<end>", [5]), ("<padding> x71", list(range(6, 77)))]
    full = diffusion.word_groups(["cat</w>"] * 75, 77)  # no room left for padding
    assert full[-1] == ("<end>", [76]) and len(full) == 77


def test_word_maps_follow_the_attention_placed_on_each_word():
    groups = [("<start>", [0]), ("cat", [1]), ("hyperdetailed", [2, 3]), ("<end>", [4])]
    maps = torch.zeros(77, 8, 12)
    maps[1, 1, 9] = 1.0  # "cat": the top right
    maps[2, 6, 2] = 0.3  # "hyperdetailed": its two pieces, bottom left, summed
    maps[3, 6, 2] = 0.4
    maps[0] = 0.2  # "<start>": everywhere alike
    image = np.full((64, 96, 3), 128, dtype=np.uint8)  # flat: brightness comes from the map
    picture = diffusion.word_maps_view(maps, groups, image, columns=2, side=96)
    assert len(picture.maps) == len(groups)
    panels = [box.cells(picture.pixels).astype(float).sum(axis=-1) for box in picture.maps]
    assert all(panel.shape == (64, 96) for panel in panels)
    for panel, (row, column) in ((panels[1], (1, 9)), (panels[2], (6, 2))):
        y, x = np.unravel_index(panel.argmax(), panel.shape)
        assert (y // 8, x // 8) == (row, column)  # 8 image pixels per map cell here
    assert panels[0].max() - panels[0].min() <= 3  # flat attention: a flat panel
    assert panels[3].max() - panels[3].min() <= 3  # no attention at all: the image alone
    # each word is scaled to its own peak: both bright spots are equally bright
    assert panels[1].max() == panels[2].max()


def test_step_strip_shows_the_chosen_previews_in_order():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    previews = [np.full((32, 64, 3), colour, dtype=np.uint8) for colour in colours]
    strip = diffusion.step_strip(previews, ["step 1", "step 10", "step 20"], side=128)
    lefts = []
    for colour in colours:
        ys, xs = np.nonzero((strip.pixels == colour).all(axis=-1))
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (64, 128)  # shrunk to 128
        lefts.append(xs.min())
    assert lefts == sorted(lefts)
    assert diffusion.strip_steps(3) == [0, 1, 2]
    chosen = diffusion.strip_steps(50)
    assert chosen[0] == 0 and chosen[-1] == 49 and len(chosen) == 6
    assert max(np.diff(chosen)) - min(np.diff(chosen)) <= 1  # evenly spread


def test_png_keeps_the_settings(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    settings = {"prompt": "a café at dusk 🌆", "steps": 20, "guidance_scale": 7.5, "seed": 3}
    path = diffusion.save_png_with_settings(image, settings, tmp_path / "image.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        np.testing.assert_array_equal(np.asarray(saved), image)
        assert json.loads(saved.text["parameters"]) == settings


def test_latents_file_holds_every_step(tmp_path):
    latents = [torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    timesteps = [981.0, 651.0, 321.0]
    settings = {"prompt": "a cat", "steps": 3}
    path = diffusion.save_step_latents(latents, timesteps, settings, tmp_path / "l.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["step_000", "step_001", "step_002", "step_003"]
        for i, latent in enumerate(latents):
            assert f.get_tensor(f"step_{i:03d}").equal(latent)
        metadata = f.metadata()
    assert json.loads(metadata["timesteps"]) == timesteps
    assert json.loads(metadata["settings"]) == settings
