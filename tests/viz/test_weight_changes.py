"""The weight-change views read back the norms computed from two state dicts: each UNet block's
tile and each text-encoder layer's cell has the colour of sqrt(Σ ||ΔW||²) / sqrt(Σ ||W||²) over
that block's weights, computed here independently; the table ranks the layers by it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd_parts import TINY_CLIP, TINY_UNET, CLIPTextEncoder, UNet2DConditionModel, unet_blocks
from sd_parts.lora import LoraLayer, lora_deltas
from viz import weight_changes as view
from viz.heatmap import MASKED

# (part, weight, factor): the fine-tune moves these weights by factor x a random tensor of them
MOVED = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", 0.3),
         ("unet", "down_blocks.0.resnets.0.conv1.weight", 0.01),
         ("unet", "mid_block.resnets.1.conv2.weight", 0.1),
         ("unet", "up_blocks.1.attentions.0.proj_out.weight", 0.02),
         ("text_encoder", "encoder.layers.1.self_attn.out_proj.weight", 0.05)]


@pytest.fixture(scope="module")
def states() -> dict[str, tuple[dict, dict]]:
    torch.manual_seed(0)
    models = {"unet": UNet2DConditionModel(TINY_UNET), "text_encoder": CLIPTextEncoder(TINY_CLIP)}
    generator = torch.Generator().manual_seed(1)
    pairs = {}
    for part, model in models.items():
        base = {k: v.clone() for k, v in model.state_dict().items()}
        new = {k: v.clone() for k, v in base.items()}
        for moved_part, name, factor in MOVED:
            if moved_part == part:
                new[name] = new[name] + factor * torch.randn(new[name].shape, generator=generator)
        pairs[part] = base, new
    return pairs


def expected_block(base: dict, new: dict, prefix: str) -> float:
    """By hand: over every floating tensor whose name starts with ``prefix``."""
    names = [n for n in base if n.startswith(prefix) and base[n].is_floating_point()]
    change = math.sqrt(sum(float((new[n].double() - base[n].double()).norm()) ** 2 for n in names))
    size = math.sqrt(sum(float(base[n].double().norm()) ** 2 for n in names))
    return change / size


def test_the_unet_diagram_and_text_encoder_cells_read_back_the_norms(states):
    changes = {part: view.state_changes(part, *states[part]) for part in states}
    norms = {part: view.weight_norms(states[part][0]) for part in states}
    blocks = {part: view.block_changes(changes[part], norms[part], part) for part in states}
    limits = view.log_limits([b.relative for of in blocks.values() for b in of.values()])
    base, new = states["unet"]
    drawn_blocks = unet_blocks(TINY_UNET)
    picture = view.unet_change_diagram(drawn_blocks, blocks["unet"], limits, "test")
    assert len(picture.maps) == len(drawn_blocks)
    moved_blocks = {"down_blocks.0", "mid_block", "up_blocks.1"}
    for block, box in zip(drawn_blocks, picture.maps, strict=True):
        value = expected_block(base, new, block.path + ".")
        assert blocks["unet"][block.path].relative == pytest.approx(value, rel=1e-9)
        # a pixel of the tile off its centre, where the number is written
        pixel = picture.pixels[box.top + 4, box.left + 4]
        if block.path in moved_blocks:
            assert value > 0
            np.testing.assert_array_equal(pixel, view.change_colour(value, limits))
        else:
            assert value == 0
            np.testing.assert_array_equal(pixel, MASKED)
    assert blocks["unet"]["down_blocks.0"].changed == 2
    # the text encoder: embeddings, layer 0, layer 1, final norm; only layer 1 moved
    base, new = states["text_encoder"]
    row = view.text_encoder_change_view(blocks["text_encoder"], TINY_CLIP.num_hidden_layers,
                                        limits)
    cells = row.maps[0].cells(row.pixels)[0]
    assert len(cells) == TINY_CLIP.num_hidden_layers + 2
    value = expected_block(base, new, "encoder.layers.1.")
    np.testing.assert_array_equal(cells[2], view.change_colour(value, limits))
    assert all((cells[i] == MASKED).all() for i in (0, 1, 3))


def test_the_table_ranks_the_layers_by_their_relative_change(states):
    changes = [c for part in states for c in view.state_changes(part, *states[part])]
    rows = view.largest_changes(changes)
    assert len(rows) == len(MOVED)
    by_name = {row[4]: row for row in rows}
    for part, name, _ in MOVED:
        base, new = states[part]
        relative = float((new[name] - base[name]).double().norm() / base[name].double().norm())
        assert by_name[name][1] == pytest.approx(relative, rel=1e-3)
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)
    kinds = {row[4]: row[2] for row in rows}
    assert kinds[MOVED[0][1]] == "cross-attention k/v"
    assert kinds[MOVED[1][1]] == "resblock conv"
    assert kinds[MOVED[4][1]] == "text attention out"


def test_a_lora_change_is_scale_alpha_over_rank_times_b_a():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(TINY_UNET).requires_grad_(False)
    module = "down_blocks.0.resnets.0.conv1"
    weight = unet.get_submodule(module).weight  # (out, in, 3, 3)
    down = torch.randn(4, weight.shape[1], 3, 3)
    up = torch.randn(weight.shape[0], 4, 1, 1)
    layer = LoraLayer("unet", module, down, up, 2.0, "test")
    deltas = lora_deltas([layer], {"unet": unet}, scale=0.5)
    (change,) = view.delta_changes("unet", {f"{module}.weight": weight},
                                   {k.removeprefix("unet."): v for k, v in deltas.items()})
    by_hand = 0.5 * (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).view(weight.shape)
    assert change.relative == pytest.approx(float(by_hand.norm() / weight.norm()), rel=1e-5)


def test_state_dicts_of_two_architectures_are_refused_by_name(states):
    base, new = states["unet"]
    odd = dict(new)
    odd["extra.weight"] = torch.zeros(1)
    odd["conv_in.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"extra\.weight.*conv_in\.weight"):
        view.state_changes("unet", base, odd)
