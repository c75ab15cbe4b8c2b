"""The encoder's inputs and outputs as Triton tensors, both ways, and the model's config.

Shared by the Triton model (bench/peers/triton_model.py, run by Triton's Python backend) and
the benchmark's Triton client, so the two agree by construction. numpy only: no Triton
package is needed to import it.

A request is one frame, raw arrays (Triton's tensors carry no image codecs, and on loopback
or shared memory decoding a PNG costs more than moving the raw bytes):
``COLOR`` H×W×3 uint8, ``DEPTH`` H×W uint16, ``INTRINSICS`` fx fy cx cy, ``DEPTH_SCALE``,
``CAM_TO_WORLD`` 4×4 and ``MAX_POINTS`` (0: the model's default). Every tensor has Triton's
leading batch dimension of 1 on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_NAME = "bifusion"
# name -> (numpy dtype, Triton config type, dims without the batch dimension)
INPUTS = {
    "COLOR": (np.uint8, "TYPE_UINT8", (-1, -1, 3)),
    "DEPTH": (np.uint16, "TYPE_UINT16", (-1, -1)),
    "INTRINSICS": (np.float64, "TYPE_FP64", (4,)),
    "DEPTH_SCALE": (np.float64, "TYPE_FP64", (1,)),
    "CAM_TO_WORLD": (np.float64, "TYPE_FP64", (4, 4)),
    "MAX_POINTS": (np.int32, "TYPE_INT32", (1,)),
}
OUTPUTS = {
    "FEATURES": (np.float32, "TYPE_FP32", (-1, -1)),
    "ALPHA": (np.float32, "TYPE_FP32", (-1,)),
    "VALID": (np.bool_, "TYPE_BOOL", (-1,)),
    "POINT_INDICES": (np.int64, "TYPE_INT64", (-1,)),
    # The batch this frame ran in and its U-Net time: what our responses' stats report.
    "BATCH_SIZE": (np.int32, "TYPE_INT32", (1,)),
    "UNET_MS": (np.float32, "TYPE_FP32", (1,)),
}


def inputs_from_frame(frame, max_points: int | None) -> dict[str, np.ndarray]:
    """A ``bifusion.Frame`` (as our server decodes it) -> the request's tensors, batch dim 1."""
    pose = frame.cam_to_world if frame.cam_to_world is not None else np.eye(4)
    arrays = {
        "COLOR": frame.color,
        "DEPTH": frame.depth,
        "INTRINSICS": frame.intrinsics.as_array(),
        "DEPTH_SCALE": [frame.depth_scale],
        "CAM_TO_WORLD": pose,
        "MAX_POINTS": [max_points or 0],
    }
    return {name: np.ascontiguousarray(arrays[name], INPUTS[name][0])[None] for name in INPUTS}


def frame_from_inputs(arrays: dict[str, np.ndarray]):
    """One request's tensors -> ``(Frame, EncodeOptions)`` for ``BiFusionEncoder``."""
    from bifusion import EncodeOptions, Frame, Intrinsics

    fx, fy, cx, cy = (float(v) for v in arrays["INTRINSICS"][0])
    frame = Frame(
        color=arrays["COLOR"][0],
        intrinsics=Intrinsics(fx=fx, fy=fy, cx=cx, cy=cy),
        depth=arrays["DEPTH"][0],
        depth_scale=float(arrays["DEPTH_SCALE"][0, 0]),
        cam_to_world=arrays["CAM_TO_WORLD"][0],
    )
    return frame, EncodeOptions(max_points=int(arrays["MAX_POINTS"][0, 0]) or None)


def outputs_from_result(result, batch_size: int) -> dict[str, np.ndarray]:
    """A ``FrameResult`` -> the response's tensors, batch dim 1 (views where possible)."""
    arrays = {
        "FEATURES": result.features,
        "ALPHA": result.alpha,
        "VALID": result.valid,
        "POINT_INDICES": result.point_indices,
        "BATCH_SIZE": [batch_size],
        "UNET_MS": [result.timings_ms.get("unet", 0.0)],
    }
    return {name: np.asarray(arrays[name], OUTPUTS[name][0])[None] for name in OUTPUTS}


@dataclass
class TritonAnswer:
    """A Triton response read back, shaped like ``bifusion_client.EncodeResult`` where the
    benchmark's checks and load generator look (frame_id, the arrays, batch_size, stage_ms)."""

    frame_id: str
    features: np.ndarray
    alpha: np.ndarray
    valid: np.ndarray
    point_indices: np.ndarray
    batch_size: int
    stage_ms: dict[str, float]
    wire_bytes: int  # the outputs' bytes as they travelled (0 through shared memory)


def answer_from_outputs(frame_id: str, arrays: dict[str, np.ndarray], wire_bytes: int) -> TritonAnswer:
    return TritonAnswer(
        frame_id=frame_id,
        features=arrays["FEATURES"][0],
        alpha=arrays["ALPHA"][0],
        valid=arrays["VALID"][0],
        point_indices=arrays["POINT_INDICES"][0],
        batch_size=int(arrays["BATCH_SIZE"][0, 0]),
        stage_ms={"unet": float(arrays["UNET_MS"][0, 0])},
        wire_bytes=wire_bytes,
    )


def output_bytes(max_points: int, feature_dim: int) -> dict[str, int]:
    """The most bytes each output can take for a frame of up to ``max_points`` points."""
    per_point = {"FEATURES": 4 * feature_dim, "ALPHA": 4, "VALID": 1, "POINT_INDICES": 8}
    return {name: per_point.get(name, 0) * max_points or 8 for name in OUTPUTS}


def model_config(
    max_batch_size: int,
    max_batch_delay_ms: float,
    device: str,
    instances: int = 1,
    checkpoint: str | None = None,
) -> str:
    """``config.pbtxt`` for the Python-backend model: Triton's dynamic batcher with our
    server's batch size and delay; ``device`` cpu or cuda picks the instance kind."""

    def tensors(specs: dict) -> str:
        return ",\n".join(
            f'  {{ name: "{name}" data_type: {kind} dims: [{", ".join(map(str, dims))}]'
            + (" allow_ragged_batch: true" if -1 in dims and specs is INPUTS else "")
            + " }"
            for name, (_, kind, dims) in specs.items()
        )

    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    # Frames of a batch are separate requests in the Python backend, so sizes may differ
    # (allow_ragged_batch); a frame waits at most the delay for others to join it.
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch_size}
dynamic_batching {{ max_queue_delay_microseconds: {round(max_batch_delay_ms * 1000)} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
input [
{tensors(INPUTS)}
]
output [
{tensors(OUTPUTS)}
]
parameters {{ key: "device" value {{ string_value: "{device}" }} }}
parameters {{ key: "checkpoint" value {{ string_value: "{checkpoint or ""}" }} }}
"""
