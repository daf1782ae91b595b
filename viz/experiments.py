"""Experiments on a VAE latent: how far one latent value reaches, what a channel carries, and the
path between two latents.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022). Each latent
pixel stands for one ``downscale`` x ``downscale`` block of the image, but the decoder's 3x3
convolutions (and its one attention layer) let it paint beyond that block. ``nudge_latent``
changes one latent pixel, ``change_map`` and ``measure_change`` say where the decoded image moved,
and ``receptive_field_view`` draws it over the image with the block outlined.

``edit_channels`` scales and shifts whole channels, to see what each one carries.

``lerp`` and ``slerp`` mix two latents. A draw from a Gaussian in d dimensions lies, with high
probability, near the sphere of radius sqrt(d) (for a 4x64x64 latent d = 16,384, radius 128, and
almost no draw is closer than 120). The straight line between two such draws cuts inside the
sphere: its midpoint is only 1/sqrt(2) as long, a latent the diffusion model never saw in
training. The spherical interpolation of Shoemake ("Animating rotation with quaternion curves",
1985), used for GAN and diffusion latents since White ("Sampling Generative Networks", 2016),
walks along the great circle instead and keeps the length. Both work in the diffusion model's
space, around its zero (the VAE's ``shift_factor``); the scale does not change the path.

Pictures are drawn with Pillow from arrays, as in ``viz.heatmap``, so tests read the data back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from viz.heatmap import (
    GAP,
    INK,
    Box,
    Picture,
    add_colorbar,
    add_title,
    colorize,
    drawable,
    enlarge,
    font,
    heatmap,
    pad,
    text_width,
)
from viz.latents import model_space

CHANGE_CMAP = "magma"
BLOCK_COLOUR = (0, 255, 0)  # the latent pixel's own block; grey and magma never hold pure green
REGION_COLOUR = (0, 200, 255)  # the changed region's bounding box
OUTLINE_ROOM = 3  # white pixels around a map, so outlines at the image's edge stay visible
MARK_BELOW = 12  # pixels: a block drawn smaller than this also gets ticks pointing at it
MARK_TICK, MARK_GAP = 8, 3  # the ticks' length and their distance from the block's outline
STRIP_WIDTH = 1024  # pixels: a strip wider than this is shown so small its captions blur
CAPTION_SIZE = 14  # the strip's captions and row names, in pixels


# ---------------------------------------------------------------------------------------------
# Receptive field: change one latent pixel, see where the image changes


def channel_stds(latent: torch.Tensor) -> torch.Tensor:
    """The (population) std of each channel of a (C, h, w) latent over its positions: (C,)."""
    return latent.to(torch.float64).flatten(1).std(dim=1, correction=0).to(latent.dtype)


def nudge_latent(latent: torch.Tensor, row: int, column: int, amount: float,
                 channel: int | None = None) -> torch.Tensor:
    """A copy of the (C, h, w) latent with one latent pixel moved by ``amount`` channel stds.

    ``channel`` None moves every channel at (row, column), each by its own std; an int moves that
    channel only. The std is the channel's spread over the whole latent, so +2 is a big but
    plausible change for SD v1 (std about 5) and for 16-channel VAEs alike.
    """
    channels, height, width = latent.shape
    if not (0 <= row < height and 0 <= column < width):
        raise ValueError(f"latent pixel (row {row}, column {column}) is outside the "
                         f"{width}x{height} latent")
    if channel is not None and not 0 <= channel < channels:
        raise ValueError(f"channel {channel} does not exist: the latent has {channels} "
                         f"channels (0 to {channels - 1})")
    step = channel_stds(latent) * amount
    if channel is not None:
        only = torch.zeros_like(step)
        only[channel] = step[channel]
        step = only
    nudged = latent.clone()
    nudged[:, row, column] += step
    return nudged


def to_levels(images: torch.Tensor) -> np.ndarray:
    """A decoded image (3, H, W) in [-1, 1] as float grey levels (H, W, 3) in [0, 255], clamped
    as the displayed image is, but not rounded: changes below one level still count."""
    values = images.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    return ((values + 1.0) * 127.5).permute(1, 2, 0).numpy()


def change_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per pixel, the largest |after - before| over R, G, B: (H, W), in the inputs' units.

    The largest rather than the mean, so a change in one colour counts in full.
    """
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"need two (H, W, 3) images of one shape, got {a.shape} and {b.shape}")
    return np.abs(b - a).max(axis=2)


