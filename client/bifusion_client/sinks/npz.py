"""One compressed, self-contained ``.npz`` per frame."""

from __future__ import annotations

import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def safe_name(frame_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", frame_id) or "frame"


class NpzSink:
    """``OUT/<frame_id>.npz`` (``np.savez_compressed``): the per-point outputs, their stats, and
    the frame they came from (image size, intrinsics, pose, time stamp, depth scale), so one
    file is enough to place the points. Features that travelled as float16 stay float16.

    Deflating 10-20 MB of features takes about a second per frame on one core, so files are
    written by a few threads (zlib releases the GIL) while the next frames are encoded; at most
    ``2 × workers`` wait, and a failed write is raised by a later :meth:`write` or :meth:`close`.
    """

    def __init__(self, folder: str | Path, workers: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npz-writer")
        self._pending: deque = deque()
        self._max_pending = 2 * workers

    def write(self, frame, result) -> Path:
        arrays = result.arrays()
        if result.features_dtype == "float16":
            arrays["features"] = result.features.astype(np.float16)  # exact: they were float16
        pose = frame.cam_to_world
        arrays.update(
            image_size_wh=np.array(frame.color.shape[1::-1], dtype=np.int64),
            intrinsics_fx_fy_cx_cy=np.array(
                [frame.intrinsics[k] for k in ("fx", "fy", "cx", "cy")], dtype=np.float64
            ),
            cam_to_world=np.eye(4) if pose is None else np.asarray(pose, dtype=np.float64),
            has_pose=np.array(pose is not None),
            stamp=np.array(np.nan if frame.stamp is None else frame.stamp, dtype=np.float64),
            depth_scale=np.array(frame.depth_scale, dtype=np.float64),
        )
        path = self.folder / f"{safe_name(result.frame_id)}.npz"
        self._pending.append(self._pool.submit(np.savez_compressed, path, **arrays))
        while self._pending and (self._pending[0].done() or len(self._pending) > self._max_pending):
            self._pending.popleft().result()  # raises the error of a failed write
        return path

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
