"""Writing ROS messages into a ROS 1 bag or a ROS 2 bag (sqlite3 or MCAP) with ``rosbags``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..extras import require

BAG_FORMATS = ("ros1", "sqlite3", "mcap")
# ROS 1's typestore lacks tf2_msgs; this is its definition (same md5 as ROS's own).
_TF_MESSAGE_DEFINITION = "geometry_msgs/TransformStamped[] transforms\n"


def bag_format_for(path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else ROS 1 for a ``*.bag`` path and an MCAP ROS 2 bag (a folder) otherwise."""
    if fmt is not None:
        if fmt not in BAG_FORMATS:
            raise ValueError(f"--out-bag-format must be one of {', '.join(BAG_FORMATS)}, got {fmt!r}")
        return fmt
    return "ros1" if Path(path).suffix == ".bag" else "mcap"


def refuse_existing(path: str | Path, flag: str = "--out-bag") -> None:
    if Path(path).exists():
        raise FileExistsError(
            f"{flag}: {path} exists already; bags are never overwritten (remove it or choose another path)"
        )


class BagWriter:
    """One bag being written. ``message(msgtype, **fields)`` builds a message of this bag's ROS
    version (ROS 1's ``seq`` and upper-case CameraInfo matrices are filled in from the ROS 2
    names); ``write(topic, msg, stamp)`` appends it, ``stamp`` in seconds."""

    def __init__(self, path: str | Path, fmt: str | None = None, flag: str = "--out-bag"):
        typesys = require("rosbags.typesys", "ros", "writing bags")
        self.path = Path(path)
        self.format = bag_format_for(path, fmt)
        refuse_existing(self.path, flag)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "ros1":
            from rosbags.rosbag1 import Writer

            self.typestore = typesys.get_typestore(typesys.Stores.ROS1_NOETIC)
            self.typestore.register(
                typesys.get_types_from_msg(_TF_MESSAGE_DEFINITION, "tf2_msgs/msg/TFMessage")
            )
            self._writer = Writer(self.path)
        else:
            self.typestore = typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)
            self._writer = _rosbag2_writer(self.path, self.format)
        self._writer.open()
        self._connections: dict = {}

    def message(self, msgtype: str, **fields):
        cls = self.typestore.types[msgtype]
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in fields:
                values[f.name] = fields[f.name]
            elif f.name.lower() in fields:  # ROS 1 CameraInfo: D, K, R, P
                values[f.name] = fields[f.name.lower()]
            elif f.name == "seq":  # ROS 1 Header
                values[f.name] = 0
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{msgtype} needs field {f.name!r}")
        return cls(**values)

    def header(self, stamp: float, frame_id: str):
        return self.message("std_msgs/msg/Header", stamp=self.time(stamp), frame_id=frame_id)

    def time(self, stamp: float):
        nanoseconds = round(stamp * 1e9)
        return self.message(
            "builtin_interfaces/msg/Time", sec=nanoseconds // 10**9, nanosec=nanoseconds % 10**9
        )

    def write(self, topic: str, msg, stamp: float) -> None:
        msgtype = msg.__msgtype__
        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        if self.format == "ros1":
            data = self.typestore.serialize_ros1(msg, msgtype)
        else:
            data = self.typestore.serialize_cdr(msg, msgtype)
        self._writer.write(self._connections[topic], round(stamp * 1e9), data)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rosbag2_writer(path: Path, fmt: str):
    from rosbags.rosbag2 import Writer

    try:
        from rosbags.rosbag2 import StoragePlugin
    except ImportError:  # rosbags 0.9 (the last for Python 3.9) writes sqlite3 only
        if fmt != "sqlite3":
            raise ValueError(
                "--out-bag-format mcap needs a newer rosbags (Python >= 3.10); use sqlite3 or a .bag path"
            ) from None
        return Writer(path)
    plugin = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
    return Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
