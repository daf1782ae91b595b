"""Tab "Prompt lab": the habits of prompt writers, and what each does to CLIP's embeddings.

Five small experiments, each with its own endpoint: two prompts compared position by position
through every layer (``compare_prompts``), CLIP skip (``clip_skip``), prompts past 75 tokens and
the chunked workaround (``long_prompt``), the weighting syntax (``weighting``), and the vocabulary
entries nearest to a token (``nearest_tokens``). The functions here turn UI values into the
arguments of ``sd_parts`` and ``viz.prompt_lab`` and return a dict keyed by output name; ``build``
lays the tab out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import gradio as gr
import torch

import sd_parts
from sd_parts.tokenizer import BOS_TOKEN, EOS_TOKEN, context_ids
from ui.loading import ModelUnavailable
from ui.models import Models
from ui.shared import answer_once, failure, literal, on_own_thread, random_banner
from viz import prompt_lab as lab
from viz import tokens
from viz.tokens import read_tokens

TITLE = "Prompt lab: habits → embeddings"
COMPARE_OUTPUTS = ("compare_tokens", "compare_map", "compare_reading")
SKIP_OUTPUTS = ("skip_map", "skip_table", "skip_reading")
LONG_OUTPUTS = ("long_cut", "long_chunks", "long_webui", "long_table", "long_reading")
WEIGHT_OUTPUTS = ("weight_tokens", "weight_map", "weight_table", "weight_notes")
NEAREST_OUTPUTS = ("nearest_table", "nearest_notes")
MOST_SKIPPED = 2  # the web UIs offer CLIP skip 1 and 2 (diffusers' 0 and 1); 2 layers is enough
MAX_NEIGHBOURS = 50
MAX_CHUNKS_SHOWN = 12  # 900 tokens; the reading still counts every chunk
KIND_COLOURS = {"BOS": "green", "EOS": "red", "padding": "gray", "token": "blue",
                "chunk": "orange"}
CUT_COLOURS = {"kept": "blue", "dropped": "red"}
EXAMPLE_PAIRS = [
    ["a photo of a cat", "a photo of a cat on a sofa"],
    ["a photo of a cat", "a photo of a dog"],
    ["a red car", "a blue car"],
]
EXAMPLE_WEIGHTS = ["a (red:1.5) car on a [busy] street", "a ((cat)) in a hat",
                   "a (cat:1.3 in a hat", "a (cat:x1.3) in a hat]"]
# 90 tokens: the plain cut falls inside "soft morning fog ...", the web UI's moves back to the
# comma before that phrase
LONG_EXAMPLE = ", ".join(["a cinematic photograph of an old lighthouse on a rocky coast at dusk",
                          "waves crashing", "dramatic clouds", "warm light in the windows",
                          "seagulls", "35mm film", "high detail", "sharp focus", "golden hour",
                          "volumetric light", "moody atmosphere", "award winning",
                          "trending on artstation", "by a famous landscape photographer",
                          "muted colours", "long exposure",
                          "soft morning fog drifting slowly over the calm water",
                          "a small boat in the distance", "reflections on wet rocks"])
SKIP_NOTE = ("The web UIs' **CLIP skip 2** = diffusers' `clip_skip=1` = **one layer skipped**: "
             "the UNet gets the output of the second-to-last layer, through the final LayerNorm. "
             "SD 1.5 itself was trained on the last layer; some fine-tunes (many anime models) on "
             "one layer skipped.")


@functools.lru_cache(maxsize=4)  # switching the padding toggle re-draws without re-encoding
def run_encoder(models: Models, rows: tuple[tuple[int, ...], ...]) -> sd_parts.CLIPTextOutput:
    def encode() -> sd_parts.CLIPTextOutput:
        with torch.inference_mode():
            return models.text_encoder()(torch.tensor(rows), output_hidden_states=True)
    return on_own_thread(encode)


# ---------------------------------------------------------------------------------------------
# The five experiments


def compare_prompts(models: Models, prompt_a: str, prompt_b: str, padding: bool
                    ) -> dict[str, object]:
    """Both prompts' tokens aligned, and how far apart their vectors are at every position and
    layer, with a sentence that reads the map."""
    try:
        a, b = read_tokens(models.tokenizer(), prompt_a), read_tokens(models.tokenizer(), prompt_b)
        output = run_encoder(models, (a.ids, b.ids))
    except ModelUnavailable as exc:
        return failure(COMPARE_OUTPUTS, "compare_reading", str(exc))
    padding_from = max(a.n_real, b.n_real)  # padding in both prompts from here on
    count = len(a.rows) if padding else padding_from
    states = [*output.hidden_states, output.last_hidden_state]
    comparison = lab.compare_states([s[0, :count] for s in states], [s[1, :count] for s in states])
    pairs = zip(a.labels, b.labels, a.ids, b.ids, strict=True)
    labels = [f"{p} padding" if p >= padding_from else f"{p} {ta}" if ia == ib
              else f"{p} {ta} → {tb}" for p, (ta, tb, ia, ib) in enumerate(pairs)][:count]
    reading = lab.comparison_reading(comparison, a.ids, b.ids, padding_from)
    for name, text in (("A", a), ("B", b)):  # words past the cut are not compared: say so
        cut = tokens.truncation_note(text.pieces)
        if cut:
            reading += f" Prompt {name}: " + cut[0].lower() + cut[1:]
    return {
        "compare_tokens": {"headers": lab.ALIGNED_HEADERS,
                           "data": lab.aligned_rows(a.rows, b.rows, count)},
        "compare_map": lab.comparison_view(comparison, labels),
        "compare_reading": literal(reading),
    }


def clip_skip(models: Models, prompt: str) -> dict[str, object]:
    """How far each token's final embedding moves with 1 and 2 layers skipped."""
    try:
        text = read_tokens(models.tokenizer(), prompt)
        encoder = models.text_encoder()
        output = run_encoder(models, (text.ids,))
    except ModelUnavailable as exc:
        return failure(SKIP_OUTPUTS, "skip_reading", str(exc))
    n_layers = len(encoder.encoder.layers)
    skips = range(1, min(MOST_SKIPPED, n_layers - 1) + 1)  # at least one layer must run
    # One pass serves every skip: clip_skip=k is the final LayerNorm of hidden state -(k + 1),
    # CLIPTextEncoder's own rule (the tests hold the two equal).
    with torch.inference_mode():
        states = [output.hidden_states[-(k + 1)][0, : text.n_real] for k in (0, *skips)]
        final, *skipped = [encoder.final_layer_norm(state) for state in states]
    if not skipped:
        return {"skip_reading": f"This text encoder has {n_layers} layer: none can be skipped."}
    cosine, l2 = lab.clip_skip_distances(final, skipped)
    labels = text.labels[: text.n_real]
    reading = lab.clip_skip_reading(cosine, l2, n_layers, float(final.norm(dim=1).mean()))
    if len(skipped) < MOST_SKIPPED:
        reading += (f" This text encoder has {n_layers} layers, so at most {n_layers - 1} can be "
                    "skipped (one must run).")
    return {"skip_map": lab.clip_skip_view(cosine, l2, labels),
            "skip_table": lab.clip_skip_table(cosine, l2, labels),
            "skip_reading": literal(reading)}


