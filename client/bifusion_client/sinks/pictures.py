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

    Each point owns its own pixel; the pixels with depth around it are given to the nearest
    point (growing every point's square one pixel per round, as far as the points' spacing
    needs), so the picture is filled, not a scatter of dots, and holes in the depth stay black.
    """
    height, width = has_depth.shape
    owner = np.full((height, width), -1, dtype=np.int64)
    v, u = np.divmod(point_indices, width)
    owner[v, u] = np.arange(len(point_indices))
    # the raster-order stride can line up over a few rows and leave gaps wider than the mean
    # spacing: grow until every depth pixel is owned, but no further than three spacings
    spacing = np.sqrt(max(int(has_depth.sum()), 1) / max(len(point_indices), 1))
    for _ in range(int(np.clip(np.ceil(3 * spacing), 1, 32))):
        grown = owner.copy()
        for dv, du in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            source = owner[max(dv, 0) : height + min(dv, 0), max(du, 0) : width + min(du, 0)]
            target = grown[max(-dv, 0) : height + min(-dv, 0), max(-du, 0) : width + min(-du, 0)]
            np.copyto(target, source, where=(target < 0) & (source >= 0))
        owner = grown
        if not np.any((owner < 0) & has_depth):
            break
    owner[~has_depth] = -1
    owner[v, u] = np.arange(len(point_indices))  # a point's own pixel is always its own
    return owner


def paint(owner: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """H×W×3 uint8: each pixel the colour of its point, black where it has none."""
    out = np.zeros((*owner.shape, 3), dtype=np.uint8)
    mask = owner >= 0
    out[mask] = colors[owner[mask]]
    return out


def frame_picture(frame, result, pca: FeaturePCA) -> Image.Image:
    valid = result.valid.astype(bool)
    valid_share = valid.mean() if len(valid) else 0.0
    owner = point_owner(result.point_indices.astype(np.int64), np.isfinite(frame.depth_metres()))
    valid_colors = np.where(valid[:, None], np.array(VALID, np.uint8), np.array(NOT_VALID, np.uint8))
    alpha_colors = np.where(valid[:, None], heat_colors(result.alpha), np.array(NOT_VALID_GREY, np.uint8))
    panels = [
        (frame.color, f"{frame.frame_id}  colour"),
        (paint(owner, valid_colors), f"valid: {valid_share:.0%} of {len(valid)} points (red: not valid)"),
        (paint(owner, alpha_colors), f"alpha 0..1 (dark..bright), gate mean {result.gate_mean:.3f}"),
        (paint(owner, pca.colors(result.features)), "features: PCA to RGB (fit on the first frame)"),
    ]
    height, width = frame.color.shape[:2]
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
