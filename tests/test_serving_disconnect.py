"""A client that leaves while the server is blocked writing to it: CANCELLED, counted and
logged once as such, no traceback."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from serving_harness import running_server, wait_until

from bifusion_client.request import request_from_folder_frame
from bifusion_server.access_log import ACCESS_LOGGER
from bifusion_server.service import EncoderService
from bifusion_wire import SERVICE_NAME

# The client's receive window stays at HTTP/2's 64 KiB (no BDP growth): a 1 MB response
# cannot pass to a client that reads nothing, so the server's write waits.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


def test_a_client_that_leaves_during_a_blocked_write_is_cancelled(
    encoder, tum_folder_frames, caplog, monkeypatch
):
    """When the client goes, gRPC both fails the held write and cancels the handler; which
    reaches the handler first is a race (a busy server saw the failed write about one call
    in four). Here the handler runs shielded from gRPC's cancel, so it always sees the write
    fail: gRPC's own ExecuteBatchError from ``context.write``."""
    handler = EncoderService.encode_stream

    async def shielded(self, requests, context):
        call = asyncio.ensure_future(handler(self, requests, context))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.gather(call, return_exceptions=True)  # until the write's failure ends it
            raise

    monkeypatch.setattr(EncoderService, "encode_stream", shielded)
    request = request_from_folder_frame(tum_folder_frames[0], max_points=1000).SerializeToString()
    leave = threading.Event()

    def requests():
        yield request
        leave.wait(60)  # the stream stays open; the client never reads

    with caplog.at_level(logging.INFO), running_server(encoder) as live:
        with grpc.insecure_channel(live.address, options=SMALL_WINDOW) as channel:
            call = channel.stream_stream(f"/{SERVICE_NAME}/EncodeStream")(requests(), timeout=120)
            # The response is counted as it goes to gRPC: the write has begun.
            wait_until(
                lambda: live.metric("bifusion_response_bytes_count") == 1, timeout=120, what="the write"
            )
        leave.set()  # the channel is closed: the client has gone
        del call
        wait_until(
            lambda: live.metric("bifusion_requests_total", rpc="EncodeStream", code="CANCELLED") == 1,
            timeout=30,
            what="the call counted as CANCELLED",
        )
        assert live.metric("bifusion_requests_total", rpc="EncodeStream", code="INTERNAL") is None
        assert live.metric("bifusion_inflight_requests") == 0
    access = [r.access for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [(a["method"], a["status"]) for a in access] == [("EncodeStream", "CANCELLED")]
    assert access[0]["frame_id"] == tum_folder_frames[0].frame_id
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
