"""A run in the background (ui/runs.py): its events in order, a failure as an event, one run
per session, and a Stop that reaches a run in another process, as ZeroGPU's spaces.GPU puts it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from ui.models import Models, Settings
from ui.runs import (
    Failed,
    Finished,
    GenerationRequest,
    Started,
    Stepped,
    StopFlag,
    Stops,
    run_in_background,
)

MODELS = Models(Settings(weights="tiny"))


def request(steps: int = 3, **changes: object) -> GenerationRequest:
    settings = dict(prompt="a cat", negative_prompt="", num_inference_steps=steps,
                    guidance_scale=7.5, scheduler="ddim", use_karras_sigmas=False, seed=0,
                    width=32, height=32, image=None, strength=0.8) | changes
    return GenerationRequest(**settings)


def test_events_come_in_order_and_end_the_run(tmp_path):
    stops = Stops(tmp_path)
    events = list(run_in_background(MODELS.pipeline(True), request(), stops.begin("a")))
    kinds = [type(event) for event in events]
    assert kinds == [Started, Stepped, Stepped, Stepped, Finished]
    assert [event.state.index for event in events[1:4]] == [0, 1, 2]
    assert all(event.seconds >= 0 for event in events[1:4])
    assert not events[-1].result.stopped and events[-1].result.steps_done == 3


def test_a_failure_is_an_event(tmp_path):
    stops = Stops(tmp_path)
    events = list(run_in_background(MODELS.pipeline(True), request(width=33), stops.begin("a")))
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert "multiples of 2" in str(events[0].error)


def test_leaving_early_stops_the_worker(tmp_path):
    stops = Stops(tmp_path)
    flag = stops.begin("a")
    events = run_in_background(MODELS.pipeline(True), request(steps=50), flag)
    assert isinstance(next(events), Started)
    events.close()  # a client that went away: the worker is stopped and waited for
    assert flag.is_set()


def test_one_run_per_session(tmp_path):
    stops = Stops(tmp_path)
    assert stops.request("a") is False  # nothing running
    first = stops.begin("a")
    second = stops.begin("a")  # the same visitor starts again: the first run stops
    assert first.is_set() and not second.is_set()
    assert stops.request("a") is True and second.is_set()
    stops.end("a", second)
    assert stops.request("a") is False and not Path(second.path).exists()


def run_in_child(flag: StopFlag, steps: int, progress) -> None:
    """A run as ZeroGPU makes it: in another process, given the flag the server made."""
    torch.set_num_threads(1)
    for event in run_in_background(MODELS.pipeline(True), request(steps=steps), flag):
        if isinstance(event, Stepped):
            progress.put("step")
        elif isinstance(event, Finished):
            progress.put(("done", event.result.steps_done, event.result.stopped))


def test_stop_reaches_a_run_in_another_process(tmp_path):
    stops = Stops(tmp_path)  # the web server's process
    flag = stops.begin("visitor")
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    child = context.Process(target=run_in_child, args=(flag, 200, progress))
    child.start()
    try:
        assert progress.get(timeout=120) == "step"  # the run is going
        assert stops.request("visitor")  # Stop, pressed in the server's process
        while (item := progress.get(timeout=120)) == "step":
            pass
        done, steps_done, stopped = item
        assert done == "done" and stopped and steps_done < 200
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            pytest.fail("the child process did not end")
