"""/metrics after real traffic: names, types and buckets as documented, values consistent
with the responses' stats, lint-clean for promtool, and readable by a real Prometheus."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_harness import ROOT, free_port, running_server, wait_until

from bifusion_client.api import BiFusionClient
from bifusion_client.request import build_request, request_from_folder_frame

RATIO_BUCKETS = [round(0.05 * k, 2) for k in range(21)]
DOCUMENTED = {  # name: (type, labels)
    "bifusion_requests": ("counter", {"rpc", "code"}),
    "bifusion_request_duration_seconds": ("histogram", {"rpc", "code"}),
    "bifusion_queue_wait_seconds": ("histogram", set()),
    "bifusion_decode_duration_seconds": ("histogram", set()),
    "bifusion_compute_duration_seconds": ("histogram", {"model_instance"}),
    "bifusion_encode_duration_seconds": ("histogram", set()),
    "bifusion_stage_duration_seconds": ("histogram", {"stage", "model_instance"}),
    "bifusion_batch_size": ("histogram", {"model_instance"}),
    "bifusion_queue_depth": ("gauge", set()),
    "bifusion_inflight_requests": ("gauge", set()),
    "bifusion_frames": ("counter", set()),
    "bifusion_batch_failures": ("counter", {"model_instance"}),
    "bifusion_instance_up": ("gauge", {"model_instance"}),
    "bifusion_instance_restarts": ("counter", {"model_instance"}),
    "bifusion_instance_stalls": ("counter", {"model_instance"}),
    "bifusion_requests_dropped": ("counter", {"reason"}),
    "bifusion_points_per_frame": ("histogram", set()),
    "bifusion_request_bytes": ("histogram", set()),
    "bifusion_response_bytes": ("histogram", set()),
    "bifusion_gate_mean": ("histogram", set()),
    "bifusion_valid_ratio": ("histogram", set()),
    "bifusion_gate_mean_last": ("gauge", set()),
    "bifusion_valid_ratio_last": ("gauge", set()),
    "bifusion_model_info": ("gauge", {"architecture", "checkpoint_sha256", "device", "demo_weights", "amp"}),
    "bifusion_gpu_memory_allocated_bytes": ("gauge", {"model_instance"}),
    "bifusion_gpu_memory_reserved_bytes": ("gauge", {"model_instance"}),
    "bifusion_ready": ("gauge", set()),
    "bifusion_max_batch_size": ("gauge", {"source", "granularity"}),
    "bifusion_batch_sweep_seconds_per_frame": ("gauge", {"batch_size", "granularity"}),
}


@dataclasses.dataclass
class Traffic:
    live: object
    results: list  # in the order sent; the last one is also the model's last


@pytest.fixture(scope="module")
def traffic(encoder, tum_folder_frames):
    """3 unary frames (one with client points, so not every point is valid), a stream of 2, then
    one more unary frame: the stream's frames decode in parallel and may reach the model in
    either order, the last frame is the model's last for sure (the ``*_last`` gauges)."""
    rng = np.random.default_rng(1)
    xyz = rng.uniform((-1.5, -1.5, 0.3), (1.5, 1.5, 3.0), size=(400, 3)).astype(np.float32)
    with running_server(encoder) as live, BiFusionClient(live.address) as client:
        f = tum_folder_frames
        results = [client.encode_request(request_from_folder_frame(f[0], max_points=800))]
        points_frame = build_request(
            f[1].color, f[1].depth, f[1].intrinsics, cam_to_world=f[1].cam_to_world,
            depth_scale=f[1].depth_scale, points=xyz, frame_id="points",
        )  # fmt: skip
        results.append(client.encode_request(points_frame))
        results.append(client.encode_request(request_from_folder_frame(f[2], max_points=1200, float16=True)))
        stream = [request_from_folder_frame(frame, max_points=600) for frame in f[3:5]]
        results.extend(client.encode_stream(stream))
        results.append(client.encode_request(request_from_folder_frame(f[1], max_points=700)))
        yield Traffic(live, results)


def families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_every_documented_metric_is_exported_with_its_type_and_labels(traffic):
    exported = families(traffic.live.metrics_text())
    for name, (kind, labels) in DOCUMENTED.items():
        assert name in exported, f"{name} missing"
        assert exported[name].type == kind, name
        for sample in exported[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)


