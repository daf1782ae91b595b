"""viz.unet: the diagram's geometry maps clicks to blocks, every picture holds the numbers it was
given (norms per position, guidance ratios as bar lengths), and the tables add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_parts import TINY_UNET, UNetConfig, unet_blocks
from viz import unet
from viz.heatmap import colorize


def outputs_for(config: UNetConfig, height: int, width: int, batch: int = 1,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random block outputs of the shapes a UNet of ``config`` gives at an h x w latent."""
    generator = torch.Generator().manual_seed(seed)
    blocks = unet_blocks(config)
    sizes = unet.level_sizes(height, width, len(config.block_out_channels))
    shapes = {}
    for block in blocks:
        level = block.level
        if block.path.startswith("down_blocks") and level < len(sizes) - 1:
            level += 1  # a down block ends with its stride-2 conv
        if block.path.startswith("up_blocks") and level > 0:
            level -= 1  # ... an up block with its upsampler
        shapes[block.path] = (block.channels, *sizes[level])
    return {p: torch.randn(batch, *s, generator=generator).squeeze(0) for p, s in shapes.items()}


def test_level_sizes_halve_odd_sides_as_stride_2_convs_do():
    assert unet.level_sizes(65, 64, 4) == [(65, 64), (33, 32), (17, 16), (9, 8)]


def test_a_click_on_a_block_names_that_block_and_between_blocks_none():
    config = UNetConfig()
    blocks = unet_blocks(config)
    outputs = outputs_for(config, 16, 16)
    diagram = unet.unet_diagram(blocks, outputs, {b.path: 0.1 for b in blocks})
    assert [s.path for s in diagram.slots] == [b.path for b in blocks]
    for slot in diagram.slots:
        box = slot.box
        # the middle of its picture, and the corners of its slot
        assert diagram.block_at(box.left + box.columns * box.cell_width // 2,
                                box.top + box.rows * box.cell_height // 2) == slot.path
        assert diagram.block_at(slot.left, slot.top) == slot.path
        assert diagram.block_at(slot.left + slot.width - 1, slot.top + slot.height - 1) \
            == slot.path
        assert diagram.block_at(slot.left + slot.width + 2, slot.top + 5) is None
    # the encoder goes down a level per block, the decoder back up: a U
    tops = {s.path: s.top for s in diagram.slots}
    assert tops["conv_in"] == tops["down_blocks.0"] == tops["up_blocks.3"] == tops["conv_out"]
    assert tops["down_blocks.0"] < tops["down_blocks.1"] < tops["down_blocks.2"] \
        < tops["down_blocks.3"] == tops["mid_block"] == tops["up_blocks.0"]
    assert unet.skip_pairs(blocks)[1:] == [("down_blocks.0", "up_blocks.3"),
                                           ("down_blocks.1", "up_blocks.2"),
                                           ("down_blocks.2", "up_blocks.1"),
                                           ("down_blocks.3", "up_blocks.0")]


def test_each_block_picture_is_its_per_position_norm_coloured():
    blocks = unet_blocks(TINY_UNET)
    outputs = outputs_for(TINY_UNET, 9, 12)  # odd and unequal sides
    diagram = unet.unet_diagram(blocks, outputs, {})
    # the geometry does not depend on what is written (the time shares)
    assert diagram.slots == unet.unet_diagram(blocks, outputs, {"conv_in": 0.5}).slots
    for slot in diagram.slots:
        norms = outputs[slot.path].double().norm(dim=0).numpy()
        np.testing.assert_allclose(unet.position_norms(outputs[slot.path]), norms)
        expected = colorize(norms, unet.NORM_CMAP, 0.0, float(norms.max()))
        assert (slot.box.rows, slot.box.columns) == norms.shape
        np.testing.assert_array_equal(slot.box.cells(diagram.picture.pixels), expected)


def test_the_table_gives_each_blocks_shape_time_and_norm():
    blocks = unet_blocks(TINY_UNET)
    outputs = outputs_for(TINY_UNET, 8, 8)
    rows = unet.block_table(blocks, outputs, {"mid_block": 0.25})
    mid = next(r for r in rows if r[1] == "mid_block")
    assert mid[2] == "64 x 4 x 4" and mid[3] == 25.0
    assert mid[4] == pytest.approx(float(outputs["mid_block"].double().norm()), rel=1e-4)


def test_the_guidance_bars_are_the_ratios_of_the_two_branches():
    generator = torch.Generator().manual_seed(1)
    outputs = {name: torch.randn(2, 3, 4, 4, generator=generator) for name in "abc"}
    outputs["b"][1] = outputs["b"][0] * 1.5  # text = 1.5 x uncond: ratio 0.5
    ratios = unet.guidance_ratios(outputs)
    assert ratios["b"] == pytest.approx(0.5)
    uncond, text = outputs["a"].double()
    assert ratios["a"] == pytest.approx(float((text - uncond).norm() / uncond.norm()))
    picture = unet.bar_chart(list(ratios), list(ratios.values()), "guidance")
    box = picture.maps[0]
    peak = max(ratios.values())
    for row, value in enumerate(ratios.values()):
        y = box.top + row * box.cell_height + box.cell_height // 2
        line = picture.pixels[y, box.left:box.left + box.cell_width]
        filled = int((line == unet.BAR).all(axis=-1).sum())
        assert filled == round(value / peak * box.cell_width)


def test_channel_statistics_and_the_skip_share():
    output = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    stats = unet.channel_statistics(output)
    assert stats[1][:2] == [1, pytest.approx(17.5)]
    assert stats[1][3:] == [12.0, 23.0]
    grid = unet.channel_grid(output)
    assert len(grid.maps) == 2  # one map per channel
    below, across, share = unet.skip_split(torch.full((2, 2), 3.0), torch.full((2, 2), 4.0))
    assert (below, across, share) == (6.0, 8.0, pytest.approx(0.64))


def test_attention_maps_are_laid_out_on_their_grid_and_summed_over_the_word():
    probs = torch.rand(2, 6, 5).softmax(-1)  # (heads, h*w = 2x3, T)
    [(title, values)] = unet.word_maps({"x.attentions.0.transformer_blocks.0.attn2": probs},
                                       {"x.attentions.0.transformer_blocks.0.attn2": (2, 3)},
                                       [1, 2])
    assert title == "x.attentions.0 (2x3)"
    np.testing.assert_allclose(values, probs[:, :, 1:3].double().sum(-1).mean(0).reshape(2, 3))
    heads = unet.head_maps(probs, (2, 3), [1, 2])
    np.testing.assert_allclose(heads[1][1], probs[1, :, 1:3].double().sum(-1).reshape(2, 3))
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    picture = unet.attention_grid(image, heads, columns=2, side=30)
    assert len(picture.maps) == 2 and picture.maps[0].columns == 30


def test_time_offsets_and_the_loss_ranking():
    features = {"r": torch.ones(2, 3, 3)}  # ||features|| = sqrt(18)
    ratios = unet.time_offsets({"r": torch.tensor([3.0, 4.0])}, features)
    assert ratios["r"] == pytest.approx(3 * 5 / 18 ** 0.5)
    ranked = unet.rank_captions({"": [1.0, 1.0], "a cat": [0.5, 0.7], "a dog": [0.9, 1.3]})
    assert [r[1] for r in ranked] == ["a cat", "(empty prompt)", "a dog"]
    assert ranked[0][2] == pytest.approx(0.6) and ranked[0][3] == pytest.approx(-0.4)
