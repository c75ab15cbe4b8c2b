"""``sensor_msgs/PointCloud2`` per frame into an output bag."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bag_writer import BagWriter
from .colors import FeaturePCA

DEFAULT_TOPIC = "/bifusion/points"
# x y z float32 (world), rgb float32 holding 0x00RRGGBB (PCL's packed colour, what RViz reads),
# alpha float32, valid uint8; padded to 24 bytes so every float stays 4-byte aligned.
CLOUD_DTYPE = np.dtype(
    {
        "names": ["x", "y", "z", "rgb", "alpha", "valid"],
        "formats": ["<f4", "<f4", "<f4", "<u4", "<f4", "u1"],
        "offsets": [0, 4, 8, 12, 16, 20],
        "itemsize": 24,
    }
)
_FLOAT32, _UINT8 = 7, 2  # sensor_msgs/PointField datatypes


def cloud_data(xyz, rgb, alpha, valid) -> np.ndarray:
    """The N×24-byte point records of a cloud (as uint8)."""
    points = np.zeros(len(xyz), dtype=CLOUD_DTYPE)
    points["x"], points["y"], points["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rgb = rgb.astype(np.uint32)
    points["rgb"] = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]  # read back as float32 bits
    points["alpha"] = alpha
    points["valid"] = valid
    return points.view(np.uint8)


class PointCloud2Sink:
    """One PointCloud2 per frame on ``topic``: header stamp = the image's stamp, frame_id = the
    world frame (the points are in world coordinates): ``world_frame`` if given, else the name
    the source gives its frames' world (a bag's tf frame), else ``world``."""

    def __init__(self, path: str | Path, pca: FeaturePCA, world_frame: str | None = None,
                 topic: str = DEFAULT_TOPIC, fmt: str | None = None):  # fmt: skip
        self.bag = BagWriter(path, fmt)
        self.pca = pca
        self.world_frame = world_frame
        self.topic = topic
        self._fields = [
            self.bag.message(
                "sensor_msgs/msg/PointField", name=name, offset=offset, datatype=datatype, count=1
            )
            for name, offset, datatype in (
                ("x", 0, _FLOAT32),
                ("y", 4, _FLOAT32),
                ("z", 8, _FLOAT32),
                ("rgb", 12, _FLOAT32),
                ("alpha", 16, _FLOAT32),
                ("valid", 20, _UINT8),
            )
        ]
        self._last_stamp = 0.0

    def write(self, frame, result) -> None:
        # frames without a stamp get one a millisecond apart so the bag keeps their order
        stamp = frame.stamp if frame.stamp is not None else self._last_stamp + 1e-3
        self._last_stamp = stamp
        xyz = result.points_world
        data = cloud_data(xyz, self.pca.colors(result.features), result.alpha, result.valid)
        msg = self.bag.message(
            "sensor_msgs/msg/PointCloud2",
            header=self.bag.header(stamp, self.world_frame or frame.world_frame or "world"),
            height=1,
            width=len(xyz),
            fields=self._fields,
            is_bigendian=False,
            point_step=CLOUD_DTYPE.itemsize,
            row_step=CLOUD_DTYPE.itemsize * len(xyz),
            data=data,
            is_dense=bool(np.isfinite(xyz).all()),
        )
        self.bag.write(self.topic, msg, stamp)

    def close(self) -> None:
        self.bag.close()