def long_prompt(models: Models, prompt: str) -> dict[str, object]:
    """What SD v1 keeps of a long prompt, and the prompt in chunks of 75 (no model runs)."""
    try:
        tokenizer = models.tokenizer()
    except ModelUnavailable as exc:
        return failure(LONG_OUTPUTS, "long_reading", str(exc))
    pieces = tokenizer.tokenize(prompt or "")
    layout = lab.chunk_layout(pieces, tokenizer.convert_tokens_to_ids(pieces),
                              tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, tokenizer.model_max_length)
    hidden = models.settings.clip_config.hidden_size
    notes = [lab.long_reading(pieces, len(layout), hidden, tokenizer.model_max_length),
             tokens.truncation_note(pieces, tokenizer.model_max_length)]
    # the web UI's rule: a cut moved back to a comma, BREAK (brackets read as text here)
    runs, _ = sd_parts.prompt_runs(tokenizer, prompt or "", False, "webui")
    webui = lab.run_layout([(tokenizer.convert_ids_to_tokens(ids), ids) for ids, _ in runs],
                           tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, tokenizer.model_max_length)
    notes.append(lab.chunking_reading([sum(k == "token" for _, _, k in c) for c in layout],
                                      [len(ids) for ids, _ in runs]))
    shown = layout[:MAX_CHUNKS_SHOWN]  # a page of tens of thousands of tokens would stall
    first = MAX_CHUNKS_SHOWN * (tokenizer.model_max_length - 2)
    cut = lab.cut_items(pieces[:first], tokenizer.model_max_length)
    chunks, webui_chunks = lab.chunk_items(shown), lab.chunk_items(webui[:MAX_CHUNKS_SHOWN])
    if len(layout) > len(shown):
        notes.append(f"The first {len(shown)} of {len(layout)} chunks are shown.")
        chunks.append((f"... {len(layout) - len(shown)} more chunks", "chunk"))
        cut.append((f"... {len(pieces) - first} more tokens", "dropped"))
    if len(webui) > MAX_CHUNKS_SHOWN:
        webui_chunks.append((f"... {len(webui) - MAX_CHUNKS_SHOWN} more chunks", "chunk"))
    return {"long_cut": cut, "long_chunks": chunks, "long_webui": webui_chunks,
            "long_table": {"headers": lab.CHUNK_HEADERS, "data": lab.chunk_table(shown)},
            "long_reading": "\n\n".join(literal(note) for note in notes if note)}


