"""The samplers: equal to diffusers' schedulers over whole runs, for every timestep spacing; then
image to image, the noise level, state, configuration files and bad arguments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sd_parts.schedulers import SAMPLERS, SchedulerConfig, load_scheduler
from sd_parts.weights import WeightsError

TOL = 1e-5
STEPS = (1, 2, 10, 50)
SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (2, 4, 8, 8)
# SD v1.5's scheduler/scheduler_config.json, as on the Hub (no timestep_spacing key)
SD15_FILE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False, "prediction_type": "epsilon",
}
REFERENCE = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
             "pndm": "PNDMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}
# (kind, karras, eta): every sampler, Karras sigmas where they apply, DDIM with and without noise
VARIANTS = [("ddpm", False, 0.0), ("ddim", False, 0.0), ("ddim", False, 1.0), ("euler", False, 0.0),
            ("euler", True, 0.0), ("pndm", False, 0.0), ("dpm++2m", False, 0.0),
            ("dpm++2m", True, 0.0)]


def make_pair(kind: str, spacing: str | None, karras: bool = False, eta: float = 0.0,
              n: int | None = None) -> tuple[object, object]:
    """diffusers' scheduler and ours, both from SD v1.5's file, with timesteps set for n steps."""
    import diffusers

    settings = {**SD15_FILE, "use_karras_sigmas": karras}
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    reference = getattr(diffusers, REFERENCE[kind]).from_config({**settings, **overrides})
    options = {"eta": eta} if kind == "ddim" else {}
    ours = load_scheduler(None, kind=kind, karras=karras, **overrides, **options)
    if n is not None:
        reference.set_timesteps(n)
        ours.set_timesteps(n)
    return reference, ours


def fake_unet(x: torch.Tensor, k: int, draws: torch.Tensor) -> torch.Tensor:
    """A noise prediction that depends on the sample, so a wrong step changes every later one."""
    return 0.7 * torch.tanh(x) + 0.3 * draws[k]


def assert_timesteps_equal(kind: str, karras: bool, ours: torch.Tensor,
                           reference: torch.Tensor) -> None:
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    if kind == "euler" and karras:
        # fractional timesteps from log sigma: torch's and numpy's float32 log differ in the last
        # bit for some sigmas, which moves a timestep by at most one float32 ulp (6.1e-5 near 999)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    else:
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(("kind", "karras", "eta"), VARIANTS)
def test_matches_diffusers(kind, karras, eta, spacing):
    # PNDM with n = 1 is defined in diffusers (one DDIM step from the single timestep to abar_0),
    # so every combination here runs.
    for n in STEPS:
        reference, ours = make_pair(kind, spacing, karras, eta, n)
        assert_timesteps_equal(kind, karras, ours.timesteps, reference.timesteps)
        assert ours.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
        torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, atol=0, rtol=0)

        g = torch.Generator().manual_seed(n)
        draws = torch.randn(len(ours.timesteps), *SHAPE, generator=g)
        x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        chosen = [0, len(ours.timesteps) // 2]  # one timestep per batch item
        torch.testing.assert_close(ours.add_noise(x0, noise, ours.timesteps[chosen]),
                                   reference.add_noise(x0, noise, reference.timesteps[chosen]),
                                   atol=TOL, rtol=0)

        x = x_ref = noise * reference.init_noise_sigma
        # the same seed on both sides: DDPM and DDIM with eta > 0 must draw the same numbers
        gen, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for k, (t, t_ref) in enumerate(zip(ours.timesteps, reference.timesteps, strict=True)):
            unet_input = ours.scale_model_input(x, t)
            unet_input_ref = reference.scale_model_input(x_ref, t_ref)
            torch.testing.assert_close(unet_input, unet_input_ref, atol=TOL, rtol=0)
            eps, eps_ref = fake_unet(unet_input, k, draws), fake_unet(unet_input_ref, k, draws)
            kwargs = {"eta": eta} if kind == "ddim" else {}
            if kind != "pndm":
                kwargs["generator"] = gen_ref
            x_before, eps_before = x.clone(), eps.clone()
            out = ours.step(eps, t, x, generator=gen)
            expected = reference.step(eps_ref, t_ref, x_ref, **kwargs)
            assert torch.equal(x, x_before) and torch.equal(eps, eps_before)  # inputs untouched
            torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=TOL, rtol=0)
            if kind == "dpm++2m":  # diffusers keeps its x_0 prediction as the solver's state
                expected_x0 = reference.model_outputs[-1]
            elif kind == "pndm":  # diffusers' PNDM returns none: see test_pndm_x0
                expected_x0 = out.pred_original_sample
            else:
                expected_x0 = expected.pred_original_sample
            torch.testing.assert_close(out.pred_original_sample, expected_x0, atol=TOL, rtol=0)
            x, x_ref = out.prev_sample, expected.prev_sample


def test_pndm_x0():
    """PNDM's x_0 is the one its DDIM-form step goes through: the first step is a DDIM step, and
    every later step satisfies x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t') e for the blended e."""
    n = 10
    pndm = load_scheduler(None, kind="pndm")
    ddim = load_scheduler(None, kind="ddim")
    pndm.set_timesteps(n)
    ddim.set_timesteps(n)
    draws = torch.randn(len(pndm.timesteps), *SHAPE, generator=torch.Generator().manual_seed(0))
    x = draws[0]
    first = pndm.step(fake_unet(x, 0, draws), pndm.timesteps[0], x)
    expected = ddim.step(fake_unet(x, 0, draws), ddim.timesteps[0], x)
    torch.testing.assert_close(first.prev_sample, expected.prev_sample, atol=TOL, rtol=0)
    torch.testing.assert_close(first.pred_original_sample, expected.pred_original_sample,
                               atol=TOL, rtol=0)
    abar = pndm.alphas_cumprod
    x = first.prev_sample
    for k in range(1, len(pndm.timesteps)):
        t = int(pndm.timesteps[k])
        out = pndm.step(fake_unet(x, k, draws), t, x)
        if k >= 2:  # step 1 redoes step 0 from the kept sample
            prev_abar = abar[t - 100] if t >= 100 else abar[0]
            e = (x - abar[t] ** 0.5 * out.pred_original_sample) / (1 - abar[t]) ** 0.5
            through_x0 = prev_abar**0.5 * out.pred_original_sample + (1 - prev_abar) ** 0.5 * e
            torch.testing.assert_close(out.prev_sample, through_x0, atol=1e-4, rtol=0)
        x = out.prev_sample


