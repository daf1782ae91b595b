"""A small page that holds the "Inside the UNet" section with a tiny in-process run, as the
generation tab holds it: for the section's gradio_client and browser tests."""

from __future__ import annotations

import threading

import gradio as gr

from ui.models import Models, Settings
from ui.runs import GenerationRequest
from ui.sections import unet_inside
from ui.tabs import generate

MODELS = Models(Settings(weights="tiny"))
SIZE, STEPS, PROMPT = 32, 3, "a cat on a mat"
made: list = []  # the records the page's run made, for the expected values


def run_record(steps: int = STEPS, size: int = SIZE):
    request = GenerationRequest(PROMPT, "", steps, 7.5, "ddim", False, 0, size, size, None, 0.8)
    *_, last = generate.generate(MODELS, request, True, threading.Event())
    return last["record"]


def section_page(models: Models = MODELS, size: int = SIZE) -> gr.Blocks:
    """The section around a record State, an exact box and a scrubber, as the generation tab
    holds it; "make_run" fills the record with a tiny run."""
    with gr.Blocks(delete_cache=models.settings.delete_cache) as demo:
        record = gr.State(None)
        exact = gr.Checkbox(True, label="Exact mode (float32)")
        scrubber = gr.Slider(0, 10, value=2, step=1, label="Step", elem_id="step-scrubber")
        make = gr.Button("Make a run", elem_id="make-run")
        status = gr.Markdown(elem_id="make-status")

        def make_run(steps: float, size: float):
            made.append(run_record(int(steps), int(size)))
            return made[-1], f"A run of {made[-1].steps} steps."

        steps_box = gr.Number(STEPS, visible=False)
        size_box = gr.Number(size, visible=False)
        make.click(make_run, [steps_box, size_box], [record, status], api_name="make_run")
        unet_inside.build(models, record, exact, scrubber)
    return demo
