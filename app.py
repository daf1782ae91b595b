"""Look inside Stable Diffusion v1: a Gradio app over the VAE, CLIP tokenizer and text encoder.

UI only: every picture, table and metric comes from a pure function in ``sd_parts``.

    python app.py                     # real weights from the Hugging Face Hub (cached)
    python app.py --weights random    # full-size architecture, seeded random weights, offline
    python app.py --weights tiny      # tiny random models, for tests and development
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import html
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import gradio as gr
import torch
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

import sd_parts
from sd_parts import figures, images

ASSETS = Path(__file__).parent / "assets"
EXAMPLE_IMAGES = [str(p) for p in sorted(ASSETS.iterdir()) if p.suffix in (".png", ".jpg")]
EXAMPLE_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a cup of coffee on a wooden table, morning light, 35mm photo",
    "",
]
MAX_FILE_SIZE = "25mb"
MAX_PIXELS = 40_000_000  # checked from the file header, before any pixel is decoded
SIZES = [256, 384, 512, 768, 1024, 2048]
TILE_ABOVE_PIXELS = 768 * 768  # bigger images go through the VAE in overlapping tiles
MEAN, SAMPLE = "posterior mean", "seeded sample (mean + std x noise)"
MEAN_OVER_HEADS = "mean over heads"
VAE_SOURCES = {  # label -> (source, subfolder)
    "SD v1.5 VAE": (sd_parts.DEFAULT_REPO, "vae"),
    "stabilityai/sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", None),
    "stabilityai/sd-vae-ft-ema": ("stabilityai/sd-vae-ft-ema", None),
}
MODEL_CARDS = {
    "SD v1.5": f"https://huggingface.co/{sd_parts.DEFAULT_REPO}",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse",
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema",
    "CLIP ViT-L/14": "https://huggingface.co/openai/clip-vit-large-patch14",
}
OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="sd-parts-"))


@dataclass(frozen=True)
class Settings:
    weights: str = "hub"  # hub | random | tiny
    vae: str | None = None  # a repo id or folder that replaces the VAE choices
    text_encoder: str = sd_parts.DEFAULT_REPO
    tokenizer: str | None = None  # None: the vocabulary bundled with sd_parts
    default_size: int = 384  # the longer side; 384 px round-trips in a few seconds on 2 cores
    queue_size: int = 16  # requests waiting at most; one more gets "busy, try again"
    cache_max_age: int = 3600  # seconds an upload or a served output is kept on disk

    @property
    def random(self) -> bool:
        return self.weights != "hub"

    @property
    def vae_choices(self) -> list[str]:
        if self.random:
            return [f"{self.weights} random weights"]
        return [self.vae] if self.vae else list(VAE_SOURCES)

    @property
    def clip_config(self) -> sd_parts.CLIPTextConfig:
        return sd_parts.TINY_CLIP if self.weights == "tiny" else sd_parts.CLIPTextConfig()

    @property
    def delete_cache(self) -> tuple[int, int]:
        """Gradio's (how often, how old) for removing uploads and served copies of outputs."""
        return max(1, self.cache_max_age // 6), self.cache_max_age

    @property
    def output_max_age(self) -> int:
        # Gradio copies each download into its cache as it serves it, so ours can go sooner.
        return max(1, self.cache_max_age // 4)


def parse_settings(argv: list[str]) -> Settings:
    """Command-line flags, each defaulting to an environment variable (for Spaces)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Look inside Stable Diffusion v1.")
    parser.add_argument("--weights", choices=["hub", "random", "tiny"],
                        default=env("SD_PARTS_WEIGHTS", "hub"))
    parser.add_argument("--vae", default=env("SD_PARTS_VAE"), help="repo id or local folder")
    parser.add_argument("--text-encoder", default=env("SD_PARTS_TEXT_ENCODER",
                                                      sd_parts.DEFAULT_REPO))
    parser.add_argument("--tokenizer", default=env("SD_PARTS_TOKENIZER"))
    parser.add_argument("--default-size", type=int, choices=SIZES,
                        default=int(env("SD_PARTS_DEFAULT_SIZE", "384")))
    parser.add_argument("--queue-size", type=int, default=int(env("SD_PARTS_QUEUE_SIZE", "16")))
    parser.add_argument("--cache-max-age", type=int,
                        default=int(env("SD_PARTS_CACHE_MAX_AGE", "3600")))
    return Settings(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Models: loaded on first use, then cached.


def user_error(message: str, title: str = "Error") -> gr.Error:
    # Gradio renders error messages as HTML; these may quote file names the user chose.
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def _as_gr_error(exc: sd_parts.WeightsError) -> gr.Error:
    return user_error(str(exc), "Could not load the model")


@functools.lru_cache(maxsize=2)
def get_vae(settings: Settings, choice: str, exact: bool) -> sd_parts.AutoencoderKL:
    dtype = torch.float32 if exact else sd_parts.fast_dtype("cpu")
    if settings.random:
        config = sd_parts.TINY_VAE if settings.weights == "tiny" else sd_parts.VAEConfig()
        torch.manual_seed(0)
        return sd_parts.AutoencoderKL(config).eval().requires_grad_(False).to(dtype)
    source, subfolder = VAE_SOURCES.get(choice, (choice, None))
    try:
        return sd_parts.load_vae(source, subfolder=subfolder, dtype=dtype)
    except sd_parts.WeightsError as exc:
        raise _as_gr_error(exc) from None


@functools.lru_cache(maxsize=1)
def get_text_encoder(settings: Settings) -> sd_parts.CLIPTextEncoder:
    if settings.random:
        torch.manual_seed(0)
        return sd_parts.CLIPTextEncoder(settings.clip_config).eval().requires_grad_(False)
    try:
        return sd_parts.load_text_encoder(settings.text_encoder)
    except sd_parts.WeightsError as exc:
        raise _as_gr_error(exc) from None


@functools.lru_cache(maxsize=1)
def get_tokenizer(settings: Settings) -> sd_parts.CLIPTokenizer:
    try:
        return sd_parts.load_tokenizer(settings.tokenizer)
    except sd_parts.WeightsError as exc:
        raise _as_gr_error(exc) from None


def output_path(name: str, max_age_s: int) -> Path:
    """A fresh file for a download; files older than max_age_s are removed first."""
    now = time.time()
    for old in OUTPUT_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > max_age_s:
                old.unlink()
        except FileNotFoundError:  # removed meanwhile by a request in another session
            pass
    return OUTPUT_DIR / f"{uuid.uuid4().hex[:12]}-{name}"


def mode_note(exact: bool) -> str:
    dtype = sd_parts.fast_dtype("cpu")
    if exact or dtype == torch.float32:
        why = "" if exact else " (this CPU has no fast bfloat16, so fast mode is float32 too)"
        return f"Exact mode: float32{why}."
    return "Fast mode: bfloat16 on this CPU. Tick *Exact mode* for float32 numerics."


# ---------------------------------------------------------------------------------------------
# Tab 1: image -> latent -> image


IMAGE_OUTPUTS = ["size", "vae_input", "preview", "fitted_preview", "channels", "stats",
                 "histogram", "std", "original", "reconstruction", "error", "metrics", "downloads"]


def image_outputs(**values: object) -> tuple:
    """The outputs of encode_image in order; those not given are cleared.

    Clearing (None) rather than gr.skip(): the previous image's reconstruction should not stand
    beside the new latent, and an update from gr.skip() makes Gradio keep a per-session copy of
    the component whose later files its delete_cache never removes.
    """
    return tuple(values.get(name) for name in IMAGE_OUTPUTS)


def encode_image(settings: Settings, path: str | None, choice: str, max_side: int, fit: str,
                 latent_kind: str, seed: int, shared_scale: bool, exact: bool,
                 progress: gr.Progress = gr.Progress(track_tqdm=True)):
    """Generator: the latent views first (with the instant preview), then the reconstruction.

    Tensors stay float32 here: the VAE casts to its own dtype (bfloat16 in fast mode) and back.
    """
    if not path:
        raise user_error("Upload an image or click one of the examples first.")
    try:
        image = images.load_image(path, MAX_PIXELS)
    except images.ImageInputError as exc:
        raise user_error(str(exc), "Cannot use this file") from None
    fitted, size_note = images.fit_for_vae(image, int(max_side), mode=fit)
    progress(0.05, desc="Loading the VAE")
    vae = get_vae(settings, choice, bool(exact))
    tiled = fitted.width * fitted.height > TILE_ABOVE_PIXELS
    progress(0.2, desc="Encoding")
    start = time.perf_counter()
    posterior = vae.encode(images.image_to_tensor(fitted), tiled=tiled)
    if latent_kind == SAMPLE:
        latent = posterior.sample(torch.Generator().manual_seed(int(seed)))
    else:
        latent = posterior.mean
    encode_s = time.perf_counter() - start
    latent = latent[0]
    factor = vae.config.scaling_factor
    shape = "x".join(str(n) for n in latent.shape)
    latent_info = (f"{size_note} The latent is {shape} (channels x height x width): "
                   f"{latent.numel():,} numbers for {3 * fitted.width * fitted.height:,} pixel "
                   f"values, {3 * fitted.width * fitted.height / latent.numel():.0f}x fewer.")
    latent_views = dict(
        size=latent_info,
        vae_input=fitted,
        preview=images.latent_to_rgb(latent, factor),
        channels=figures.latent_channels_figure(latent, shared_scale),
        stats=images.channel_stats(latent, factor),
        histogram=figures.latent_histogram_figure(latent, factor),
        std=figures.std_map_figure(posterior.std[0], shared_scale),
    )
    yield image_outputs(**latent_views, metrics=f"Encoded in {encode_s:.2f} s. Decoding...")
    progress(0.6, desc="Decoding")
    start = time.perf_counter()
    decoded = vae.decode(latent[None], tiled=tiled)
    decode_s = time.perf_counter() - start
    reconstruction = images.tensor_to_image(decoded[0])
    psnr = images.psnr(fitted, reconstruction)
    psnr_text = "∞ (identical)" if psnr == float("inf") else f"{psnr:.2f} dB"
    latent_file = images.latent_to_safetensors(
        latent, factor, fitted.size, output_path("latent.safetensors", settings.output_max_age))
    png_file = output_path("reconstruction.png", settings.output_max_age)
    reconstruction.save(png_file)
    fitted_map = images.fit_latent_to_rgb(latent, fitted, factor)
    # the last yield carries every output, so an API client gets the complete result
    yield image_outputs(
        **latent_views,
        original=fitted,
        reconstruction=reconstruction,
        fitted_preview=images.apply_latent_rgb_map(latent, factor, fitted_map),
        error=figures.abs_error_figure(fitted, reconstruction),
        metrics=(f"**PSNR** {psnr_text} · **SSIM** {images.ssim(fitted, reconstruction):.4f}"
                 f" · encoded in {encode_s:.2f} s, decoded in {decode_s:.2f} s"
                 f"{' (tiled)' if tiled else ''}. {mode_note(bool(exact))}"),
        downloads=[str(latent_file), str(png_file)],
    )


# ---------------------------------------------------------------------------------------------
# Tab 2: prompt -> tokens -> embeddings -> attention


@dataclass(frozen=True)
class EncodedPrompt:
    rows: list[list]  # token_rows: the 77 positions as the text encoder sees them
    pieces_full: list[str]
    n_real: int  # BOS + kept tokens + EOS
    output: sd_parts.CLIPTextOutput | None  # None when the text encoder could not be loaded
    error: str = ""


def encode_prompt(settings: Settings, prompt: str) -> EncodedPrompt:
    tokenizer = get_tokenizer(settings)
    pieces = tokenizer.tokenize(prompt)
    rows = figures.token_rows(tokenizer.convert_tokens_to_ids(pieces), pieces)
    n_real = figures.positions_used(len(pieces))
    try:
        output = run_text_encoder(settings, tuple(row[2] for row in rows))
    except gr.Error as exc:
        return EncodedPrompt(rows, pieces, n_real, None, html.unescape(exc.message))
    return EncodedPrompt(rows, pieces, n_real, output)


@functools.lru_cache(maxsize=8)  # changing layer or head re-draws without re-encoding
def run_text_encoder(settings: Settings, input_ids: tuple[int, ...]) -> sd_parts.CLIPTextOutput:
    encoder = get_text_encoder(settings)
    with torch.inference_mode():
        return encoder(torch.tensor([input_ids]), output_hidden_states=True,
                       output_attentions=True)


def attention_views(encoded: EncodedPrompt, layer: int, head: str, padding: bool) -> tuple:
    if encoded.output is None:
        return None, None, None
    count = len(encoded.rows) if padding else encoded.n_real
    labels = [row[1] for row in encoded.rows[:count]]
    layers = encoded.output.attentions
    layer = min(max(int(layer), 1), len(layers))
    weights = layers[layer - 1][0, :, :count, :count]  # (heads, T, T)
    if head == MEAN_OVER_HEADS:
        single, title = weights.mean(0), f"Layer {layer}, mean over {weights.shape[0]} heads"
    else:
        index = int(head.split()[-1])
        if not 1 <= index <= weights.shape[0]:
            raise user_error(f"This text encoder has {weights.shape[0]} heads; pick one of them.")
        single, title = weights[index - 1], f"Layer {layer}, head {index}"
    eos = encoded.n_real - 1
    return (
        figures.attention_figure(single, labels, title),
        figures.attention_heads_grid_figure(weights, labels, layer),
        figures.eos_attention_figure([a[0, :, :count, :count] for a in layers], eos, labels),
    )


def inspect_prompt(settings: Settings, prompt: str, layer: int, head: str, padding: bool,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
    encoded = encode_prompt(settings, prompt or "")
    notes = [figures.token_count_note(encoded.pieces_full),
             figures.truncation_note(encoded.pieces_full)]
    if not (prompt or "").strip():
        notes.append("An empty prompt is what SD v1 uses for the *unconditional* branch of "
                     "classifier-free guidance: BOS, EOS and padding.")
    if encoded.error:
        notes.append(f"**The text encoder could not be loaded**, so only the tokens are shown. "
                     f"{encoded.error}")
    highlights = [(row[1], row[3]) for row in encoded.rows]
    if encoded.output is None:
        return (highlights, "\n\n".join(n for n in notes if n), encoded.rows,
                None, None, None, None, None, None, None)
    hidden = [h[0] for h in encoded.output.hidden_states]
    last = encoded.output.last_hidden_state[0]
    labels = [row[1] for row in encoded.rows]
    real = labels[: encoded.n_real]
    embeddings_file = images.embeddings_to_safetensors(
        last, torch.tensor([row[2] for row in encoded.rows]),
        output_path("embeddings.safetensors", settings.output_max_age), prompt=prompt or "")
    return (
        highlights, "\n\n".join(n for n in notes if n), encoded.rows,
        figures.embedding_heatmap_figure(last, labels, encoded.n_real),
        figures.hidden_state_norms_figure(hidden, labels, encoded.n_real),
        figures.cosine_similarity_figure(last[: encoded.n_real], real),
        *attention_views(encoded, layer, head, padding),
        str(embeddings_file),
    )


def update_attention(settings: Settings, prompt: str, layer: int, head: str,
                     padding: bool) -> tuple:
    return attention_views(encode_prompt(settings, prompt or ""), layer, head, padding)


# ---------------------------------------------------------------------------------------------
# Layout


HOW_IT_WORKS = """
## How Stable Diffusion v1 makes an image

<div class="pipeline">
<span class="step used">prompt</span> → <span class="step used">CLIP tokenizer</span> →
<span class="step used">CLIP text encoder</span> → 77 x 768 embeddings →
<span class="step">UNet + scheduler (denoises a 4 x 64 x 64 latent, 20-50 steps)</span> →
<span class="step used">VAE decoder</span> → 512 x 512 image
<br><br>
<span class="step used">image</span> → <span class="step used">VAE encoder</span> →
4 x 64 x 64 latent (for image-to-image, inpainting and training)
</div>

Highlighted parts run in this app; the UNet and the scheduler, which do the actual denoising,
do not.

**The latent.** The VAE squeezes each 8 x 8 block of pixels (192 numbers) into 4 numbers, 48x
fewer. The diffusion model works in this small space, which is what made SD fast enough for a
consumer GPU. The *Image* tab shows the four channels: most of their content is colour and
edges at 1/8 resolution, which is why a simple linear map already previews the image.

**The posterior.** The encoder outputs a mean and a standard deviation for every latent value;
a latent is drawn as *mean + std x noise* (the reparameterization trick). The std is tiny, so
the mean and a sample decode to nearly the same image.

**The scaling factor.** Raw latents have a standard deviation of about 5. SD v1 multiplies them
by 0.18215 so they have roughly unit variance, the scale the noise schedule assumes; the
decoder gets them back divided by the same factor. The histogram in the *Image* tab shows this.

**The text side.** The tokenizer splits the prompt into at most 75 byte-pair pieces between
BOS and EOS and pads to 77. The text encoder is a 12-layer causal transformer: each token sees
only the tokens before it, and the UNet reads all 77 output vectors through cross-attention,
the padding included.
"""

CSS = """
.pipeline { line-height: 2.4; }
.pipeline .step { border: 1px solid #999; border-radius: 6px; padding: 3px 8px; }
.pipeline .used { background: #ffe9a8; border-color: #d49b00; font-weight: 600; }
.banner { background: #fff3cd; border: 1px solid #d49b00; padding: 6px 12px; border-radius: 6px; }
"""


def build_demo(settings: Settings) -> gr.Blocks:
    banner = ("**Random weights: every output below is meaningless.** The architecture is "
              f"real ({settings.weights} configuration); start without `--weights` to use the "
              "real checkpoints.")
    clip = settings.clip_config
    # The example images are served from assets/ as they are. Copies in Gradio's cache would be
    # removed by delete_cache after cache_max_age, and the examples would then stop working.
    gr.set_static_paths([ASSETS])
    # No telemetry: Gradio would otherwise report each start to its own servers.
    with gr.Blocks(title="Inside Stable Diffusion v1", delete_cache=settings.delete_cache,
                   analytics_enabled=False) as demo:
        gr.Markdown("# Inside Stable Diffusion v1\nSee how the VAE turns an image into a latent "
                    "and back, and how CLIP reads a prompt.")
        with gr.Tab("Image → latent → image"):
            if settings.random:
                gr.Markdown(banner, elem_classes="banner")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image (PNG, JPEG, WebP, GIF, BMP, TIFF)",
                                     file_types=["image"], elem_id="image-input")
                    examples = gr.Examples(EXAMPLE_IMAGES, inputs=upload, label="Examples")
                    choice = gr.Dropdown(settings.vae_choices, value=settings.vae_choices[0],
                                         label="VAE weights")
                    max_side = gr.Dropdown(SIZES, value=settings.default_size,
                                           label="Longer side at most (px)")
                    fit = gr.Radio(["crop", "pad"], value="crop",
                                   label="To reach multiples of 8")
                    latent_kind = gr.Radio([MEAN, SAMPLE], value=MEAN, label="Latent to decode",
                                           elem_id="latent-kind")
                    seed = gr.Number(0, precision=0, label="Seed for the sample")
                    shared_scale = gr.Checkbox(True, label="One colour scale for all channels")
                    exact = gr.Checkbox(sd_parts.fast_dtype("cpu") == torch.float32,
                                        label="Exact mode (float32)")
                    gr.Markdown(mode_note(False))
                    run = gr.Button("Encode and decode", variant="primary")
                with gr.Column(scale=2):
                    size_md = gr.Markdown()
                    with gr.Row():
                        vae_input = gr.Image(label="What the encoder sees", format="png")
                        preview = gr.Image(label="Instant preview: a fixed linear map of the "
                                           "latent to RGB", format="png")
                        fitted_preview = gr.Image(label="Linear map fitted to this image",
                                                  format="png")
                    channels_plot = gr.Plot(label="The 4 latent channels", format="png",
                                            elem_id="latent-channels")
                    with gr.Row():
                        stats_table = gr.Dataframe(headers=images.CHANNEL_STATS_HEADERS,
                                                   label="Per-channel statistics",
                                                   interactive=False)
                        histogram_plot = gr.Plot(label="Scaled latent vs N(0, 1)", format="png")
                    std_plot = gr.Plot(label="Posterior std (how uncertain each value is)",
                                       format="png")
                    with gr.Row():
                        original = gr.Image(label="Original (as encoded)", format="png")
                        reconstruction_image = gr.Image(label="Reconstruction", format="png",
                                                        elem_id="reconstruction")
                    error_plot = gr.Plot(label="Absolute error", format="png")
                    metrics_md = gr.Markdown()
                    downloads = gr.File(label="Downloads: latent (.safetensors), "
                                        "reconstruction (.png)", file_count="multiple")
            image_inputs = [upload, choice, max_side, fit, latent_kind, seed, shared_scale, exact]
            outputs = [size_md, vae_input, preview, fitted_preview, channels_plot, stats_table,
                       histogram_plot, std_plot, original, reconstruction_image, error_plot,
                       metrics_md, downloads]  # in the order of IMAGE_OUTPUTS
            encode = functools.partial(encode_image, settings)
            gr.on([run.click, upload.upload, latent_kind.change], encode, image_inputs, outputs,
                  api_name="encode_image", concurrency_id="models", concurrency_limit=1)
            examples.load_input_event.then(encode, image_inputs, outputs, api_visibility="private",
                                           concurrency_id="models", concurrency_limit=1)
        with gr.Tab("Prompt → tokens → embeddings → attention"):
            if settings.random:
                gr.Markdown(banner, elem_classes="banner")
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", elem_id="prompt-input", scale=4,
                                    placeholder="a photograph of an astronaut riding a horse")
                inspect = gr.Button("Inspect", variant="primary", scale=1)
            gr.Examples(EXAMPLE_PROMPTS, inputs=prompt, label="Examples")
            tokens = gr.HighlightedText(label="Tokens as CLIP sees them (77 positions)",
                                        elem_id="token-view", show_legend=True,
                                        color_map={"BOS": "green", "EOS": "red",
                                                   "padding": "gray", "token": "blue"})
            notes = gr.Markdown()
            with gr.Accordion("Token table (position, piece, id, kind)", open=False):
                token_table = gr.Dataframe(headers=figures.TOKEN_ROWS_HEADERS, interactive=False)
            embeddings_plot = gr.Plot(label="Output embeddings", format="png")
            with gr.Row():
                norms_plot = gr.Plot(label="Token norms through the layers", format="png")
                cosine_plot = gr.Plot(label="Token-to-token cosine similarity", format="png")
            with gr.Row():
                layer = gr.Slider(1, clip.num_hidden_layers, value=1, step=1, label="Layer")
                head = gr.Dropdown([MEAN_OVER_HEADS] + [f"head {i + 1}" for i in
                                                        range(clip.num_attention_heads)],
                                   value=MEAN_OVER_HEADS, label="Head")
                padding = gr.Checkbox(False, label="Include padding positions")
            attention_plot = gr.Plot(label="Attention map", format="png", elem_id="attention-map")
            heads_plot = gr.Plot(label="All heads of this layer", format="png")
            eos_plot = gr.Plot(label="What EOS attends to, layer by layer", format="png")
            embeddings_file = gr.File(label="Download the embeddings (.safetensors)")
            attention_outputs = [attention_plot, heads_plot, eos_plot]
            gr.on([inspect.click, prompt.submit], functools.partial(inspect_prompt, settings),
                  [prompt, layer, head, padding],
                  [tokens, notes, token_table, embeddings_plot, norms_plot, cosine_plot,
                   *attention_outputs, embeddings_file],
                  api_name="inspect_prompt", concurrency_id="models", concurrency_limit=1)
            gr.on([layer.release, head.change, padding.change],
                  functools.partial(update_attention, settings), [prompt, layer, head, padding],
                  attention_outputs, api_name="attention_view", concurrency_id="models",
                  concurrency_limit=1)
        with gr.Tab("How it works"):
            gr.Markdown(HOW_IT_WORKS)
            gr.Markdown("Model cards: " + " · ".join(f"[{name}]({url})"
                                                     for name, url in MODEL_CARDS.items()))
    demo.queue(max_size=settings.queue_size)
    return demo


# Gradio's file route fetches any public web address it is given and streams it back (asking a
# public DNS service about hosts it cannot resolve), and its proxy route serves apps loaded with
# gr.load. This app serves only its own files, so both are refused before Gradio sees them.
OFF_SITE_ROUTE = re.compile(r"/(file[=/]\s*[a-z][a-z0-9+.-]+:|proxy=)", re.IGNORECASE)


class RefuseOffSiteRequests:
    """ASGI middleware: 404 for requests that would make the server reach another host."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and OFF_SITE_ROUTE.search(unquote(scope["path"])):
            await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep the server's memory flat under load (Linux with glibc; elsewhere nothing happens).

    glibc gives each thread that allocates its own memory arena, up to 8 per core, and seldom
    hands their freed pages back. Gradio runs handlers on a pool of threads, so without a limit
    the resident memory creeps up by about 1 MB a request until every arena has grown. A
    MALLOC_ARENA_MAX set in the environment wins.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # -8 is M_ARENA_MAX in glibc's malloc.h
    except (OSError, AttributeError):  # another C library
        pass


def remove_old_files(folder: Path, max_age_s: float) -> None:
    """Delete files under folder created more than max_age_s ago, then folders left empty."""
    now = time.time()
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder's files before the folder
        try:
            if now - path.lstat().st_ctime <= max_age_s:
                continue
            if path.is_dir():
                path.rmdir()  # only when empty; an OSError says it is not
            else:
                path.unlink()
        except OSError:  # in use, not empty, or removed meanwhile
            pass


def start_cache_cleaner(max_age_s: int) -> None:
    """Every max_age_s / 6 seconds, remove what is older than max_age_s from Gradio's folder.

    Gradio's own delete_cache misses the empty temporary file each upload leaves, and under
    concurrent requests its clean-up task can stop for good (it iterates a set that requests
    add to). Everything in this folder is an upload or an output: the examples are served from
    assets/. Point GRADIO_TEMP_DIR at a folder of this app's own.
    """
    folder = Path(gr.utils.get_upload_folder())

    def clean() -> None:
        while True:
            time.sleep(max(1, max_age_s // 6))
            if folder.is_dir():
                remove_old_files(folder, max_age_s)

    threading.Thread(target=clean, name="cache-cleaner", daemon=True).start()


def launch(demo: gr.Blocks, **overrides: object) -> None:
    """Start the server with the app's security settings (tests pass a port and no blocking)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    limit_malloc_arenas()
    start_cache_cleaner(demo.delete_cache[1])
    options = dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
        share=False,
        show_error=False,  # gr.Error messages are shown; other exceptions give no details
        enable_monitoring=False,
        ssr_mode=False,  # Gradio < 6.32: run-history endpoints could misuse a Hub token with SSR
        run_history=False,
        mcp_server=False,
        css=CSS,
        footer_links=[],
        app_kwargs={"middleware": [Middleware(RefuseOffSiteRequests)]},
    )
    demo.launch(**(options | overrides))


demo = build_demo(parse_settings([]))

if __name__ == "__main__":
    demo = build_demo(parse_settings(sys.argv[1:]))
    launch(demo)
