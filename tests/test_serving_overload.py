"""Flow control: deadlines, cancellation, a full queue and a failing batch.

The model is held busy on purpose (``ModelSpy.gate``) so that what waits in the queue is
known exactly; ``ModelSpy.seen`` proves which frames reached the model.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest
import torch
from serving_harness import ModelSpy, health_status, running_server, wait_until

from bifusion import InputError
from bifusion_client.request import request_from_folder_frame
from bifusion_wire import encoder_pb2_grpc

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


def queue_in_order(live, stub, frame, names, timeout=120):
    """Sends the frames one at a time, each queued before the next is sent, so that the queue
    holds them in this order (frames sent together decode in parallel and queue in any order).
    Returns their futures by name."""
    futures, before = {}, live.server.batcher.queued
    for queued, name in enumerate(names, start=before + 1):
        futures[name] = stub.EncodeFrame.future(request(frame, name), timeout=timeout)
        wait_until(lambda queued=queued: live.server.batcher.queued == queued, what=f"{name!r} to be queued")
    return futures


def test_expired_deadline_never_reaches_the_model(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1) as (live, stub, busy):
        late = stub.EncodeFrame.future(request(frame, "late"), timeout=2.0)
        wait_until(lambda: live.server.batcher.queued == 1, what="'late' to be queued")
        with pytest.raises(grpc.RpcError) as caught:
            late.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Taken off the queue while the model is still busy: it can never reach the model.
        wait_until(
            lambda: live.metric("bifusion_requests_dropped_total", reason="deadline") == 1, what="the drop"
        )
        assert live.server.batcher.queued == 0
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        assert spy.seen == ["busy"]
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="DEADLINE_EXCEEDED") == 1
        assert stub.EncodeFrame(request(frame, "after"), timeout=60).frame_id == "after"


def test_cancelled_call_never_reaches_the_model(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1) as (live, stub, busy):
        doomed = stub.EncodeFrame.future(request(frame, "doomed"), timeout=60)
        wait_until(lambda: live.server.batcher.queued == 1, what="'doomed' to be queued")
        assert doomed.cancel()
        # Taken off the queue while the model is still busy: it can never reach the model.
        wait_until(
            lambda: live.metric("bifusion_requests_dropped_total", reason="cancelled") == 1, what="the drop"
        )
        assert live.server.batcher.queued == 0
        spy.gate.set()
        busy.result()
        assert spy.seen == ["busy"]


def test_a_frame_expiring_while_its_batch_forms_never_reaches_the_model(encoder, tum_folder_frames):
    """Out of the queue, waiting for batch-mates (2 s here), a frame still leaves at its deadline."""
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with (
        running_server(spy, max_batch_size=4, max_batch_delay_ms=2000) as live,
        grpc.insecure_channel(live.address) as channel,
    ):
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeFrame(request(frame, "late"), timeout=0.8)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(
            lambda: live.metric("bifusion_requests_dropped_total", reason="deadline") == 1, what="the drop"
        )
        assert stub.EncodeFrame(request(frame, "after"), timeout=60).frame_id == "after"
        assert spy.seen == ["after"]


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


def test_expired_frames_leave_the_queue_at_once_and_free_their_slots(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1, max_queue=2) as (live, stub, busy):
        late = [stub.EncodeFrame.future(request(frame, f"late-{i}"), timeout=2.0) for i in range(2)]
        wait_until(lambda: live.server.batcher.queued == 2, what="two queued frames")
        for future in late:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The model is still busy, yet the expired frames no longer hold the queue's two slots.
        wait_until(lambda: live.server.batcher.queued == 0, timeout=5, what="the queue to empty")
        assert live.metric("bifusion_queue_depth") == 0
        waiting = queue_in_order(live, stub, frame, ["waiting-0", "waiting-1"])
        spy.gate.set()
        assert [f.result().frame_id for f in [busy, *waiting.values()]] == ["busy", "waiting-0", "waiting-1"]
        assert spy.seen == ["busy", "waiting-0", "waiting-1"]
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="RESOURCE_EXHAUSTED") is None
        assert live.metric("bifusion_requests_dropped_total", reason="deadline") == 2


def test_every_expired_request_is_counted_as_deadline_exceeded(encoder, tum_folder_frames):
    """Whichever ends the call first (the server's timer or the client's cancellation at its
    own deadline), an expired request is DEADLINE_EXCEEDED in both counters, never CANCELLED."""
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    count = 30
    with model_held_busy(spy, frame, max_batch_size=1, max_queue=64) as (live, stub, busy):
        # Deadlines spread over 0.2 s, all far enough off that every frame is queued first.
        late = [
            stub.EncodeFrame.future(request(frame, f"late-{i}"), timeout=3.0 + 0.02 * (i % 10))
            for i in range(count)
        ]
        wait_until(lambda: live.server.batcher.queued == count, what=f"{count} queued frames")
        codes = []
        for future in late:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            codes.append(caught.value.code())
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * count
        wait_until(
            lambda: (
                live.metric("bifusion_requests_total", rpc="EncodeFrame", code="DEADLINE_EXCEEDED") == count
            ),
            timeout=10,
            what=f"{count} DEADLINE_EXCEEDED",
        )
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="CANCELLED") is None
        assert live.metric("bifusion_requests_dropped_total", reason="deadline") == count
        assert live.metric("bifusion_requests_dropped_total", reason="cancelled") == 0
        assert live.server.batcher.queued == 0
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        assert spy.seen == ["busy"]


def test_a_failing_batch_is_bisected_so_only_the_guilty_frame_fails(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder, fail_on="explode"), tum_folder_frames[0]
    names = ("a", "explode", "b", "c")
    with model_held_busy(spy, frame, max_batch_size=4, max_batch_delay_ms=200) as (live, stub, busy):
        # These four share the next batch: the model is busy while they queue.
        futures = queue_in_order(live, stub, frame, names)
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        with pytest.raises(grpc.RpcError) as caught:
            futures.pop("explode").result()
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "injected failure" in caught.value.details()
        for name, future in futures.items():
            result = future.result()
            assert result.frame_id == name and result.stats.num_points == MAX_POINTS
        # The batch of four failed, then its half holding "explode", then "explode" alone.
        assert spy.batches[1:] == [list(names), ["a", "explode"], ["a"], ["explode"], ["b", "c"]]
        assert live.metric("bifusion_batch_failures_total", model_instance="0") == 3
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="INTERNAL") == 1
        # The server stays up and healthy.
        assert stub.EncodeFrame(request(frame, "later"), timeout=60).frame_id == "later"
        assert health_status(live.address) == "SERVING"


@pytest.mark.parametrize(
    ("failure", "code", "detail"),
    [
        (lambda _: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "does not fit"),
        (lambda _: InputError("points", "the frame has no points"),
         grpc.StatusCode.INVALID_ARGUMENT, "points:"),
    ],
    ids=["out-of-memory", "input-error"],
)  # fmt: skip
def test_a_frame_failing_alone_gets_the_status_of_its_failure(
    encoder, tum_folder_frames, failure, code, detail
):
    spy, frame = ModelSpy(encoder, fail_on="huge", failure=failure), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=2, max_batch_delay_ms=200) as (live, stub, busy):
        huge, mate = queue_in_order(live, stub, frame, ["huge", "mate"]).values()
        spy.gate.set()
        assert busy.result().frame_id == "busy"
        with pytest.raises(grpc.RpcError) as caught:
            huge.result()
        assert caught.value.code() == code
        assert detail in caught.value.details()
        assert mate.result().frame_id == "mate"
        assert spy.batches[1:] == [["huge", "mate"], ["huge"], ["mate"]]
