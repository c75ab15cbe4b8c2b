"""Where frames come from: a ``frames.json`` folder, a TUM RGB-D sequence, a ROS 1/2 bag or MCAP.

Every reader yields :class:`RGBDFrame` lazily, one frame at a time.
"""

from .folder import read_folder
from .frame import RGBDFrame
from .rosbag import read_rosbag
from .tum import TUM_DEPTH_SCALE, TUM_INTRINSICS, read_tum, tum_intrinsics

__all__ = [
    "TUM_DEPTH_SCALE",
    "TUM_INTRINSICS",
    "RGBDFrame",
    "read_folder",
    "read_rosbag",
    "read_tum",
    "tum_intrinsics",
]
