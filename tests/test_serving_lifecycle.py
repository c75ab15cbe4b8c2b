"""Start-up, health, reflection and the SIGTERM drain."""

from __future__ import annotations

import io
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from serving_harness import (
    ModelSpy,
    SlowLink,
    health_status,
    running_server,
    server_process,
    wait_for_health,
    wait_until,
)

from bifusion import EncodeOptions
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from bifusion_wire import SERVICE_NAME

HEALTH_NAMES = ("", SERVICE_NAME)


def test_health_reports_serving_only_after_warm_up(encoder, tum_folder_frames):
    spy = ModelSpy(encoder)
    spy.gate.clear()  # hold the warm-up inside the model
    try:
        with running_server(spy, warmup_frames=1, wait_ready=False) as live:
            assert spy.entered.wait(30)
            for name in HEALTH_NAMES:
                assert health_status(live.address, name) == "NOT_SERVING"
            assert live.metric("bifusion_ready") == 0
            with BiFusionClient(live.address) as client:
                with pytest.raises(grpc.RpcError) as caught:
                    client.encode_request(request_from_folder_frame(tum_folder_frames[0], max_points=500))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in caught.value.details()
                spy.gate.set()
                live.wait_ready()
                for name in HEALTH_NAMES:
                    assert health_status(live.address, name) == "SERVING"
                assert spy.batches[0] == ["warmup-0"]  # the warm-up ran before SERVING
                assert live.metric("bifusion_ready") == 1
                result = client.encode_request(
                    request_from_folder_frame(tum_folder_frames[0], max_points=500)
                )
                assert result.num_points == 500
    finally:
        spy.gate.set()


def test_a_stalled_batch_turns_health_not_serving_until_it_returns(encoder, tum_folder_frames):
    """The model in the server process cannot be stopped: past the stall timeout the server
    leaves the load balancer (and a liveness probe's good books) until the batch returns."""
    spy = ModelSpy(encoder)
    request = request_from_folder_frame(tum_folder_frames[0], max_points=500)
    with running_server(spy, stall_timeout_seconds=10) as live, BiFusionClient(live.address) as client:
        assert client.encode_request(request, timeout=120).num_points == 500  # well inside the timeout
        assert live.metric("bifusion_instance_stalls_total", model_instance="0") == 0
        spy.gate.clear()
        spy.entered.clear()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.encode_request, request, 120)
            assert spy.entered.wait(30)
            wait_until(lambda: health_of(live) == {"NOT_SERVING"}, what="NOT_SERVING")
            assert live.metric("bifusion_instance_stalls_total", model_instance="0") == 1
            assert live.metric("bifusion_instance_up", model_instance="0") == 0
            assert live.metric("bifusion_ready") == 0
            spy.gate.set()
            assert held.result().num_points == 500  # the stalled batch's frame is still answered
        wait_until(lambda: health_of(live) == {"SERVING"}, what="SERVING again")
        assert live.metric("bifusion_instance_up", model_instance="0") == 1
        assert client.encode_request(request, timeout=120).num_points == 500


def test_a_batch_returning_as_the_stall_timeout_comes_due_is_no_stall(
    encoder, tum_folder_frames, monkeypatch
):
    """The watchdog's timer can come due in the very loop iteration in which the batch
    returns, after the instance has seen it return: that is no stall, and serving goes on."""
    request = request_from_folder_frame(tum_folder_frames[0], max_points=500)
    with running_server(encoder, stall_timeout_seconds=120) as live, BiFusionClient(live.address) as client:
        (instance,) = live.server.instances
        returned = instance._returned

        def returned_as_the_timer_comes_due():
            returned()
            live.server.batcher._stalled(instance, 120.0)

        monkeypatch.setattr(instance, "_returned", returned_as_the_timer_comes_due)
        for _ in range(3):
            assert client.encode_request(request, timeout=60).num_points == 500
        assert instance.ready and health_of(live) == {"SERVING"}
        assert live.metric("bifusion_instance_stalls_total", model_instance="0") == 0


# The real server, with every model call but the warm-up's held until the file named by
# BIFUSION_TEST_GATE exists: what is in flight stays in flight for as long as a test needs.
GATED_MODEL = """
import os, sys, time
import bifusion

encode = bifusion.BiFusionEncoder.encode
gate = os.environ["BIFUSION_TEST_GATE"]

def gated(self, frames, *args, **kwargs):
    while not all(f.frame_id.startswith("warmup") for f in frames) and not os.path.exists(gate):
        time.sleep(0.01)
    return encode(self, frames, *args, **kwargs)

bifusion.BiFusionEncoder.encode = gated
from bifusion_server.main import main
main(sys.argv[1:])
"""


