"""``EncodeFrameResponse`` bytes -> numpy arrays that view those bytes.

The tensors are found in the received message by hand (``bifusion_wire.raw``) and viewed in
place with ``np.frombuffer``: protobuf's parser would copy every ``bytes`` field first. The
small fields (ids, stats) still go through protobuf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.raw import LENGTH_DELIMITED, TensorView, fields
from bifusion_wire.tensor import FieldError, bfloat16_to_float32, from_tensor

TENSOR_FIELDS = {
    pb.EncodeFrameResponse.DESCRIPTOR.fields_by_name[name].number: name
    for name in ("features", "alpha", "valid", "point_indices", "points_world", "features_scale")
}
FEATURE_DTYPES = ("float32", "float16", "int8", "bfloat16")
# A shared-memory reference -> the bytes it names (a view of the client's region).
# (typing.Union: this alias is evaluated at run time, and the client supports Python 3.9.)
SharedMemoryReader = Callable[[pb.SharedMemoryRef], Union[memoryview, np.ndarray]]


@dataclass
class EncodeResult:
    """One encoded frame. ``features`` is always float32, whatever dtype it travelled as:
    a read-only view of the response (or the shared-memory region) when that was float32,
    a converted copy otherwise (``features_dtype`` says which)."""

    frame_id: str
    features: np.ndarray  # N×256 float32, unit norm
    alpha: np.ndarray  # N float32
    valid: np.ndarray  # N bool
    point_indices: np.ndarray  # N int64: pixel v·W + u, or the row of the client's points
    points_world: np.ndarray | None  # N×3 float32 when asked for
    num_points: int
    valid_ratio: float
    gate_mean: float
    model_id: str
    stage_ms: dict[str, float] = field(default_factory=dict)
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 0
    wire_bytes: int = 0  # size of the response message
    features_dtype: str = "float32"  # as it travelled
    features_scale: np.ndarray | None = None  # N float32, with int8 features only
    shared_memory: bool = False  # the arrays view a shared-memory region, not the message

    @classmethod
    def from_bytes(cls, message: bytes, shared_memory: SharedMemoryReader | None = None) -> EncodeResult:
        """Parse a serialised response; ``shared_memory`` resolves tensors that travelled as
        shared-memory references."""
        buffer = memoryview(message)
        tensors: dict[str, TensorView] = {}
        small = []
        for number, wire_type, start, value_start, end in fields(buffer):
            name = TENSOR_FIELDS.get(number)
            if name is not None and wire_type == LENGTH_DELIMITED:
                tensors[name] = TensorView.parse(buffer, value_start, end, tensors.get(name))
            else:
                small.append(buffer[start:end])
        head = pb.EncodeFrameResponse.FromString(b"".join(small))

        def array(name: str, dtypes: tuple[str, ...] | None = None) -> np.ndarray | None:
            view = tensors.get(name)
            if view is None:
                return None
            data = None
            if view.shared_memory is not None:
                if shared_memory is None:
                    raise FieldError(
                        f"{name}.shared_memory", "a shared-memory reference, but no region to read"
                    )
                data = shared_memory(view.shared_memory)
            return from_tensor(view, name, dtypes, data=data)

        features_dtype = tensors["features"].dtype if "features" in tensors else "float32"
        scale = array("features_scale", ("float32",))
        stats = head.stats
        return cls(
            frame_id=head.frame_id,
            features=float32_features(array("features", FEATURE_DTYPES), features_dtype, scale),
            alpha=array("alpha"),
            valid=array("valid"),
            point_indices=array("point_indices"),
            points_world=array("points_world"),
            num_points=stats.num_points,
            valid_ratio=stats.valid_ratio,
            gate_mean=stats.gate_mean,
            model_id=head.model_id,
            stage_ms=dict(stats.stage_ms),
            queue_ms=stats.queue_ms,
            decode_ms=stats.decode_ms,
            batch_size=stats.batch_size,
            wire_bytes=len(message),
            features_dtype=features_dtype,
            features_scale=scale,
            shared_memory=any(v.shared_memory is not None for v in tensors.values()),
        )

    @classmethod
    def from_response(cls, response: pb.EncodeFrameResponse) -> EncodeResult:
        return cls.from_bytes(response.SerializeToString())

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-point arrays and scalar stats, as ``np.savez`` takes them."""
        arrays = {
            "features": self.features,
            "alpha": self.alpha,
            "valid": self.valid,
            "point_indices": self.point_indices,
            "frame_id": np.array(self.frame_id),
            "model_id": np.array(self.model_id),
            "num_points": np.array(self.num_points),
            "valid_ratio": np.array(self.valid_ratio),
            "gate_mean": np.array(self.gate_mean),
        }
        if self.points_world is not None:
            arrays["points_world"] = self.points_world
        return arrays


def float32_features(features: np.ndarray | None, dtype: str, scale: np.ndarray | None) -> np.ndarray:
    """Features as they travelled (``dtype``; int8 with its per-point ``scale``) -> float32."""
    if features is None:
        raise FieldError("features", "missing from the response")
    if dtype == "float32":
        return features
    if dtype == "bfloat16":
        return bfloat16_to_float32(features)
    if dtype == "int8":
        if scale is None or scale.shape != features.shape[:1]:
            raise FieldError("features_scale", f"int8 features need one scale per point ({len(features)})")
        return dequantise_int8(features, scale)
    return features.astype(np.float32)


def dequantise_int8(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 features and their per-point scales -> float32."""
    out = values.astype(np.float32)
    out *= scale[:, None]
    return out
