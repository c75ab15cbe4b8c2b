"""Seeded fuzzing over loopback gRPC: mutated and garbage requests never get INTERNAL or UNKNOWN,
and the server still serves a good frame bitwise the same afterwards.

Frames are a real TUM frame shrunk to 32×24 with a handful of points, so most mutants are
refused before the model and the whole run fits in CI. Families: field-level protobuf
mutations, byte-level mutations of the serialised request, raw garbage, and streams of mutants.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image
from serving_harness import running_server

from bifusion_client.request import build_request
from bifusion_client.result import EncodeResult
from bifusion_wire import SERVICE_NAME
from bifusion_wire import encoder_pb2 as pb

SEED = 20261126
UNARY_MUTANTS = 2000
STREAMS, STREAM_LENGTH = 40, 4
WAVE = 100  # requests in flight at once: the few accepted ones share model calls
SHRINK = 20  # 640×480 -> 32×24
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FINE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # queue or budget full under the burst: retryable
}
WEIRD_FLOATS = [0.0, -0.0, -1.0, 1e-300, 1e300, -1e300, math.inf, -math.inf, math.nan, 5e-324, 3.4e38]
WEIRD_INTS = [0, 1, 2, 15, 16, 24, 32, 4096, 4097, 65535, 2**31 - 1, 2**32 - 1]


def small_request(frame) -> pb.EncodeFrameRequest:
    """The TUM frame at 1/20 scale: 32×24 PNG colour and depth, 16 points. PNG checksums its
    data, so most byte-level mutants are refused before the model."""
    height, width = frame.color.shape[0] // SHRINK, frame.color.shape[1] // SHRINK
    color = np.asarray(Image.fromarray(frame.color).resize((width, height), Image.BILINEAR))
    depth = np.ascontiguousarray(frame.depth[::SHRINK, ::SHRINK])
    k = frame.intrinsics
    intrinsics = (k["fx"] / SHRINK, k["fy"] / SHRINK, k["cx"] / SHRINK, k["cy"] / SHRINK)
    return build_request(
        color,
        depth,
        intrinsics,
        cam_to_world=frame.cam_to_world,
        depth_scale=frame.depth_scale,
        frame_id="fuzz-good",
        max_points=16,
    )


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    data = bytearray(data)
    kind = rng.randrange(5)
    at = rng.randrange(len(data))
    if kind == 0:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == 3:
        data += data[at : at + rng.randrange(1, 256)]
    else:
        data[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80))
    return bytes(data)


def _field_mutations() -> list[Callable[[random.Random, pb.EncodeFrameRequest], None]]:
    def intrinsic(rng, r):
        setattr(r.intrinsics, rng.choice(("fx", "fy", "cx", "cy")), rng.choice(WEIRD_FLOATS))

    def size(rng, r):
        setattr(r.intrinsics, rng.choice(("width", "height")), rng.choice(WEIRD_INTS))

    def encoding(rng, r):
        image = rng.choice((r.color, r.depth))
        image.encoding = rng.randrange(-3, 9)

    def image_data(rng, r):
        image = rng.choice((r.color, r.depth))
        image.data = _mutate_bytes(rng, image.data)

    def depth_scale(rng, r):
        r.depth.depth_scale = rng.choice(WEIRD_FLOATS)

    def drop(rng, r):
        r.ClearField(rng.choice(("color", "depth", "intrinsics", "options", "cam_to_world")))

    def pose(rng, r):
        values = list(r.cam_to_world) or [1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
        if rng.random() < 0.3:
            values = values[: rng.randrange(20)]
        else:
            values[rng.randrange(len(values))] = rng.choice(WEIRD_FLOATS)
        r.cam_to_world[:] = values

    def options(rng, r):
        choice = rng.randrange(3)
        if choice == 0:
            r.options.max_points = rng.choice(WEIRD_INTS)
        elif choice == 1:
            r.options.output_dtype = rng.randrange(-2, 5)
        else:
            r.options.occlusion_tau = rng.choice(WEIRD_FLOATS)

    def points(rng, r):
        if rng.random() < 0.5:
            r.ClearField("depth")
        tensor = r.points
        tensor.dtype = rng.choice(("float32", "float64", "uint8", "bool", "complex64", "", "float32 "))
        rank = rng.choice((0, 1, 2, 2, 2, 3, 9, 65))
        tensor.shape[:] = [rng.choice((0, 1, 3, 6, 7, 2**40, -1, 2**63 - 1)) for _ in range(rank)]
        tensor.data = bytes(rng.randrange(256) for _ in range(rng.choice((0, 4, 12, 36, 72, 100))))

    def frame_id(rng, r):
        r.frame_id = rng.choice(("é" * 300, "x" * 257, "🤖" * 257, "\x00" * 300))

    return [intrinsic, size, encoding, image_data, depth_scale, drop, pose, options, points, frame_id]


def mutants(good: pb.EncodeFrameRequest, rng: random.Random, count: int) -> list[bytes]:
    """``count`` mutated requests: about half field-level, a third byte-level, the rest garbage."""
    mutations = _field_mutations()
    serialised = good.SerializeToString()
    out = []
    for _ in range(count):
        family = rng.random()
        if family < 0.5:
            request = pb.EncodeFrameRequest()
            request.CopyFrom(good)
            for mutate in rng.sample(mutations, rng.randrange(2, 5)):
                mutate(rng, request)
            out.append(request.SerializeToString())
        elif family < 0.85:
            data = serialised
            for _ in range(rng.randrange(1, 4)):
                data = _mutate_bytes(rng, data)
            out.append(data)
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 5, 64, 700)))))
    return out


def _code(future) -> grpc.StatusCode:
    error = future.exception()
    return grpc.StatusCode.OK if error is None else error.code()


def send_unary(channel, payloads: list[bytes]) -> Counter:
    call = channel.unary_unary(f"/{SERVICE_NAME}/EncodeFrame")  # bytes in, bytes out
    codes: Counter = Counter()
    for start in range(0, len(payloads), WAVE):
        futures = [call.future(p, timeout=120) for p in payloads[start : start + WAVE]]
        codes.update(_code(f) for f in futures)
    return codes


def send_streams(channel, streams: list[list[bytes]]) -> Counter:
    call = channel.stream_stream(f"/{SERVICE_NAME}/EncodeStream")
    codes: Counter = Counter()
    calls = [call(iter(messages), timeout=120) for messages in streams]
    for stream in calls:
        try:
            for _ in stream:
                pass
            codes[grpc.StatusCode.OK] += 1
        except grpc.RpcError as error:
            codes[error.code()] += 1
    return codes


def encode_alone(channel, good: pb.EncodeFrameRequest) -> EncodeResult:
    call = channel.unary_unary(f"/{SERVICE_NAME}/EncodeFrame")
    return EncodeResult.from_response(
        pb.EncodeFrameResponse.FromString(call(good.SerializeToString(), timeout=60))
    )


def test_fuzzed_requests_never_get_internal_and_leave_the_server_intact(encoder, tum_folder_frames):
    rng = random.Random(SEED)
    good = small_request(tum_folder_frames[0])
    payloads = mutants(good, rng, UNARY_MUTANTS)
    streams = [mutants(good, rng, STREAM_LENGTH) for _ in range(STREAMS)]
    for stream in streams[::8]:
        stream.insert(0, good.SerializeToString())  # a good frame first, then mutants
    config = {"max_message_bytes": 1 << 20, "max_batch_size": 32, "max_batch_delay_ms": 20, "max_queue": 256}
    with running_server(encoder, **config) as live, grpc.insecure_channel(live.address) as channel:
        before = encode_alone(channel, good)
        codes = send_unary(channel, payloads)
        stream_codes = send_streams(channel, streams)
        after = encode_alone(channel, good)
        assert live.metric("bifusion_batch_failures_total", model_instance="0") == 0
    report = {c.name: n for c, n in (codes + stream_codes).items()}
    assert sum(codes.values()) == UNARY_MUTANTS and sum(stream_codes.values()) == STREAMS
    assert not NEVER & set(codes + stream_codes), report
    assert set(codes + stream_codes) <= FINE, report
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > UNARY_MUTANTS // 2, report  # the fuzz bites
    assert before.num_points == after.num_points > 0
    for name in ("features", "alpha", "valid", "point_indices"):
        assert getattr(before, name).tobytes() == getattr(after, name).tobytes(), name


@pytest.mark.parametrize("seed", [1, 2])
def test_mutants_are_reproducible_from_the_seed(tum_folder_frames, seed):
    good = small_request(tum_folder_frames[0])
    assert mutants(good, random.Random(seed), 50) == mutants(good, random.Random(seed), 50)
