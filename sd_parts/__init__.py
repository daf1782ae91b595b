"""sd_parts: Stable Diffusion v1's VAE, CLIP text encoder and tokenizer, written to be read."""

from .clip import CLIPTextEncoder, CLIPTextOutput
from .config import TINY_CLIP, TINY_VAE, CLIPTextConfig, VAEConfig
from .runtime import fast_dtype
from .tokenizer import CLIPTokenizer, load_tokenizer
from .vae import AutoencoderKL, DiagonalGaussian
from .weights import DEFAULT_REPO, WeightsError, load_text_encoder, load_vae

__all__ = [
    "DEFAULT_REPO", "TINY_CLIP", "TINY_VAE", "AutoencoderKL", "CLIPTextConfig", "CLIPTextEncoder",
    "CLIPTextOutput", "CLIPTokenizer", "DiagonalGaussian", "VAEConfig", "WeightsError",
    "fast_dtype", "load_text_encoder", "load_tokenizer", "load_vae",
]
