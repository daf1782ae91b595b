"""The "What changed" tab through gradio_client on the tiny app (its own server process): a LoRA
in kohya's layout with random non-zero A and B (``tests/helpers/addons.py``), a textual inversion
and a second checkpoint loaded with ``load_addon``; ``weight_changes`` against norms computed
here from the same files; ``with_and_without`` side by side; bad files refused, keys named."""

from __future__ import annotations

import weakref
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from safetensors.torch import save_file

import sd_parts
from tests.helpers.addons import LAYERS, base_pipeline, kohya_lora
from tests.helpers.references import save_tiny_pipeline
from tests.helpers.serve import in_process, local_client
from ui.models import Models, Settings
from ui.tabs import addons as tab


@pytest.fixture(scope="module")
def client(tiny_server):
    return local_client(tiny_server.url, download_files=str(tiny_server.folder / "add"))


def call(client: Client, api_name: str, names: tuple[str, ...], *args: object) -> dict:
    answer = client.predict(*args, api_name=api_name)
    return dict(zip(names, answer if len(names) > 1 else [answer], strict=True))


def load(client: Client, kind: str, source: str | Path, token: str = "", scale: float = 1.0,
         exact: bool = False) -> str:
    """A file is uploaded, as a visitor's is; a string is typed into the source box."""
    upload, typed = (handle_file(str(source)), "") if isinstance(source, Path) else (None, source)
    return call(client, "/load_addon", tab.LOAD_OUTPUTS, kind, upload, typed, token, scale,
                exact)["load_status"]


def run(client: Client, scale: float) -> dict:
    return call(client, "/with_and_without", tab.RUN_OUTPUTS, "a red cat", "", 3, 3, 7.5,
                "ddim", scale)


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_kohya_lora_is_measured_and_run_with_and_without(client, tmp_path):
    path = kohya_lora(tmp_path / "style.safetensors")
    status = load(client, "LoRA", path, scale=1.0)
    assert status.startswith("**Loaded LoRA:** style (kohya, scale 1): 5 layers")
    # the table's numbers, against ||scale (alpha / r) B A|| / ||W|| computed here from the file
    base = base_pipeline(False)
    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    layers, _, _ = sd_parts.read_lora(base, path)
    for scale in (1.0, 0.5):
        out = call(client, "/weight_changes", tab.CHANGE_OUTPUTS, scale)
        table = {row[4]: row for row in out["largest"]["data"]}
        assert len(table) == len(LAYERS)
        for name, delta in sd_parts.lora_deltas(layers, models, scale).items():
            part, module = name.split(".", 1)
            weight = models[part].get_submodule(module.removesuffix(".weight")).weight
            relative = float(delta.double().norm() / weight.double().norm())
            assert table[module][1] == pytest.approx(relative, rel=1e-3)
        assert out["unet_changes"] and out["text_changes"]
        assert "5 of" in out["change_reading"] and "resblock conv" in out["change_reading"]
        blocks = {(row[0], row[1]): row for row in out["blocks"]["data"]}
        assert blocks["UNet", "down_blocks.0"][3] == 2 and blocks["UNet", "up_blocks.0"][3] == 0
    with_lora = run(client, 1.0)
    assert "without and with LoRA at scale 1." in with_lora["run_status"]
    without, with_ = pixels(with_lora["image_without"]), pixels(with_lora["image_with"])
    assert without.shape == with_.shape == (32, 32, 3)
    assert np.abs(without.astype(int) - with_.astype(int)).max() > 0
    # at scale 0 the copy's weights are the base's again: the same image, bit for bit
    off = run(client, 0.0)
    np.testing.assert_array_equal(pixels(off["image_with"]), pixels(off["image_without"]))
    np.testing.assert_array_equal(pixels(off["image_without"]), without)
    for name in ("difference", "strips", "word_maps"):
        assert pixels(off[name]).size > 0
    bad = call(client, "/with_and_without", tab.RUN_OUTPUTS, "a red cat", "", None, 3, 7.5,
               "ddim", 1.0)
    assert "Give the seed, the steps and the LoRA scale as numbers; got None" in bad["run_status"]
    assert bad["image_with"] is None and bad["word_maps"] is None


@pytest.mark.parametrize(("extra", "named"), [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.ones(2, 2)},
     "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"),
    ({"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(4, 32),
      "lora_unet_no_such_block_to_q.lora_up.weight": torch.ones(32, 4)},
     "lora_unet_no_such_block_to_q.lora_down.weight"),
])
def test_bad_lora_files_are_refused_naming_the_keys(client, tmp_path, extra, named):
    status = load(client, "LoRA", kohya_lora(tmp_path / "bad.safetensors", extra))
    assert "Could not load the LoRA" in status and named.replace("_", "\\_") in status
    out = call(client, "/weight_changes", tab.CHANGE_OUTPUTS, 1.0)
    assert out["change_reading"].startswith("Load an add-on first")



def test_paths_on_the_server_are_read_only_inside_the_listed_folders(client, tmp_path):
    """A visitor cannot read, or probe for, the server's files by typing their paths."""
    for typed in (str(kohya_lora(tmp_path / "there.safetensors")), "/etc/passwd",
                  str(tmp_path / "none.safetensors"), "ui/models.py"):
        status = load(client, "LoRA", typed)
        assert "read by path only inside the folders it was started with" in status, typed
        assert "SD\\_PARTS\\_ADDON\\_DIRS" in status


