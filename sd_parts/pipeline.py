"""Text to image and image to image with Stable Diffusion v1: the whole diagram in one loop.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022); classifier-
free guidance from Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022). The loop is the one
diffusers' ``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline`` run, step for step and
random draw for random draw, so the same seed gives the same image:

    prompt ─► tokenizer ─► text encoder ─► context (2, 77, 768): [negative prompt, prompt]
    noise (B, 4, H/8, W/8) x init_noise_sigma          (or: the image's latent, noised to t_start)
    for each timestep t:
        eps_uncond, eps_text = unet(scale(x_t), t, context)     one batched call
        eps = eps_uncond + g (eps_text - eps_uncond)            guidance pushes away from "nothing"
        x_t = scheduler.step(eps, t, x_t)
    image = vae.decode(x_0 / scaling_factor)

Everything the app shows comes out of the loop itself: a callback after every step (which may stop
the run) and, on request, a trace with the latents, the predicted clean latents and DAAM-style
cross-attention maps per token (Tang et al., "What the DAAM: Interpreting Stable Diffusion Using
Cross Attention", 2023).

Length: about 460 lines, because text to image, image to image, the LCM-distilled loop and the
denoising loss share one encoding of prompts, one plan of timesteps and one checked set of
arguments; the samplers, the models and the add-ons each have files of their own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .clip import CLIPTextEncoder
from .prompts import encode_prompts
from .schedulers import Scheduler, SchedulerConfig, load_scheduler, read_scheduler_config
from .schedulers.schedule import random_normal
from .tokenizer import CLIPTokenizer, load_tokenizer
from .unet import UNet2DConditionModel, guidance_embedding
from .vae import AutoencoderKL
from .weights import DEFAULT_REPO, load_text_encoder, load_unet, load_vae

# The per-step cross-attention maps are kept at this side, whatever the image size, so a long run
# at a big size keeps (steps x 77 x 16 x 16) numbers, a few MB, instead of every layer's maps.
STEP_MAP_SIZE = 16
MAX_STEPS = 1000  # the training schedule has 1000 timesteps; no sampler can take more


@dataclass
class StepState:
    """What one denoising step computed, handed to the callback."""

    index: int  # 0-based position in this run's timesteps
    total: int  # how many timesteps the run visits (PNDM visits one more than asked for)
    timestep: float
    latents: torch.Tensor  # (B, 4, h, w) after the step: x at the next, lower noise level
    pred_original: torch.Tensor  # (B, 4, h, w) the clean latent x_0 this step predicted
    noise_text: torch.Tensor  # (B, 4, h, w) the UNet's noise prediction given the prompt
    noise_uncond: torch.Tensor | None  # ... given the negative prompt; None without guidance


@dataclass
class Trace:
    """The run, step by step. Latents are in the diffusion model's (scaled) space."""

    timesteps: list[float] = field(default_factory=list)
    noise_levels: list[float] = field(default_factory=list)  # sigma_t = sqrt((1 - abar) / abar)
    latents: list[torch.Tensor] = field(default_factory=list)  # the start, then after each step
    pred_original: list[torch.Tensor] = field(default_factory=list)  # per step
    # Cross-attention of every pixel to each context token (T = 77, or 77 x chunks with
    # long_prompts), for the prompt's half of the batch: averaged over heads, upsampled to the
    # latent grid and summed over the 16 layers and all steps (DAAM's aggregation): (B, T, h, w).
    word_maps: torch.Tensor | None = None
    # The same per step, at STEP_MAP_SIZE x STEP_MAP_SIZE: (steps, B, 77, 16, 16).
    step_maps: list[torch.Tensor] = field(default_factory=list)


@dataclass
class GenerationResult:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (B, 4, h, w) the final latent, scaled
    steps_done: int
    stopped: bool  # the callback ended the run before the last step
    trace: Trace | None = None
    notes: list[str] = field(default_factory=list)  # what the weighting parser could not read