def test_sigterm_with_a_stuck_model_exits_instead_of_waiting_for_ever(tum_folder_frames, tmp_path):
    """Python waits for every worker thread at exit; a model thread that never returns would
    keep a drained server alive until something kills it."""
    flags = ("--device", "cpu", "--warmup-frames", "0", "--stall-timeout-seconds", "2")
    flags += ("--drain-seconds", "3")
    never_opened = {"BIFUSION_TEST_GATE": str(tmp_path / "gate")}  # a hung kernel
    with server_process(*flags, launcher=("-c", GATED_MODEL), env=never_opened) as live:
        request = request_from_folder_frame(tum_folder_frames[0], max_points=500)
        with BiFusionClient(live.address) as client, ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.encode_request, request, 120)
            wait_until(lambda: health_of(live) == {"NOT_SERVING"}, timeout=60, what="the stall")
            started = time.monotonic()
            live.process.send_signal(signal.SIGTERM)
            assert live.process.wait(60) == 1
            assert time.monotonic() - started < 30  # the drain, not the stuck batch
            with pytest.raises(grpc.RpcError):
                held.result()
        assert "exiting with a model batch still stuck" in live.log_text()


def health_of(live) -> set[str]:
    return {health_status(live.address, name) for name in HEALTH_NAMES}


