"""sd_parts: Stable Diffusion v1's parts (tokenizer, CLIP text encoder, UNet, schedulers, VAE)
and the pipeline that joins them, written to be read."""

from .clip import CLIPTextEncoder, CLIPTextOutput
from .config import (
    FLUX_VAE,
    SD3_VAE,
    SDXL_VAE,
    TINY_CLIP,
    TINY_VAE,
    TINY_VAE_16,
    CLIPTextConfig,
    VAEConfig,
)
from .lora import (
    LoraSummary,
    load_lora_weights,
    lora_changes,
    lora_deltas,
    read_lora,
    set_lora_scale,
    unload_lora_weights,
)
from .pipeline import GenerationResult, StableDiffusionPipeline, StepState, Trace, load_pipeline
from .prompts import (
    apply_weights,
    chunk_ids,
    emphasize,
    encode_long,
    encode_prompts,
    parse_prompt,
    parse_weights,
    prompt_runs,
    token_weights,
    webui_runs,
)
from .runtime import fast_dtype
from .schedulers import (
    SAMPLERS,
    SamplerInfo,
    Scheduler,
    SchedulerConfig,
    load_scheduler,
    unet_evaluations,
)
from .single_file import load_single_file
from .textual_inversion import (
    Embedding,
    load_textual_inversion,
    read_embedding,
    unload_textual_inversion,
)
from .tiny_vae import TAESD, TAESD3, TINY_TAESD, TINY_TAESD_16, AutoencoderTiny, TinyVAEConfig
from .tokenizer import CLIPTokenizer, load_tokenizer
from .unet import (
    TINY_UNET,
    UNet2DConditionModel,
    UNetBlock,
    UNetConfig,
    UNetProbe,
    guidance_embedding,
    unet_blocks,
)
from .vae import AutoencoderKL, DiagonalGaussian
from .weight_changes import WeightChange, weight_changes
from .weights import (
    DEFAULT_REPO,
    TAESD_REPO,
    WeightsError,
    load_text_encoder,
    load_tiny_vae,
    load_unet,
    load_vae,
)

__all__ = [
    "SAMPLERS", "SamplerInfo", "unet_evaluations",
    "DEFAULT_REPO", "FLUX_VAE", "SD3_VAE", "SDXL_VAE", "TINY_CLIP", "TINY_UNET", "TINY_VAE",
    "TINY_VAE_16", "AutoencoderKL", "CLIPTextConfig",
    "CLIPTextEncoder", "CLIPTextOutput", "CLIPTokenizer", "DiagonalGaussian", "GenerationResult",
    "Scheduler", "SchedulerConfig", "StableDiffusionPipeline", "StepState", "Trace",
    "UNet2DConditionModel", "UNetConfig", "VAEConfig", "WeightsError", "apply_weights",
    "chunk_ids", "encode_long", "encode_prompts", "fast_dtype", "load_pipeline", "load_scheduler",
    "load_single_file", "load_text_encoder", "load_tokenizer", "load_unet", "load_vae",
    "parse_weights", "token_weights",
    "TAESD", "TAESD3", "TAESD_REPO", "TINY_TAESD", "TINY_TAESD_16", "AutoencoderTiny",
    "TinyVAEConfig", "load_tiny_vae",
    "Embedding", "LoraSummary", "WeightChange", "load_lora_weights", "load_textual_inversion",
    "lora_changes", "lora_deltas", "read_embedding", "read_lora", "set_lora_scale",
    "unload_lora_weights", "unload_textual_inversion", "weight_changes",
    "emphasize", "parse_prompt", "prompt_runs", "webui_runs",
    "UNetBlock", "UNetProbe", "guidance_embedding", "unet_blocks",
]
