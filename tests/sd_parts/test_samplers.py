"""The samplers added beside the first five: each equals its diffusers class over whole runs, for
every timestep spacing and sigma schedule the class offers; then the registry that describes
them and the settings they refuse."""

from __future__ import annotations

import inspect

import pytest
import torch

from sd_parts.schedulers import (
    FAMILIES,
    SAMPLERS,
    SIGMA_SCHEDULES,
    DPMSolverMultistepScheduler,
    SchedulerConfig,
    load_scheduler,
    unet_evaluations,
)

TOL = 1e-5
STEPS = (1, 2, 10, 25)
SHAPE = (2, 4, 4, 4)
SD15_FILE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False, "prediction_type": "epsilon",
}
# kind: the diffusers class and the settings that make it that kind
REFERENCE = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++3m_sde": ("DPMSolverMultistepScheduler",
                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# where diffusers' step keeps the clean-latent prediction: its output, or the solver's history
X0_IN_OUTPUT = {"euler": "pred_original_sample", "euler_a": "pred_original_sample",
                "lms": "pred_original_sample", "heun": "pred_original_sample",
                "dpm2": "pred_original_sample", "dpm2_a": "pred_original_sample",
                "lcm": "denoised"}
X0_IN_HISTORY = ("dpm++2m", "dpm++2m_sde", "dpm++3m_sde", "dpm++2s", "unipc")  # DEIS keeps eps


def cases() -> list[tuple[str, str | None, str | None, float | None]]:
    """(kind, spacing, sigma schedule, eta): every spacing x schedule each kind offers (the
    first five kinds' other cases are in test_schedulers.py), TCD with and without noise."""
    result = []
    for kind in REFERENCE:
        info = SAMPLERS[kind]
        schedules = info.sigma_schedules
        if kind not in ("euler", "dpm++2m"):
            schedules = (None, *schedules)
        for spacing in info.spacings or (None,):
            for schedule in schedules:
                result.append((kind, spacing, schedule, None))
    result.append(("tcd", None, None, 0.0))
    return result


def make_pair(kind: str, spacing: str | None, schedule: str | None,
              eta: float | None = None) -> tuple[object, object]:
    import diffusers

    name, fixed = REFERENCE[kind]
    settings = {**SD15_FILE, **fixed}
    if schedule is not None:
        settings[f"use_{schedule}_sigmas"] = True
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    reference = getattr(diffusers, name).from_config({**settings, **overrides})
    flags = {} if schedule is None else {f"use_{schedule}_sigmas": True}
    options = {} if eta is None else {"eta": eta}
    return reference, load_scheduler(None, kind=kind, **flags, **overrides, **options)


def fake_unet(x: torch.Tensor, k: int, draws: torch.Tensor) -> torch.Tensor:
    """A noise prediction that depends on the sample, so a wrong step changes every later one."""
    return 0.7 * torch.tanh(x) + 0.3 * draws[k]


