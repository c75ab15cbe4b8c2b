"""Responses written once, in place: wire bytes equal to protobuf's, client arrays that view
the received bytes, and the error of the compact feature dtypes on the real frames."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from serving_harness import running_server

from bifusion import EncodeOptions
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from bifusion_client.result import TENSOR_FIELDS as TENSORS_BY_NUMBER
from bifusion_client.result import EncodeResult
from bifusion_server.respond import (
    reference_response,
    response_head,
    response_outputs,
    serialise_inline,
    without_padding,
)
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.raw import TensorView, fields
from bifusion_wire.tensor import MAX_OUTPUT_TENSORS, MESSAGE_ALIGNMENT, bfloat16_to_float32

DTYPES = ("float32", "float16", "int8", "bfloat16")
TENSORS = ("features", "alpha", "valid", "point_indices", "points_world", "features_scale")
MAX_POINTS = 3000
# A padding field takes at most 2 × MESSAGE_ALIGNMENT + 2 bytes (see tensor_field_header).
PADDING_BOUND = MAX_OUTPUT_TENSORS * (2 * MESSAGE_ALIGNMENT + 2)


@pytest.fixture(scope="module")
def results(encoder, tum_frames):
    """The real frames, each encoded with world points (every tensor a response can hold)."""
    options = EncodeOptions(max_points=MAX_POINTS, return_points_world=True)
    return encoder.encode(tum_frames, [options] * len(tum_frames))


def _head(result):
    return response_head(result, model="abc123", queue_ms=1.5, decode_ms=2.5, batch_size=5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_response_parses_as_the_protobuf_reference(results, dtype):
    for result in results[:2]:
        fast = serialise_inline(_head(result), response_outputs(result, dtype))
        reference = reference_response(_head(result), result, dtype)
        assert type(fast) is bytes
        parsed = pb.EncodeFrameResponse.FromString(fast)
        paddings = [getattr(parsed, name).padding for name in TENSORS if parsed.HasField(name)]
        assert all(set(padding) <= {0} for padding in paddings)
        # Each padding field adds its bytes, a key and a length.
        assert len(fast) - len(reference) <= sum(len(p) + 2 for p in paddings)
        assert without_padding(fast) == without_padding(reference)
        assert parsed.features.dtype == dtype and list(parsed.features.shape) == [MAX_POINTS, 256]
        assert parsed.HasField("features_scale") == (dtype == "int8")


def test_client_arrays_view_the_response_bytes(results):
    result = results[0]
    message = serialise_inline(_head(result), response_outputs(result, "float32"))
    parsed = EncodeResult.from_bytes(message)
    whole = np.frombuffer(message, np.uint8)
    for name in ("features", "alpha", "valid", "point_indices", "points_world"):
        array = getattr(parsed, name)
        assert np.shares_memory(array, whole), name
        assert not array.flags.writeable
        np.testing.assert_array_equal(array, getattr(result, name))
    assert parsed.frame_id == result.frame_id and parsed.model_id == "abc123"
    assert parsed.batch_size == 5 and parsed.stage_ms == pytest.approx(result.timings_ms)
    assert parsed.wire_bytes == len(message)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tensor_starts_aligned_in_the_message(results, dtype):
    for result in (*results, _no_points(results[0])):
        message = serialise_inline(_head(result), response_outputs(result, dtype))
        buffer = memoryview(message)
        offsets = {
            TENSORS_BY_NUMBER[number]: _offset(buffer, lo, hi)
            for number, _, _, lo, hi in fields(buffer)
            if number in TENSORS_BY_NUMBER
        }
        assert set(offsets) >= {"features", "alpha", "valid", "point_indices", "points_world"}
        assert all(offset % MESSAGE_ALIGNMENT == 0 for offset in offsets.values()), offsets
        # CPython's bytes data is 16-byte aligned, so the arrays viewing it are aligned too.
        assert np.frombuffer(message, np.uint8).ctypes.data % MESSAGE_ALIGNMENT == 0
        parsed = EncodeResult.from_bytes(message)
        for name in TENSORS:
            array = getattr(parsed, name)
            assert array is None or (array.flags.aligned and array.flags.c_contiguous), name


def _offset(buffer, lo, hi):
    """Where a Tensor's data starts in the message."""
    data = TensorView.parse(buffer, lo, hi).data
    return np.frombuffer(data, np.uint8).ctypes.data - np.frombuffer(buffer, np.uint8).ctypes.data


def _no_points(result):
    def first(array):
        return None if array is None else array[:0]

    fields = ("features", "alpha", "valid", "point_indices", "points_world")
    return dataclasses.replace(result, **{name: first(getattr(result, name)) for name in fields})


def test_client_parses_a_message_serialised_by_protobuf(results):
    """Field order and merging are protobuf's business: the hand parser takes its output too."""
    result = results[1]
    reference = reference_response(_head(result), result, "float16")
    parsed = EncodeResult.from_bytes(reference)
    np.testing.assert_allclose(parsed.features, result.features, atol=1e-3)
    assert parsed.features_dtype == "float16" and parsed.features.dtype == np.float32


