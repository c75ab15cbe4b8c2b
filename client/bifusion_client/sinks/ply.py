"""One binary little-endian PLY point cloud per frame, in world coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .colors import FeaturePCA
from .npz import safe_name

PLY_DTYPE = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
     ("alpha", "<f4"), ("valid", "u1")]
)  # fmt: skip
_PLY_TYPES = {"<f4": "float", "u1": "uchar"}


def ply_bytes(xyz: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, valid: np.ndarray) -> bytes:
    """x y z (float), red green blue (uchar, the PCA colours), alpha (float), valid (uchar)."""
    vertices = np.empty(len(xyz), dtype=PLY_DTYPE)
    vertices["x"], vertices["y"], vertices["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    vertices["red"], vertices["green"], vertices["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    vertices["alpha"] = alpha
    vertices["valid"] = valid
    properties = "".join(
        f"property {_PLY_TYPES[PLY_DTYPE.fields[name][0].str.replace('|', '')]} {name}\n"
        for name in PLY_DTYPE.names
    )
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {len(xyz)}\n{properties}end_header\n"
    return header.encode("ascii") + vertices.tobytes()


class PlySink:
    """``OUT/<frame_id>.ply``: every frame's points in the one world frame, so they overlay."""

    def __init__(self, folder: str | Path, pca: FeaturePCA):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pca = pca

    def write(self, frame, result) -> Path:
        path = self.folder / f"{safe_name(result.frame_id)}.ply"
        path.write_bytes(
            ply_bytes(result.points_world, self.pca.colors(result.features), result.alpha, result.valid)
        )
        return path

    def close(self) -> None:
        pass
