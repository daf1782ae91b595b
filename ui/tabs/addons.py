"""Tab "What changed": a LoRA, a second checkpoint or a textual inversion, and what it changes.

Three endpoints: ``load_addon`` loads one add-on for this visitor (``ui.addons``: on a copy of the
shared models, released when the session ends); ``weight_changes`` draws which blocks and layers
it changed and by how much (``viz.weight_changes``), or for a learned token its nearest
vocabulary tokens and its length among the vocabulary's (``viz.addons``); ``with_and_without``
runs the same prompt, seed and sampler with and without it, side by side. The functions here
turn UI values into arguments and return a dict keyed by output name; ``build`` lays the tab out.
"""

from __future__ import annotations

import math
import weakref

import gradio as gr
import torch

import sd_parts
from sd_parts.unet_probe import unet_blocks
from ui import addons
from ui.addons import AddOn
from ui.models import Models
from ui.shared import REFUSED, failure, literal, random_banner, send
from viz import addons as runs_view
from viz import diffusion
from viz import weight_changes as changes_view
from viz.pixels import images_to_pixels
from viz.tokens import readable_pieces

TITLE = "What changed"
LOAD_OUTPUTS = ("load_status",)
CHANGE_OUTPUTS = ("change_reading", "unet_changes", "text_changes", "largest", "blocks",
                  "token_use", "neighbours", "token_norms")
RUN_OUTPUTS = ("run_status", "image_without", "image_with", "difference", "strips", "word_maps")
TOKEN_COLOURS = {"learned": "red", "token": "blue"}
EXAMPLE_PROMPT = "a photograph of an astronaut riding a horse"
MAX_STEPS = 50
NEIGHBOURS = 8
STRIP_FRAMES = 4


def no_addon(status: str, names: tuple[str, ...]) -> dict[str, object]:
    return failure(names, status, "Load an add-on first (above): a LoRA, a textual inversion "
                                  "or a second checkpoint.")


def load(models: Models, addon: AddOn | None, kind: str, upload: str | None, source: str,
         token: str, scale: float, exact: bool) -> tuple[AddOn | None, dict[str, object]]:
    """This visitor's new add-on (the one before released first) and the status line."""
    try:
        where = addons.source_of(upload, source)
        addons.release(addon)
        loaded = addons.load_addon(models, kind, where, token, float(scale), bool(exact))
    except REFUSED as exc:
        message = str(exc)
        if (source or "").strip() == addons.LCM_LORA and not upload:
            message = (f"The LCM-LoRA ({addons.LCM_LORA}) cannot be fetched: {message} Without "
                       "the Hub, download its pytorch_lora_weights.safetensors elsewhere and "
                       "upload it here.")
        return None, failure((), "load_status", message)
    note = f" {loaded.dtype_note}" if loaded.dtype_note else ""
    mode = "float32" if exact else "fast mode (bfloat16 where the CPU has it)"
    text = (f"**Loaded {loaded.kind}:** {literal(loaded.summary)}.{literal(note)} The base "
            f"models run in {mode}; the add-on is applied to this session's copy of them and "
            "released when you leave the page.")
    return loaded, {"load_status": text}


# The shared models' ||W||, for the blocks' denominators; weakly held, so that a model the
# app lets go (another mode loaded) is not kept alive here.
_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_norms(module: torch.nn.Module) -> dict[str, float]:
    if module not in _NORMS:
        _NORMS[module] = changes_view.weight_norms(module.state_dict())
    return _NORMS[module]


def layer_changes(addon: AddOn) -> list[changes_view.LayerChange]:
    """Every changed weight of the add-on against the base, with its norms."""
    base = addon.base
    if addon.kind == "LoRA":
        models = {"unet": base.unet, "text_encoder": base.text_encoder}
        changes = []
        for part, model in models.items():
            layers = [layer for layer in addon.layers if layer.part == part]
            deltas = sd_parts.lora_deltas(layers, models, addon.scale)
            prefix = f"{part}."
            deltas = {name.removeprefix(prefix): d for name, d in deltas.items()}
            weights = {name: model.get_submodule(name.removesuffix(".weight")).weight
                       for name in deltas}
            changes += changes_view.delta_changes(part, weights, deltas)
        return changes
    if addon.cached_changes is None:  # a fine-tune: every weight against the base's
        addon.cached_changes = [
            change for part in ("unet", "text_encoder")
            for change in changes_view.state_changes(part, getattr(base, part).state_dict(),
                                                     getattr(addon.pipe, part).state_dict())]
    return addon.cached_changes