def assert_timesteps_equal(ours: torch.Tensor, reference: torch.Tensor, exact: bool) -> None:
    """Timesteps spaced or rounded exactly; those computed from log sigma (re-spaced levels,
    DPM2's midpoints) to 2e-4: diffusers takes some of those logs and sums in float32 through
    numpy, whose float32 log differs from torch's in the last bit for some values (a float32 ulp
    near t = 999 is 6e-5)."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    if exact or not ours.is_floating_point():
        assert torch.equal(ours, reference)
    else:
        torch.testing.assert_close(ours, reference, atol=2e-4, rtol=0)


@pytest.mark.parametrize(("kind", "spacing", "schedule", "eta"), cases())
def test_matches_diffusers(kind, spacing, schedule, eta):
    import diffusers  # noqa: F401 - imported here so collection stays fast

    reference, ours = make_pair(kind, spacing, schedule, eta)  # reused: set_timesteps resets
    for n in STEPS:
        reference.set_timesteps(n)
        ours.set_timesteps(n)
        exact = schedule is None and kind not in ("dpm2", "dpm2_a")
        assert_timesteps_equal(ours.timesteps, reference.timesteps, exact)
        assert ours.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
        if hasattr(reference, "sigmas") and kind not in ("lcm", "tcd"):
            torch.testing.assert_close(ours.sigmas, reference.sigmas.float(), rtol=1e-6,
                                       atol=1e-7)

        g = torch.Generator().manual_seed(n)
        draws = torch.randn(len(ours.timesteps), *SHAPE, generator=g)
        x = x_ref = torch.randn(SHAPE, generator=g) * reference.init_noise_sigma
        gen, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        takes = inspect.signature(reference.step).parameters
        kwargs = {"generator": gen_ref} if "generator" in takes else {}
        if kind == "tcd":
            kwargs["eta"] = ours.eta
        # DEIS' weights are float32 differences of nearly equal terms in log rho (ill-conditioned
        # where levels crowd, as beta sigmas do near sigma_max) and diffusers takes those logs
        # with numpy, whose float32 log differs from torch's in the last bit (by how much
        # depends on the CPU's vector log): the samples drift apart by up to 5e-6 relative on an
        # AMD EPYC and 1.5e-5 on an Intel Xeon with beta sigmas, while both are 2e-4 from the
        # same sums in float64
        rtol = (3e-5 if schedule == "beta" else 1e-5) if kind == "deis" else 0
        for k, (t, t_ref) in enumerate(zip(ours.timesteps, reference.timesteps, strict=True)):
            unet_input = ours.scale_model_input(x, t)
            unet_input_ref = reference.scale_model_input(x_ref, t_ref)
            torch.testing.assert_close(unet_input, unet_input_ref, atol=TOL, rtol=rtol)
            eps, eps_ref = fake_unet(unet_input, k, draws), fake_unet(unet_input_ref, k, draws)
            x_before = x.clone()
            out = ours.step(eps, t, x, generator=gen)
            expected = reference.step(eps_ref, t_ref, x_ref, **kwargs)
            assert torch.equal(x, x_before)  # the input is not changed in place
            torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=TOL, rtol=rtol)
            if kind in X0_IN_OUTPUT:
                torch.testing.assert_close(out.pred_original_sample,
                                           getattr(expected, X0_IN_OUTPUT[kind]), atol=TOL,
                                           rtol=0)
            elif kind in X0_IN_HISTORY:
                torch.testing.assert_close(out.pred_original_sample, reference.model_outputs[-1],
                                           atol=TOL, rtol=0)
            x, x_ref = out.prev_sample, expected.prev_sample
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["heun", "dpm2_a", "lms", "dpm++2m_sde", "unipc", "lcm"])
def test_image_to_image_start(kind):
    """diffusers' StableDiffusionImg2ImgPipeline at strength 0.5: the run starts at
    timesteps[start * order] (Heun and DPM2 list two timesteps per step)."""
    n, strength = 10, 0.5
    reference, ours = make_pair(kind, None, None)
    reference.set_timesteps(n)
    ours.set_timesteps(n)
    start = max(n - min(int(n * strength), n), 0) * ours.order
    assert ours.order == reference.order
    ours.begin_at(start)
    reference.set_begin_index(start)
    timesteps, timesteps_ref = ours.timesteps[start:], reference.timesteps[start:]
    g = torch.Generator().manual_seed(3)
    image_latent, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x = ours.add_noise(image_latent, noise, timesteps[:1].repeat(SHAPE[0]))
    x_ref = reference.add_noise(image_latent, noise, timesteps_ref[:1].repeat(SHAPE[0]))
    torch.testing.assert_close(x, x_ref, atol=TOL, rtol=0)
    draws = torch.randn(len(timesteps), *SHAPE, generator=g)
    gen, gen_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    takes = inspect.signature(reference.step).parameters
    kwargs = {"generator": gen_ref} if "generator" in takes else {}
    for k, (t, t_ref) in enumerate(zip(timesteps, timesteps_ref, strict=True)):
        eps = fake_unet(ours.scale_model_input(x, t), k, draws)
        eps_ref = fake_unet(reference.scale_model_input(x_ref, t_ref), k, draws)
        x = ours.step(eps, t, x, generator=gen).prev_sample
        x_ref = reference.step(eps_ref, t_ref, x_ref, **kwargs).prev_sample
        torch.testing.assert_close(x, x_ref, atol=TOL, rtol=0)


def test_registry():
    """Every kind loads and runs; its description matches what its class does."""
    labels = [info.label for info in SAMPLERS.values()]
    assert len(set(labels)) == len(labels)
    for kind, info in SAMPLERS.items():
        assert info.kind == kind and info.family in FAMILIES
        assert set(info.sigma_schedules) <= set(SIGMA_SCHEDULES)
        scheduler = load_scheduler(None, kind=kind)
        assert isinstance(scheduler, info.scheduler)
        for n in (1, 20):
            scheduler.set_timesteps(n)
            assert unet_evaluations(kind, n) == len(scheduler.timesteps), (kind, n)
        for schedule in info.sigma_schedules:
            respaced = load_scheduler(None, kind=kind, **{f"use_{schedule}_sigmas": True})
            assert respaced.config.sigma_schedule == schedule
        for option in info.options:  # accepted by name, and kept
            assert getattr(load_scheduler(None, kind=kind, **{option: 0.5}), option) == 0.5
    assert SAMPLERS["heun"].unet_calls_per_step == 2 and unet_evaluations("heun", 20) == 39
    assert unet_evaluations("pndm", 20) == 21 and unet_evaluations("euler", 20) == 20
    assert isinstance(load_scheduler(None, kind="dpm++3m_sde"), DPMSolverMultistepScheduler)
    with pytest.raises(TypeError):
        SAMPLERS["euler"].fixed["solver_order"] = 3  # the table is read-only


def test_file_sigma_schedule_applies_where_offered(tmp_path):
    """A scheduler_config.json's sigma schedule is used by the kinds that offer it, turned off
    for the others, and overridden by an explicit choice."""
    import json

    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({**SD15_FILE, "use_beta_sigmas": True}))
    assert load_scheduler(str(tmp_path), kind="heun").config.sigma_schedule == "beta"
    assert load_scheduler(str(tmp_path), kind="euler_a").config.sigma_schedule is None
    assert load_scheduler(str(tmp_path), kind="lcm").config.sigma_schedule is None
    chosen = load_scheduler(str(tmp_path), kind="heun", karras=True)
    assert chosen.config.sigma_schedule == "karras"
    off = load_scheduler(str(tmp_path), kind="heun", use_beta_sigmas=False)
    assert off.config.sigma_schedule is None


def test_refused_settings():
    """What diffusers refuses, turns into NaN or silently ignores is refused with a reason."""
    import diffusers

    with pytest.raises(ValueError, match="karras sigmas .* apply to euler, lms, heun"):
        load_scheduler(None, kind="euler_a", karras=True)
    with pytest.raises(ValueError, match="beta sigmas .* not to 'ddim'"):
        load_scheduler(None, kind="ddim", use_beta_sigmas=True)
    with pytest.raises(ValueError, match="exponential sigmas .* not to 'lcm'"):
        load_scheduler(None, kind="lcm", use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="at most one sigma schedule"):
        load_scheduler(None, kind="euler", use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="at most one sigma schedule"):
        SchedulerConfig(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="disagree"):
        load_scheduler(None, kind="euler", karras=True, use_karras_sigmas=False)
    with pytest.raises(ValueError, match="does not offer timestep_spacing 'leading'"):
        load_scheduler(None, kind="dpm++2s", timestep_spacing="leading")
    with pytest.raises(ValueError, match="picks its own timesteps"):
        load_scheduler(None, kind="tcd", timestep_spacing="trailing")
    with pytest.raises(ValueError, match="eta applies to another kind"):
        load_scheduler(None, kind="lcm", eta=0.3)
    with pytest.raises(ValueError, match="must lie in"):
        load_scheduler(None, kind="tcd", eta=1.5)
    with pytest.raises(ValueError, match="solver_order 2 or 3"):
        DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="unknown algorithm_type"):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver")

    # LCM's 50 distillation timesteps: diffusers refuses more steps, and so do we
    with pytest.raises(ValueError, match="smaller than `num_inference_steps`: 51"):
        diffusers.LCMScheduler.from_config(SD15_FILE).set_timesteps(51)
    with pytest.raises(ValueError, match="at most original_inference_steps"):
        load_scheduler(None, kind="lcm").set_timesteps(51)

    # 1000 plain-spaced steps repeat a timestep: diffusers then divides by a step of length 0
    for kind in ("unipc", "deis", "dpm++2s", "dpm++2m_sde"):
        reference, ours = make_pair(kind, None, None)
        reference.set_timesteps(1000)
        assert (reference.timesteps[1:] == reference.timesteps[:-1]).any()
        with pytest.raises(ValueError, match="repeat a timestep"):
            ours.set_timesteps(1000)