def weighting_views(tokenizer: sd_parts.CLIPTokenizer, encoder: sd_parts.CLIPTextEncoder,
                    prompt: str) -> dict[str, object]:
    """The prompt's tokens with their weights, and what weighting (with the mean restored) does
    to each position. Malformed input and a context whose mean cannot be restored give notes."""
    spans, notes = sd_parts.parse_weights(prompt or "")
    pieces, weights = sd_parts.token_weights(tokenizer, spans)
    views: dict[str, object] = {"weight_tokens": lab.weight_items(pieces, weights)}
    limit = tokenizer.model_max_length
    kept = min(len(pieces), limit - 2)
    if len(pieces) > kept:
        notes.append(f"Only the first {kept} of {len(pieces)} tokens are encoded here: the rest "
                     "do not fit in one 77-token context (see Long prompts for the chunks).")
    if all(weight == 1.0 for weight in weights):
        notes.append("No weights in this prompt: write (word:1.3), (word) for x1.1 or [word] "
                     "for /1.1.")
    ids = context_ids(tokenizer.convert_tokens_to_ids(pieces), limit, tokenizer.bos_token_id,
                      tokenizer.eos_token_id, tokenizer.pad_token_id)
    position_weights = [1.0, *weights[:kept]] + [1.0] * (limit - 1 - kept)  # BOS, EOS, padding: 1
    def encode() -> torch.Tensor:
        with torch.inference_mode():
            return encoder(torch.tensor([ids])).last_hidden_state
    context = on_own_thread(encode)
    try:
        weighted = sd_parts.apply_weights(context, position_weights)
    except ValueError as exc:
        notes.append(f"The weights cannot be applied to this text encoder's output: {exc}.")
        return views | {"weight_notes": "\n\n".join(literal(note) for note in notes)}
    n_real = kept + 2
    labels = tokens.readable_pieces([BOS_TOKEN, *pieces[:kept],
                                     EOS_TOKEN])
    before, after = context[0, :n_real], weighted[0, :n_real]
    notes.insert(0, lab.weighting_reading(position_weights, context[0], weighted[0]))
    return views | {
        "weight_map": lab.weighting_view(position_weights[:n_real], before, after, labels),
        "weight_table": {"headers": lab.WEIGHT_HEADERS,
                         "data": lab.weighting_table(position_weights[:n_real], before, after,
                                                     labels)},
        "weight_notes": "\n\n".join(literal(note) for note in notes),
    }