def test_truncated_response_is_an_error_not_garbage(results):
    message = serialise_inline(_head(results[0]), response_outputs(results[0], "float32"))
    with pytest.raises(ValueError):
        EncodeResult.from_bytes(message[: len(message) // 2])


def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_compact_features_error_on_the_real_frames(results, dtype):
    """The stated bound: cosine to the float32 feature ≥ 0.9999 and norm within 1e-2 of 1."""
    worst_cosine, worst_norm = 1.0, 0.0
    for result in results:
        parsed = EncodeResult.from_bytes(serialise_inline(_head(result), response_outputs(result, dtype)))
        assert parsed.features_dtype == dtype and parsed.features.dtype == np.float32
        worst_cosine = min(worst_cosine, float(_cosines(parsed.features, result.features).min()))
        worst_norm = max(worst_norm, float(np.abs(np.linalg.norm(parsed.features, axis=1) - 1).max()))
    assert worst_cosine >= 0.9999, worst_cosine
    assert worst_norm <= 1e-2, worst_norm


def test_int8_uses_the_full_range_per_point(results):
    result = results[0]
    parsed = EncodeResult.from_bytes(serialise_inline(_head(result), response_outputs(result, "int8")))
    np.testing.assert_allclose(parsed.features_scale, np.abs(result.features).max(axis=1) / 127, rtol=1e-6)
    message = pb.EncodeFrameResponse.FromString(
        serialise_inline(_head(result), response_outputs(result, "int8"))
    )
    values = np.frombuffer(message.features.data, np.int8).reshape(-1, 256)
    assert (np.abs(values).max(axis=1) == 127).all()
    # Bitwise numpy's own arithmetic: float32 x * (1 / scale), rounded half to even.
    scale = parsed.features_scale
    np.testing.assert_array_equal(values, np.rint(result.features * (1 / scale)[:, None]).astype(np.int8))


def test_float16_is_bitwise_numpys_own_cast(results):
    """Converted by torch for speed, but the same bits as numpy's float16 cast, specials and
    ties (1 + 2^-11 rounds to even) and overflow (70000 -> inf) included."""
    result = results[0]
    features = result.features.copy()
    features[0, :6] = [np.nan, np.inf, -np.inf, 1.00048828125, 70000.0, 6e-8]
    result = dataclasses.replace(result, features=features)
    message = pb.EncodeFrameResponse.FromString(
        serialise_inline(_head(result), response_outputs(result, "float16"))
    )
    bits = np.frombuffer(message.features.data, np.uint16).reshape(features.shape)
    with np.errstate(over="ignore"):
        expected = features.astype(np.float16)
    np.testing.assert_array_equal(bits, expected.view(np.uint16))


def test_bfloat16_is_rounded_to_nearest_even_and_widened_exactly(results):
    result = results[0]
    features = result.features.copy()
    features[0, :4] = [np.nan, np.inf, -np.inf, 1.00390625]  # 1 + 2^-8: a tie, rounds to even (1.0)
    result = dataclasses.replace(result, features=features)
    message = pb.EncodeFrameResponse.FromString(
        serialise_inline(_head(result), response_outputs(result, "bfloat16"))
    )
    bits = np.frombuffer(message.features.data, np.uint16).reshape(features.shape)
    expected = torch.from_numpy(features).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    widened = bfloat16_to_float32(bits)
    assert (
        np.isnan(widened[0, 0])
        and widened[0, 1] == np.inf
        and widened[0, 2] == -np.inf
        and widened[0, 3] == 1.0
    )
    np.testing.assert_array_equal(widened, torch.from_numpy(features).to(torch.bfloat16).float().numpy())


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder, max_batch_size=4) as live:
        yield live


def test_served_output_dtypes_and_their_sizes(live, tum_folder_frames):
    frame = tum_folder_frames[2]
    sizes = {}
    with BiFusionClient(live.address) as client:
        full = client.encode_request(request_from_folder_frame(frame, max_points=MAX_POINTS))
        for dtype in DTYPES:
            result = client.encode_request(
                request_from_folder_frame(frame, max_points=MAX_POINTS, output_dtype=dtype)
            )
            assert result.features_dtype == dtype
            for array in (result.features, result.alpha, result.valid, result.point_indices):
                assert array.flags.aligned  # a view of the message, or a float32 copy
            assert _cosines(result.features, full.features).min() >= 0.9999
            np.testing.assert_array_equal(result.valid, full.valid)
            sizes[dtype] = result.wire_bytes
    features = MAX_POINTS * 256
    slack = 64 + PADDING_BOUND  # stats and framing, and the alignment padding
    assert sizes["float32"] - sizes["float16"] == pytest.approx(2 * features, abs=slack)
    assert sizes["float16"] == pytest.approx(sizes["bfloat16"], abs=slack)
    # int8: 1 byte per component plus a 4-byte scale per point
    assert sizes["float32"] - sizes["int8"] == pytest.approx(3 * features - 4 * MAX_POINTS, abs=64 + slack)


def test_served_response_decodes_with_the_descriptors_from_reflection(live, tum_folder_frames):
    """What grpcurl does: fetch the schema by reflection, decode the bytes with it."""
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(live.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="bifusion.v1.EncodeFrameResponse"
        )
        (answer,) = stub.ServerReflectionInfo(iter([request]))
        pool = descriptor_pool.DescriptorPool()
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
        message_class = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("bifusion.v1.EncodeFrameResponse")
        )
        data = request_from_folder_frame(tum_folder_frames[0], max_points=500).SerializeToString()
        raw = channel.unary_unary("/bifusion.v1.BiFusionEncoder/EncodeFrame")(data, timeout=120)
    decoded = message_class.FromString(raw)
    assert decoded.features.dtype == "float32" and list(decoded.features.shape) == [500, 256]
    features = np.frombuffer(decoded.features.data, np.float32).reshape(500, 256)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(features, EncodeResult.from_bytes(raw).features)
