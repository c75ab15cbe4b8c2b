"""The Grafana dashboard and provisioning: well-formed, covering what operators need, and
querying only metrics a running server really exports (checked against a live /metrics)."""

from __future__ import annotations

import urllib.request

import pytest
import yaml
from deploy_promql import check_names, dashboard_targets, exported, metric_names, rule_exprs
from deploy_tools import DOCKER, load_dashboard
from serving_harness import running_server

# What the issue asks the dashboard to show, as the metrics that show it.
REQUIRED = {
    "gate mean": {"bifusion_gate_mean_sum", "bifusion_gate_mean_last"},
    "valid ratio": {"bifusion_valid_ratio_sum", "bifusion_valid_ratio_last"},
    "latency": {"bifusion_request_duration_seconds_bucket"},
    "frames/s": {"bifusion_frames_total"},
    "batch size": {"bifusion_batch_size_sum", "bifusion_batch_size_bucket"},
    "queue depth": {"bifusion_queue_depth"},
    "errors by code": {"bifusion_requests_total"},
    "GPU memory": {"bifusion_gpu_memory_allocated_bytes", "bifusion_gpu_memory_reserved_bytes"},
}


@pytest.fixture(scope="module")
def live_metrics(encoder):
    with running_server(encoder) as live, urllib.request.urlopen(live.metrics_url, timeout=10) as response:
        yield response.read().decode()


def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    # No two panels overlap on the 24-column grid.
    cells = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= variables


def test_dashboard_shows_what_the_issue_asks_for():
    used = set().union(*(metric_names(expr) for _title, expr in dashboard_targets()))
    for topic, metrics in REQUIRED.items():
        assert metrics <= used, f"dashboard lacks {topic}: {sorted(metrics - used)}"
    exprs = [expr for _title, expr in dashboard_targets()]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "request_duration" in e for e in exprs)
    assert any("sum by (code)" in e and 'code!="OK"' in e for e in exprs), "errors by code"


def test_provisioning_points_at_the_dashboard_and_prometheus():
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    [prom] = datasources["datasources"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/bifusion.yaml").read_text())
    [provider] = providers["providers"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    # The dashboard's datasource variable defaults to the provisioned datasource.
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == prom["uid"]


def test_checker_is_not_vacuous():
    available = {"bifusion_frames_total": "counter", "bifusion_batch_size_bucket": "histogram"}
    assert check_names("rate(bifusion_frames_total[1m])", available) == []
    assert check_names("rate(bifusion_frame_total[1m])", available) == [
        "bifusion_frame_total is not exported"
    ]
    assert check_names("histogram_quantile(0.9, rate(bifusion_frames_total[1m]))", available)
    assert metric_names('x{job="bifusion_not_a_metric"} + bifusion_ready') == {"bifusion_ready"}


def test_every_dashboard_metric_is_exported_by_a_live_server(live_metrics):
    available = exported(live_metrics)
    assert "bifusion_gate_mean_bucket" in available  # the scrape is real and parsed
    problems = {f"{title}: {p}" for title, expr in dashboard_targets() for p in check_names(expr, available)}
    assert not problems, sorted(problems)


def test_every_alert_rule_metric_is_exported_by_a_live_server(live_metrics):
    available = exported(live_metrics)
    problems = {f"{name}: {p}" for name, expr in rule_exprs() for p in check_names(expr, available)}
    assert not problems, sorted(problems)
