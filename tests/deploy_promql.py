"""The PromQL the deployment ships (dashboard panels, alert rules) and the metric names in it."""

from __future__ import annotations

import re

import yaml
from deploy_tools import DOCKER, load_dashboard
from prometheus_client.parser import text_string_to_metric_families

METRIC = re.compile(r"\bbifusion_[a-zA-Z0-9_]+\b")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(load_dashboard()["panels"])
    return found


def rule_exprs() -> list[tuple[str, str]]:
    found = []
    for path in sorted((DOCKER / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((rule.get("alert") or rule.get("record"), rule["expr"]))
    return found


def metric_names(expr: str) -> set[str]:
    """``bifusion_*`` series names an expression reads (label values are ignored)."""
    return set(METRIC.findall(QUOTED.sub('""', expr)))


def exported(metrics_text: str) -> dict[str, str]:
    """Every sample name of a /metrics scrape -> its family's type (histogram, counter, ...)."""
    names = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            names[sample.name] = family.type
    return names


def check_names(expr: str, available: dict[str, str]) -> list[str]:
    """Problems with the names in ``expr`` against a scrape: missing, or a histogram
    read without its _bucket/_sum/_count suffix, or histogram_quantile over a non-bucket."""
    problems = []
    for name in sorted(metric_names(expr)):
        if name not in available:
            problems.append(f"{name} is not exported")
        elif name.endswith(HISTOGRAM_SUFFIXES) and available[name] != "histogram":
            problems.append(f"{name} looks like a histogram series but its family is a {available[name]}")
    for inner in re.findall(r"histogram_quantile\([^,]+,(.*)", expr, flags=re.S):
        if not any(n.endswith("_bucket") for n in metric_names(inner)):
            problems.append("histogram_quantile over something that is not a _bucket series")
    return problems


def grafana_to_promql(expr: str, rate_window: str = "30s") -> str:
    """A panel query as Prometheus runs it once Grafana has filled in its variables."""
    return expr.replace("$__rate_interval", rate_window).replace('"$instance"', '".*"')