def weight_views(addon: AddOn | None, scale: float) -> dict[str, object]:
    """The weight-change views of the add-on, at ``scale`` for a LoRA."""
    if addon is None:
        return no_addon("change_reading", CHANGE_OUTPUTS)
    if addon.kind == "textual inversion":
        return token_views(addon)
    try:
        with addon.lock:
            addons.set_scale(addon, float(scale))
            changes = layer_changes(addon)
    except REFUSED as exc:
        return failure(CHANGE_OUTPUTS, "change_reading", str(exc))
    base = addon.base
    norms = {part: model_norms(getattr(base, part)) for part in ("unet", "text_encoder")}
    blocks = {part: changes_view.block_changes(changes, norms[part], part) for part in norms}
    limits = changes_view.log_limits([b.relative for of in blocks.values() for b in of.values()])
    what = f"{addon.kind} {addon.name}" + (f" at scale {addon.scale:g}" if addon.lora else "")
    total = sum(len(n) for n in norms.values())
    dtypes = {str(next(pipe.unet.parameters()).dtype) for pipe in (base, addon.pipe)}
    reading = changes_view.kinds_reading(changes, total)
    if len(dtypes) > 1:
        reading += (f" The base and the checkpoint are in different dtypes ({', '.join(dtypes)})"
                    ": bfloat16's rounding counts as a change in every weight; tick Exact mode.")
    return {
        "change_reading": literal(f"What {what} changes: {reading}"),
        "unet_changes": changes_view.unet_change_diagram(
            unet_blocks(base.unet.config), blocks["unet"], limits,
            f"The UNet's blocks: ||ΔW|| / ||W|| over each block's weights ({what})"),
        "text_changes": changes_view.text_encoder_change_view(
            blocks["text_encoder"], base.text_encoder.config.num_hidden_layers, limits),
        "largest": {"headers": changes_view.TABLE_HEADERS,
                    "data": changes_view.largest_changes(changes)},
        "blocks": {"headers": changes_view.BLOCK_HEADERS,
                   "data": changes_view.block_rows(blocks)},
    }


def token_views(addon: AddOn) -> dict[str, object]:
    """A learned token: how a prompt reads it, its nearest vocabulary tokens, its norms."""
    embedding = addon.embedding
    table = addon.base.text_encoder.embeddings.token_embedding.weight
    pieces = addon.base.tokenizer.convert_ids_to_tokens(range(table.shape[0]))
    percent = runs_view.norm_percentiles(table, embedding.vectors)
    lengths = ", ".join(f"{token} {float(v.norm()):.3g} (longer than {p:.0f}% of the vocabulary)"
                        for token, v, p in zip(embedding.tokens, embedding.vectors.float(),
                                               percent, strict=True))
    prompt = f"a photo of {embedding.token}"
    used = addon.pipe.tokenizer.tokenize(prompt)
    learned = set(embedding.tokens)
    return failure(CHANGE_OUTPUTS, "change_reading", "") | {
        "change_reading": literal(
            f"A textual inversion changes no weight: it adds {len(embedding.tokens)} row(s) to "
            f"the token embedding table, one per vector. Lengths: {lengths}. In a prompt, "
            f"“{embedding.token}” becomes {len(embedding.tokens)} token(s), as below."),
        "token_use": [(text, "learned" if piece in learned else "token")
                      for text, piece in zip(readable_pieces(used), used, strict=True)],
        "neighbours": {"headers": runs_view.NEIGHBOUR_HEADERS,
                       "data": runs_view.embedding_neighbours(table, embedding.vectors,
                                                              embedding.tokens, pieces,
                                                              NEIGHBOURS)},
        "token_norms": runs_view.embedding_norms_figure(table, embedding.vectors,
                                                        embedding.tokens),
    }


def run_views(models: Models, addon: AddOn | None, prompt: str, negative: str, seed: float,
              steps: float, guidance: float, sampler: str, scale: float) -> dict[str, object]:
    """The same run without and with the add-on: images, difference, x0 strips, word maps."""
    if addon is None:
        return no_addon("run_status", RUN_OUTPUTS)
    names = ("base", "fine-tune") if addon.kind == "second checkpoint" else \
        ("without", f"with {addon.kind}")
    size = models.settings.generate_size
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (seed, steps, scale)):
        return failure(RUN_OUTPUTS, "run_status", f"Give the seed, the steps and the LoRA scale "
                       f"as numbers; got {seed!r}, {steps!r} and {scale!r}.")
    arguments = dict(prompt=prompt or "", negative_prompt=negative or "",
                     num_inference_steps=int(steps), guidance_scale=float(guidance),
                     height=size, width=size, scheduler=sampler, trace=True)
    try:
        with addon.lock:
            addons.set_scale(addon, float(scale))
            results = [pipe(generator=torch.Generator().manual_seed(int(seed)), **arguments)
                       for pipe in (addon.base, addon.pipe)]
    except REFUSED as exc:
        return failure(RUN_OUTPUTS, "run_status", str(exc))
    images = [images_to_pixels(r.images * 2 - 1) for r in results]
    chosen = diffusion.strip_steps(len(results[0].trace.pred_original), STRIP_FRAMES)
    strips = [x0_frames(pipe, result, chosen) for pipe, result in
              zip((addon.base, addon.pipe), results, strict=True)]
    groups = [diffusion.word_groups(pipe.tokenizer.tokenize(prompt or "")[:75],
                                    r.trace.word_maps.shape[1])
              for pipe, r in zip((addon.base, addon.pipe), results, strict=True)]
    scale_note = f" at scale {addon.scale:g}" if addon.lora else ""
    return {
        "run_status": literal(f"The same prompt, seed {int(seed)}, {sampler} sampler and "
                              f"{int(steps)} steps: {names[0]} and {names[1]}{scale_note}."),
        "image_without": images[0], "image_with": images[1],
        "difference": runs_view.difference_view(images[0], images[1], names),
        "strips": runs_view.strip_pair(strips, names, [f"step {i + 1}: x0" for i in chosen]),
        "word_maps": runs_view.word_map_comparison(groups[0], groups[1],
                                                   results[0].trace.word_maps[0],
                                                   results[1].trace.word_maps[0], names),
    }


