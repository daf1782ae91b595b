"""Inside the UNet, in the generation tab: the accordion under the scrubber that opens one UNet
call of the run's step (``ui/sections/unet_calls.py`` makes the call and draws its views) block
by block, with its events: a block, a position or a word chosen, the denoising loss of an image.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import gradio as gr
from PIL import Image

from ui.encoding import MAX_PIXELS
from ui.models import Models
from ui.runs import RunRecord
from ui.sections.unet_calls import (
    LOSS_TIMESTEPS,
    block_views,
    chosen_step,
    cross_attention_views,
    denoising_losses,
    inside_views,
    probe_step,
    self_attention_views,
)
from ui.shared import LABEL_ROOM, REFUSED, failure, send
from viz import unet, upload

INTRO = """One UNet call, re-run at the step the scrubber stands on (1 … the run's steps) from the
latent that step fed it, with the negative prompt and the prompt (a batch of two) when the run was
guided. **Blocks**: each block's output as the L2 norm over its channels at every position
(viridis, 0 to that block's own largest norm), its shape C x h x w and its share of this call's
time, measured here (the recording included). Orange arrows are the skip connections. Click a
block (or choose it) for its channels; click the image for where that position looks in every
self-attention layer; choose a word for where it is looked at."""
INSIDE = ("status", "diagram", "table", "block", "image", "word", "layer", "guidance",
          "guidance_table", "timestep", "offsets")
BLOCK = ("block_note", "channels", "stats")
SELF = ("self_note", "self_maps")
CROSS = ("cross_note", "word_maps", "head_maps")
LOSS = ("loss_status", "loss_plot", "loss_table")


def _image(label: str, **options: object) -> gr.Image:
    return gr.Image(label=label, format="png", interactive=False, **options)


def _table(headers: list[str]) -> gr.Dataframe:
    return gr.Dataframe(headers=headers, interactive=False, wrap=True)


class UNetSection:
    """The accordion under the generation tab's scrubber, and its events."""

    def __init__(self, models: Models, record: gr.State, exact: gr.Checkbox,
                 scrubber: gr.Slider) -> None:
        self.models = models
        stops: dict[str, threading.Event] = {}
        with gr.Accordion("Inside the UNet: one step's call, block by block", open=False,
                          elem_id="unet-inside") as accordion:
            gr.Markdown(INTRO)
            look = gr.Button("Look inside the UNet at this step", elem_id="unet-look")
            out = {"status": gr.Markdown(elem_id="unet-status")}
            out["diagram"] = _image("The UNet at this step (click a block)",
                                    elem_id="unet-diagram")
            out["table"] = _table(["block", "checkpoint path", "shape", "time %", "L2 norm",
                                   "rms"])
            # the handlers check every value themselves and say what the choices are
            out["block"] = gr.Dropdown([], label="Block (or click it in the diagram)",
                                       elem_id="unet-block", allow_custom_value=True)
            blk = {"block_note": gr.Markdown(elem_id="unet-block-note"),
                   "channels": _image("Its first 64 channels, on one signed scale",
                                      elem_id="unet-channels"),
                   "stats": _table(["channel", "mean", "std", "min", "max"])}
            with gr.Row():
                out["image"] = _image("The run's image: click a position", elem_id="unet-image")
                with gr.Column():
                    with gr.Row():
                        x_box = gr.Number(None, precision=0, label="x (pixels)")
                        y_box = gr.Number(None, precision=0, label="y (pixels)")
                    where = gr.Button("Where does this position look?")
                    sa = {"self_note": gr.Markdown(elem_id="unet-self-note")}
            sa["self_maps"] = _image("Self-attention of the position, each layer at its own "
                                     "resolution (mean over heads)", elem_id="unet-self")
            with gr.Row():
                out["word"] = gr.Dropdown([], label="Word of the prompt", elem_id="unet-word",
                                          allow_custom_value=True)
                out["layer"] = gr.Dropdown([], label="Cross-attention layer, head by head",
                                           allow_custom_value=True)
            ca = {"cross_note": gr.Markdown()}
            ca["word_maps"] = _image("Cross-attention to the word, per layer (mean over heads), "
                                     "beside the run's map summed over layers and steps")
            ca["head_maps"] = _image("The chosen layer, head by head")
            out["guidance"] = _image("Where the text enters: the text branch against the "
                                     "unconditional one at each block's output")
            out["guidance_table"] = _table(["block", "||text - uncond|| / ||uncond||"])
            out["timestep"] = _image("The timestep: its sinusoids and the MLP's output")
            out["offsets"] = _image("Each residual block's time offset, ||offset|| / ||conv1 "
                                    "features||, at a few t (this step's features)")
            with gr.Group():
                gr.Markdown("**Denoising loss** of an image (the run's when none is uploaded) "
                            "under captions: E ||ε − ε_θ(x_t, t, caption)||² at ten timesteps, one "
                            "noise draw for all. A lower loss: the caption explains the image "
                            "better.")
                loss_image = gr.Image(type="filepath", label="Image (optional)",
                                      sources=["upload"])
                captions = [gr.Textbox(label=f"Caption {i + 1}") for i in range(4)]
                with gr.Row():
                    measure = gr.Button("Measure the loss")
                    stop = gr.Button("Stop")
                loss = {"loss_status": gr.Markdown(elem_id="unet-loss-status"),
                        "loss_plot": _image("Denoising loss against t"),
                        "loss_table": _table(["rank", "caption", "mean loss",
                                              "minus the empty prompt's"])}
        slots = gr.State(None)
        opened = gr.State(False)

        def unet_inside(run_record, step, exact):
            """The probed UNet call of a step: the blocks, their table, guidance and time.

            Args:
                step: the step whose UNet evaluation to open, 1 to the run's steps.
                exact: float32 numerics (else the fast dtype).
            """
            yield from send([self.inside(run_record, step, exact)], out | {"slots": slots})

        def unet_block(run_record, block, step, exact):
            """One block of the step's UNet call: its channels and their statistics.

            Args:
                block: the block's checkpoint path, e.g. "down_blocks.1" or "up_blocks.2".
                step: the step, 1 to the run's steps.
                exact: float32 numerics.
            """
            if not block and run_record is not None:
                yield {c: gr.skip() for c in blk.values()}
                return
            yield from send([self.answer(BLOCK, run_record, step, exact,
                                         lambda p: block_views(p, block))], blk)

        def self_attention(run_record, x, y, step, exact):
            """Where a position of the final image looks in every self-attention layer.

            Args:
                x: the position's column in the image, in pixels from the left.
                y: the position's row in the image, in pixels from the top.
                step: the step, 1 to the run's steps.
                exact: float32 numerics.
            """
            if x is None or y is None:
                yield {sa["self_note"]: "Click a position of the image.", sa["self_maps"]: None}
                return
            yield from send([self.answer(SELF, run_record, step, exact,
                                         lambda p: self_attention_views(p, x, y))], sa)

        def cross_attention(run_record, word, layer, step, exact):
            """Where a word of the prompt is looked at, layer by layer, and one layer's heads.

            Args:
                word: a word of the prompt, as the menu lists them ("<start>", "cat", ...).
                layer: an attn2 layer's path for the per-head maps ("" for none).
                step: the step, 1 to the run's steps.
                exact: float32 numerics.
            """
            if not word and run_record is not None:
                yield {c: gr.skip() for c in ca.values()}
                return
            yield from send([self.answer(
                CROSS, run_record, step, exact,
                lambda p: cross_attention_views(p, word, layer))], ca)

        def denoising_loss(run_record, image, caption_1, caption_2, caption_3, caption_4, exact,
                           request: gr.Request):
            """The denoising loss of an image against t for the empty prompt and up to four
            captions, and the captions ranked by mean loss; progress after every UNet call.

            Args:
                image: the image (None: the run's final image).
                caption_1: a caption ("" to leave it out).
                caption_2: a caption.
                caption_3: a caption.
                caption_4: a caption.
                exact: float32 numerics.
            """
            session = request.session_hash if request is not None else ""
            flag = stops[session] = threading.Event()
            texts = [c.strip() for c in (caption_1, caption_2, caption_3, caption_4)
                     if c and c.strip()]
            yield from send(self.losses(run_record, image, texts, exact, flag), loss)

        def pick_block(diagram_slots, event: gr.SelectData):
            x, y = event.index[0], event.index[1] - LABEL_ROOM
            path = next((s.path for s in diagram_slots or () if s.contains(x, y)), None)
            return gr.skip() if path is None else gr.Dropdown(value=path)

        def pick_position(event: gr.SelectData):
            return event.index[0], event.index[1]

        def stop_loss(request: gr.Request) -> str:
            flag = stops.get(request.session_hash if request is not None else "")
            if flag is None:
                return "Nothing is being measured."
            flag.set()
            return "Stopping after this UNet call..."

        unet = dict(concurrency_id="generate", concurrency_limit=1)
        inside_outputs = [*out.values(), slots]
        look.click(unet_inside, [record, scrubber, exact], inside_outputs, api_name="unet_inside",
                   **unet)
        def when_opened(run_record, step, exact):
            if run_record is None:  # nothing to open yet: the button says what to do
                yield {c: gr.skip() for c in inside_outputs}
                return
            yield from unet_inside(run_record, step, exact)

        def when_scrubbed(is_open, run_record, step, exact):
            if not is_open or run_record is None:  # closed: nothing runs
                yield {c: gr.skip() for c in inside_outputs}
                return
            yield from unet_inside(run_record, step, exact)

        accordion.expand(lambda: True, None, opened, api_visibility="private").then(
            when_opened, [record, scrubber, exact], inside_outputs, api_visibility="private",
            **unet)
        accordion.collapse(lambda: False, None, opened, api_visibility="private")
        scrubber.release(when_scrubbed, [opened, record, scrubber, exact], inside_outputs,
                         api_visibility="private", **unet)
        out["diagram"].select(pick_block, slots, out["block"], api_visibility="private")
        out["block"].change(unet_block, [record, out["block"], scrubber, exact],
                            list(blk.values()), api_name="unet_block", **unet)
        where.click(self_attention, [record, x_box, y_box, scrubber, exact], list(sa.values()),
                    api_name="self_attention", **unet)
        out["image"].select(pick_position, None, [x_box, y_box],
                            api_visibility="private").then(
            self_attention, [record, x_box, y_box, scrubber, exact], list(sa.values()),
            api_name="self_attention_clicked", api_visibility="private", **unet)
        gr.on([out["word"].change, out["layer"].change], cross_attention,
              [record, out["word"], out["layer"], scrubber, exact], list(ca.values()),
              api_name="cross_attention", **unet)
        measure.click(denoising_loss, [record, loss_image, *captions, exact],
                      list(loss.values()), api_name="denoising_loss", **unet)
        stop.click(stop_loss, None, loss["loss_status"], api_name="stop_denoising_loss",
                   queue=False)

    def inside(self, record: RunRecord | None, step: float | None, exact: bool
               ) -> dict[str, object]:
        try:
            probed = probe_step(self.models, record, chosen_step(record, step), bool(exact))
        except REFUSED as exc:
            return failure((*INSIDE, "slots"), "status", str(exc))
        return inside_views(self.models, probed, bool(exact))

    def answer(self, names: tuple[str, ...], record: RunRecord | None, step: float | None,
               exact: bool, views) -> dict[str, object]:
        """``views(probed)`` for the step's probed call; a REFUSED error fills names[0] only."""
        try:
            probed = probe_step(self.models, record, chosen_step(record, step), bool(exact))
            return views(probed)
        except REFUSED as exc:
            return failure(names, names[0], str(exc))

    def losses(self, record: RunRecord | None, path: str | None, captions: list[str],
               exact: bool, stop: threading.Event) -> Iterator[dict[str, object]]:
        try:
            if path:
                image = upload.load_image(path, MAX_PIXELS)
            elif record is not None and record.image is not None:
                image = Image.fromarray(record.image)
            else:
                raise ValueError("Upload an image, or generate one first: the loss is measured "
                                 "on the run's image when none is uploaded.")
            if not captions:
                raise ValueError("Write at least one caption to compare with the empty prompt.")
            losses: dict[str, list[float]] = {}
            for done, so_far in denoising_losses(self.models, image, captions, bool(exact),
                                                 stop):
                if so_far:
                    losses = so_far
                    break
                yield {"loss_status": f"UNet call {done} of {len(LOSS_TIMESTEPS)} (t = "
                                      f"{LOSS_TIMESTEPS[done - 1]}); Stop ends after the next."}
        except REFUSED as exc:
            yield failure(LOSS, "loss_status", str(exc))
            return
        if not losses or not next(iter(losses.values())):
            yield failure(LOSS, "loss_status", "Stopped before the first UNet call ended.")
            return
        measured = LOSS_TIMESTEPS[:len(next(iter(losses.values())))]
        ended = "Stopped" if len(measured) < len(LOSS_TIMESTEPS) else "Done"
        yield {"loss_status": f"{ended}: {len(measured)} timesteps, {len(losses)} prompts "
                              "in each UNet call.",
               "loss_plot": unet.loss_figure(measured, losses),
               "loss_table": unet.rank_captions(losses)}


def build(models: Models, record: gr.State, exact: gr.Checkbox, scrubber: gr.Slider
          ) -> UNetSection:
    """The section inside the generation tab's Blocks, reading its record, exact and scrubber."""
    return UNetSection(models, record, exact, scrubber)
