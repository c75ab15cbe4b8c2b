"""One PNG per frame: the colour image, the valid mask, an alpha heat map and the PCA colours
side by side, each point's value painted back onto the image through its pixel index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colors import FeaturePCA, heat_colors
from .npz import safe_name

LABEL_HEIGHT = 18
NO_POINT = (0, 0, 0)
VALID = (235, 235, 235)
NOT_VALID = (170, 30, 30)
NOT_VALID_GREY = (70, 70, 70)


def point_owner(point_indices: np.ndarray, has_depth: np.ndarray) -> np.ndarray:
    """For every pixel (H×W), the point that stands for it, or -1.

    The server keeps an even stride of the depth pixels in raster order, so a pixel with depth
    belongs to the nearest point before it on the same row, if that point is no further than
    twice the usual stride: the picture is filled, not a scatter of dots.
    """
    height, width = has_depth.shape
    order = np.argsort(point_indices, kind="stable")
    sorted_indices = point_indices[order]
    pixels = np.arange(height * width)
    before = np.searchsorted(sorted_indices, pixels, side="right") - 1
    found = before >= 0
    nearest = sorted_indices[np.maximum(before, 0)]
    gaps = np.diff(sorted_indices)
    max_gap = 2 * max(1, int(np.median(gaps))) if gaps.size else 1
    owned = (
        found & has_depth.reshape(-1) & (pixels - nearest <= max_gap) & (nearest // width == pixels // width)
    )
    return np.where(owned, order[np.maximum(before, 0)], -1).reshape(height, width)


def paint(owner: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """H×W×3 uint8: each pixel the colour of its point, black where it has none."""
    out = np.zeros((*owner.shape, 3), dtype=np.uint8)
    mask = owner >= 0
    out[mask] = colors[owner[mask]]
    return out


def frame_picture(frame, result, pca: FeaturePCA) -> Image.Image:
    valid = result.valid.astype(bool)
    owner = point_owner(result.point_indices.astype(np.int64), np.isfinite(frame.depth_metres()))
    valid_colors = np.where(valid[:, None], np.array(VALID, np.uint8), np.array(NOT_VALID, np.uint8))
    alpha_colors = np.where(valid[:, None], heat_colors(result.alpha), np.array(NOT_VALID_GREY, np.uint8))
    panels = [
        (frame.color, f"{frame.frame_id}  colour"),
        (paint(owner, valid_colors), f"valid: {valid.mean():.0%} of {len(valid)} points (red: not valid)"),
        (paint(owner, alpha_colors), f"alpha 0..1 (dark..bright), gate mean {result.gate_mean:.3f}"),
        (paint(owner, pca.colors(result.features)), "features: PCA to RGB (fit on the first frame)"),
    ]
    height, width = frame.height, frame.width
    canvas = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for number, (pixels, label) in enumerate(panels):
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (number * width, LABEL_HEIGHT))
        draw.text((number * width + 4, 3), label, fill=(255, 255, 255), font=font)
    return canvas


class PicturesSink:
    """``OUT/<frame_id>.png`` per frame."""

    def __init__(self, folder: str | Path, pca: FeaturePCA):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pca = pca

    def write(self, frame, result) -> Path:
        path = self.folder / f"{safe_name(result.frame_id)}.png"
        frame_picture(frame, result, self.pca).save(path, compress_level=1)
        return path

    def close(self) -> None:
        pass