@dataclass(frozen=True)
class ChangedRegion:
    """The pixels whose change is at least ``threshold``: how many, and their bounding box.

    ``box`` is (top, left, bottom, right) with bottom and right inclusive; None when no pixel
    changed that much.
    """

    threshold: float
    count: int
    box: tuple[int, int, int, int] | None
    largest: float

    @property
    def height(self) -> int:
        return 0 if self.box is None else self.box[2] - self.box[0] + 1

    @property
    def width(self) -> int:
        return 0 if self.box is None else self.box[3] - self.box[1] + 1

    def contains(self, box: tuple[int, int, int, int]) -> bool:
        """Whether another (top, left, bottom, right) box lies inside this region's box."""
        if self.box is None:
            return False
        top, left, bottom, right = self.box
        return top <= box[0] and left <= box[1] and bottom >= box[2] and right >= box[3]


def measure_change(change: np.ndarray, threshold: float) -> ChangedRegion:
    """Count and enclose the pixels of a change map that changed by at least ``threshold`` (> 0)."""
    if not threshold > 0:
        raise ValueError(f"the threshold must be above 0, got {threshold}")
    changed = np.asarray(change) >= threshold
    largest = float(np.max(change)) if np.size(change) else 0.0
    if not changed.any():
        return ChangedRegion(threshold, 0, None, largest)
    rows, columns = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    box = (int(rows[0]), int(columns[0]), int(rows[-1]), int(columns[-1]))
    return ChangedRegion(threshold, int(changed.sum()), box, largest)


def block_of(row: int, column: int, downscale: int) -> tuple[int, int, int, int]:
    """The image pixels (top, left, bottom, right; inclusive) one latent pixel stands for."""
    return (row * downscale, column * downscale, (row + 1) * downscale - 1,
            (column + 1) * downscale - 1)


def describe_change(region: ChangedRegion, block: tuple[int, int, int, int], downscale: int,
                    size: tuple[int, int]) -> str:
    """A few sentences: the changed region's size and place, against the latent pixel's block
    and the whole image (``size`` = (width, height))."""
    level, largest = f"{region.threshold:.3g}", f"{region.largest:.3g}"
    share = region.count / (size[0] * size[1])
    if region.box is None:
        return f"No pixel changed by {level} (of 255) or more; the largest change is {largest}."
    top, left, bottom, right = region.box
    text = (f"Changed region {region.width} x {region.height} px (x {left}-{right}, y {top}-"
            f"{bottom}); the block is {downscale} x {downscale}. {region.count:,} of the "
            f"{size[0] * size[1]:,} pixels ({share:.1%}) changed by at least {level} (of 255); "
            f"the largest change is {largest}.")
    if not region.contains(block):
        text += " Part of the block itself changed less than that."
    if region.box == (0, 0, size[1] - 1, size[0] - 1):
        text += (" The region is the whole image: the decoder's attention layer and its group "
                 "norms (statistics over the whole image) let every latent pixel reach every "
                 "pixel, if only a little.")
    return text


def _outline(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], map_box: Box,
             colour: tuple[int, int, int]) -> None:
    """A 1-pixel rectangle just outside an image box (pixels) drawn on an enlarged map."""
    top, left, bottom, right = box
    cell = map_box.cell_height
    draw.rectangle([map_box.left + left * cell - 1, map_box.top + top * cell - 1,
                    map_box.left + (right + 1) * cell, map_box.top + (bottom + 1) * cell],
                   outline=colour)


def _ticks(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], map_box: Box,
           colour: tuple[int, int, int]) -> None:
    """Four short lines pointing at a box from above, below, left and right, so a block of a
    few pixels is found at a glance on a picture shown smaller than its size."""
    top, left, bottom, right = box
    cell = map_box.cell_height
    y0, x0 = map_box.top + top * cell - 1, map_box.left + left * cell - 1  # the outline's
    y1, x1 = map_box.top + (bottom + 1) * cell, map_box.left + (right + 1) * cell
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    near, far = MARK_GAP, MARK_GAP + MARK_TICK - 1
    for line in (((xm, y0 - far), (xm, y0 - near)), ((xm, y1 + near), (xm, y1 + far)),
                 ((x0 - far, ym), (x0 - near, ym)), ((x1 + near, ym), (x1 + far, ym))):
        draw.line(line, fill=colour, width=2)


