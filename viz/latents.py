"""What a VAE latent holds: its channels as heat maps, as colours, as numbers and as a histogram.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022). The VAE
encoder turns each ``downscale`` x ``downscale`` block of pixels into ``latent_channels`` numbers
(SD v1 and SDXL: 4 channels, 8x; SD3 and FLUX: 16 channels, 8x). The diffusion model sees the
latent in its own space, ``(latent - shift_factor) * scaling_factor``; the views below say which
space they show. Every view takes the channel count from the latent and the downscale and factors
from the VAE's config, never from a constant.

Most of a latent is colour and edges at low resolution, so a linear map from its channels to RGB
already previews the image. ``LATENT_RGB_MAPS`` holds the published maps per VAE family;
``fit_rgb_map`` finds the best map for one image by least squares, for any channel count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from viz.chart import Chart, density_chart
from viz.heatmap import Picture, add_colorbar, add_title, arrange, enlarge, heatmap
from viz.plot import DIVERGING, SEQUENTIAL

CHANNEL_STATS_HEADERS = ["channel", "mean", "std", "min", "max", "mean in model space",
                         "std in model space"]
PANEL_SIDE = 300  # pixels: the longer side of one channel's heat map, for 4 channels


@dataclass(frozen=True)
class LatentRGBMap:
    """A linear map from a latent in the diffusion model's space to RGB in [-1, 1].

    ``weights`` has one (R, G, B) row per latent channel; ``bias`` is added after. ``channels``
    and ``scaling_factor`` identify the VAE family the map was fitted for.
    """

    weights: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]
    scaling_factor: float
    source: str

    @property
    def channels(self) -> int:
        return len(self.weights)

    def matrix(self) -> np.ndarray:
        """The map as a (channels + 1, 3) array, the bias as its last row."""
        return np.vstack([np.asarray(self.weights), np.asarray(self.bias)])


# Published maps, each fitted by least squares on real latents of its family. Keys are the VAE
# families the compare view offers; SD 2.x shares SD v1's VAE and map.
LATENT_RGB_MAPS: dict[str, LatentRGBMap] = {
    "sd1": LatentRGBMap(
        weights=((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
                 (-0.184, -0.271, -0.473)),
        bias=(0.0, 0.0, 0.0), scaling_factor=0.18215,
        source="the widely published SD v1 approximation"),
    "sdxl": LatentRGBMap(
        weights=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                 (-0.3165, -0.2492, -0.2188)),
        bias=(0.1084, -0.0175, -0.0011), scaling_factor=0.13025,
        source="ComfyUI's latent_formats.SDXL"),
    "sd3": LatentRGBMap(
        weights=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
                 (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
                 (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
                 (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
                 (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810),
                 (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189)),
        bias=(0.2394, 0.2135, 0.1925), scaling_factor=1.5305,
        source="ComfyUI's latent_formats.SD3"),
    "flux": LatentRGBMap(
        weights=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                 (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                 (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                 (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                 (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103),
                 (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778)),
        bias=(-0.0329, -0.0718, -0.0851), scaling_factor=0.3611,
        source="ComfyUI's latent_formats.Flux"),
}


def rgb_map_for(channels: int, scaling_factor: float) -> LatentRGBMap | None:
    """The published map of the family with this channel count and scaling factor, if any.

    A VAE of unknown family with 4 channels gets SD v1's map (the SD v1 fine-tunes share it);
    other channel counts get None, and a map fitted to the image is the preview.
    """
    for rgb_map in LATENT_RGB_MAPS.values():
        if rgb_map.channels == channels and math.isclose(rgb_map.scaling_factor, scaling_factor):
            return rgb_map
    return LATENT_RGB_MAPS["sd1"] if channels == 4 else None


# ---------------------------------------------------------------------------------------------
# Numbers


def latent_to_numpy(latent: torch.Tensor | np.ndarray) -> np.ndarray:
    """A latent of shape (C, h, w) or (1, C, h, w) as a float64 array of shape (C, h, w)."""
    if isinstance(latent, torch.Tensor):
        values = latent.detach().to("cpu", torch.float64).numpy()
    else:
        values = np.asarray(latent, dtype=np.float64)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3:
        raise ValueError(f"expected a latent of shape (C, h, w) or (1, C, h, w), not "
                         f"{values.shape}")
    return values


def model_space(
    latent: torch.Tensor | np.ndarray, scaling_factor: float, shift_factor: float = 0.0
) -> np.ndarray:
    """The latent as the diffusion model sees it: (latent - shift_factor) * scaling_factor."""
    return (latent_to_numpy(latent) - shift_factor) * scaling_factor


def apply_rgb_map(
    latent: torch.Tensor | np.ndarray,
    matrix: np.ndarray,
    scaling_factor: float,
    shift_factor: float = 0.0,
) -> np.ndarray:
    """Colour each latent pixel with a linear map: (h, w, 3) uint8.

    ``matrix`` is (C, 3), or (C + 1, 3) with a last row of biases; it maps the latent in model
    space to RGB in [-1, 1], which is then clipped and mapped to 0-255.
    """
    values = model_space(latent, scaling_factor, shift_factor)
    weights = np.asarray(matrix, dtype=np.float64)
    channels = values.shape[0]
    if weights.shape not in ((channels, 3), (channels + 1, 3)):
        raise ValueError(f"a {channels}-channel latent needs a ({channels}, 3) or "
                         f"({channels + 1}, 3) map, got {weights.shape}")
    rgb = np.tensordot(values, weights[:channels], axes=(0, 0))  # (h, w, 3)
    if weights.shape[0] == channels + 1:
        rgb = rgb + weights[channels]
    return np.rint((np.clip(rgb, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def fit_rgb_map(
    latent: torch.Tensor | np.ndarray,
    image: Image.Image,
    scaling_factor: float,
    shift_factor: float = 0.0,
) -> np.ndarray:
    """The best linear map (least squares) from this latent to this image's colours: (C + 1, 3).

    The image is averaged down to the latent grid (each latent pixel stands for one block of
    pixels). Rows 0..C-1 weigh the channels in model space and the last row is a bias, so
    ``apply_rgb_map`` draws the fitted colours and the matrix compares with a published one.
    """
    values = model_space(latent, scaling_factor, shift_factor)
    channels, height, width = values.shape
    if image.width * height != image.height * width:
        raise ValueError(
            f"image {image.width}x{image.height} and latent {width}x{height} differ in aspect ratio"
        )
    small = image.convert("RGB").resize((width, height), Image.Resampling.BOX)
    target = np.asarray(small, dtype=np.float64).reshape(-1, 3) / 127.5 - 1.0
    design = np.concatenate(
        [values.reshape(channels, -1).T, np.ones((height * width, 1))], axis=1
    )
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    return solution


def channel_stats(
    latent: torch.Tensor | np.ndarray, scaling_factor: float, shift_factor: float = 0.0
) -> list[list]:
    """Table rows, one per channel and one for all channels, with ``CHANNEL_STATS_HEADERS``.

    Mean, (population) std, min and max are of the raw latent, as the encoder outputs it; the
    last two columns are of the latent in model space, where the std should be close to 1.
    Numbers are rounded to 4 places.
    """
    values = latent_to_numpy(latent)
    groups = [(str(c), values[c]) for c in range(values.shape[0])] + [("all", values)]
    rows = []
    for label, group in groups:
        scaled = (group - shift_factor) * scaling_factor
        numbers = [group.mean(), group.std(), group.min(), group.max(), scaled.mean(),
                   scaled.std()]
        rows.append([label] + [round(float(number), 4) for number in numbers])
    return rows


# ---------------------------------------------------------------------------------------------
# Pictures


def _grid(values: np.ndarray, cmap: str, centred: bool, shared_scale: bool, title: str,
          bar_label: str) -> Picture:
    """One heat map per channel, in a square-ish grid, with one shared or separate colour bars."""
    channels, height, width = values.shape
    columns = math.ceil(math.sqrt(channels))
    side = PANEL_SIDE * 2 // columns  # 4 channels: 300 px panels; 16: 150 px
    cell = max(1, side // max(height, width))

    def limits(block: np.ndarray) -> tuple[float, float]:
        if centred:  # symmetric, so zero gets the neutral middle colour
            extent = max(float(np.abs(block).max()), 1e-8)
            return -extent, extent
        return min(float(block.min()), 0.0), max(float(block.max()), 1e-8)

    panels = []
    for channel in range(channels):
        block = values[channel]
        own = limits(block)
        panel = heatmap(block, cmap, limits(values) if shared_scale else own, (cell, cell),
                        title=f"channel {channel}: mean {block.mean():+.2f}, std {block.std():.2f}")
        panels.append(panel if shared_scale else add_colorbar(panel, cmap, own, ""))
    picture = arrange(panels, columns)
    if shared_scale:
        picture = add_colorbar(picture, cmap, limits(values), bar_label)
    return add_title(picture, title)


def latent_channels_view(
    latent: torch.Tensor | np.ndarray, downscale: int, shared_scale: bool = True
) -> Picture:
    """Every channel of a raw latent as a heat map, red positive, blue negative.

    With ``shared_scale`` one colour bar serves all channels, so they can be compared; otherwise
    each channel gets its own range, which shows more detail in quiet channels.
    """
    values = latent_to_numpy(latent)
    channels, height, width = values.shape
    title = (f"The {channels} latent channels ({width}x{height}; 1 latent pixel = "
             f"{downscale}x{downscale} image pixels)")
    return _grid(values, DIVERGING, True, shared_scale, title, "latent value (raw)")


def std_view(std: torch.Tensor | np.ndarray, shared_scale: bool = True) -> Picture:
    """The encoder's uncertainty: the posterior's standard deviation per channel and pixel.

    The encoder outputs a mean and a std for every latent value; a sample is mean + std x noise.
    Small values mean the encoder is sure.
    """
    values = latent_to_numpy(std)
    title = "Posterior std per channel (sample = mean + std x noise)"
    return _grid(values, SEQUENTIAL, False, shared_scale, title, "standard deviation")


def enlarge_to(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A latent-resolution picture (h, w, 3) repeated to ``size`` = (width, height) pixels.

    Nearest neighbour: each latent pixel becomes the block of image pixels it stands for.
    """
    height, width = pixels.shape[:2]
    if size[0] % width or size[1] % height:
        raise ValueError(f"{width}x{height} does not divide {size[0]}x{size[1]}")
    return enlarge(pixels, size[1] // height, size[0] // width)


def latent_space_text(scaling_factor: float, shift_factor: float, name: str = "z") -> str:
    """How the diffusion model's latent is made from the encoder's ``name``:
    "(z - 0.1159) x 0.3611", or "z x 0.18215" without a shift."""
    if shift_factor:
        return f"({name} - {shift_factor:g}) x {scaling_factor:g}"
    return f"{name} x {scaling_factor:g}"


def latent_histogram_view(
    latent: torch.Tensor | np.ndarray, scaling_factor: float, shift_factor: float = 0.0
) -> Chart:
    """Histogram (density) of the latent in model space against the standard normal N(0, 1).

    The VAE's raw latent has a std of about 5 (SD v1); the scaling factor brings it to roughly
    unit variance, the scale the diffusion model's noise schedule assumes. One line per channel
    up to 4 channels; with more, all values together and the quietest and loudest channel.
    """
    scaled = model_space(latent, scaling_factor, shift_factor)
    channels = scaled.shape[0]
    if channels <= 4:
        groups = [(f"channel {c}", scaled[c]) for c in range(channels)]
    else:
        stds = scaled.reshape(channels, -1).std(axis=1)
        quiet, loud = int(stds.argmin()), int(stds.argmax())
        groups = [("all channels", scaled), (f"channel {quiet}", scaled[quiet]),
                  (f"channel {loud}", scaled[loud])]
    space = latent_space_text(scaling_factor, shift_factor, "latent")
    return density_chart([(f"{label}: std {group.std():.2f}", group) for label, group in groups],
                         [scaled], f"value in model space: {space}", (480, 255),
                         legend_below=False)
