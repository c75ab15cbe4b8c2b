"""Flow control: deadlines, cancellation, a full queue and a failing batch.

The model is held busy on purpose (``ModelSpy.gate``) so that what waits in the queue is
known exactly; ``ModelSpy.seen`` proves which frames reached the model.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
from serving_harness import ModelSpy, health_status, running_server, wait_until

from bifusion_wire import encoder_pb2_grpc
from bifusion_client.request import request_from_folder_frame

MAX_POINTS = 500


def request(frame, frame_id):
    req = request_from_folder_frame(frame, max_points=MAX_POINTS)
    req.frame_id = frame_id
    return req


@contextlib.contextmanager
def model_held_busy(spy, frame, **config):
    """A live server whose model is stuck on frame "busy" until ``spy.gate`` opens.
    Yields (live server, stub, the future of "busy")."""
    spy.gate.clear()
    try:
        with running_server(spy, **config) as live, grpc.insecure_channel(live.address) as channel:
            stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
            busy = stub.EncodeFrame.future(request(frame, "busy"), timeout=120)
            assert spy.entered.wait(30)
            yield live, stub, busy
    finally:
        spy.gate.set()  # never leave a model call hanging


def test_expired_deadline_never_reaches_the_model(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1) as (live, stub, busy):
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeFrame(request(frame, "late"), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        wait_until(
            lambda: live.metric("bifusion_requests_dropped_total", reason="deadline") == 1, what="the drop"
        )
        assert spy.seen == ["busy"]  # "late" was taken off the queue and dropped
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="DEADLINE_EXCEEDED") == 1
        assert stub.EncodeFrame(request(frame, "after"), timeout=60).frame_id == "after"


def test_cancelled_call_never_reaches_the_model(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1) as (live, stub, busy):
        doomed = stub.EncodeFrame.future(request(frame, "doomed"), timeout=60)
        wait_until(lambda: live.server.batcher.queued == 1, what="'doomed' to be queued")
        assert doomed.cancel()
        spy.gate.set()
        busy.result()
        wait_until(
            lambda: live.metric("bifusion_requests_dropped_total", reason="cancelled") == 1, what="the drop"
        )
        assert spy.seen == ["busy"]


def test_full_queue_is_resource_exhausted_at_once(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1, max_queue=2) as (live, stub, busy):
        queued = [stub.EncodeFrame.future(request(frame, f"queued-{i}"), timeout=120) for i in range(2)]
        wait_until(lambda: live.server.batcher.queued == 2, what="two queued frames")
        assert live.metric("bifusion_queue_depth") == 2
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeFrame(request(frame, "one too many"), timeout=5)  # answered without waiting
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in caught.value.details()
        spy.gate.set()
        assert [f.result().frame_id for f in [busy, *queued]] == ["busy", "queued-0", "queued-1"]
        assert "one too many" not in spy.seen
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="RESOURCE_EXHAUSTED") == 1


def test_a_failing_batch_fails_only_its_requests(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder, fail_on="explode"), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=4, max_batch_delay_ms=200) as (live, stub, busy):
        # These two share the next batch: the model is busy while they queue.
        doomed = [stub.EncodeFrame.future(request(frame, name), timeout=60) for name in ("explode", "mate")]
        wait_until(lambda: live.server.batcher.queued == 2, what="two queued frames")
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        for future in doomed:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert "injected failure" in caught.value.details()
        assert spy.batches[1] == ["explode", "mate"]
        assert live.metric("bifusion_batch_failures_total") == 1
        # The server stays up and healthy.
        assert stub.EncodeFrame(request(frame, "later"), timeout=60).frame_id == "later"
        assert health_status(live.address) == "SERVING"