@pytest.mark.parametrize(("kind", "karras"), [("ddpm", False), ("ddim", False), ("pndm", False),
                                              ("euler", False), ("euler", True),
                                              ("dpm++2m", False), ("dpm++2m", True)])
def test_image_to_image_start(kind, karras):
    """diffusers' StableDiffusionImg2ImgPipeline at strength 0.5: the same start latent and run."""
    n, strength = 10, 0.5
    reference, ours = make_pair(kind, None, karras, n=n)
    start = max(n - min(int(n * strength), n), 0)
    timesteps = ours.timesteps[start:]
    ours.begin_at(start)
    timesteps_ref = reference.timesteps[start * reference.order:]
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(start * reference.order)
    g = torch.Generator().manual_seed(3)
    image_latent, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x = ours.add_noise(image_latent, noise, timesteps[:1].repeat(SHAPE[0]))
    x_ref = reference.add_noise(image_latent, noise, timesteps_ref[:1].repeat(SHAPE[0]))
    torch.testing.assert_close(x, x_ref, atol=TOL, rtol=0)
    if kind in ("euler", "dpm++2m"):  # started at sigma[start], not at the schedule's first
        assert not torch.allclose(x, image_latent + noise * ours.sigmas[0])
    draws = torch.randn(len(timesteps), *SHAPE, generator=g)
    gen, gen_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for k, (t, t_ref) in enumerate(zip(timesteps, timesteps_ref, strict=True)):
        eps = fake_unet(ours.scale_model_input(x, t), k, draws)
        eps_ref = fake_unet(reference.scale_model_input(x_ref, t_ref), k, draws)
        x = ours.step(eps, t, x, generator=gen).prev_sample
        kwargs = {} if kind == "pndm" else {"generator": gen_ref}
        x_ref = reference.step(eps_ref, t_ref, x_ref, **kwargs).prev_sample
        torch.testing.assert_close(x, x_ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_default_spacing_is_diffusers_class_default(kind):
    """SD v1.5's file names no spacing, so each diffusers class uses its own default."""
    reference, ours = make_pair(kind, None, n=25)
    assert ours.config.timestep_spacing == reference.config.timestep_spacing
    assert torch.equal(ours.timesteps.double(), reference.timesteps.double())


def test_timesteps_match_for_every_step_count():
    """Rounding of spaced timesteps (499.5 for n = 3, 937.5 for n = 48) follows numpy's
    arithmetic, as diffusers' does."""
    import numpy as np

    for kind in ("ddim", "euler", "pndm", "dpm++2m"):
        for spacing in SPACINGS:
            reference, ours = make_pair(kind, spacing)
            for n in range(1, 999):
                if spacing == "trailing" and len(np.arange(1000, 0, -1000 / n)) != n:
                    continue  # diffusers adds a step at t = -1 here: see np_arange_down
                reference.set_timesteps(n)
                ours.set_timesteps(n)
                assert torch.equal(ours.timesteps, reference.timesteps), (kind, spacing, n)


def test_repeated_timesteps():
    """DPM-Solver++ with 50 Karras sigmas rounds two noise levels to t = 1. Looked up by value,
    a repeated timestep means its second position (diffusers); a begin index is taken as given."""
    reference, ours = make_pair("dpm++2m", None, karras=True, n=50)
    assert ours.timesteps[47] == ours.timesteps[48] == 1
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[47:48].repeat(SHAPE[0])
    noisy = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, reference.add_noise(x0, noise, t), atol=TOL, rtol=0)
    torch.testing.assert_close(noisy, ours.add_noise(x0, noise, ours.timesteps[48:49]))
    ours.begin_at(47)
    reference.set_begin_index(47)
    x = x_ref = ours.add_noise(x0, noise, t)
    for t in ours.timesteps[47:]:
        x = ours.step(torch.tanh(x), t, x).prev_sample
        x_ref = reference.step(torch.tanh(x_ref), t, x_ref).prev_sample
        torch.testing.assert_close(x, x_ref, atol=TOL, rtol=0)