def x0_frames(pipe: sd_parts.StableDiffusionPipeline, result: sd_parts.GenerationResult,
              chosen: list[int]) -> list:
    """The chosen steps' predicted clean latents, decoded by the run's own VAE."""
    return [diffusion.vae_image(pipe.vae, result.trace.pred_original[i]) for i in chosen]


# ---------------------------------------------------------------------------------------------
# The page


def build(models: Models, tab: gr.Tab) -> None:
    """The tab's layout and events, inside an open ``gr.Blocks``."""
    settings = models.settings
    if settings.random:
        gr.Markdown(random_banner(settings.weights), elem_classes="banner")
    gr.Markdown("Load a **LoRA** (kohya/AUTOMATIC1111 or diffusers/PEFT `.safetensors`), a "
                "**second checkpoint** (a fine-tune: one LDM `.safetensors` or a diffusers "
                "folder) or a **textual inversion**, and see which layers it changes and what "
                "it does to the same prompt and seed. It stays yours: other visitors never see "
                "it, and it is released when you leave.")
    state = gr.State(None, delete_callback=addons.release)
    out: dict[str, gr.components.Component] = {}
    with gr.Row():
        kind = gr.Radio(list(addons.KINDS), value="LoRA", label="What to load")
        exact = gr.Checkbox(False, label="Exact mode (float32)")
    with gr.Row():
        upload = gr.File(label="Upload a .safetensors file", file_types=[".safetensors"],
                         type="filepath", elem_id="addon-upload")
        with gr.Column():
            source = gr.Textbox(label="or a Hub repo id (a path on the server: only inside "
                                      f"the folders in {addons.ADDON_DIRS})",
                                placeholder=addons.LCM_LORA, elem_id="addon-source")
            token = gr.Textbox(label="Token (textual inversion; default: the file's)")
            with gr.Row():
                load_button = gr.Button("Load", variant="primary", elem_id="addon-load")
                preset = gr.Button("LCM-LoRA preset: LCM, 4 steps, guidance 1")
    out["load_status"] = gr.Markdown(elem_id="addon-status")
    gr.Markdown("### What changed in the weights")
    scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA scale (0: off, 1: as trained)",
                      elem_id="addon-scale")
    out["change_reading"] = gr.Markdown(elem_id="addon-reading")
    with gr.Column() as weights_view:  # a LoRA's or a fine-tune's changes
        out["unet_changes"] = gr.Image(label="UNet blocks", format="png", show_label=False,
                                       elem_id="addon-unet", elem_classes="titled")
        out["text_changes"] = gr.Image(label="Text encoder layers", format="png",
                                       show_label=False, elem_id="addon-text",
                                       elem_classes="titled")
        out["largest"] = gr.Dataframe(headers=changes_view.TABLE_HEADERS, interactive=False,
                                      label="The largest changes", elem_id="addon-largest")
        with gr.Accordion("Every block", open=False):
            out["blocks"] = gr.Dataframe(headers=changes_view.BLOCK_HEADERS, interactive=False)
    with gr.Column(visible=False) as token_view:  # a learned token's place in the vocabulary
        out["token_use"] = gr.HighlightedText(label="The learned token in a prompt",
                                              color_map=TOKEN_COLOURS, elem_id="addon-token-use")
        out["neighbours"] = gr.Dataframe(headers=runs_view.NEIGHBOUR_HEADERS, interactive=False,
                                         label="Nearest vocabulary tokens of each learned vector",
                                         elem_id="addon-neighbours")
        out["token_norms"] = gr.Image(label="Lengths", format="png", show_label=False,
                                      elem_id="addon-token-norms")
    gr.Markdown("### The same run with and without")
    with gr.Row():
        prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt", scale=3, elem_id="addon-prompt")
        negative = gr.Textbox("", label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, minimum=0)
        steps = gr.Slider(1, MAX_STEPS, value=4 if settings.weights == "tiny" else 20, step=1,
                          label="Steps")
        guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance")
        sampler = gr.Dropdown(list(sd_parts.SAMPLERS), value="ddim", label="Sampler")
    run = gr.Button("Run with and without", variant="primary", elem_id="addon-run")
    out["run_status"] = gr.Markdown(elem_id="addon-run-status")
    with gr.Row():
        out["image_without"] = gr.Image(label="Without", format="png", elem_id="addon-without")
        out["image_with"] = gr.Image(label="With", format="png", elem_id="addon-with")
    out["difference"] = gr.Image(label="Difference", format="png", show_label=False,
                                 elem_id="addon-difference", elem_classes="titled")
    out["strips"] = gr.Image(label="x0 step by step", format="png", show_label=False,
                             elem_id="addon-strips", elem_classes="titled")
    out["word_maps"] = gr.Image(label="Word maps", format="png", show_label=False,
                                elem_id="addon-word-maps", elem_classes="titled")

    def shown(addon, text):
        """The views of what was loaded (weight changes, or a learned token), the scale for a
        LoRA only, the last run's views emptied (they showed the add-on before); a learned
        token put into the prompt, so that the run uses it."""
        token = addon.embedding.token if addon is not None and addon.embedding else None
        used = gr.skip() if token is None or token in (text or "").lower() else \
            f"{text.rstrip()}, {token}" if text and text.strip() else f"a photo of {token}"
        lora = addon is not None and addon.lora is not None
        return (gr.Column(visible=token is None), gr.Column(visible=token is not None), used,
                gr.Slider(visible=lora), *([None] * len(RUN_OUTPUTS)))

    def outputs(names: tuple[str, ...]) -> list:
        return [out[name] for name in names]

    # the handlers' parameter names are the endpoints' (diffusers' where it has one)
    def load_handler(addon, kind, file, source, token, lora_scale, exact):
        loaded, views = load(models, addon, kind, file, source, token, lora_scale, exact)
        yield from send([views | {"state": loaded}], out | {"state": state})

    def changes_handler(addon, lora_scale):
        yield from send([weight_views(addon, lora_scale)], out)

    def run_handler(addon, prompt, negative_prompt, seed, num_inference_steps, guidance_scale,
                    scheduler, lora_scale):
        views = run_views(models, addon, prompt, negative_prompt, seed, num_inference_steps,
                          guidance_scale, scheduler, lora_scale)
        yield from send([views], out)

    model_event = {"concurrency_id": "models", "concurrency_limit": 1}
    private = {"api_visibility": "private"}
    load_inputs = [state, kind, upload, source, token, scale, exact]
    run_inputs = [state, prompt, negative, seed, steps, guidance, sampler, scale]
    load_outputs = [*outputs(LOAD_OUTPUTS), state]

    def after_loading(event: gr.events.Dependency, api_name: str | None) -> None:
        """Show the views of what was loaded, then its weight changes."""
        named = {"api_name": api_name} if api_name else private
        event.then(shown, [state, prompt], [weights_view, token_view, prompt, scale,
                                            *outputs(RUN_OUTPUTS)], show_progress="hidden",
                   **private).then(changes_handler, [state, scale], outputs(CHANGE_OUTPUTS),
                                   **named, **model_event)

    after_loading(gr.on([load_button.click], load_handler, load_inputs, load_outputs,
                        api_name="load_addon", **model_event), "weight_changes")
    # the LCM-LoRA preset: its repo id, the LCM sampler, 4 steps, guidance 1; then loading it
    preset_values = ("LoRA", None, addons.LCM_LORA, addons.LCM_PRESET["scheduler"],
                     addons.LCM_PRESET["num_inference_steps"],
                     addons.LCM_PRESET["guidance_scale"])
    after_loading(preset.click(lambda: preset_values, None,
                               [kind, upload, source, sampler, steps, guidance], **private)
                  .then(load_handler, load_inputs, load_outputs, **private, **model_event), None)
    # a run pair is generation work: it waits for the generation tab's runs, not for the
    # lighter model views
    run_event = {"concurrency_id": "generate", "concurrency_limit": 1}
    gr.on([run.click, prompt.submit], run_handler, run_inputs, outputs(RUN_OUTPUTS),
          api_name="with_and_without", **run_event)
    # a new scale: the changes measured again, then the run again
    scale.release(changes_handler, [state, scale], outputs(CHANGE_OUTPUTS), **private,
                  **model_event).then(run_handler, run_inputs, outputs(RUN_OUTPUTS), **private,
                                      **run_event)
