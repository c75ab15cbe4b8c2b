"""docker/envoy/envoy.yaml: accepted by Envoy's own validator, and — run for real on loopback
in front of two live encoder replicas — spreads one client's gRPC calls over both, skips a
replica that stops (gRPC health checks), and keeps serving."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from deploy_tools import DOCKER, tool
from serving_harness import _LoopThread, free_port, running_server, wait_until

from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame

CONFIG = DOCKER / "envoy" / "envoy.yaml"
CALLS = 16
MAX_POINTS = 1000


def validate(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_envoy_validates_the_shipped_config_without_deprecations():
    result = validate(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "Deprecated" not in result.stdout + result.stderr


def test_config_balances_grpc_over_http2_with_health_checks():
    config = yaml.safe_load(CONFIG.read_text())
    [cluster] = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"  # every replica behind the "encoder" name
    [address] = [
        e["endpoint"]["address"]["socket_address"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert address == {"address": "encoder", "port_value": 50051}
    upstream = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in upstream["explicit_http_config"]
    assert "grpc_health_check" in cluster["health_checks"][0]
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s", "streams must not be cut by a route timeout"


def test_validator_is_not_vacuous(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["static_resources"]["clusters"][0]["lb_policy"] = "NOT_A_POLICY"
    broken = tmp_path / "envoy.yaml"
    broken.write_text(yaml.safe_dump(config))
    assert validate(broken).returncode != 0


def loopback_config(ports: list[int], listen: int, admin: int) -> dict:
    """The shipped config with the replicas on loopback ports instead of behind DNS."""
    config = yaml.safe_load(CONFIG.read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen}
    cluster = config["static_resources"]["clusters"][0]
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    cluster["health_checks"][0].update(interval="0.5s", no_traffic_interval="0.5s", timeout="1s")
    return config


def cluster_health(admin: int) -> dict[str, str]:
    """Envoy's view of each replica: "healthy" or its failure flags."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters?format=json", timeout=5) as response:
        clusters = json.load(response)["cluster_statuses"]
    hosts = next(c for c in clusters if c["name"] == "bifusion_encoder").get("host_statuses", [])
    view = {}
    for host in hosts:
        address = host["address"]["socket_address"]
        flags = {k: v for k, v in host["health_status"].items() if k != "eds_health_status" and v}
        view[str(address["port_value"])] = "healthy" if not flags else ",".join(sorted(flags))
    return view


@pytest.fixture
def replicas(encoder):
    with running_server(encoder) as first, running_server(encoder) as second:
        yield [first, second]


@contextlib.contextmanager
def running_envoy(config: dict, tmp_path, admin: int) -> Iterator[subprocess.Popen]:
    """Envoy on ``config`` (admin on port ``admin``), once it sees both replicas healthy."""
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen(
        [tool("envoy"), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: process.poll() is not None or set(_safe_health(admin).values()) == {"healthy"},
            60,
            "envoy to see both replicas healthy",
            interval=0.25,
        )
        assert process.poll() is None, (tmp_path / "envoy.log").read_text()
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def envoy(replicas, tmp_path):
    listen, admin = free_port(), free_port()
    ports = [int(r.address.rsplit(":", 1)[1]) for r in replicas]
    with running_envoy(loopback_config(ports, listen, admin), tmp_path, admin):
        yield f"127.0.0.1:{listen}", admin, ports


def _safe_health(admin: int) -> dict[str, str]:
    try:
        view = cluster_health(admin)
    except OSError:
        return {}
    return view if len(view) == 2 else {}


def frames_served(replica) -> float:
    return replica.metric("bifusion_frames_total") or 0.0


def test_one_client_channel_is_spread_over_both_replicas_and_survives_one_draining(
    replicas, envoy, tum_folder_frames
):
    address, admin, ports = envoy
    before = [frames_served(r) for r in replicas]
    requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in tum_folder_frames]
    with BiFusionClient(address) as client:  # ONE channel, ONE HTTP/2 connection to Envoy
        for i in range(CALLS):
            result = client.encode_request(requests[i % len(requests)], timeout=120)
            assert result.num_points == MAX_POINTS
        served = [frames_served(r) - b for r, b in zip(replicas, before, strict=True)]
        assert sum(served) == CALLS
        assert all(n > 0 for n in served), f"one connection was pinned to one replica: {served}"

        # Drain the second replica as SIGTERM would: it reports NOT_SERVING, Envoy's gRPC
        # health check takes it out of the pool, and every call still succeeds on the first.
        _drain(replicas[1])
        try:
            wait_until(lambda: cluster_health(admin)[str(ports[1])] != "healthy", 30, "", interval=0.25)
        except TimeoutError:
            pytest.fail(f"envoy kept the draining replica in the pool: {cluster_health(admin)}")
        first_before = frames_served(replicas[0])
        for i in range(4):
            assert client.encode_request(requests[i], timeout=120).num_points == MAX_POINTS
        assert frames_served(replicas[0]) - first_before == 4


def _drain(replica) -> None:
    """SIGTERM's drain on an in-process replica (the harness's own loop runs its coroutines)."""
    _LoopThread.get().run(replica.server.drain())
