"""docker/prometheus: promtool accepts the config and rules and the rules pass their unit
tests; then the real Prometheus server, with the shipped config and rules aimed at a live
encoder on loopback, scrapes real frames' gate mean and valid ratio, which read back
through its HTTP API equal the stats the responses carried."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_promql import dashboard_targets, grafana_to_promql
from deploy_tools import DATA, DOCKER, tool
from serving_harness import free_port, running_server

from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame

MAX_POINTS = 3000
CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES = DOCKER / "prometheus" / "rules"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_check_config_also_checks_the_rules():
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, "rule_files must resolve next to prometheus.yml"


def test_promtool_check_rules():
    files = sorted(str(p) for p in RULES.glob("*.yml"))
    assert files
    result = promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests():
    result = promtool("test", "rules", "prometheus_rules_test.yml", cwd=DATA)
    assert result.returncode == 0, result.stdout + result.stderr


def loopback_config(metrics_port: int, prometheus_port: int) -> dict:
    """The shipped config with the encoder found on loopback instead of by compose DNS."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="2s", scrape_timeout="2s", evaluation_interval="2s")
    config["rule_files"] = [str(RULES / "*.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    encoder = jobs["bifusion-encoder"]
    assert encoder.pop("dns_sd_configs")[0]["port"] == 9100
    encoder["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    return config


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, check, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last is not None and check(last):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{expr} never satisfied the check (last value {last})")


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder, max_batch_size=4) as live:
        yield live


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(loopback_config(live.server.metrics_port, port)))
    checked = promtool("check", "config", str(config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.25)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def sent(live, prometheus, tum_folder_frames):
    """Five real frames through the service; returns their results once Prometheus has
    scraped the last of them."""
    prometheus.wait_for('up{job="bifusion-encoder"}', lambda v: v == 1)
    before = live.metric("bifusion_gate_mean_count")
    before_sums = live.metric("bifusion_gate_mean_sum"), live.metric("bifusion_valid_ratio_sum")
    with BiFusionClient(live.address) as client:
        results = [
            client.encode_request(request_from_folder_frame(f, max_points=MAX_POINTS), timeout=120)
            for f in tum_folder_frames
        ]
    expected_count = before + len(results)
    prometheus.wait_for("bifusion_gate_mean_count", lambda v: v == expected_count)
    # A second scrape after the count settles, so every series holds the final values.
    time.sleep(2.5)
    return results, before, before_sums


def test_gate_mean_and_valid_ratio_read_back_from_prometheus(prometheus, sent):
    results, before, (gate_sum_before, valid_sum_before) = sent
    last = results[-1]
    assert len({round(r.gate_mean, 6) for r in results}) > 1, "real frames should give distinct gate means"
    assert prometheus.value("bifusion_gate_mean_last") == pytest.approx(last.gate_mean, abs=1e-6)
    assert prometheus.value("bifusion_valid_ratio_last") == pytest.approx(last.valid_ratio, abs=1e-6)
    assert prometheus.value("bifusion_gate_mean_count") == before + len(results)
    assert prometheus.value("bifusion_valid_ratio_count") == before + len(results)
    assert prometheus.value("bifusion_gate_mean_sum") - gate_sum_before == pytest.approx(
        math.fsum(r.gate_mean for r in results), abs=1e-5
    )
    assert prometheus.value("bifusion_valid_ratio_sum") - valid_sum_before == pytest.approx(
        math.fsum(r.valid_ratio for r in results), abs=1e-5
    )
    # The histogram buckets hold the same frames: below 1.0 exactly those under it.
    for le in ("0.5", "1.0"):
        in_bucket = prometheus.value(f'bifusion_valid_ratio_bucket{{le="{le}"}}')
        assert in_bucket - (before if le == "1.0" else 0) >= sum(r.valid_ratio <= float(le) for r in results)
    # The last-value gauge's history holds every frame's value as it was scraped.
    series = prometheus.query("bifusion_gate_mean_last[5m]")
    assert series and len(series[0]["values"]) >= 2
    frames = prometheus.value("bifusion_frames_total")
    assert frames >= len(results)


def test_shipped_alert_rules_evaluate_on_live_data(prometheus, sent):
    # The demo checkpoint is loaded: its alert fires (no `for`), with the model's labels.
    alerts = prometheus.query('ALERTS{alertname="BiFusionDemoWeights", alertstate="firing"}')
    deadline = time.monotonic() + 30
    while not alerts and time.monotonic() < deadline:
        time.sleep(0.5)
        alerts = prometheus.query('ALERTS{alertname="BiFusionDemoWeights", alertstate="firing"}')
    assert alerts and alerts[0]["metric"]["demo_weights"] == "true"
    assert not prometheus.query('ALERTS{alertname=~"BiFusionNotServing|BiFusionEncoderDown"}')
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]


def test_every_dashboard_query_runs_and_the_key_panels_have_data(prometheus, sent):
    empty = []
    for title, expr in dashboard_targets():
        result = prometheus.query(grafana_to_promql(expr))  # raises on a PromQL error
        if not result:
            empty.append(title)
    # Panels that must show something after five good frames (errors, drops and GPU may be 0 or empty).
    must_have_data = {
        "Gate mean (α over valid points)",
        "Valid ratio",
        "Request latency (EncodeFrame, OK)",
        "Frames / s",
        "Batch size",
        "Queue depth and in-flight RPCs",
        "GPU memory",
        "Encoder stages (p95 per batch)",
        "Where the time goes (p95)",
    }
    titles = {title for title, _ in dashboard_targets()}
    assert must_have_data <= titles
    assert not must_have_data & set(empty), sorted(must_have_data & set(empty))