def weighting(models: Models, prompt: str) -> dict[str, object]:
    try:
        return weighting_views(models.tokenizer(), models.text_encoder(), prompt)
    except ModelUnavailable as exc:
        return failure(WEIGHT_OUTPUTS, "weight_notes", str(exc))


def token_choices(models: Models, prompt: str) -> list[tuple[str, int]]:
    """The prompt's real positions (BOS, tokens, EOS) as dropdown choices."""
    text = read_tokens(models.tokenizer(), prompt)
    return [(f"{p}: {label}", p) for p, label in enumerate(text.labels[: text.n_real])]


def nearest_tokens(models: Models, prompt: str, position: int | str | None, k: int
                   ) -> dict[str, object]:
    """The k vocabulary entries whose token embeddings point most nearly the way the chosen
    position's token does."""
    try:
        text = read_tokens(models.tokenizer(), prompt)
        table = models.text_encoder().embeddings.token_embedding.weight
    except ModelUnavailable as exc:
        return failure(NEAREST_OUTPUTS, "nearest_notes", str(exc))
    try:  # a choice's value is its position; a typed one may read "5" or "5: cat</w>"
        index = int(position) if isinstance(position, int | float) else int(
            str(position).split(":")[0])
    except (ValueError, OverflowError):
        index = -1
    if not 0 <= index < text.n_real:
        return {"nearest_notes": literal(
            f"Choose a position of the prompt's tokens, from 0 (BOS) to {text.n_real - 1} (EOS); "
            f"got {position!r}.")}
    if not isinstance(k, int | float) or not 1 <= k <= MAX_NEIGHBOURS:
        return {"nearest_notes": literal(f"Choose from 1 to {MAX_NEIGHBOURS} neighbours; got "
                                         f"{k!r}.")}
    ids, scores = lab.nearest_tokens(table, text.ids[index], int(k))
    rows = lab.nearest_rows(ids, scores, models.tokenizer().convert_ids_to_tokens(ids))
    vocab, dims = table.shape
    note = (f"The {int(k)} rows of CLIP's {vocab} x {dims} token embedding table nearest to "
            f"“{text.labels[index]}” (position {index}, id {text.ids[index]}) by cosine "
            "similarity, the row itself left out. This table is read before any layer: it holds "
            "what a token means on its own, without its position or the words around it.")
    return {"nearest_table": {"headers": lab.NEAREST_HEADERS, "data": rows},
            "nearest_notes": literal(note)}


