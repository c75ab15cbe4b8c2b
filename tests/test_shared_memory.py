"""Shared-memory outputs over real POSIX shared memory and real gRPC on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_harness import running_server, wait_until

from bifusion_client.api import BiFusionClient, error_field
from bifusion_client.request import request_from_folder_frame
from bifusion_server.client_shared_memory import SharedMemoryRegistry
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire import encoder_pb2_grpc
from bifusion_wire.tensor import FieldError

MAX_POINTS = 1500
SHM = Path("/dev/shm")


@pytest.fixture
def shm():
    """Real shared-memory objects, unlinked at the end."""
    made = []

    def make(size: int) -> shared_memory.SharedMemory:
        region = shared_memory.SharedMemory(create=True, size=size)
        made.append(region)
        return region

    yield make
    for region in made:
        region.close()
        region.unlink()


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder, max_batch_size=4, allow_shared_memory=True) as live:
        yield live


@pytest.fixture(scope="module")
def live_off(encoder):
    with running_server(encoder, max_batch_size=2) as live:
        yield live


def registry(live) -> SharedMemoryRegistry:
    return live.server._shared_memory


def register(stub, name, region, byte_size=None):
    call = stub.RegisterSharedMemory(
        pb.RegisterSharedMemoryRequest(
            name=name, key=region.name.lstrip("/"), byte_size=byte_size or region.size
        )
    )
    return call, next(call)


def test_shared_memory_results_match_tcp_and_view_the_region(live, tum_folder_frames):
    with BiFusionClient(live.address) as tcp, BiFusionClient(live.address, shared_memory=True) as shm_client:
        for frame in tum_folder_frames[:3]:
            for dtype in ("float32", "int8"):
                request = request_from_folder_frame(
                    frame, max_points=MAX_POINTS, output_dtype=dtype, world_points=True
                )
                expected = tcp.encode_request(request)
                result = shm_client.encode_request(request)
                assert result.shared_memory and not expected.shared_memory
                assert result.wire_bytes < 2000 < expected.wire_bytes
                for name in ("features", "alpha", "valid", "point_indices", "points_world"):
                    np.testing.assert_array_equal(
                        getattr(result, name), getattr(expected, name), err_msg=name
                    )
        # Six calls, two regions: a region is reused once the result viewing it is dropped.
        assert len(shm_client._shared.regions) == 2
        region = next(r for r in shm_client._shared.regions if r.name == result_region(result, shm_client))
        assert np.shares_memory(result.alpha, np.frombuffer(region.map, np.uint8))
        held = result.alpha.copy()
        # The result still holds its region: the next call writes elsewhere and leaves it intact.
        other = shm_client.encode_request(
            request_from_folder_frame(tum_folder_frames[4], max_points=MAX_POINTS)
        )
        assert not np.shares_memory(other.alpha, result.alpha)
        np.testing.assert_array_equal(result.alpha, held)
        names = [r.name for r in shm_client._shared.regions]
        assert all(name in registry(live) for name in names)
    # close(): unregistered on the server, unlinked from /dev/shm; live arrays stay readable
    wait_until(
        lambda: not any(name in registry(live) for name in names), timeout=10, what="regions forgotten"
    )
    assert not any((SHM / name).exists() for name in names)
    np.testing.assert_array_equal(result.alpha, held)


def result_region(result, client) -> str:
    for region in client._shared.regions:
        if np.shares_memory(result.alpha, np.frombuffer(region.map, np.uint8)):
            return region.name
    raise AssertionError("the result views no region of the client")


def test_shared_memory_stream(live, tum_folder_frames):
    requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in tum_folder_frames]
    with BiFusionClient(live.address, shared_memory=True) as client:
        results = list(client.encode_stream(requests))
        expected = [client.encode_request(r) for r in requests]
    assert [r.frame_id for r in results] == [f.frame_id for f in tum_folder_frames]
    for got, want in zip(results, expected, strict=True):
        assert got.shared_memory
        # batched differently from the unary calls: equal up to the encoder's batch-invariance bound
        np.testing.assert_allclose(got.features, want.features, rtol=0, atol=1e-4)


def test_registration_ends_when_the_channel_closes(live, shm):
    region = shm(1 << 20)
    channel = grpc.insecure_channel(live.address)
    _, status = register(encoder_pb2_grpc.BiFusionEncoderStub(channel), "closing-channel", region)
    assert status.byte_size == 1 << 20 and "closing-channel" in registry(live)
    channel.close()
    wait_until(lambda: "closing-channel" not in registry(live), timeout=10, what="the region forgotten")


def test_unregister_forgets_the_region_and_ends_its_stream(live, shm):
    region = shm(1 << 20)
    with grpc.insecure_channel(live.address) as channel:
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        call, _ = register(stub, "explicit", region)
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="explicit"))
        assert list(call) == [] and call.code() == grpc.StatusCode.OK
        assert "explicit" not in registry(live)
        with pytest.raises(grpc.RpcError) as info:
            stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="explicit"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(info.value) == "name"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r, region: setattr(r, "name", "bad/name"), "name"),
        (lambda r, region: setattr(r, "key", "../etc/passwd"), "key"),
        (lambda r, region: setattr(r, "key", "no-such-region-here"), "key"),
        (lambda r, region: setattr(r, "byte_size", region.size + 4096), "byte_size"),
        (lambda r, region: setattr(r, "byte_size", 0), "byte_size"),
    ],
)
def test_bad_registrations_name_the_field(live, shm, change, field):
    region = shm(1 << 16)
    request = pb.RegisterSharedMemoryRequest(
        name="bad-one", key=region.name.lstrip("/"), byte_size=region.size
    )
    change(request, region)
    with grpc.insecure_channel(live.address) as channel, pytest.raises(grpc.RpcError) as info:
        next(encoder_pb2_grpc.BiFusionEncoderStub(channel).RegisterSharedMemory(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(info.value) == field


def test_a_symlink_under_dev_shm_is_refused(live, shm, tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 4096)
    link = SHM / f"bifusion-test-link-{os.getpid()}"
    link.symlink_to(target)
    try:
        request = pb.RegisterSharedMemoryRequest(name="link", key=link.name, byte_size=4096)
        with grpc.insecure_channel(live.address) as channel, pytest.raises(grpc.RpcError) as info:
            next(encoder_pb2_grpc.BiFusionEncoderStub(channel).RegisterSharedMemory(request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(info.value) == "key"
    finally:
        link.unlink()
    assert target.read_bytes() == b"x" * 4096


def test_duplicate_name_is_refused(live, shm):
    region = shm(1 << 16)
    with grpc.insecure_channel(live.address) as channel:
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        call, _ = register(stub, "twice", region)
        with pytest.raises(grpc.RpcError) as info:
            register(stub, "twice", region)
        assert error_field(info.value) == "name"
        call.cancel()


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        ({"region": "nobody"}, "output_shared_memory.region"),
        ({"offset": 100}, "output_shared_memory.offset"),
        ({"offset": 64 << 20}, "output_shared_memory.offset"),
        ({"offset": 64, "byte_size": 16 << 20}, "output_shared_memory.byte_size"),
        ({"byte_size": 4096}, "output_shared_memory.byte_size"),
    ],
)
def test_bad_output_ranges_name_the_field_and_leave_the_region_untouched(
    live, shm, tum_folder_frames, ref, field
):
    region = shm(16 << 20)
    region.buf[:] = b"\x5a" * region.size
    request = request_from_folder_frame(tum_folder_frames[0], max_points=MAX_POINTS)
    request.output_shared_memory.CopyFrom(
        pb.SharedMemoryRef(**{"region": "ranges", "offset": 0, "byte_size": region.size, **ref})
    )
    with grpc.insecure_channel(live.address) as channel:
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        call, _ = register(stub, "ranges", region)
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeFrame(request, timeout=60)
        call.cancel()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(info.value) == field
    assert bytes(region.buf) == b"\x5a" * region.size


def test_writes_stay_inside_the_asked_range(live, shm, tum_folder_frames):
    region = shm(8 << 20)
    region.buf[:] = b"\x5a" * region.size
    offset, size = 1 << 20, 4 << 20
    request = request_from_folder_frame(tum_folder_frames[1], max_points=MAX_POINTS)
    request.output_shared_memory.CopyFrom(pb.SharedMemoryRef(region="inside", offset=offset, byte_size=size))
    with grpc.insecure_channel(live.address) as channel:
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        call, _ = register(stub, "inside", region)
        response = stub.EncodeFrame(request, timeout=60)
        call.cancel()
    refs = [getattr(response, n).shared_memory for n in ("features", "alpha", "valid", "point_indices")]
    assert all(r.region == "inside" and r.offset % 64 == 0 for r in refs)
    assert refs[0].offset == offset and refs[0].byte_size == MAX_POINTS * 256 * 4
    end = max(r.offset + r.byte_size for r in refs)
    assert end <= offset + size
    data = np.frombuffer(region.buf, np.uint8)
    assert (data[:offset] == 0x5A).all() and (data[end:] == 0x5A).all()
    assert not response.features.data


def test_overlapping_ranges_in_flight_are_refused(shm):
    region = shm(1 << 20)
    registry = SharedMemoryRegistry()
    registry.register(
        pb.RegisterSharedMemoryRequest(name="r", key=region.name.lstrip("/"), byte_size=region.size)
    )
    first = registry.lease(pb.SharedMemoryRef(region="r", offset=0, byte_size=4096), 4096)
    with pytest.raises(FieldError) as info:
        registry.lease(pb.SharedMemoryRef(region="r", offset=2048, byte_size=4096), 4096)
    assert info.value.field == "output_shared_memory"
    registry.lease(pb.SharedMemoryRef(region="r", offset=4096, byte_size=4096), 4096).release()
    first.release()
    registry.lease(pb.SharedMemoryRef(region="r", offset=2048, byte_size=4096), 4096).release()
    registry.close()


def test_a_shrunk_region_is_not_written(shm):
    from bifusion_server.respond import Output

    region = shm(1 << 20)
    registry = SharedMemoryRegistry()
    registry.register(
        pb.RegisterSharedMemoryRequest(name="s", key=region.name.lstrip("/"), byte_size=region.size)
    )
    lease = registry.lease(pb.SharedMemoryRef(region="s", offset=0, byte_size=region.size), 4096)
    os.truncate(SHM / region.name.lstrip("/"), 4096)
    output = Output("alpha", "float32", (1024,), lambda dest: dest.fill(1.0))
    with pytest.raises(FieldError, match="shrunk"):
        lease.write([output])
    lease.release()
    registry.close()


def test_off_by_default_with_failed_precondition(live_off, shm, tum_folder_frames):
    region = shm(1 << 16)
    with BiFusionClient(live_off.address) as client:
        assert not client.model_info().shared_memory
    with grpc.insecure_channel(live_off.address) as channel:
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            register(stub, "off", region)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--allow-shared-memory" in info.value.details()
        request = request_from_folder_frame(tum_folder_frames[0], max_points=MAX_POINTS)
        request.output_shared_memory.CopyFrom(pb.SharedMemoryRef(region="off", byte_size=1 << 16))
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeFrame(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    before = set(SHM.glob("bifusion-*"))
    with BiFusionClient(live_off.address, shared_memory=True) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.encode_request(request_from_folder_frame(tum_folder_frames[0], max_points=MAX_POINTS))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert set(SHM.glob("bifusion-*")) == before, "a refused registration leaves nothing in /dev/shm"


def test_an_open_registration_does_not_hold_up_a_drain(encoder, shm):
    region = shm(1 << 16)
    with (
        running_server(encoder, allow_shared_memory=True, drain_seconds=60) as live,
        grpc.insecure_channel(live.address) as channel,
    ):
        call, _ = register(encoder_pb2_grpc.BiFusionEncoderStub(channel), "during-drain", region)
        started = time.monotonic()
        live.start_drain().result(timeout=30)
        assert time.monotonic() - started < 15, "the drain waited for the registration call"
        with pytest.raises(grpc.RpcError):
            list(call)  # the server ended it
        assert "during-drain" not in registry(live)


def test_a_call_cancelled_while_its_outputs_are_written_holds_its_range_until_the_write_ends(
    encoder, shm, tum_folder_frames
):
    """The pool thread writing a cancelled call's outputs cannot be stopped: until it is done,
    the range is still that call's and no other request may be given it."""
    region = shm(16 << 20)
    request = request_from_folder_frame(tum_folder_frames[0], max_points=MAX_POINTS)
    request.output_shared_memory.CopyFrom(pb.SharedMemoryRef(region="held", offset=0, byte_size=region.size))
    with (
        running_server(encoder, allow_shared_memory=True) as live,
        grpc.insecure_channel(live.address) as channel,
    ):
        service = live.server._service
        writing, finish = threading.Event(), threading.Event()
        serialise = service._serialise

        def slow_serialise(*args):
            writing.set()
            assert finish.wait(60)
            return serialise(*args)

        service._serialise = slow_serialise
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        call, _ = register(stub, "held", region)
        try:
            first = stub.EncodeFrame.future(request, timeout=60)
            assert writing.wait(60)
            first.cancel()
            wait_until(
                lambda: live.metric("bifusion_requests_total", rpc="EncodeFrame", code="CANCELLED") == 1,
                what="the cancelled call",
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.EncodeFrame(request, timeout=30)
            assert error_field(info.value) == "output_shared_memory"
            assert "still in flight" in info.value.details()
        finally:
            finish.set()
        wait_until(lambda: live.server._service._budget.in_use == (0, 0), what="the write to end")
        assert stub.EncodeFrame(request, timeout=60).features.shared_memory.region == "held"
        call.cancel()


class _UnconfirmedContext:
    """A registration call whose confirmation never goes out (the client stopped reading)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> None:
        return None

    async def write(self, message: bytes) -> None:
        await asyncio.Event().wait()


def test_a_registration_that_ends_before_it_is_confirmed_leaves_nothing_registered(live, shm):
    region = shm(1 << 16)
    request = pb.RegisterSharedMemoryRequest(
        name="unconfirmed", key=region.name.lstrip("/"), byte_size=region.size
    )
    registering = live.on_loop(
        live.server._service.register_shared_memory(request.SerializeToString(), _UnconfirmedContext())
    )
    wait_until(lambda: "unconfirmed" in registry(live), what="the region to be registered")
    registering.cancel()
    wait_until(lambda: "unconfirmed" not in registry(live), what="the region to be forgotten")
    with grpc.insecure_channel(live.address) as channel:  # the name is free again
        call, status = register(encoder_pb2_grpc.BiFusionEncoderStub(channel), "unconfirmed", region)
        assert status.name == "unconfirmed"
        call.cancel()