def test_reflection_lists_the_service_and_a_call_through_it_works(encoder, tum_folder_frames):
    """Message classes come from the reflected descriptors only, as grpcurl would build them."""
    frame = tum_folder_frames[0]
    with running_server(encoder) as live, grpc.insecure_channel(live.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE_NAME)
        method = service.methods_by_name["EncodeFrame"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        assert request_class.DESCRIPTOR.file.pool is pool  # not the generated stubs' pool

        def png(array):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            return buffer.getvalue()

        request = request_class(
            frame_id=frame.frame_id,
            color={"encoding": "PNG", "data": png(frame.color)},
            depth={"encoding": "PNG16", "data": png(frame.depth), "depth_scale": frame.depth_scale},
            intrinsics={**frame.intrinsics, "width": 640, "height": 480},
            cam_to_world=frame.cam_to_world.reshape(-1).tolist(),
            options={"max_points": 500},
        )
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=60)
        assert response.frame_id == frame.frame_id
        assert response.features.dtype == "float32" and list(response.features.shape) == [500, 256]
        features = np.frombuffer(response.features.data, "<f4").reshape(500, 256)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_stops_the_server_with_one_line_naming_the_flag(flag):
    """9100, the metrics default, is node_exporter's port too: a taken one is common."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        flags = ("--device", "cpu", "--warmup-frames", "0", flag, str(port))
        with server_process(*flags, wait_ready=False) as live:
            assert live.process.wait(120) == 1
            log = live.log_text()
    lines = [line for line in log.splitlines() if " INFO " not in line]
    assert len(lines) == 1, log  # nothing but the reason: no traceback, no gRPC core line
    assert f"ERROR bifusion.server: cannot start: {flag} {port}: cannot listen on" in lines[0], log
    assert "Address already in use" in lines[0]


def test_drain_ends_an_idle_stream_promptly(encoder, tum_folder_frames):
    frame = tum_folder_frames[0]
    more = threading.Event()

    def frames():
        yield request_from_folder_frame(frame, max_points=500)
        more.wait(30)  # an idle camera: the stream stays open

    with running_server(encoder, drain_seconds=30) as live, BiFusionClient(live.address) as client:
        stream = client.encode_stream(frames(), timeout=60)
        assert next(stream).frame_id == frame.frame_id
        started = time.monotonic()
        drain = live.start_drain()
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        drain.result(30)
        assert time.monotonic() - started < 10  # it did not wait out drain_seconds
        more.set()


def test_a_frame_arriving_over_a_slow_link_is_in_flight_from_its_first_byte(encoder, tum_folder_frames):
    """Over a slow link (or a loaded proxy) a frame takes seconds to arrive. A call that began
    before the drain counts in flight as soon as its headers are in, so the drain waits for
    its body and it ends OK; a call that begins during the drain is refused UNAVAILABLE at
    its headers, long before its body could have arrived. Served as plain unary calls, both
    reached the service only once their bodies had, and gRPC's stop cancelled the first."""
    frame = tum_folder_frames[0]
    request = request_from_folder_frame(frame, max_points=500)
    rate = len(request.SerializeToString()) / 3  # each body takes about 3 s to arrive
    # Two links: a second call on the first one would queue behind the first call's body.
    with (
        running_server(encoder, drain_seconds=60) as live,
        SlowLink(live.address, rate) as first_link,
        SlowLink(live.address, rate) as second_link,
        BiFusionClient(first_link.address) as first,
        BiFusionClient(second_link.address) as second,
        ThreadPoolExecutor(1) as pool,
    ):
        arriving = pool.submit(first.encode_request, request, 60)
        wait_until(
            lambda: live.metric("bifusion_inflight_requests") == 1,
            timeout=1.5,
            what="the call to count in flight while its frame is still arriving",
        )
        assert not arriving.done()
        drain = live.start_drain()
        wait_for_health(live.address, "NOT_SERVING", timeout=10)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            second.encode_request(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        assert time.monotonic() - started < 1.5  # at its headers, not after its body
        assert arriving.result(60).frame_id == frame.frame_id
        drain.result(60)


def test_a_client_that_sends_again_the_moment_its_call_ends_is_refused_not_cancelled(
    encoder, tum_folder_frames
):
    """The drain has been quiet (no new call) for longer than its quiet period when the last
    call in flight ends; that call's client sends its next one at once. The drain must not
    stop gRPC the moment it is idle: the next call is answered UNAVAILABLE, not CANCELLED."""
    from bifusion_server.app import DRAIN_QUIET_SECONDS

    frame = tum_folder_frames[0]
    request = request_from_folder_frame(frame, max_points=500)
    spy = ModelSpy(encoder)
    with running_server(spy, drain_seconds=60) as live, BiFusionClient(live.address) as client:

        def two_calls():
            first = client.encode_request(request, timeout=60)
            try:
                client.encode_request(request, timeout=60)
            except grpc.RpcError as error:
                return first, error.code(), error.details()
            return first, grpc.StatusCode.OK, ""

        spy.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            calls = pool.submit(two_calls)
            assert spy.entered.wait(30)
            drain = live.start_drain()
            wait_for_health(live.address, "NOT_SERVING", timeout=10)
            time.sleep(DRAIN_QUIET_SECONDS + 0.5)
            spy.gate.set()
            first, code, details = calls.result(60)
        assert first.frame_id == frame.frame_id
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "shutting down" in details
        drain.result(60)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    encoder, tum_frames, tum_folder_frames, tmp_path
):
    max_points = 3000
    expected = {f.frame_id: encoder.encode([f], EncodeOptions(max_points=max_points))[0] for f in tum_frames}
    gate = tmp_path / "gate"
    flags = ("--max-batch-size", "1", "--warmup-frames", "1", "--drain-seconds", "120")
    with server_process(*flags, launcher=("-c", GATED_MODEL), env={"BIFUSION_TEST_GATE": str(gate)}) as live:
        log = live.log_text()
        assert log.index("warm-up: 1 synthetic frames") < log.index("SERVING")
        # Eight frames held at the model's gate: all in flight when SIGTERM comes, while health
        # turns NOT_SERVING and a new request bounces; then they are let through.
        requests = [request_from_folder_frame(f, max_points=max_points) for f in tum_folder_frames * 2][:8]
        with ThreadPoolExecutor(len(requests)) as pool, BiFusionClient(live.address) as client:
            futures = [pool.submit(client.encode_request, r, 300) for r in requests]
            wait_until(
                lambda: live.metric("bifusion_inflight_requests") == len(requests),
                what="all requests in flight",
            )
            live.process.send_signal(signal.SIGTERM)
            wait_for_health(live.address, "NOT_SERVING", timeout=10, process=live.process)
            with pytest.raises(grpc.RpcError) as caught:
                client.encode_request(requests[0], timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in caught.value.details()
            gate.touch()
            results = [f.result() for f in futures]  # none lost
        for result in results:
            np.testing.assert_allclose(result.features, expected[result.frame_id].features, rtol=0, atol=1e-4)
        assert live.process.wait(60) == 0
        log = live.log_text()
        assert int(re.search(r"draining: (\d+) requests in flight", log).group(1)) == len(requests)
        assert "drained and stopped" in log