# ---------------------------------------------------------------------------------------------
# The page


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks`` (in ``tab``, the page's tab
    that holds the lab, if there is one: opening it shows the first comparison)."""
    settings = models.settings
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    out: dict[str, gr.components.Component] = {}
    model_event = {"concurrency_id": "models", "concurrency_limit": 1}
    # The pictures carry their own titles: a label would cover them where the page is narrow
    # and the picture is shown scaled down.
    with gr.Tab("Two prompts") as pair_tab:
        gr.Markdown("Change a prompt and see which positions of CLIP's output move, layer by "
                    "layer. The text encoder is causal: a position sees only the tokens up to it.")
        with gr.Row():
            prompt_a = gr.Textbox(label="Prompt A", value=EXAMPLE_PAIRS[0][0])
            prompt_b = gr.Textbox(label="Prompt B", value=EXAMPLE_PAIRS[0][1])
        with gr.Row():
            padding = gr.Checkbox(True, label="Include padding positions")
            compare = gr.Button("Compare", variant="primary")
        gr.Examples(EXAMPLE_PAIRS, inputs=[prompt_a, prompt_b], label="Examples")
        out["compare_reading"] = gr.Markdown()
        out["compare_map"] = gr.Image(label="Distance between the prompts, positions x layers",
                                      format="png", show_label=False, elem_id="lab-compare-map",
                                      elem_classes="titled")
        with gr.Accordion("Tokens side by side", open=False):
            out["compare_tokens"] = gr.Dataframe(headers=lab.ALIGNED_HEADERS, interactive=False)
    with gr.Tab("CLIP skip") as skip_tab:
        gr.Markdown(SKIP_NOTE)
        with gr.Row():
            skip_prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PAIRS[0][1], scale=4)
            skip = gr.Button("Measure", variant="primary", scale=1)
        out["skip_reading"] = gr.Markdown()
        out["skip_map"] = gr.Image(label="How far each token moves", format="png",
                                   show_label=False, elem_id="lab-skip-map",
                                   elem_classes="titled")
        with gr.Accordion("The numbers", open=False):
            out["skip_table"] = gr.Dataframe(interactive=False)
    with gr.Tab("Long prompts") as long_tab:
        gr.Markdown("SD v1 reads BOS, 75 tokens and EOS. The web UIs encode a longer prompt in "
                    "chunks of 75 and give the UNet all of them side by side. Two rules, side by "
                    "side: the plain cut every 75 tokens (diffusers' long prompts), and "
                    "AUTOMATIC1111's, which moves a cut back to just after the last comma when "
                    "one lies within the cut's last 20 tokens and starts a new chunk at `BREAK`.")
        with gr.Row():
            long_text = gr.Textbox(label="Prompt", value=LONG_EXAMPLE, lines=3, scale=4)
            split = gr.Button("Split", variant="primary", scale=1)
        out["long_reading"] = gr.Markdown()
        out["long_cut"] = gr.HighlightedText(label="What SD v1 keeps and drops", show_legend=True,
                                             color_map=CUT_COLOURS)
        with gr.Row():  # side by side; one above the other where the page is narrow
            out["long_chunks"] = gr.HighlightedText(
                label="Plain: a cut every 75 tokens", show_legend=True, color_map=KIND_COLOURS,
                elem_id="lab-long-plain", min_width=320)
            out["long_webui"] = gr.HighlightedText(
                label="AUTOMATIC1111: back to a comma, BREAK", show_legend=True,
                color_map=KIND_COLOURS, elem_id="lab-long-webui", min_width=320)
        with gr.Accordion("Every position of every chunk", open=False):
            out["long_table"] = gr.Dataframe(headers=lab.CHUNK_HEADERS, interactive=False)
    with gr.Tab("Weighting") as weight_tab:
        gr.Markdown("`(word:1.3)` multiplies the embeddings of the word's tokens by 1.3, "
                    "`(word)` by 1.1, `[word]` divides by 1.1; brackets nest. Afterwards the "
                    "context's mean is restored.")
        with gr.Row():
            weight_text = gr.Textbox(label="Prompt", value=EXAMPLE_WEIGHTS[0], scale=4)
            weigh = gr.Button("Weigh", variant="primary", scale=1)
        gr.Examples([[text] for text in EXAMPLE_WEIGHTS], inputs=weight_text, label="Examples")
        out["weight_notes"] = gr.Markdown()
        out["weight_tokens"] = gr.HighlightedText(label="Tokens and weights (red: heavier, blue: "
                                                        "lighter)")
        out["weight_map"] = gr.Image(label="Weights and vector lengths", format="png",
                                     show_label=False, elem_id="lab-weight-map",
                                     elem_classes="titled")
        with gr.Accordion("The numbers", open=False):
            out["weight_table"] = gr.Dataframe(headers=lab.WEIGHT_HEADERS, interactive=False)
    with gr.Tab("Nearest tokens") as near_tab:
        gr.Markdown("Pick a token of the prompt: the vocabulary entries whose embeddings point "
                    "the same way, from the 49,408-row table CLIP starts from.")
        with gr.Row():
            near_text = gr.Textbox(label="Prompt", value=EXAMPLE_PAIRS[0][0], scale=3)
            position = gr.Dropdown([], label="Token", allow_custom_value=True, scale=2)
            k = gr.Slider(1, MAX_NEIGHBOURS, value=10, step=1, label="How many")
            find = gr.Button("Find", variant="primary", scale=1)
        out["nearest_notes"] = gr.Markdown()
        out["nearest_table"] = gr.Dataframe(headers=lab.NEAREST_HEADERS, interactive=False)

    def outputs(names: tuple[str, ...]) -> list:
        return [out[name] for name in names]

    def answer(names: tuple[str, ...], views: dict[str, object]) -> Iterator[dict]:
        return answer_once({out[name]: views.get(name) for name in names})

    def compare_handler(prompt_a, prompt_b, show_padding):
        views = compare_prompts(models, prompt_a, prompt_b, show_padding)
        yield from answer(COMPARE_OUTPUTS, views)

    def skip_handler(prompt):
        yield from answer(SKIP_OUTPUTS, clip_skip(models, prompt))

    def long_handler(prompt):
        yield from answer(LONG_OUTPUTS, long_prompt(models, prompt))

    def weight_handler(prompt):
        yield from answer(WEIGHT_OUTPUTS, weighting(models, prompt))

    def nearest_handler(prompt, token, count):
        yield from answer(NEAREST_OUTPUTS, nearest_tokens(models, prompt, token, count))

    def choices_handler(text):
        try:
            choices = token_choices(models, text)
        except ModelUnavailable:
            return gr.Dropdown(choices=[], value=None)
        first = choices[1][1] if len(choices) > 2 else choices[0][1]  # the first real token
        return gr.Dropdown(choices=choices, value=first)

    def opened_handler(text, chosen):  # a token chosen earlier stays chosen
        return choices_handler(text) if chosen in (None, "") else gr.skip()

    # Opening the lab, or one of its experiments, answers the prompts already filled in: the
    # first view is a result, not an empty box. Showing the same inputs again costs little (the
    # encoder's output is cached).
    opened = [pair_tab.select] + ([tab.select] if tab is not None else [])
    gr.on(opened, compare_handler, [prompt_a, prompt_b, padding], outputs(COMPARE_OUTPUTS),
          api_visibility="private", **model_event)
    gr.on([skip_tab.select], skip_handler, [skip_prompt], outputs(SKIP_OUTPUTS),
          api_visibility="private", **model_event)
    gr.on([long_tab.select], long_handler, [long_text], outputs(LONG_OUTPUTS),
          api_visibility="private")
    gr.on([weight_tab.select], weight_handler, [weight_text], outputs(WEIGHT_OUTPUTS),
          api_visibility="private", **model_event)
    gr.on([near_tab.select], opened_handler, [near_text, position], [position],
          api_visibility="private", show_progress="hidden").then(
        nearest_handler, [near_text, position, k], outputs(NEAREST_OUTPUTS),
        api_visibility="private", **model_event)
    gr.on([compare.click, prompt_a.submit, prompt_b.submit, padding.change], compare_handler,
          [prompt_a, prompt_b, padding], outputs(COMPARE_OUTPUTS), api_name="compare_prompts",
          **model_event)
    gr.on([skip.click, skip_prompt.submit], skip_handler, [skip_prompt], outputs(SKIP_OUTPUTS),
          api_name="clip_skip", **model_event)
    gr.on([split.click, long_text.submit], long_handler, [long_text], outputs(LONG_OUTPUTS),
          api_name="long_prompt")
    gr.on([weigh.click, weight_text.submit], weight_handler, [weight_text],
          outputs(WEIGHT_OUTPUTS), api_name="weighting", **model_event)
    gr.on([near_text.change], choices_handler, [near_text], [position], api_visibility="private",
          show_progress="hidden")
    gr.on([find.click, position.input, k.release], nearest_handler, [near_text, position, k],
          outputs(NEAREST_OUTPUTS), api_name="nearest_tokens", **model_event)
