"""Limits on what clients can hold: connections, streams per connection, idle time, pings."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_harness import running_server, wait_until

from bifusion_client.api import BiFusionClient
from bifusion_server.app import connection_options
from bifusion_server.config import ServerConfig
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire import encoder_pb2_grpc

# A channel of its own: without it, channels to one address share a connection.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


class StateRecorder:
    """Every connectivity state a channel goes through."""

    def __init__(self, channel: grpc.Channel):
        self.states: list[grpc.ChannelConnectivity] = []
        self._lock = threading.Lock()
        channel.subscribe(self._record, try_to_connect=False)

    def _record(self, state) -> None:
        with self._lock:
            self.states.append(state)

    def saw(self, *states) -> bool:
        """Whether ``states`` happened in this order (not necessarily next to each other)."""
        with self._lock:
            seen = iter(self.states)
            return all(any(s == want for s in seen) for want in states)


def wait_for_goaway(states: StateRecorder, what: str) -> None:
    """Until the server closes the channel's connection (READY, then IDLE)."""
    ready_then_idle = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)
    wait_until(lambda: states.saw(*ready_then_idle), timeout=20, what=what)


def check(channel: grpc.Channel, timeout: float = 10) -> str:
    request = health_pb2.HealthCheckRequest()
    response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_connection_options_follow_the_config():
    options = dict(connection_options(ServerConfig(max_concurrent_streams=7, connection_idle_seconds=2.5)))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_connection_idle_ms"] == 2500
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    assert options["grpc.max_allowed_incoming_connections"] == 512
    unlimited = dict(connection_options(ServerConfig(connection_idle_seconds=0, connection_age_seconds=0)))
    assert "grpc.max_connection_idle_ms" not in unlimited and "grpc.max_connection_age_ms" not in unlimited


def test_an_idle_connection_is_closed_after_the_idle_limit(encoder):
    with (
        running_server(encoder, connection_idle_seconds=1.0) as live,
        grpc.insecure_channel(live.address, options=[OWN_CONNECTION]) as channel,
    ):
        states = StateRecorder(channel)
        assert check(channel) == "SERVING"
        # The server sends GOAWAY once no call has run for 1 s: the channel drops to IDLE.
        wait_for_goaway(states, "the idle connection to be closed")
        assert check(channel) == "SERVING"  # and a client reconnects transparently


def silent_stream(stub):
    """An EncodeStream call that stays open and sends nothing."""
    return stub.EncodeStream(iter(threading.Event().wait, True), timeout=60)


def test_an_active_connection_outlives_the_idle_limit(encoder):
    with (
        running_server(encoder, connection_idle_seconds=1.0) as live,
        grpc.insecure_channel(live.address, options=[OWN_CONNECTION]) as channel,
    ):
        states = StateRecorder(channel)
        stream = silent_stream(encoder_pb2_grpc.BiFusionEncoderStub(channel))
        wait_until(lambda: states.saw(grpc.ChannelConnectivity.READY), what="a connection")
        time.sleep(2.5)  # well past the idle limit
        assert not states.saw(grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)
        stream.cancel()


def test_calls_beyond_the_stream_cap_wait_for_a_free_stream(encoder):
    with (
        running_server(encoder, max_concurrent_streams=2) as live,
        grpc.insecure_channel(live.address, options=[OWN_CONNECTION]) as channel,
    ):
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        assert check(channel) == "SERVING"  # connected: the server's limit is known
        holders = [silent_stream(stub) for _ in range(2)]
        wait_until(lambda: live.server._service.inflight == 2, what="two open streams")
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=1.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # it waited, unserved
        waiting = stub.GetModelInfo.future(pb.GetModelInfoRequest(), timeout=30)
        holders[0].cancel()
        assert waiting.result().feature_dim == 256  # served once a stream was free
        holders[1].cancel()


def test_many_more_calls_than_the_stream_cap_all_succeed(encoder):
    """A client with 100 calls at once on a connection capped at 8: the extra calls wait, none
    fails (gRPC's overload protection refused most of them with UNAVAILABLE)."""
    with (
        running_server(encoder, max_concurrent_streams=8) as live,
        grpc.insecure_channel(live.address, options=[OWN_CONNECTION]) as channel,
    ):
        stub = encoder_pb2_grpc.BiFusionEncoderStub(channel)
        for _ in range(3):
            futures = [stub.GetModelInfo.future(pb.GetModelInfoRequest(), timeout=60) for _ in range(100)]
            assert [f.result().feature_dim for f in futures] == [256] * 100


def test_connections_beyond_the_cap_are_refused(encoder):
    with running_server(encoder, max_connections=2) as live:
        channels = [grpc.insecure_channel(live.address, options=[OWN_CONNECTION]) for _ in range(3)]
        try:
            assert [check(c) for c in channels[:2]] == ["SERVING", "SERVING"]
            with pytest.raises(grpc.RpcError) as caught:
                check(channels[2], timeout=3)
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            channels[0].close()
            wait_until(lambda: _serving(channels[2]), timeout=30, what="a connection slot to free up")
        finally:
            for channel in channels:
                channel.close()


def _serving(channel) -> bool:
    try:
        return check(channel, timeout=2) == "SERVING"
    except grpc.RpcError:
        return False


def test_a_client_pinging_too_often_is_sent_away(encoder):
    """Clients may ping while idle, but not faster than every 30 s."""
    abusive = [
        OWN_CONNECTION,
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with running_server(encoder) as live:
        with grpc.insecure_channel(live.address, options=abusive) as channel:
            states = StateRecorder(channel)
            assert check(channel) == "SERVING"
            wait_for_goaway(states, "GOAWAY for too many pings")
        with BiFusionClient(live.address) as polite:  # the policy still lets a normal client in
            assert polite.health() == "SERVING"