def test_trailing_never_adds_a_step_below_zero():
    _, ours = make_pair("ddim", "trailing", n=485)  # numpy's float arange gives 486 values here
    assert len(ours.timesteps) == 485 and ours.timesteps.min() == 1
    assert ours.timesteps[0] == 999


def test_noise_level():
    """sigma_t = sqrt((1 - abar_t) / abar_t); at Euler's fractional timesteps, the sigma used."""
    import diffusers

    ddim = load_scheduler(None, kind="ddim")
    abar = ddim.alphas_cumprod[500].item()
    assert ddim.noise_level(torch.tensor(500)) == pytest.approx(math.sqrt((1 - abar) / abar))
    assert ddim.noise_level(999) == pytest.approx(14.6146, abs=1e-4)  # SD v1's sigma_max
    for karras in (False, True):
        euler = load_scheduler(None, kind="euler", karras=karras)
        euler.set_timesteps(50)
        assert euler.timesteps.frac().abs().sum() > 0  # the test needs fractional timesteps
        reference = diffusers.EulerDiscreteScheduler.from_config(
            {**SD15_FILE, "use_karras_sigmas": karras})
        reference.set_timesteps(50)
        levels = torch.tensor([euler.noise_level(t) for t in euler.timesteps])
        torch.testing.assert_close(levels, reference.sigmas[:-1], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="0..999"):
        ddim.noise_level(1000)


@pytest.mark.parametrize("kind", ["pndm", "dpm++2m", "euler"])
def test_set_timesteps_resets_state(kind):
    """A half-finished run leaves past predictions behind; set_timesteps must forget them."""
    def run(scheduler: object, steps: int) -> torch.Tensor:
        draws = torch.randn(11, *SHAPE, generator=torch.Generator().manual_seed(0))
        x = draws[0] * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps[:steps]):
            eps = fake_unet(scheduler.scale_model_input(x, t), k, draws)
            x = scheduler.step(eps, t, x).prev_sample
        return x

    fresh = load_scheduler(None, kind=kind)
    fresh.set_timesteps(10)
    used = load_scheduler(None, kind=kind)
    used.set_timesteps(10)
    run(used, 5)
    used.set_timesteps(10)
    assert torch.equal(run(used, 11), run(fresh, 11))


def test_scale_model_input_returns_a_new_tensor():
    for kind in SAMPLERS:
        scheduler = load_scheduler(None, kind=kind)
        scheduler.set_timesteps(10)
        x = torch.randn(SHAPE)
        y = scheduler.scale_model_input(x, scheduler.timesteps[0])
        assert y is not x and y.data_ptr() != x.data_ptr()


