"""LoRA files of both shared layouts, against a diffusers pipeline whose weights the test changed by
hand: W + scale * (alpha / rank) * B A. (diffusers' own load_lora_weights needs peft, which is not
installed here; the merged weights are an independent reference.) Then unloading, several LoRAs,
bad files, and the weight-change measures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_parts import WeightsError, load_pipeline
from sd_parts.lora import lora_changes, lora_deltas, read_lora, set_lora_scale
from sd_parts.weight_changes import layer_kind, weight_changes

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 32
RANK = 4
KOHYA_ALPHA = 2.0  # differs from the rank, so alpha / rank = 0.5 is tested

# (part, diffusers module name, kohya name or None for the module name with "_"): UNet attention,
# resblock convolutions (3x3 and 1x1) and text-encoder attention. Two kohya names are LDM's.
LAYERS = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", None),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
     "input_blocks_1_1_transformer_blocks_0_attn2_to_k"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", None),
    ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0", None),
    ("unet", "down_blocks.0.resnets.0.conv1", None),
    ("unet", "up_blocks.0.resnets.0.conv_shortcut", "output_blocks_0_0_skip_connection"),
    ("unet", "mid_block.resnets.1.conv2", None),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", None),
    ("text_encoder", "encoder.layers.1.self_attn.out_proj", None),
]


def lora_factors(models: dict[str, torch.nn.Module], seed: int = 0) -> dict[tuple, tuple]:
    """Random non-zero A (r, in[, kh, kw]) and B (out, r[, 1, 1]) for every layer of LAYERS."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for part, module, kohya in LAYERS:
        weight = models[part].get_submodule(module).weight
        kernel = tuple(weight.shape[2:])
        down = torch.randn(RANK, weight.shape[1], *kernel, generator=generator) * 0.2
        up = torch.randn(weight.shape[0], RANK, *(1,) * len(kernel), generator=generator) * 0.2
        factors[part, module, kohya] = down, up
    return factors


def diffusers_file(factors: dict, path: Path) -> Path:
    tensors = {}
    for (part, module, _), (down, up) in factors.items():
        name = f"unet.{module}" if part == "unet" else f"text_encoder.text_model.{module}"
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    save_file(tensors, path)
    return path


def kohya_file(factors: dict, path: Path) -> Path:
    tensors = {}
    for (part, module, kohya), (down, up) in factors.items():
        name = kohya or module.replace(".", "_")
        name = f"lora_unet_{name}" if part == "unet" else f"lora_te_text_model_{name}"
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(KOHYA_ALPHA)
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def pipes(tiny_folder: Path):  # noqa: F811
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder)
    reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference, load_pipeline(str(tiny_folder))


def reference_models(reference) -> dict[str, torch.nn.Module]:
    # transformers 5's CLIPTextModel has the layers at the top, as sd_parts names them
    return {"unet": reference.unet, "text_encoder": reference.text_encoder}


def generate_reference(reference) -> torch.Tensor:
    return reference(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images


def generate(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE,
                scheduler="ddim", generator=torch.Generator().manual_seed(0)).images


@torch.no_grad()
def merged_by_hand(reference, factors: dict, scale: float, alpha: float | None) -> dict:
    """Add scale * (alpha / rank) * B A to the reference's weights; return the old weights."""
    models = reference_models(reference)
    kept = {}
    for (part, module, _), (down, up) in factors.items():
        weight = models[part].get_submodule(module).weight
        kept[part, module] = weight.clone()
        delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape)
        weight += scale * ((alpha or RANK) / RANK) * delta
    return kept


