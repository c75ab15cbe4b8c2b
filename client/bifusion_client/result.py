"""``EncodeFrameResponse`` -> numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import from_tensor


@dataclass
class EncodeResult:
    """One encoded frame. ``features`` is always float32, also when it travelled as float16."""

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

    @classmethod
    def from_response(cls, response: pb.EncodeFrameResponse) -> EncodeResult:
        features = from_tensor(response.features, "features", dtypes=("float32", "float16"))
        stats = response.stats
        return cls(
            frame_id=response.frame_id,
            features=features.astype(np.float32),
            alpha=from_tensor(response.alpha, "alpha"),
            valid=from_tensor(response.valid, "valid"),
            point_indices=from_tensor(response.point_indices, "point_indices"),
            points_world=(
                from_tensor(response.points_world, "points_world")
                if response.HasField("points_world")
                else None
            ),
            num_points=stats.num_points,
            valid_ratio=stats.valid_ratio,
            gate_mean=stats.gate_mean,
            model_id=response.model_id,
            stage_ms=dict(stats.stage_ms),
            queue_ms=stats.queue_ms,
            decode_ms=stats.decode_ms,
            batch_size=stats.batch_size,
            wire_bytes=response.ByteSize(),
            features_dtype=response.features.dtype,
        )

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