def test_the_lcm_lora_says_it_cannot_be_fetched_offline(client):
    status = load(client, "LoRA", tab.addons.LCM_LORA)
    assert status.startswith("The LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) cannot be "
                             "fetched")


def test_a_textual_inversion_shows_its_neighbours_and_use(client, tmp_path):
    vectors = torch.randn(2, sd_parts.TINY_CLIP.hidden_size, generator=torch.Generator()
                          .manual_seed(3))
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vectors}, path)
    status = load(client, "textual inversion", path)
    assert "&lt;cat-toy&gt; (diffusers layout): 2 vectors" in status
    out = call(client, "/weight_changes", tab.CHANGE_OUTPUTS, 1.0)
    rows = out["neighbours"]["data"]
    assert len(rows) == 2 * tab.NEIGHBOURS
    table = base_pipeline(False).text_encoder.embeddings.token_embedding.weight.float()
    similarity = torch.nn.functional.cosine_similarity(table, vectors[0][None].float())
    assert rows[0][0] == "<cat-toy>" and rows[0][4] == int(similarity.argmax())
    used = [item["class_or_confidence"] for item in out["token_use"]]
    assert used.count("learned") == 2
    assert out["token_norms"] and "changes no weight" in out["change_reading"]
    ran = call(client, "/with_and_without", tab.RUN_OUTPUTS, "a photo of <cat-toy>", "", 0, 2,
               7.5, "ddim", 1.0)
    assert pixels(ran["image_with"]).shape == (32, 32, 3)


def test_a_second_checkpoint_is_compared_weight_by_weight(tmp_path, monkeypatch):
    """A diffusers folder, named by its path inside the folders the operator listed."""
    save_tiny_pipeline(tmp_path)
    monkeypatch.setenv(tab.addons.ADDON_DIRS, str(tmp_path))
    with in_process(Settings(weights="tiny")) as url:
        client = local_client(url, download_files=str(tmp_path / "downloads"))
        missing = load(client, "second checkpoint", str(tmp_path / "nothing"))
        assert "nothing: no such file or folder." in missing
        status = load(client, "second checkpoint", str(tmp_path), exact=True)
        assert status.startswith("**Loaded second checkpoint:**") and "float32" in status
        out = call(client, "/weight_changes", tab.CHANGE_OUTPUTS, 1.0)
        ran = run(client, 1.0)
    base, tuned = base_pipeline(True), sd_parts.load_pipeline(str(tmp_path))
    blocks = {(row[0], row[1]): row[2] for row in out["blocks"]["data"]}
    for part, label in (("unet", "UNet"), ("text_encoder", "text encoder")):
        mine, theirs = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        names = [n for n in mine if n.startswith("mid_block." if part == "unet"
                                                  else "encoder.layers.0.")]
        change = sum(float((theirs[n].double() - mine[n].double()).norm()) ** 2 for n in names)
        size = sum(float(mine[n].double().norm()) ** 2 for n in names)
        block = "mid_block" if part == "unet" else "layers.0"
        assert blocks[label, block] == pytest.approx((change / size) ** 0.5, rel=1e-3)
    assert "base and fine-tune" in ran["run_status"]


def test_a_session_copy_shares_every_tensor_until_the_lora_replaces_it(tmp_path):
    """The shared models are never written: the copy's fused layers are its own tensors, the
    rest are the shared ones (no memory of their own)."""
    base = base_pipeline(False)
    before = {name: tensor.clone() for name, tensor in base.unet.state_dict().items()}
    pipe = tab.addons.session_pipeline(base)
    shared = {name: p.data_ptr() for name, p in base.unet.named_parameters()}
    assert {name: p.data_ptr() for name, p in pipe.unet.named_parameters()} == shared
    sd_parts.load_lora_weights(pipe, kohya_lora(tmp_path / "lora.safetensors"))
    own = {name for name, p in pipe.unet.named_parameters() if p.data_ptr() != shared[name]}
    assert own == {f"{module}.weight" for part, module in LAYERS if part == "unet"}
    assert all(torch.equal(before[name], tensor)
               for name, tensor in base.unet.state_dict().items())


def test_a_second_checkpoint_is_halved_when_memory_is_short():
    gib = 2**30
    assert tab.addons.checkpoint_dtype(4 * gib, 16 * gib)[0] == torch.float32
    dtype, note = tab.addons.checkpoint_dtype(4 * gib, 5 * gib)
    assert dtype == torch.bfloat16
    assert note.startswith("Loaded in bfloat16, half its float32 size of 4.00 GiB: only 5.0 GiB")
    with pytest.raises(ValueError, match="Not enough memory for a second checkpoint"):
        tab.addons.checkpoint_dtype(4 * gib, 2 * gib)


def test_the_session_copy_is_released_when_the_session_ends(tmp_path):
    """The tab's State hands its add-on to ``release`` when Gradio deletes the session's state;
    released, the copy with the fused weights is gone."""
    with gr.Blocks() as demo:
        tab.build(Models(Settings(weights="tiny")), None)
    states = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    assert [state.delete_callback for state in states] == [tab.addons.release]
    addon, _ = tab.load(Models(Settings(weights="tiny")), None, "LoRA",
                        str(kohya_lora(tmp_path / "lora.safetensors")), "", "", 1.0, False)
    copy = weakref.ref(addon.pipe.unet)
    tab.addons.release(addon)
    assert copy() is None