@torch.no_grad()
def restore(reference, kept: dict) -> None:
    models = reference_models(reference)
    for (part, module), weight in kept.items():
        models[part].get_submodule(module).weight.copy_(weight)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_matches_merged_weights(pipes, tmp_path, layout):
    reference, pipe = pipes
    factors = lora_factors({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    writer, alpha = (diffusers_file, None) if layout == "diffusers" else (kohya_file, KOHYA_ALPHA)
    path = writer(factors, tmp_path / f"{layout}.safetensors")
    before_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = generate(pipe)
    for scale in (1.0, 0.5):
        summary = pipe.load_lora_weights(str(path), scale=scale)
        assert len(summary.layers) == len(LAYERS)
        assert {layer.rank for layer in summary.layers} == {RANK}
        assert {layer.alpha for layer in summary.layers} == {alpha or RANK}
        assert ("LDM" in summary.layout) == (layout == "kohya")
        ours = generate(pipe)
        kept = merged_by_hand(reference, factors, scale, alpha)
        try:
            expected = generate_reference(reference)
        finally:
            restore(reference, kept)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
        assert (ours - before).abs().max() > 1e-3  # the LoRA changed the image
        pipe.unload_lora_weights()
        after = generate(pipe)
        assert torch.equal(after, before)
        assert all(torch.equal(v, before_state[k]) for k, v in pipe.unet.state_dict().items())


def test_several_loras_and_their_scales(pipes, tmp_path):
    _, pipe = pipes
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    first = diffusers_file(lora_factors(models, seed=1), tmp_path / "first.safetensors")
    second = kohya_file(lora_factors(models, seed=2), tmp_path / "second.safetensors")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = pipe.unet.get_submodule(name).weight
    original = weight.detach().clone()
    deltas = [lora_deltas(read_lora(pipe, path)[0], models)[f"unet.{name}.weight"]
              for path in (first, second)]
    pipe.load_lora_weights(str(first), scale=1.0)
    only_first = pipe.unet.get_submodule(name).weight.detach().clone()
    torch.testing.assert_close(only_first, original + deltas[0])
    pipe.load_lora_weights(str(second), scale=0.5)
    torch.testing.assert_close(pipe.unet.get_submodule(name).weight,
                               original + deltas[0] + 0.5 * deltas[1])
    with pytest.raises(ValueError, match="loaded already"):
        pipe.load_lora_weights(str(second))
    set_lora_scale(pipe, "second", -1.0)
    torch.testing.assert_close(pipe.unet.get_submodule(name).weight,
                               original + deltas[0] - deltas[1])
    # each weight is fused again from the kept original: no rounding piles up
    pipe.unload_lora_weights("second")
    assert torch.equal(pipe.unet.get_submodule(name).weight, only_first)
    # what a LoRA would change, measured without applying it, against the weight before LoRAs
    changes = {c.name: c for c in lora_changes(pipe, second, scale=0.5)}
    change = changes[f"unet.{name}.weight"]
    assert change.kind == "attention q/k/v"
    assert change.relative == pytest.approx(float((0.5 * deltas[1]).norm() / original.norm()),
                                            rel=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(pipe.unet.get_submodule(name).weight, original)


def _pair(name: str, down: tuple, up: tuple) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.ones(down), f"{name}.lora_up.weight": torch.ones(up)}


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("tensors, message", [
    ({f"{Q}.hada_w1_a": torch.ones(4, 32), f"{Q}.hada_w1_b": torch.ones(4, 32)}, "LoHa"),
    ({f"{Q}.lokr_w1": torch.ones(4, 4), f"{Q}.lokr_w2": torch.ones(8, 8)}, "LoKr"),
    (_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (4, 1280), (1280, 4))
     | _pair(Q, (4, 32), (32, 4)), "SDXL LoRA.*lora_te2_text_model"),
    (_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (4, 2048),
           (32, 4)), "attn2_to_k.lora_down.weight: it was trained for SDXL"),
    (_pair("lora_unet_down_blocks_5_attentions_0_transformer_blocks_0_attn1_to_q", (4, 32),
           (32, 4)), "down_blocks_5_.*has no layer 'down_blocks.5.attentions"),
    (_pair(Q, (4, 33), (32, 4)), rf"{Q}.lora_down.weight: lora_down \(4, 33\).*do not fit"),
    (_pair(Q, (4, 32), (32, 3)), "do not fit the layer's weight"),
    ({f"{Q}.lora_down.weight": torch.ones(4, 32)}, f"{Q}.lora_down.weight: .*no up"),
    ({"unet.down_blocks.0.weird.weight": torch.ones(2)}, "not LoRA tensors.*weird"),
])
def test_bad_lora_files_are_refused(pipes, tmp_path, tensors, message):
    _, pipe = pipes
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(WeightsError, match=message):
        pipe.load_lora_weights(str(path))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_pickled_and_unreadable_files_are_refused(pipes, tmp_path):
    _, pipe = pipes
    pickled = tmp_path / "lora.ckpt"
    torch.save({"a": torch.ones(1)}, pickled)
    with pytest.raises(WeightsError, match="pickled"):
        pipe.load_lora_weights(str(pickled))
    renamed = tmp_path / "lora.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    with pytest.raises(WeightsError, match="pickled"):
        pipe.load_lora_weights(str(renamed))
    save_file({"a": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="lora.safetensors, other.safetensors: pass weight_name"):
        pipe.load_lora_weights(str(tmp_path))  # a folder with two files and no default name


def test_weight_changes_reads_back_the_norms():
    generator = torch.Generator().manual_seed(0)
    base = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 4),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": torch.randn(8, 8),
        "up_blocks.1.resnets.0.conv1.weight": torch.randn(4, 4, 3, 3, generator=generator),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias": torch.randn(16),
        "encoder.layers.0.self_attn.v_proj.weight": torch.randn(8, 8),
        "embeddings.position_ids": torch.arange(4),  # not a weight: left out
    }
    new = {name: (t + 0.1 * torch.randn(t.shape) if t.is_floating_point() else t)
           for name, t in base.items()}
    new["up_blocks.1.resnets.0.conv1.weight"] = base["up_blocks.1.resnets.0.conv1.weight"]
    changes = weight_changes(base, new)
    assert [c.name for c in changes] == list(base)[:-1]
    for change in changes:
        expected = (new[change.name] - base[change.name]).norm() / base[change.name].norm()
        assert change.relative == pytest.approx(float(expected), rel=1e-6)
    assert [c.kind for c in changes] == ["cross-attention k/v", "attention out", "resblock conv",
                                         "feed-forward", "text attention q/k/v"]
    assert changes[2].relative == 0
    with pytest.raises(ValueError, match="names in only one.*conv1"):
        weight_changes(base, {k: v for k, v in new.items() if "conv1" not in k})
    assert layer_kind("down_blocks.1.downsamplers.0.conv") == "resampling conv"


