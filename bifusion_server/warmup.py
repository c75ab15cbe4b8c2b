"""Synthetic frames for warming the model up before the server reports SERVING.

Built here rather than read from disk, so a container needs nothing but the checkpoint.
The scene is a tilted plane 1–3 m away with a colour gradient: every pixel has depth, so
a warm-up frame exercises every stage at the model's full default point count.
"""

from __future__ import annotations

import numpy as np

from bifusion import Frame, Intrinsics

WIDTH, HEIGHT = 640, 480


def synthetic_frames(count: int) -> list[Frame]:
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    depth_mm = (1000 + 2000 * rows / (HEIGHT - 1)).astype(np.uint16)
    color = np.stack(
        (cols * 255 // (WIDTH - 1), rows * 255 // (HEIGHT - 1), (cols + rows) % 256), axis=-1
    ).astype(np.uint8)
    intrinsics = Intrinsics(fx=525.0, fy=525.0, cx=(WIDTH - 1) / 2, cy=(HEIGHT - 1) / 2)
    return [
        Frame(color=color, depth=depth_mm, depth_scale=1000.0, intrinsics=intrinsics, frame_id=f"warmup-{i}")
        for i in range(count)
    ]
