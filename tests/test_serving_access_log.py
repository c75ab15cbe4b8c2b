"""The access log: one line per RPC with its facts, JSON when asked, repeated errors rate-limited."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from serving_harness import running_server, server_process

from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from bifusion_server.access_log import ACCESS_LOGGER, AccessLog, CallRecord
from bifusion_server.log_format import JsonFormatter


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def error(peer: str = "ipv4:10.0.0.7:50000", status: str = "INVALID_ARGUMENT") -> CallRecord:
    return CallRecord(method="EncodeFrame", peer=peer, status=status, frame_id="f")


def access_records(caplog) -> list[dict]:
    return [r.access for r in caplog.records if r.name == ACCESS_LOGGER]


def test_repeated_errors_are_rate_limited_with_a_suppressed_count(caplog):
    clock = FakeClock()
    log = AccessLog(burst=3, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        for port in range(50000, 50005):  # one client, five connections: one key
            log.record(error(peer=f"ipv4:10.0.0.7:{port}"))
        log.record(error(peer="ipv4:10.0.0.8:1"))  # another client: its own budget
        log.record(error(status="NOT_FOUND"))  # another status: its own budget
        for _ in range(20):
            log.record(CallRecord(method="EncodeFrame", peer="ipv4:10.0.0.7:1"))  # OK: never limited
        assert len(access_records(caplog)) == 3 + 1 + 1 + 20
        clock.now += 10.0
        log.record(error())
    last = access_records(caplog)[-1]
    assert last["suppressed"] == 2 and last["status"] == "INVALID_ARGUMENT"
    assert "suppressed=2" in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING


def test_json_lines_parse_and_carry_the_access_fields():
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "%s", ("text",), None)
    record.access = {"method": "EncodeFrame", "status": "OK", "frame_id": 'a"b', "latency_ms": 1.5}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["logger"] == ACCESS_LOGGER and entry["message"] == "text"
    assert entry["frame_id"] == 'a"b' and entry["latency_ms"] == 1.5


def test_every_rpc_gets_one_line_with_its_facts(encoder, tum_folder_frames, caplog):
    good = request_from_folder_frame(tum_folder_frames[0], max_points=300)
    bad = request_from_folder_frame(tum_folder_frames[1], max_points=300, depth_format="raw")
    bad.depth.data = bad.depth.data[:10]
    # The stream's last frame is raw and decodes well before the PNG one ahead of it: the
    # call is still named after the frame answered last, not the one decoded last.
    stream = [
        request_from_folder_frame(tum_folder_frames[2], max_points=300),
        request_from_folder_frame(
            tum_folder_frames[3], max_points=300, color_format="raw", depth_format="raw"
        ),
    ]
    with (
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
        running_server(encoder) as live,
        BiFusionClient(live.address) as client,
    ):
        client.encode_request(good)
        with pytest.raises(grpc.RpcError):
            client.encode_request(bad)
        assert len(list(client.encode_stream(stream))) == 2
        client.model_info()
        client.health()  # probes are not logged
    lines = access_records(caplog)
    assert [(e["method"], e["status"]) for e in lines] == [
        ("EncodeFrame", "OK"),
        ("EncodeFrame", "INVALID_ARGUMENT"),
        ("EncodeStream", "OK"),
        ("GetModelInfo", "OK"),
    ]
    first, refused, streamed, _ = lines
    assert first["frame_id"] == good.frame_id and first["frames"] == 1
    assert first["request_bytes"] == len(good.SerializeToString())
    assert first["response_bytes"] > 300 * 256 * 4
    assert first["peer"].startswith("ipv4:127.0.0.1:") and first["latency_ms"] > 0
    assert refused["frame_id"] == bad.frame_id and refused["response_bytes"] == 0
    assert streamed["frames"] == 2 and streamed["frame_id"] == stream[-1].frame_id
    assert streamed["request_bytes"] == sum(len(r.SerializeToString()) for r in stream)


def test_log_format_json_makes_every_server_line_json(tum_folder_frames):
    with server_process("--log-format", "json", "--warmup-frames", "0") as live:
        with BiFusionClient(live.address) as client:
            client.encode_request(request_from_folder_frame(tum_folder_frames[0], max_points=300))
        text = live.log_text()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(e["message"].startswith("SERVING") for e in entries)
    access = [e for e in entries if e["logger"] == ACCESS_LOGGER]
    assert len(access) == 1 and access[0]["status"] == "OK" and access[0]["frames"] == 1