def test_older_diffusers_names_and_peft_metadata(pipes, tmp_path):
    """lora.down/lora.up, attention-processor and lora_linear_layer names read as the same layers;
    alpha from diffusers' lora_adapter_metadata (PEFT's lora_alpha and alpha_pattern)."""
    import json

    _, pipe = pipes
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    tensors = {
        f"{block}.attn1.to_q.lora.down.weight": torch.ones(2, 32),
        f"{block}.attn1.to_q.lora.up.weight": torch.ones(32, 2),
        f"{block}.attn2.processor.to_out_lora.down.weight": torch.ones(2, 32),
        f"{block}.attn2.processor.to_out_lora.up.weight": torch.ones(32, 2),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight":
            torch.ones(2, 32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight":
            torch.ones(64, 2),
    }
    metadata = {"unet.lora_alpha": 1, "unet.alpha_pattern": {"attn2.to_out.0": 3},
                "text_encoder.lora_alpha": 4}
    save_file(tensors, tmp_path / "old.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(metadata)})
    layers, _, _ = read_lora(pipe, tmp_path / "old.safetensors")
    found = {(layer.part, layer.module): layer.alpha for layer in layers}
    assert found == {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): 1.0,
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"): 3.0,
        ("text_encoder", "encoder.layers.0.mlp.fc1"): 4.0,
    }
    metadata["unet.use_dora"] = True
    save_file(tensors, tmp_path / "dora.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(WeightsError, match="unet.use_dora"):
        read_lora(pipe, tmp_path / "dora.safetensors")
