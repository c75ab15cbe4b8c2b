"""A Rerun recording (``.rrd``) of the run: per frame the camera, its image and the point cloud
coloured by the feature PCA and by alpha (``pip install 'bifusion-client[rerun]'``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..extras import require
from .colors import FeaturePCA, heat_colors


class RerunSink:
    def __init__(self, path: str | Path, pca: FeaturePCA, application_id: str = "bifusion"):
        rr = require("rerun", "rerun", "--rerun")
        self.rr = rr
        self.pca = pca
        self.recording = rr.RecordingStream(application_id)
        self.recording.save(str(path))
        self.recording.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
        self._number = 0

    def write(self, frame, result) -> None:
        rr, rec = self.rr, self.recording
        rec.set_time("frame", sequence=self._number)
        if frame.stamp is not None:
            rec.set_time("stamp", timestamp=frame.stamp)
        self._number += 1
        pose = np.eye(4) if frame.cam_to_world is None else np.asarray(frame.cam_to_world)
        k = frame.intrinsics
        height, width = frame.color.shape[:2]
        rec.log("world/camera", rr.Transform3D(translation=pose[:3, 3], mat3x3=pose[:3, :3]))
        rec.log(
            "world/camera",
            rr.Pinhole(
                focal_length=[k["fx"], k["fy"]],
                principal_point=[k["cx"], k["cy"]],
                width=width,
                height=height,
                camera_xyz=rr.ViewCoordinates.RDF,  # x right, y down, z forward
            ),
        )
        rec.log("world/camera/image", rr.Image(frame.color))
        # Arrow (inside rerun) refuses unaligned buffers. This server's responses keep every
        # tensor aligned; an older server's need not, and only then does this copy.
        xyz = np.require(result.points_world, requirements="CA")
        rec.log("world/points/pca", rr.Points3D(xyz, colors=self.pca.colors(result.features), radii=0.004))
        alpha_colors = np.where(result.valid[:, None], heat_colors(result.alpha), np.uint8(70))
        rec.log("world/points/alpha", rr.Points3D(xyz, colors=alpha_colors, radii=0.004))

    def close(self) -> None:
        self.recording.flush()
        self.recording.disconnect()