class CrossAttentionCollector:
    """Sums the UNet's cross-attention maps of one step, for the prompt's half of the batch.

    A 16-bit UNet call that overflows is repeated in float32 and calls the hook again from the
    first layer, so only the last ``layers`` maps (the complete, finite pass) are summed.
    """

    def __init__(self, batch: int, grid: tuple[int, int], layers: int):
        self.batch, self.grid, self.layers = batch, grid, layers
        self.maps: list[torch.Tensor] = []  # (B, T, h, w) per layer call

    def __call__(self, probs: torch.Tensor, size: tuple[int, int]) -> None:
        # probs (2B or B, heads, hw, T): with guidance the prompt's rows are the second half
        maps = probs[-self.batch:].float().mean(dim=1)  # (B, hw, T)
        maps = maps.transpose(1, 2).reshape(self.batch, -1, *size)  # (B, T, h_l, w_l)
        if size != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.maps.append(maps)

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(self.maps[-self.layers:]).sum(dim=0)


class StableDiffusionPipeline:
    """The four parts (tokenizer, text encoder, UNet, VAE) and the noise schedule's settings.

    The scheduler is made afresh for every call (samplers keep state between steps), so one
    pipeline can serve one call after another with different samplers.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: SchedulerConfig = SchedulerConfig(),
    ):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = scheduler_config  # the noise schedule; samplers are per call

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_downscale(self) -> int:
        return self.vae.downscale

    def make_scheduler(self, kind: str, use_karras_sigmas: bool | None = None, *,
                       use_exponential_sigmas: bool | None = None,
                       use_beta_sigmas: bool | None = None, **options: object) -> Scheduler:
        """A fresh sampler of ``kind`` (a key of ``sd_parts.SAMPLERS``) for this model's noise
        schedule; the sigma schedule in diffusers' words (None: as the model's file says, where
        the kind offers it), ``options`` the kind's own (``eta`` for ddim and tcd)."""
        return load_scheduler(self.scheduler_config, kind=kind,
                              use_karras_sigmas=use_karras_sigmas,
                              use_exponential_sigmas=use_exponential_sigmas,
                              use_beta_sigmas=use_beta_sigmas, **options)

    def plan(self, num_inference_steps: int, scheduler: str,
             use_karras_sigmas: bool | None = None, strength: float = 1.0, *,
             use_exponential_sigmas: bool | None = None, use_beta_sigmas: bool | None = None,
             **options: object) -> tuple[Scheduler, torch.Tensor, int]:
        """The sampler, the timesteps a run will visit and the index of the first one.

        With ``strength`` < 1 (image to image) the run skips the noisiest part of the schedule,
        as diffusers' StableDiffusionImg2ImgPipeline does: it denoises int(n x strength) steps,
        which are twice as many timesteps for Heun and DPM2 (``order`` 2).
        """
        sampler = self.make_scheduler(scheduler, use_karras_sigmas,
                                      use_exponential_sigmas=use_exponential_sigmas,
                                      use_beta_sigmas=use_beta_sigmas, **options)
        sampler.set_timesteps(num_inference_steps)
        denoised = min(int(num_inference_steps * strength), num_inference_steps)
        start = (num_inference_steps - denoised) * sampler.order
        sampler.begin_at(start)
        # PNDM repeats one timestep and Heun/DPM2 list two per step, so the list can be longer
        # than num_inference_steps
        timesteps = sampler.timesteps[start:] if denoised else sampler.timesteps[:0]
        return sampler, timesteps, start

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], long_prompts: bool = False,
                      weighting: bool = False, clip_skip: int | None = None,
                      chunking: str = "plain", emphasis: str = "original") -> torch.Tensor:
        """(B, 77, hidden): the text encoder's last hidden state, as SD v1 conditions on; the
        options as in ``sd_parts.prompts.encode_prompts`` (all off: diffusers' encoding)."""
        return self._encode(prompts, long_prompts, weighting, clip_skip, chunking, emphasis)[0]

    # Adapters, as methods: pipe.load_lora_weights(source, scale=0.8) is
    # sd_parts.lora.load_lora_weights(pipe, source, scale=0.8). LoRAs are fused into the UNet's
    # and text encoder's weights (the originals kept for unloading); textual inversions add
    # tokens to the tokenizer and rows to the text encoder's embedding table.
    from .lora import load_lora_weights, set_lora_scale, unload_lora_weights
    from .textual_inversion import load_textual_inversion, unload_textual_inversion

    def _encode(self, prompts: list[str], long_prompts: bool, weighting: bool,
                clip_skip: int | None, chunking: str = "plain", emphasis: str = "original"
                ) -> tuple[torch.Tensor, list[str]]:
        context, notes = encode_prompts(self.text_encoder, self.tokenizer, prompts,
                                        long=long_prompts, weighting=weighting,
                                        clip_skip=clip_skip, chunking=chunking,
                                        emphasis=emphasis)
        return context.to(self.device, torch.float32), notes

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | None = None,
        scheduler: str = "pndm",
        use_karras_sigmas: bool | None = None,  # None: as the model's file says
        image: torch.Tensor | None = None,
        strength: float = 0.8,
        callback: Callable[[int, float, StepState], bool | None] | None = None,
        trace: bool = False,
        long_prompts: bool = False,
        weighting: bool = False,
        clip_skip: int | None = None,
        on_start: Callable[[torch.Tensor], None] | None = None,
        use_exponential_sigmas: bool | None = None,
        use_beta_sigmas: bool | None = None,
        eta: float | None = None,
        chunking: str = "plain",
        emphasis: str = "original",
    ) -> GenerationResult:
        """Generate images (B, 3, H, W) in [0, 1].

        ``scheduler`` is a key of ``sd_parts.SAMPLERS``; ``use_karras_sigmas``,
        ``use_exponential_sigmas`` and ``use_beta_sigmas`` re-space its noise levels where it
        offers that (at most one True; None takes the model's file); ``eta`` is the noise of
        ddim (default 0) and tcd (default 0.3). Stochastic samplers draw from ``generator``.

        A guidance-distilled UNet (``time_cond_proj_dim``, an LCM) is run as diffusers'
        LatentConsistencyModelPipeline runs it: the guidance scale goes into the UNet as
        ``timestep_cond`` and each step is one pass on the prompt alone, with no negative
        prompt. The lcm and tcd samplers also run on a plain UNet, with ordinary guidance: their
        steps are then DDIM-like jumps through a model that was not trained to predict x_0 from
        so few steps, and 4-8 of them give blurred images.

        ``image`` (B, 3, H, W) in [0, 1] turns on image to image: the image's latent is noised to
        the level ``strength`` picks and denoised from there (0: the VAE's reconstruction of the
        image, no step taken; 1: the image is not used at all, as in text to image; diffusers
        still mixes about 7% of it in at 1). ``callback(index, t, state)`` runs after every step;
        returning False stops the run there, keeping what was made. ``on_start(latents)`` runs
        once with the start latents (noise, or the noised image), before the first UNet call.

        Off by default, as diffusers has none of them: ``long_prompts`` encodes prompts past 75
        tokens in chunks (the UNet then attends to 77 x n context vectors), ``weighting`` reads
        the web UIs' ``(word:1.3)`` syntax, ``clip_skip`` conditions on an earlier text-encoder
        layer (diffusers' numbering: 1 is the web UIs' "CLIP skip 2"); ``chunking="webui"`` cuts
        long prompts as AUTOMATIC1111 does (at a comma, at BREAK) and ``emphasis="no norm"`` keeps
        weighted chunks unrescaled. See ``sd_parts.prompts``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if image is not None:
            height, width = image.shape[-2:]
        check_arguments(len(prompts), len(negatives), num_inference_steps, guidance_scale,
                        height, width, self.latent_downscale, image, strength)
        distilled = self.unet.config.time_cond_proj_dim is not None
        if distilled and any(negatives):
            raise ValueError("this UNet has guidance distilled into it (time_cond_proj_dim): it "
                             "makes no unconditional prediction, so a negative prompt has no "
                             "effect; leave negative_prompt empty")
        # at 1, uncond + 1 (text - uncond) is just the text branch; a distilled UNet has none
        guided = guidance_scale > 1 and not distilled
        context, notes = self._encode(negatives + prompts if guided else prompts, long_prompts,
                                      weighting, clip_skip, chunking, emphasis)
        img2img = image is not None and strength < 1
        options = {} if eta is None else {"eta": eta}
        sampler, timesteps, start = self.plan(num_inference_steps, scheduler, use_karras_sigmas,
                                              strength if img2img else 1.0,
                                              use_exponential_sigmas=use_exponential_sigmas,
                                              use_beta_sigmas=use_beta_sigmas, **options)
        batch, device = len(prompts), self.device
        grid = (height // self.latent_downscale, width // self.latent_downscale)
        shape = (batch, self.unet.config.in_channels, *grid)
        scaling = self.vae.config.scaling_factor
        # the guidance scale as the distilled UNet's extra time condition, one row per image
        guidance_cond = (guidance_embedding(guidance_scale, self.unet.config.time_cond_proj_dim)
                         .to(device).expand(batch, -1) if distilled else None)

        if img2img:
            # image to image: start part way down the schedule, from the image's noised latent
            image = image.to(device, torch.float32) * 2 - 1
            start_latents = self.vae.encode(image).sample(generator) * scaling
            latents = start_latents
            if len(timesteps):
                noise = random_normal(shape, generator, device, torch.float32)
                latents = sampler.add_noise(start_latents, noise, timesteps[:1].repeat(batch))
        else:
            latents = random_normal(shape, generator, device, torch.float32) \
                * sampler.init_noise_sigma

        if on_start is not None:
            on_start(latents)
        record = Trace(latents=[latents.cpu()]) if trace else None
        word_maps = None
        stopped = False
        steps_done = 0
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = sampler.scale_model_input(model_input, t)
            collector = CrossAttentionCollector(batch, grid, self.unet.cross_attention_layers) \
                if trace else None
            noise = self.unet(model_input, t, context, on_cross_attention=collector,
                              timestep_cond=guidance_cond)
            noise_uncond, noise_text = noise.chunk(2) if guided else (None, noise)
            if guided:
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            out = sampler.step(noise, t, latents, generator=generator)
            latents = out.prev_sample
            steps_done = index + 1
            t_value = float(t)
            if record is not None:
                record.timesteps.append(t_value)
                record.noise_levels.append(sampler.noise_level(t))
                record.latents.append(latents.cpu())
                record.pred_original.append(out.pred_original_sample.cpu())
                step_maps = collector.total
                word_maps = step_maps if word_maps is None else word_maps + step_maps
                record.step_maps.append(F.interpolate(
                    step_maps, size=(STEP_MAP_SIZE, STEP_MAP_SIZE), mode="area").cpu())
            if callback is not None:
                state = StepState(index, len(timesteps), t_value, latents,
                                  out.pred_original_sample, noise_text, noise_uncond)
                if callback(index, t_value, state) is False and index < len(timesteps) - 1:
                    stopped = True
                    break
        if record is not None and word_maps is not None:
            record.word_maps = word_maps.cpu()
        decoded = self.vae.decode(latents / scaling)
        return GenerationResult(images=(decoded / 2 + 0.5).clamp(0, 1), latents=latents,
                                steps_done=steps_done, stopped=stopped, trace=record,
                                notes=notes)

    @torch.no_grad()
    def denoising_loss(
        self,
        image: torch.Tensor,
        prompts: str | list[str],
        timesteps: list[int] | torch.Tensor,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
    ) -> torch.Tensor:
        """The UNet as a denoiser of the user's own image: how well, told each prompt, it finds
        the noise put on the image at each timestep. (len(prompts), len(timesteps)) float32.

        This is the training loss of Ho et al. (2020), ||eps - eps_theta(x_t, t, c)||^2, averaged
        over the latent: x_0 is the image's latent (the posterior mean, scaled as the UNet sees
        it), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the noise schedule's abar_t, and
        eps is drawn once (``torch.randn`` with ``generator``) and reused for every timestep and
        prompt, so the prompts are compared on the same noisy latents. A lower loss means the
        prompt explains the image better at that noise level (as in Li et al., "Your Diffusion
        Model is Secretly a Zero-Shot Classifier", 2023). Prompts are plainly encoded and there
        is no guidance.

        ``image`` (1, 3, H, W) in [0, 1], H and W multiples of the VAE's downscale;
        ``timesteps``: whole numbers in [0, num_train_timesteps). One UNet call per timestep
        takes all the prompts; ``callback(done, total)`` runs after each. If it returns False
        the computation stops: the timesteps not reached are NaN in the result.
        """
        from .schedulers.schedule import make_alphas_cumprod  # the trained abar_t, t = 0..T-1

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = check_loss_arguments(image, prompts, timesteps, self.latent_downscale,
                                     self.scheduler_config.num_train_timesteps)
        device = self.device
        config = self.vae.config
        posterior = self.vae.encode(image.to(device, torch.float32) * 2 - 1)
        latents = (posterior.mean - config.shift_factor) * config.scaling_factor  # (1, C, h, w)
        noise = random_normal(latents.shape, generator, device, torch.float32)
        context = self.encode_prompt(prompts)  # (P, 77, hidden)
        abar = make_alphas_cumprod(self.scheduler_config).to(device)
        losses = torch.full((len(prompts), len(steps)), float("nan"))
        for j, t in enumerate(steps):
            noisy = abar[t] ** 0.5 * latents + (1 - abar[t]) ** 0.5 * noise
            eps = self.unet(noisy.expand(len(prompts), -1, -1, -1), t, context)
            losses[:, j] = (eps - noise).square().mean(dim=(1, 2, 3)).cpu()
            if callback is not None and callback(j + 1, len(steps)) is False:
                break
        return losses


def check_loss_arguments(image: torch.Tensor, prompts: list[str],
                         timesteps: list[int] | torch.Tensor, multiple: int,
                         train_timesteps: int) -> list[int]:
    """Refuse what ``denoising_loss`` cannot use, saying why; the timesteps as a list of ints."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"give at least one prompt (a list of strings); got {prompts!r}")
    if (not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3)
            or not image.is_floating_point()):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be one float image (1, 3, H, W) in [0, 1]; got {shape}")
    height, width = image.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f"the image's height and width must be multiples of {multiple}; got "
                         f"{height}x{width}")
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError("image values must be finite and in [0, 1]")
    values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    if isinstance(timesteps, torch.Tensor) and timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a list of numbers; got a tensor of shape "
                         f"{tuple(timesteps.shape)}")
    if not values:
        raise ValueError("give at least one timestep")
    steps = []
    for t in values:
        whole = isinstance(t, int) or (isinstance(t, float) and t.is_integer())
        if isinstance(t, bool) or not whole or not 0 <= t < train_timesteps:
            raise ValueError(f"timesteps must be whole numbers in [0, {train_timesteps}); "
                             f"got {t!r}")
        steps.append(int(t))
    return steps


