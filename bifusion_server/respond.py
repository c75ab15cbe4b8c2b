"""Encoder results and model facts -> wire messages."""

from __future__ import annotations

import json

import numpy as np

from bifusion import FrameResult, ModelInfo
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import to_tensor

# Per point: alpha float32, valid bool, point index int64; world xyz float32 when asked.
FIXED_BYTES_PER_POINT = 4 + 1 + 8
WORLD_BYTES_PER_POINT = 12
ENVELOPE_BYTES = 64 * 1024  # ids, shapes, stats and protobuf framing, generously


def model_id(sha256: str) -> str:
    return sha256[:12]


def response_bytes_bound(num_points: int, feature_dim: int, float16: bool, world: bool) -> int:
    """An upper bound on a response's size, checked before the frame reaches the model."""
    per_point = feature_dim * (2 if float16 else 4) + FIXED_BYTES_PER_POINT
    per_point += WORLD_BYTES_PER_POINT if world else 0
    return num_points * per_point + ENVELOPE_BYTES


def response_message(
    result: FrameResult,
    float16: bool,
    model: str,
    queue_ms: float,
    decode_ms: float,
    batch_size: int,
) -> pb.EncodeFrameResponse:
    response = pb.EncodeFrameResponse(frame_id=result.frame_id, model_id=model)
    to_tensor(result.features.astype(np.float16) if float16 else result.features, response.features)
    to_tensor(result.alpha, response.alpha)
    to_tensor(result.valid, response.valid)
    to_tensor(result.point_indices, response.point_indices)
    if result.points_world is not None:
        to_tensor(result.points_world, response.points_world)
    stats = response.stats
    stats.num_points = result.stats.num_points
    stats.valid_ratio = result.stats.valid_ratio
    stats.gate_mean = result.stats.gate_mean
    stats.stage_ms.update(result.timings_ms)
    stats.queue_ms = queue_ms
    stats.decode_ms = decode_ms
    stats.batch_size = batch_size
    return response


def model_info_message(
    info: ModelInfo, max_batch_size: int, max_queue: int, max_message_bytes: int, version: str
) -> pb.ModelInfo:
    return pb.ModelInfo(
        architecture=info.architecture,
        checkpoint_sha256=info.checkpoint_sha256,
        model_id=model_id(info.checkpoint_sha256),
        device=info.device,
        demo_weights=info.demo_weights,
        feature_dim=info.config.feature_dim,
        amp=info.amp,
        limits=pb.Limits(
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_points=info.limits.max_points,
            default_max_points=info.config.max_points,
            max_message_bytes=max_message_bytes,
            max_image_side=info.limits.max_image_side,
            min_image_side=info.limits.min_image_side,
        ),
        server_version=version,
        config_json=json.dumps(info.config.to_dict(), sort_keys=True),
    )