def test_generator_list_draws_like_diffusers():
    """One generator per image, as diffusers' randn_tensor: DDPM's noise per batch item."""
    reference, ours = make_pair("ddpm", None, n=10)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[0]
    out = ours.step(eps, t, x, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    expected = reference.step(eps, t, x,
                              generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="one generator per batch item"):
        ours.step(eps, t, x, generator=[torch.Generator()] * 3)


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5, True, "10", None])
def test_bad_step_count_refused(n):
    scheduler = load_scheduler(None, kind="ddim")
    with pytest.raises(ValueError, match="integer from 1 to 1000"):
        scheduler.set_timesteps(n)


def test_degenerate_schedules_refused():
    # "leading" with steps_offset 1 puts the first of 1000 steps at t = 1000 (diffusers then
    # indexes past the trained schedule); DPM-Solver++'s n+1-point linspace repeats a timestep
    with pytest.raises(ValueError, match="reach timestep 1000"):
        load_scheduler(None, kind="ddim").set_timesteps(1000)
    with pytest.raises(ValueError, match="repeat a timestep"):
        load_scheduler(None, kind="dpm++2m").set_timesteps(1000)
    load_scheduler(None, kind="ddim", timestep_spacing="trailing").set_timesteps(1000)


def test_bad_arguments_refused():
    for kind in ("ddim", "ddpm", "pndm"):
        with pytest.raises(ValueError, match="karras sigmas"):
            load_scheduler(None, kind=kind, karras=True)
    with pytest.raises(ValueError, match="unknown scheduler kind 'dpm_fast'"):
        load_scheduler(None, kind="dpm_fast")
    with pytest.raises(ValueError, match="eta applies to another kind"):
        load_scheduler(None, kind="euler", eta=0.5)
    with pytest.raises(ValueError, match="unknown scheduler setting"):
        load_scheduler(None, kind="ddim", timestep_spacnig="trailing")
    with pytest.raises(ValueError, match="does not offer timestep_spacing 'middle'"):
        load_scheduler(None, kind="ddim", timestep_spacing="middle")
    with pytest.raises(ValueError, match="steps_offset must be of type int, got '1'"):
        load_scheduler(None, kind="ddim", steps_offset="1")
    with pytest.raises(ValueError, match="eta must lie in"):
        load_scheduler(None, kind="ddim", eta=-0.1)
    scheduler = load_scheduler(None, kind="dpm++2m")
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        scheduler.step(torch.zeros(SHAPE), 998, torch.zeros(SHAPE))


def test_config_file_in_a_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_FILE))
    euler = load_scheduler(str(tmp_path), kind="euler")
    assert euler.config == SchedulerConfig(timestep_spacing="linspace")
    ddim = load_scheduler(str(tmp_path), kind="ddim", timestep_spacing="trailing", eta=1.0)
    assert ddim.config.timestep_spacing == "trailing" and ddim.eta == 1.0

    changed = {**SD15_FILE, "beta_end": 0.02, "steps_offset": 0, "use_karras_sigmas": True}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(changed))
    dpm = load_scheduler(str(tmp_path), kind="dpm++2m")  # the file's Karras setting is taken
    assert dpm.config.beta_end == 0.02 and dpm.config.steps_offset == 0
    assert dpm.config.use_karras_sigmas
    assert not load_scheduler(str(tmp_path), kind="ddim").config.use_karras_sigmas

    unsupported = {**SD15_FILE, "rescale_betas_zero_snr": True}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(unsupported))
    with pytest.raises(WeightsError, match="rescale_betas_zero_snr=True"):
        load_scheduler(str(tmp_path), kind="ddim")
    with pytest.raises(WeightsError, match="scheduler_config.json"):
        load_scheduler(str(tmp_path / "scheduler"), kind="ddim", subfolder="missing")


def test_config_written_by_diffusers(tmp_path):
    import diffusers

    diffusers.DDIMScheduler.from_config(SD15_FILE, timestep_spacing="trailing").save_config(
        tmp_path)
    reference, _ = make_pair("ddim", "trailing", n=20)
    ours = load_scheduler(str(tmp_path), kind="ddim")
    ours.set_timesteps(20)
    assert ours.config.timestep_spacing == "trailing"
    assert torch.equal(ours.timesteps, reference.timesteps)