def check_arguments(
    batch: int, negatives: int, steps: int, guidance: float, height: int, width: int,
    multiple: int, image: torch.Tensor | None, strength: float,
) -> None:
    """Refuse what would fail deep inside the loop, or silently give nonsense, with a reason."""
    if batch == 0 or negatives != batch:
        raise ValueError(f"give one negative prompt per prompt (got {batch} prompts and "
                         f"{negatives} negative prompts)")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {MAX_STEPS}; "
                         f"got {steps!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 turns guidance off); "
                         f"got {guidance!r}")
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} (one latent "
                         f"pixel per {multiple}x{multiple} block); got {height}x{width}")
    if not math.isfinite(strength) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be between 0 and 1; got {strength!r}")
    if image is not None:
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] != batch:
            raise ValueError(f"image must be (batch={batch}, 3, H, W) in [0, 1]; got "
                             f"{tuple(image.shape)}")
        if image.min() < 0 or image.max() > 1:
            raise ValueError("image values must be in [0, 1]")


def load_pipeline(
    source: str = DEFAULT_REPO,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StableDiffusionPipeline:
    """SD v1 from a diffusers-layout repo or folder, or from one LDM-layout ``.safetensors`` file.

    The folder layout has ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/``; ``variant="fp16"`` picks the half-precision files (cast to ``dtype`` as read).
    A single file carries no tokenizer or scheduler: SD v1's own (bundled) are used.
    """
    if os.path.isfile(source) or str(source).endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        from .single_file import load_single_file

        models = load_single_file(source, dtype=dtype, device=device)
        return StableDiffusionPipeline(load_tokenizer(None), models.text_encoder, models.unet,
                                       models.vae)
    common = dict(revision=revision, variant=variant, dtype=dtype, device=device)
    return StableDiffusionPipeline(
        load_tokenizer(source, subfolder="tokenizer", revision=revision),
        load_text_encoder(source, subfolder="text_encoder", **common),
        load_unet(source, subfolder="unet", **common),
        load_vae(source, subfolder="vae", **common),
        read_scheduler_config(source, subfolder="scheduler", revision=revision),
    )
