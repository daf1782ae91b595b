"""Tab "Prompt → tokens → embeddings → attention": CLIP's tokenizer and text encoder at work.

``inspect_prompt`` yields the tokens at once (the tokenizer needs no model), then every view of
the text encoder's output; ``update_attention`` redraws the attention views for another layer or
head without running the encoder again. ``build`` lays the tab out and maps names to components.
The chosen attention map comes twice: as HTML to point at (``viz.attention_html``: a token's row
and column light up and the value is read out) and as a picture to download.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import gradio as gr
import torch

import sd_parts
from ui.loading import ModelUnavailable
from ui.models import Models
from ui.shared import (
    PictureFiles,
    answer_once,
    in_parallel,
    is_download,
    literal,
    on_own_thread,
    output_path,
    random_banner,
)
from viz import attention_html, export, text_encoder, tokens
from viz.tokens import Tokens, read_tokens

TITLE = "Prompt → tokens → embeddings → attention"
EXAMPLE_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a cup of coffee on a wooden table, morning light, 35mm photo",
    "",
]
MEAN_OVER_HEADS = "mean over heads"
OUTPUTS = ("tokens", "notes", "table", "embeddings", "norms", "cosine", "attention",
           "attention_map", "heads", "eos", "download")
# "attention" is the chosen map as a PNG file to download; "attention_map" the same map as HTML
ATTENTION_OUTPUTS = ("attention", "attention_map", "heads", "eos")
KIND_COLOURS = {"BOS": "green", "EOS": "red", "padding": "gray", "token": "blue"}


@functools.lru_cache(maxsize=8)  # changing layer or head re-draws without re-encoding
def run_text_encoder(models: Models, input_ids: tuple[int, ...]) -> sd_parts.CLIPTextOutput:
    def encode() -> sd_parts.CLIPTextOutput:
        encoder = models.text_encoder()
        with torch.inference_mode():
            return encoder(torch.tensor([input_ids]), output_hidden_states=True,
                           output_attentions=True)
    return on_own_thread(encode)


def token_views(prompt: str, read: Tokens) -> dict[str, object]:
    notes = [literal(tokens.token_count_note(read.pieces)),
             literal(tokens.truncation_note(read.pieces))]
    if not prompt.strip():
        notes.append("An empty prompt is what SD v1 uses for the *unconditional* branch of "
                     "classifier-free guidance: BOS, EOS and padding.")
    return {
        "tokens": [(row[1], row[4]) for row in read.rows],
        "notes": "\n\n".join(n for n in notes if n),
        "table": read.rows,
    }


def attention_jobs(read: Tokens, output: sd_parts.CLIPTextOutput, layer: int, head: str,
                   padding: bool) -> dict[str, Callable[[], object]]:
    """How to draw each attention view (name -> job), for ``in_parallel``. The jobs get numpy
    arrays: torch called from a view thread would start an OpenMP team of its own there."""
    count = len(read.rows) if padding else read.n_real
    labels = read.labels[:count]
    layers = [a[0, :, :count, :count] for a in output.attentions]  # each (heads, T, T)
    layer = min(max(int(layer), 1), len(layers))
    weights = layers[layer - 1]
    if head == MEAN_OVER_HEADS:
        single, title = weights.mean(0), f"Layer {layer}, mean over {weights.shape[0]} heads"
    else:
        index = int(head.split()[-1])
        if not 1 <= index <= weights.shape[0]:
            raise gr.Error(f"This text encoder has {weights.shape[0]} heads; pick one of them.")
        single, title = weights[index - 1], f"Layer {layer}, head {index}"
    single, weights, layers = single.numpy(), weights.numpy(), [a.numpy() for a in layers]
    eos = read.n_real - 1
    return {
        "attention": lambda: text_encoder.attention_view(single, labels, title),
        "attention_map": lambda: attention_html.attention_html(single, labels,
                                                               read.kinds[:count], title),
        "heads": lambda: text_encoder.heads_view(weights, labels, layer),
        "eos": lambda: text_encoder.eos_view(layers, eos, labels),
    }


def inspect_prompt(models: Models, prompt: str, layer: int, head: str, padding: bool,
                   then: Callable[[str, object], object] | None = None
                   ) -> Iterator[dict[str, object]]:
    """Yield the tokens first, then every view of the text encoder's output, keyed by OUTPUTS;
    ``then(name, view)``, if given, is each view's value instead, made on the thread that drew
    it (the handler writes the picture there)."""
    prompt = prompt or ""
    try:
        read = read_tokens(models.tokenizer(), prompt)
    except ModelUnavailable as exc:
        yield {"notes": f"**The tokenizer could not be loaded.** {literal(str(exc))}"}
        return
    first = token_views(prompt, read)
    yield first
    try:
        output = run_text_encoder(models, read.ids)
    except ModelUnavailable as exc:
        yield first | {"notes": f"{first['notes']}\n\n**The text encoder could not be loaded**, "
                                f"so only the tokens are shown. {literal(str(exc))}"}
        return
    last = output.last_hidden_state[0]
    embeddings_file = export.embeddings_to_safetensors(
        last, torch.tensor(read.ids), output_path("embeddings.safetensors",
                                                  models.settings.output_max_age), prompt=prompt)
    last, states = last.numpy(), [h[0].numpy() for h in output.hidden_states]
    yield first | in_parallel(attention_jobs(read, output, layer, head, padding) | {
        "embeddings": lambda: text_encoder.embedding_view(last, read.labels, read.n_real),
        "norms": lambda: text_encoder.norms_view(states, read.labels, read.n_real),
        "cosine": lambda: text_encoder.cosine_view(last[: read.n_real],
                                                   read.labels[: read.n_real]),
    }, then) | {"download": str(embeddings_file)}


def update_attention(models: Models, prompt: str, layer: int, head: str, padding: bool
                     ) -> dict[str, object]:
    """The attention views for another layer, head or padding choice (the encoder's output is
    cached for the last few prompts)."""
    try:
        read = read_tokens(models.tokenizer(), prompt or "")
        output = run_text_encoder(models, read.ids)
    except ModelUnavailable:  # inspect_prompt has said why; nothing to draw
        return {}
    return attention_views(read, output, layer, head, padding)


def attention_views(read: Tokens, output: sd_parts.CLIPTextOutput, layer: int, head: str,
                    padding: bool) -> dict[str, object]:
    return in_parallel(attention_jobs(read, output, layer, head, padding))


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks`` (in ``tab``, the page's tab
    that holds it, if there is one: opening it the first time inspects the prompt filled in)."""
    settings, clip = models.settings, models.settings.clip_config
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    with gr.Row():
        prompt = gr.Textbox(EXAMPLE_PROMPTS[0], label="Prompt", elem_id="prompt-input", scale=4,
                            placeholder="a photograph of an astronaut riding a horse")
        inspect = gr.Button("Inspect", variant="primary", scale=1)
    # The empty prompt is what guidance's unconditional branch reads: BOS, EOS and padding only.
    gr.Examples(EXAMPLE_PROMPTS, inputs=prompt, label="Examples",
                example_labels=[p or "(empty: what guidance's unconditional branch reads)"
                                for p in EXAMPLE_PROMPTS])
    out = {
        "tokens": gr.HighlightedText(label="Tokens as CLIP sees them (77 positions)",
                                     elem_id="token-view", show_legend=True,
                                     color_map=KIND_COLOURS),
        "notes": gr.Markdown(elem_id="prompt-notes"),
    }
    with gr.Accordion("Token table (position, text, piece, id, kind)", open=False):
        out["table"] = gr.Dataframe(headers=tokens.TOKEN_ROWS_HEADERS, interactive=False)
    out["embeddings"] = gr.Image(label="Output embeddings", format="png")
    with gr.Row():
        out["norms"] = gr.Image(label="Token norms through the layers", format="png")
        out["cosine"] = gr.Image(label="Token-to-token cosine similarity", format="png")
    with gr.Row():
        layer = gr.Slider(1, clip.num_hidden_layers, value=1, step=1, label="Layer")
        head = gr.Dropdown([MEAN_OVER_HEADS] + [f"head {i + 1}" for i in
                                                range(clip.num_attention_heads)],
                           value=MEAN_OVER_HEADS, label="Head")
        padding = gr.Checkbox(False, label="Include padding positions")
    # the map to point at; its script runs once and follows every new value (gr.HTML runs no
    # <script> inside a value)
    out["attention_map"] = gr.HTML("", elem_id="attention-map", js_on_load=attention_html.SCRIPT,
                                   apply_default_css=False)
    out["attention"] = gr.File(label="Download this attention map as a picture (.png)",
                               elem_id="attention-picture")
    out["heads"] = gr.Image(label="All heads of this layer", format="png")
    out["eos"] = gr.Image(label="What EOS attends to, layer by layer", format="png")
    out["download"] = gr.File(label="Download the embeddings (.safetensors)")

    def inspect_handler(prompt, layer, head, show_padding,
                        progress=gr.Progress(track_tqdm=True)):  # Hub downloads show here
        files = PictureFiles()

        def write(name: str, view: object) -> object:
            return files(view, is_download(out[name]))
        for views in inspect_prompt(models, prompt, layer, head, show_padding, write):
            yield {out[name]: views.get(name) for name in OUTPUTS}

    shown = gr.State(False)  # whether this visitor's page has shown a prompt yet

    def first_view(was_shown, prompt, layer, head, show_padding,
                   progress=gr.Progress(track_tqdm=True)):
        """Opening the tab the first time answers the prompt filled in, not empty boxes."""
        if was_shown:
            yield {shown: True}
            return
        for update in inspect_handler(prompt, layer, head, show_padding):
            yield update | {shown: True}

    def attention_handler(prompt, layer, head, show_padding):
        views = update_attention(models, prompt, layer, head, show_padding)
        yield from answer_once({out[name]: views.get(name) for name in ATTENTION_OUTPUTS})

    controls = [prompt, layer, head, padding]
    gr.on([inspect.click, prompt.submit], inspect_handler, controls,
          [out[name] for name in OUTPUTS], api_name="inspect_prompt", concurrency_id="models",
          concurrency_limit=1).then(lambda: True, None, shown, api_visibility="private")
    if tab is not None:
        tab.select(first_view, [shown, *controls], [*(out[name] for name in OUTPUTS), shown],
                        api_visibility="private", concurrency_id="models", concurrency_limit=1)
    gr.on([layer.release, head.change, padding.change], attention_handler, controls,
          [out[name] for name in ATTENTION_OUTPUTS], api_name="attention_view",
          concurrency_id="models", concurrency_limit=1)