def receptive_field_view(image: np.ndarray, change: np.ndarray, region: ChangedRegion,
                         block: tuple[int, int, int, int], title: str,
                         min_side: int = 384) -> Picture:
    """The change drawn over the image: changed pixels in colour, the rest of the image grey.

    A pixel whose change reaches ``region.threshold`` gets the colour map's colour for its change
    (0 to the largest change); every other pixel shows the image in dimmed grey, so the picture
    stays recognisable. The latent pixel's own block is outlined in green, the changed region's
    bounding box in blue; a block drawn smaller than ``MARK_BELOW`` pixels also gets four green
    ticks pointing at it, since its outline alone is lost on a page. Small images are enlarged
    (nearest neighbour) to ``min_side`` pixels; ``maps[0]`` says where the pixels are.
    """
    image = np.asarray(image)
    if image.shape[:2] != np.shape(change):
        raise ValueError(f"image {image.shape[:2]} and change map {np.shape(change)} differ")
    top_value = max(region.largest, region.threshold)
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    dimmed = np.rint(96 + grey * 0.5).astype(np.uint8)  # 96-223: mid greys, away from the ink
    rgb = np.repeat(dimmed[:, :, None], 3, axis=2)
    changed = np.asarray(change) >= region.threshold
    rgb[changed] = colorize(np.asarray(change)[changed], CHANGE_CMAP, 0.0, top_value)
    height, width = change.shape
    cell = max(1, min_side // max(height, width))
    block_side = min(block[2] - block[0], block[3] - block[1]) + 1
    room = OUTLINE_ROOM + (MARK_GAP + MARK_TICK if block_side * cell < MARK_BELOW else 0)
    picture = pad(Picture(enlarge(rgb, cell, cell), (Box(0, 0, height, width, cell, cell),)),
                  room, room, room, room)
    drawn = Image.fromarray(picture.pixels)
    draw = ImageDraw.Draw(drawn)
    if region.box is not None:
        _outline(draw, region.box, picture.maps[0], REGION_COLOUR)
    _outline(draw, block, picture.maps[0], BLOCK_COLOUR)  # last: it wins where the two meet
    if block_side * cell < MARK_BELOW:
        _ticks(draw, block, picture.maps[0], BLOCK_COLOUR)
    picture = Picture(np.asarray(drawn), picture.maps)
    picture = add_colorbar(picture, CHANGE_CMAP, (0.0, top_value),
                           "change (grey levels, largest over R, G, B)")
    return add_title(picture, title)


# ---------------------------------------------------------------------------------------------
# Channel edits


def edit_channels(latent: torch.Tensor, scales: Sequence[float], shifts: Sequence[float],
                  shift_factor: float = 0.0) -> torch.Tensor:
    """Each channel c of a (C, h, w) latent scaled by scales[c] and moved by shifts[c] stds.

    Scaling is around the diffusion model's zero, the VAE's ``shift_factor`` (0 for SD v1): a
    scale of 0 sets the channel to the value the model's noise is centred on. Written as
    ``k * z + (1 - k) * shift_factor + d * std`` so that k = 1, d = 0 gives back z bit for bit.
    """
    channels = latent.shape[0]
    if len(scales) != channels or len(shifts) != channels:
        raise ValueError(f"need one scale and one shift per channel: the latent has {channels} "
                         f"channels, got {len(scales)} scales and {len(shifts)} shifts")
    numbers = [float(v) for v in (*scales, *shifts)]
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("every scale and shift must be a finite number")
    view = (channels, 1, 1)
    k = torch.tensor(numbers[:channels], dtype=latent.dtype).view(view)
    d = torch.tensor(numbers[channels:], dtype=latent.dtype).view(view)
    stds = channel_stds(latent).view(view)
    return k * latent + (1 - k) * shift_factor + d * stds


def difference_view(plain: np.ndarray, edited: np.ndarray, min_side: int = 384) -> Picture:
    """Where an edit changed the decoded image: the largest |edited - plain| over R, G, B."""
    change = change_map(plain, edited)
    height, width = change.shape
    top = max(float(change.max()), 1.0)
    cell = max(1, min_side // max(height, width))
    picture = heatmap(change, CHANGE_CMAP, (0.0, top), (cell, cell))
    picture = add_colorbar(picture, CHANGE_CMAP, (0.0, top), "|edited - plain| (grey levels)")
    return add_title(picture, f"Edited minus plain decode: mean {change.mean():.2f}, largest "
                              f"{change.max():.0f} grey levels")


# ---------------------------------------------------------------------------------------------
# Interpolation


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b: a straight line; t = 0 and t = 1 give a and b exactly."""
    return (1.0 - t) * a + t * b


def slerp_weights(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """The weights (wa, wb) of spherical interpolation, from the angle between a and b flattened.

    wa = sin((1 - t) theta) / sin(theta), wb = sin(t theta) / sin(theta). For (near) parallel
    latents the angle is 0 and the weights tend to (1 - t, t), which is what is returned.
    """
    x, y = a.flatten().to(torch.float64), b.flatten().to(torch.float64)
    norms = float(x.norm() * y.norm())
    if norms == 0.0:
        raise ValueError("slerp needs two non-zero latents: a zero latent has no direction")
    theta = math.acos(max(-1.0, min(1.0, float(x @ y) / norms)))
    if math.sin(theta) < 1e-6:
        if theta > 1.0:
            raise ValueError("the two latents point in opposite directions: no single great "
                             "circle joins them")
        return 1.0 - t, t
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, centre: float = 0.0) -> torch.Tensor:
    """Spherical interpolation of two latents around ``centre`` (the VAE's shift_factor).

    The path is wa (a - centre) + wb (b - centre) + centre, written as
    ``wa a + wb b + (1 - wa - wb) centre`` so that t = 0 and t = 1 give a and b exactly.
    """
    wa, wb = slerp_weights(a - centre, b - centre, t)
    return wa * a + wb * b + (1.0 - wa - wb) * centre


def rms(latent: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> float:
    """Root mean square of a latent in the diffusion model's space: about 1 for unit noise."""
    return float(np.sqrt(np.mean(model_space(latent, scaling_factor, shift_factor) ** 2)))


def match_size(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """The image centre-cropped to the aspect ratio of ``size`` = (width, height), then resized to
    it (LANCZOS); and half a sentence saying what was done."""
    width, height = image.size
    target_w, target_h = size
    if width * target_h > height * target_w:  # too wide: crop the sides
        crop_w, crop_h = max(1, round(height * target_w / target_h)), height
    else:
        crop_w, crop_h = width, max(1, round(width * target_h / target_w))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    note = f"{width}x{height}"
    if (crop_w, crop_h) != (width, height):
        note += f" cropped to {crop_w}x{crop_h}"
    if cropped.size == tuple(size):
        return cropped, note
    return cropped.resize(tuple(size), Image.Resampling.LANCZOS), f"{note}, resized to " \
        f"{target_w}x{target_h}"


def strip_picture(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                  captions: Sequence[Sequence[str]], max_width: int = STRIP_WIDTH,
                  min_side: int = 128) -> Picture:
    """Frames (H, W, 3) uint8 of one size in rows, each row named at its left, each frame with a
    caption below it. ``maps`` has one box per frame, row by row.

    Frames smaller than ``min_side`` are enlarged by a whole factor (nearest neighbour, so each
    box's cells are the frame's pixels) while the frames stay within ``max_width``; frames that
    are together wider than that are shrunk by a whole factor (averaging blocks of pixels).
    """
    if not rows or not rows[0] or len(row_labels) != len(rows) or len(captions) != len(rows):
        raise ValueError("need at least one row of frames, one label per row and one caption "
                         "per frame")
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    for row, texts in zip(rows, captions, strict=True):
        if len(texts) != len(row) or any(f.shape != (height, width, 3) for f in row):
            raise ValueError(f"every frame must be {height}x{width}x3 with one caption")
    up = max(1, min(min_side // max(height, width), max_width // (columns * width)))
    down = max(1, math.ceil(columns * width / max_width)) if up == 1 else 1
    frame_h, frame_w = height * up // down, width * up // down
    size = CAPTION_SIZE
    left = text_width(row_labels, size) + GAP
    caption_h = (font(size).size + 4) * max(len(t.splitlines()) for r in captions for t in r)
    cell_w = max(frame_w, text_width([line for r in captions for t in r for line in t.splitlines()],
                                     size))
    row_h = frame_h + caption_h + 2 * GAP
    image = Image.new("RGB", (left + columns * (cell_w + GAP), len(rows) * row_h), "white")
    draw = ImageDraw.Draw(image)
    boxes = []
    for r, (row, texts) in enumerate(zip(rows, captions, strict=True)):
        y = r * row_h
        draw.text((0, y + frame_h / 2), drawable(row_labels[r]), font=font(size), fill=INK,
                  anchor="lm")
        for c, (frame, text) in enumerate(zip(row, texts, strict=True)):
            x = left + c * (cell_w + GAP)
            shown = Image.fromarray(enlarge(frame, up, up) if up > 1 else frame)
            if down > 1:
                shown = shown.resize((frame_w, frame_h), Image.Resampling.BOX)
            image.paste(shown, (x, y))
            for i, line in enumerate(text.splitlines()):
                draw.text((x, y + frame_h + 4 + i * (font(size).size + 4)), drawable(line),
                          font=font(size), fill=INK)
            cell = up if down == 1 else 1
            boxes.append(Box(y, x, frame_h // cell, frame_w // cell, cell, cell))
    return Picture(np.asarray(image), tuple(boxes))