@pytest.mark.parametrize("doc", ["README.md", "docs/metrics.md"])
def test_every_exported_metric_is_documented(traffic, doc):
    text = (ROOT / doc).read_text()
    exported = families(traffic.live.metrics_text())
    for family in exported.values():
        # prometheus_client's own *_created timestamps ride along with counters and histograms.
        if family.name.startswith("bifusion_") and not family.name.endswith("_created"):
            shown = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{shown}" in text or f"{shown}`" in text, f"{shown} is not documented in {doc}"


def test_buckets(traffic):
    exported = families(traffic.live.metrics_text())

    def bounds(name):
        return [float(s.labels["le"]) for s in exported[name].samples if s.name == f"{name}_bucket"]

    assert bounds("bifusion_batch_size") == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, float("inf")]
    assert bounds("bifusion_gate_mean") == [*RATIO_BUCKETS, float("inf")]
    assert bounds("bifusion_valid_ratio") == [*RATIO_BUCKETS, float("inf")]
    duration = bounds("bifusion_compute_duration_seconds")
    assert duration[0] == 0.001 and 10.0 in duration


def test_gate_mean_and_valid_ratio_match_the_responses(traffic):
    metric = traffic.live.metric
    results = traffic.results
    for stat in ("gate_mean", "valid_ratio"):
        values = [getattr(r, stat) for r in results]
        name = f"bifusion_{stat}"
        assert metric(f"{name}_count") == len(values)
        assert metric(f"{name}_sum") == pytest.approx(sum(values), abs=1e-9)
        assert metric(f"{name}_last") == values[-1]
        for le in RATIO_BUCKETS:
            assert metric(f"{name}_bucket", le=str(le)) == sum(v <= le for v in values), (stat, le)
    assert min(r.valid_ratio for r in results) < 1.0  # the client-points frame had invalid points


def test_counts_and_sizes_match_the_traffic(traffic):
    metric = traffic.live.metric
    results = traffic.results
    assert metric("bifusion_frames_total") == len(results)
    assert metric("bifusion_points_per_frame_sum") == sum(r.num_points for r in results)
    assert metric("bifusion_response_bytes_sum") == sum(r.wire_bytes for r in results)
    assert metric("bifusion_request_bytes_count") == len(results)
    assert metric("bifusion_requests_total", rpc="EncodeFrame", code="OK") == 4
    assert metric("bifusion_requests_total", rpc="EncodeStream", code="OK") == 1
    for name in ("queue_wait_seconds", "decode_duration_seconds", "encode_duration_seconds"):
        assert metric(f"bifusion_{name}_count") == len(results), name
    one = {"model_instance": "0"}  # an in-process server has one instance
    batches = metric("bifusion_batch_size_count", **one)
    assert metric("bifusion_batch_size_sum", **one) == len(results)
    assert metric("bifusion_compute_duration_seconds_count", **one) == batches
    assert metric("bifusion_stage_duration_seconds_count", stage="unet", **one) == batches
    assert metric("bifusion_instance_up", **one) == 1
    assert metric("bifusion_instance_restarts_total", **one) == 0
    assert metric("bifusion_queue_depth") == 0 and metric("bifusion_inflight_requests") == 0
    assert metric("bifusion_ready") == 1
    info = traffic.live.server.encoder.info
    labels = dict(
        architecture=info.architecture, checkpoint_sha256=info.checkpoint_sha256, device="cpu",
        demo_weights="true", amp="false",
    )  # fmt: skip
    assert metric("bifusion_model_info", **labels) == 1
    assert metric("bifusion_gpu_memory_allocated_bytes", **one) == 0  # present on CPU, at 0
    assert metric("bifusion_gpu_memory_reserved_bytes", **one) == 0


def test_promtool_finds_nothing_to_lint(traffic):
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (Debian package 'prometheus')")
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=traffic.live.metrics_text(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_real_prometheus_reads_gate_mean_and_valid_ratio(traffic, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (Debian package 'prometheus')")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}\n"
        "scrape_configs:\n"
        f"  - job_name: bifusion\n    static_configs: [{{targets: ['{traffic.live.metrics_address}']}}]\n"
    )
    command = [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    prometheus = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def query(expr):
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.load(response)["data"]["result"]
            except OSError:
                return None
            return float(result[0]["value"][1]) if result else None

        results = traffic.results
        wait_until(lambda: query("bifusion_gate_mean_count") == len(results), timeout=60, what="a scrape")
        gate_means = [r.gate_mean for r in results]
        valid_ratios = [r.valid_ratio for r in results]
        assert query("bifusion_gate_mean_sum / bifusion_gate_mean_count") == pytest.approx(
            np.mean(gate_means)
        )
        assert query("bifusion_valid_ratio_sum / bifusion_valid_ratio_count") == pytest.approx(
            np.mean(valid_ratios)
        )
        assert query("bifusion_gate_mean_last") == pytest.approx(gate_means[-1])
        assert query("bifusion_valid_ratio_last") == pytest.approx(valid_ratios[-1])
        assert query('bifusion_model_info{demo_weights="true"}') == 1
        assert query("up") == 1
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def test_every_rpcs_ok_series_exists_from_the_start(encoder):
    """So that rate() over them reads 0, not "no data", before the first call."""
    rpcs = ("EncodeFrame", "EncodeStream", "GetModelInfo", "RegisterSharedMemory", "UnregisterSharedMemory")
    with running_server(encoder, allow_shared_memory=True) as live:
        for rpc in rpcs:
            assert live.metric("bifusion_requests_total", rpc=rpc, code="OK") == 0, rpc
