"""The "Inside the UNet" section through gradio_client, on a small page that holds it with a
tiny in-process run: every endpoint refuses cleanly before a run and, after one, answers with
pictures that hold the probe's tensors (an independent ``sd_parts.UNetProbe`` call on the same
latent, made here)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gradio_client import Client

import sd_parts
from sd_parts import UNetProbe, unet_blocks
from tests.helpers.serve import local_client, picture, serving
from tests.helpers.unet_section import MODELS, PROMPT, SIZE, STEPS, made, section_page
from ui.models import Models, Settings
from ui.sections import unet_calls
from ui.shared import LABEL_ROOM
from ui.tabs import generate
from viz import unet
from viz.heatmap import colorize, pad


@pytest.fixture(scope="module")
def url():
    with serving(section_page()) as address:
        yield address


@pytest.fixture(scope="module")
def after_run(url) -> tuple[Client, object]:
    client = local_client(url, download_files=False)
    client.predict(STEPS, SIZE, api_name="/make_run")
    return client, made[-1]


def probed(record, step: int, queries=()) -> UNetProbe:
    """The step's UNet call made here, as the section should make it: DDIM feeds the latent as
    it is; guidance: the negative (empty) prompt, then the prompt."""
    pipe = MODELS.pipeline(True)
    blocks = unet_blocks(pipe.unet.config)
    probe = UNetProbe([b.path for b in blocks], queries=queries, cross_attention=True)
    latent = record.trace.latents[step - 1][None]
    context = pipe.encode_prompt(["", PROMPT])
    pipe.unet(torch.cat([latent] * 2), record.trace.timesteps[step - 1], context, probe=probe)
    return probe


def test_every_endpoint_refuses_cleanly_before_a_run(url, capfd):
    client = local_client(url, download_files=False)  # a session without a run
    status, diagram, table, *_ = client.predict(2, True, api_name="/unet_inside")
    assert status == unet_calls.NO_RUN and diagram is None
    assert table["data"] in ([], [[]]) or table is None
    note, channels, _ = client.predict("mid_block", 2, True, api_name="/unet_block")
    assert note.startswith("Generate an image first") and channels is None
    note, maps = client.predict(3, 4, 2, True, api_name="/self_attention")
    assert note.startswith("Generate an image first") and maps is None
    note, maps, heads = client.predict("cat", "", 2, True, api_name="/cross_attention")
    assert note.startswith("Generate an image first") and maps is None and heads is None
    note, plot, ranked = client.predict(None, "a cat", "", "", "", True,
                                        api_name="/denoising_loss")
    assert note.startswith("Upload an image, or generate one first") and plot is None
    assert "Traceback" not in "".join(capfd.readouterr())  # refused, not raised


def test_the_blocks_picture_holds_each_blocks_norms(after_run):
    client, record = after_run
    status, diagram, table, *_ = client.predict(2, True, api_name="/unet_inside")
    assert status.startswith(f"Step 2 of {STEPS}, timestep {record.trace.timesteps[1]:g}")
    probe = probed(record, 2)
    blocks = unet_blocks(MODELS.unet(True).config)
    outputs = {b.path: probe.outputs[b.path][1] for b in blocks}  # the text branch
    pixels = picture(diagram)
    slots = unet.diagram_slots(blocks, {p: tuple(v.shape) for p, v in outputs.items()})
    for slot in slots:
        norms = outputs[slot.path].double().norm(dim=0).numpy()
        expected = colorize(norms, unet.NORM_CMAP, 0.0, float(norms.max()))
        cells = slot.box.moved(LABEL_ROOM, 0).cells(pixels).astype(int)
        assert np.abs(cells - expected).max() <= 1, slot.path  # at most one colour step
    rows = {row[1]: row for row in table["data"]}
    assert list(rows) == [b.path for b in blocks]
    shares = [row[3] for row in rows.values()]
    assert all(s > 0 for s in shares) and sum(shares) <= 100.5  # measured, parts of the call
    assert rows["mid_block"][4] == pytest.approx(float(outputs["mid_block"].double().norm()),
                                                 rel=1e-4)


def test_a_decoder_block_shows_its_channels_and_the_skip_against_the_input_it_got(after_run):
    client, record = after_run
    note, channels, stats = client.predict("up_blocks.1", 2, True, api_name="/unet_block")
    probe = probed(record, 2)
    output = probe.outputs["up_blocks.1"][1].double()
    got = np.array([row[1:] for row in stats["data"]], dtype=float)
    np.testing.assert_allclose(got[:, 0], output.flatten(1).mean(1).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got[:, 3], output.flatten(1).max(1).values.numpy(), rtol=1e-4)
    # the first resnet's real input, caught by a hook, split into its two halves
    model = MODELS.unet(True)
    seen = []
    hook = model.up_blocks[1].resnets[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0][1:].clone()))
    try:
        probed(record, 2)
    finally:
        hook.remove()
    below_channels = model.up_blocks[0].resnets[0].conv1.out_channels
    below = float(seen[0][:, :below_channels].double().norm())
    skip = float(seen[0][:, below_channels:].double().norm())
    assert f"||{below:.4g}||, skip ||{skip:.4g}||" in note
    assert picture(channels).shape[1] > 200


def test_self_attention_of_a_clicked_position_is_the_probes(after_run):
    client, record = after_run
    x, y = 21, 9  # pixels of the 32 x 32 image: latent (row 4, col 10) of 16 x 16
    note, maps = client.predict(x, y, 2, True, api_name="/self_attention")
    assert note.startswith("Latent position (row 4, col 10) of 16 x 16")
    probe = probed(record, 2, queries=[(4, 10)])
    sizes = {p: (int(np.sqrt(v.shape[-1])),) * 2 for p, v in probe.self_attention.items()}
    rows = {p: v[1, :, 0] for p, v in probe.self_attention.items()}
    expected = unet.attention_grid(record.image, unet.self_attention_maps(rows, sizes),
                                   ((x + 0.5) / SIZE, (y + 0.5) / SIZE))
    got = picture(maps).astype(int)
    want = pad(expected, top=LABEL_ROOM).pixels.astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_a_word_is_drawn_from_the_probes_cross_attention(after_run):
    client, record = after_run
    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    note, maps, heads = client.predict("cat", layer, 2, True, api_name="/cross_attention")
    probe = probed(record, 2)
    probs = probe.cross_attention[layer][1]
    expected = unet.attention_grid(record.image, unet.head_maps(probs, (16, 16), [2]))
    got = picture(heads).astype(int)
    want = pad(expected, top=LABEL_ROOM).pixels.astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    layers = len(probe.cross_attention) + 1  # and the run's own map
    assert len(unet.attention_grid(record.image, [("m", np.ones((2, 2)))] * layers).maps) \
        == layers and picture(maps).shape[0] > 300


def test_the_denoising_loss_streams_each_call_and_ranks_the_captions(after_run):
    client, _ = after_run
    job = client.submit(None, "a cat on a mat", "a dog", "", "", True,
                        api_name="/denoising_loss")
    note, plot, ranked = job.result(timeout=120)
    progress = [out[0] for out in job.outputs()[:-1]]
    assert [p.split(" (")[0] for p in progress] == [f"UNet call {i} of 10" for i in
                                                    range(1, 11)]
    assert note.startswith("Done: 10 timesteps, 3 prompts")
    assert sorted(row[1] for row in ranked["data"]) == ["(empty prompt)", "a cat on a mat",
                                                        "a dog"]
    means = [row[2] for row in ranked["data"]]
    assert means == sorted(means)
    assert picture(plot).shape[1] > 300


def test_the_probed_call_is_made_once_per_step(after_run, monkeypatch):
    client, record = after_run
    calls = []
    model = MODELS.unet(True)
    original = sd_parts.UNet2DConditionModel.forward
    monkeypatch.setattr(sd_parts.UNet2DConditionModel, "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    client.predict(3, True, api_name="/unet_inside")
    client.predict("mid_block", 3, True, api_name="/unet_block")
    client.predict(5, 5, 3, True, api_name="/self_attention")
    assert len(calls) == 1 and model is MODELS.unet(True)


def test_stop_ends_the_denoising_loss_after_the_current_call(after_run):
    _, record = after_run
    from PIL import Image

    stop = threading.Event()
    stop.set()  # pressed while the first call runs
    answers = list(unet_calls.denoising_losses(MODELS, Image.fromarray(record.image),
                                                ["a cat"], True, stop))
    assert answers[0] == (1, {}) and answers[-1][0] == 1
    assert [len(v) for v in answers[-1][1].values()] == [1, 1]  # the call it was making


def test_a_distilled_unet_is_probed_as_its_run_called_it(tmp_path):
    """An LCM UNet (time_cond_proj_dim) takes the guidance scale as an embedding and makes one
    pass on the prompt: the probed call of a step is that pass, equal to the run's own."""
    from tests.helpers.references import save_tiny_pipeline
    from ui.runs import GenerationRequest

    save_tiny_pipeline(tmp_path, distilled=True)
    models = Models(Settings(weights="hub", unet=str(tmp_path), vae=str(tmp_path / "vae"),
                             text_encoder=str(tmp_path), tokenizer=str(tmp_path / "tokenizer")))
    request = GenerationRequest(PROMPT, "", 2, 4.0, "lcm", False, 0, SIZE, SIZE, None, 0.8)
    *_, last = generate.generate(models, request, True, threading.Event())
    record = last["record"]
    probed = unet_calls.probe_step(models, record, 2, True)
    assert not probed.guided
    torch.testing.assert_close(probed.outputs["conv_out"][0], record.noise_text[1].float(),
                               rtol=1e-5, atol=1e-6)
    views = unet_calls.inside_views(models, probed, True)
    assert "guidance distilled into it" in views["status"] and views["guidance"] is None


def test_a_step_is_probed_on_the_input_its_sampler_scaled():
    """Euler scales the UNet's input by its sigma, which the sigma schedule sets: the probed
    call of a run with exponential sigmas is that run's own call, text branch and all."""
    from ui.runs import GenerationRequest

    request = GenerationRequest(PROMPT, "", 3, 7.5, "euler", False, 0, SIZE, SIZE, None, 0.8,
                                use_exponential_sigmas=True)
    *_, last = generate.generate(MODELS, request, True, threading.Event())
    record = last["record"]
    for step in (1, 2, 3):
        probed = unet_calls.probe_step(MODELS, record, step, True)
        assert probed.guided and probed.timestep == record.trace.timesteps[step - 1]
        torch.testing.assert_close(probed.outputs["conv_out"][1],
                                   record.noise_text[step - 1].float(), rtol=1e-5, atol=1e-6)
