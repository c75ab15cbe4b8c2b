"""docker/k8s: every overlay renders with the real ``kubectl kustomize`` (default flags),
every object validates offline against the Kubernetes API schemas, the Prometheus Operator
objects pass their own checks (promtool), and what the manifests promise — probe and
container ports, the metrics path, the metric names in the alert rules and the autoscaler,
the drain fitting the grace period, a read-only root filesystem, TLS probes, TLS through
Envoy — is checked against live servers. Client-side round-robin over several servers (the
headless Service's path) is checked live too."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from deploy_promql import check_names, exported, metric_names
from deploy_tools import DOCKER, ROOT, tool
from serving_harness import (
    ModelSpy,
    free_port,
    health_status,
    running_server,
    wait_until,
)
from test_deploy_envoy import CALLS, loopback_config, running_envoy
from test_deploy_prometheus import Prometheus
from test_deploy_prometheus import loopback_config as prometheus_loopback_config

from bifusion_client.api import BiFusionClient, balancing_service_config
from bifusion_client.request import request_from_folder_frame
from bifusion_server.config import ServerConfig, env_name, load_config


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_k8s", ROOT / "scripts" / "generate_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_k8s = _load_generator()

K8S = DOCKER / "k8s"
OVERLAYS = ("gpu", "cpu", "gpu-production")
# 1.27: native gRPC probes are GA; the newest schemas the validator ships.
KUBE_VERSIONS = ("1.27", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SECRET_FILES = ("tls.crt", "tls.key", "ca.crt", "token")
HEALTHCHECK_SETTINGS = {"BIFUSION_HEALTHCHECK_CA", "BIFUSION_HEALTHCHECK_SERVER_NAME"}
NON_SERVER_SETTINGS = {"BIFUSION_CACHE_DIR"}  # read by the library (bifusion/demo.py)
ADAPTER_VALUES = K8S / "components" / "autoscaling" / "prometheus-adapter-values.yaml"
TOKEN = "k8s-test-token"
MAX_POINTS = 1000


def kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_secrets(folder: Path) -> None:
    """A throwaway CA, a certificate it signed for the names the manifests expect, a token."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "rsa:2048", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=bifusion-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", cwd=folder)  # fmt: skip
    openssl("req", *key, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=bifusion-encoder", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=DNS:bifusion-encoder,DNS:bifusion-serve,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "1", "-extfile", "san.ext", cwd=folder)  # fmt: skip
    (folder / "token").write_text(TOKEN + "\n")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("k8s-secrets")
    make_secrets(folder)
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, secrets) -> dict[str, list[dict]]:
    """Every overlay as kubectl renders it. gpu-production reads its Secrets from files git
    ignores: it is rendered from a copy of docker/k8s holding throwaway ones."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    for name in SECRET_FILES:
        shutil.copy(secrets / name, copy / "overlays" / "gpu-production" / "secrets" / name)
    out = {}
    for overlay in OVERLAYS:
        base = copy if overlay == "gpu-production" else K8S
        result = kustomize(base / "overlays" / overlay)
        assert result.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, prefix: str) -> dict:
    [found] = [d for name, d in objects(docs, kind).items() if name.startswith(prefix)]
    return found


def encoder_pod(docs) -> dict:
    return objects(docs, "Deployment")["bifusion-encoder"]["spec"]["template"]


def encoder_container(docs) -> dict:
    [container] = encoder_pod(docs)["spec"]["containers"]
    return container


def encoder_env(docs) -> dict[str, str]:
    """The container's environment: its envFrom ConfigMap, then its own env entries."""
    container = encoder_container(docs)
    [source] = container["envFrom"]
    env = dict(objects(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def server_config(docs) -> ServerConfig:
    return load_config([], {k: v for k, v in encoder_env(docs).items() if k.startswith("BIFUSION_")})


# ---------------------------------------------------------------- rendering and schemas


def test_overlays_render_with_default_flags_and_missing_secrets_are_named(rendered):
    assert set(rendered) == set(OVERLAYS)
    # In a fresh checkout the production example stops at the first Secret file it lacks.
    if not (K8S / "overlays" / "gpu-production" / "secrets" / "tls.crt").exists():
        result = kustomize(K8S / "overlays" / "gpu-production")
        assert result.returncode != 0 and "secrets/tls.crt" in result.stderr


def test_secret_files_are_never_committed():
    secrets = K8S / "overlays" / "gpu-production" / "secrets"
    tracked = subprocess.run(
        ["git", "ls-files", str(K8S)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [p for p in tracked if "/secrets/" in p] == [
        "docker/k8s/overlays/gpu-production/secrets/.gitignore"
    ]
    for name in SECRET_FILES:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(secrets / name)], cwd=ROOT)
        assert ignored.returncode == 0, f"secrets/{name} would not be ignored by git"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_match_the_kubernetes_api_schemas(rendered, overlay, version):
    """Strict: unknown fields (a misspelt probe setting) fail too. The Operator's CRDs have no
    schema here; they get their own checks below."""
    errors = []
    for doc in rendered[overlay]:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)
    kinds = {doc["kind"] for doc in rendered[overlay]}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Namespace"} <= kinds
    if overlay == "gpu-production":
        assert {"HorizontalPodAutoscaler", "Secret"} | CRD_KINDS <= kinds


def test_schema_check_is_not_vacuous(rendered):
    deployment = objects(rendered["gpu"], "Deployment")["bifusion-encoder"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)


# ---------------------------------------------------------------- one source of truth


def test_copies_of_the_docker_sources_are_current(rendered):
    assert generate_k8s.main(["--check"]) == 0, "run python scripts/generate_k8s.py"
    docs = rendered["gpu-production"]
    dashboard = objects(docs, "ConfigMap")["bifusion-grafana-dashboard"]
    assert dashboard["data"]["bifusion.json"] == generate_k8s.DASHBOARD.read_text()
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    [rule] = objects(docs, "PrometheusRule").values()
    assert rule["spec"]["groups"] == yaml.safe_load(generate_k8s.RULES.read_text())["groups"]
    envoy = yaml.safe_load(one(rendered["gpu"], "ConfigMap", "bifusion-envoy")["data"]["envoy.yaml"])
    source = yaml.safe_load(generate_k8s.ENVOY.read_text())
    assert envoy["static_resources"]["listeners"] == source["static_resources"]["listeners"]


def test_prometheus_rule_passes_promtool(rendered, tmp_path):
    [rule] = objects(rendered["gpu-production"], "PrometheusRule").values()
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The rules' up{job=...} must match the job the ServiceMonitor produces: its Service's name.
    jobs = {j for _, e in _rule_exprs(rule) for j in _jobs(e)}
    [monitor] = objects(rendered["gpu-production"], "ServiceMonitor").values()
    services = _selected(objects(rendered["gpu-production"], "Service"), monitor["spec"]["selector"])
    assert jobs == set(services), (jobs, services)


def test_service_monitor_scrapes_every_encoders_metrics_port(rendered):
    """No CRD schema offline: the ServiceMonitor is checked against what it points at."""
    docs = rendered["gpu-production"]
    [monitor] = objects(docs, "ServiceMonitor").values()
    [(name, service)] = _selected(objects(docs, "Service"), monitor["spec"]["selector"]).items()
    assert name == "bifusion-encoder" and service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    config = server_config(docs)
    assert [ports[e["port"]] for e in monitor["spec"]["endpoints"]] == [config.metrics_port]
    assert {"apiVersion", "kind", "metadata", "spec"} == set(monitor)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"


def _rule_exprs(rule: dict) -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


def _jobs(expr: str) -> set[str]:
    return set(re.findall(r'job="([^"]+)"', expr))


def _selected(items: dict[str, dict], selector: dict) -> dict[str, dict]:
    wanted = selector["matchLabels"].items()
    return {n: o for n, o in items.items() if wanted <= o["metadata"].get("labels", {}).items()}


# ---------------------------------------------------------------- the wiring


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_encoder_pod_is_locked_down_and_drains_within_its_grace(rendered, overlay):
    docs = rendered[overlay]
    pod = encoder_pod(docs)["spec"]
    container = encoder_container(docs)
    config = server_config(docs)
    env = encoder_env(docs)
    assert pod["enableServiceLinks"] is False  # or a Service's env vars mix with BIFUSION_*
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    # The server writes only the demo checkpoint cache and temporary files: both are volumes.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [p for p, m in mounts.items() if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    for path in (env["BIFUSION_CACHE_DIR"], env["XDG_CACHE_HOME"], env["CUDA_CACHE_PATH"], "/tmp"):
        assert any(path == w or path.startswith(w + "/") for w in writable), f"{path} is not writable"
    models = mounts["/models"]
    assert models["readOnly"] is True and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"] is True
    if config.checkpoint:
        assert config.checkpoint.startswith("/models/")

    deployment = objects(docs, "Deployment")["bifusion-encoder"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.drain_seconds + 5
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > config.drain_seconds + pre_stop
    start = container["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300  # slow loads are not killed

    [pdb] = _selected_pdbs(docs, encoder_pod(docs))
    assert pdb["spec"]["maxUnavailable"] == 1
    resources = container["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part])
        assert (resources[part].get("nvidia.com/gpu") == 1) == (overlay != "cpu")
    assert config.device == ("cpu" if overlay == "cpu" else "cuda")


def _selected_pdbs(docs, pod_template) -> list[dict]:
    labels = pod_template["metadata"]["labels"].items()
    return [
        p
        for p in objects(docs, "PodDisruptionBudget").values()
        if p["spec"]["selector"]["matchLabels"].items() <= labels
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_ports_and_probes_agree_with_the_server_config(rendered, overlay):
    docs = rendered[overlay]
    config = server_config(docs)
    env = encoder_env(docs)
    known = {env_name(f.name) for f in dataclasses.fields(ServerConfig)}
    unknown = (
        {k for k in env if k.startswith("BIFUSION_")} - known - HEALTHCHECK_SETTINGS - NON_SERVER_SETTINGS
    )
    assert not unknown, f"not server settings: {sorted(unknown)}"
    container = encoder_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    annotations = encoder_pod(docs)["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        if config.tls:  # the kubelet's gRPC probes cannot speak TLS: the image's healthcheck
            assert spec["exec"]["command"] == ["bifusion-healthcheck"], probe
        else:
            assert spec["grpc"]["port"] == config.port and spec["grpc"].get("service", "") == "", probe

    services = objects(docs, "Service")
    headless = services["bifusion-encoder"]
    assert headless["spec"]["clusterIP"] == "None"  # one A record per ready pod
    pod_labels = encoder_pod(docs)["metadata"]["labels"].items()
    assert headless["spec"]["selector"].items() <= pod_labels
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == ports
    assert all(p["targetPort"] in ports for p in headless["spec"]["ports"])

    # Envoy: clients connect to bifusion-serve, Envoy finds every encoder via the headless name.
    envoy_config = yaml.safe_load(one(docs, "ConfigMap", "bifusion-envoy")["data"]["envoy.yaml"])
    [cluster] = envoy_config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "bifusion-encoder", "port_value": config.port}
    assert envoy_config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    [listener] = envoy_config["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]["port_value"]
    envoy_pod = objects(docs, "Deployment")["bifusion-envoy"]["spec"]["template"]
    [envoy] = envoy_pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]} == {"grpc": listen}
    serve = services["bifusion-serve"]
    assert serve["spec"]["selector"].items() <= envoy_pod["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in serve["spec"]["ports"]] == [(config.port, "grpc")]
    assert envoy_pod["spec"]["enableServiceLinks"] is False
    assert (
        ("transport_socket" in cluster) == config.tls == ("transport_socket" in listener["filter_chains"][0])
    )
    assert _selected_pdbs(docs, envoy_pod)


def test_cpu_overlay_drops_every_trace_of_the_gpu(rendered):
    text = yaml.safe_dump_all(rendered["cpu"])
    assert "nvidia.com/gpu" not in text
    assert encoder_container(rendered["cpu"])["image"].endswith(":cpu")
    assert encoder_container(rendered["gpu"])["image"].endswith(":cuda")


def test_autoscaler_targets_the_encoders_through_the_adapter_rule(rendered):
    docs = rendered["gpu-production"]
    [hpa] = objects(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "bifusion-encoder",
    }
    assert "replicas" not in objects(docs, "Deployment")["bifusion-encoder"]["spec"], "would fight the HPA"
    [metric] = hpa["spec"]["metrics"]
    rules = {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]}
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] in rules
    config = server_config(docs)
    # One full batch waiting per encoder: the GPU always has its next batch ready.
    assert float(metric["external"]["target"]["averageValue"]) == config.max_batch_size


def adapter_queries() -> list[tuple[str, str]]:
    """(exposed name, PromQL) for every external rule, templated as prometheus-adapter does
    for an HPA in the namespace bifusion with no extra selector."""
    found = []
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]:
        [series] = metric_names(rule["seriesQuery"])
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="bifusion"')
            .replace("<<.GroupBy>>", "")
        )
        found.append((rule["name"]["as"], query))
    return found


def test_adapter_queries_are_valid_promql(tmp_path):
    rules = [{"record": f"test:{name}", "expr": query} for name, query in adapter_queries()]
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_both_generated_configs(rendered, secrets, tmp_path):
    for overlay in ("gpu", "gpu-production"):
        text = one(rendered[overlay], "ConfigMap", "bifusion-envoy")["data"]["envoy.yaml"]
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(text.replace("/etc/bifusion/tls/", f"{secrets}/"))
        result = subprocess.run(
            [tool("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{overlay}: {result.stdout}{result.stderr}"


# ---------------------------------------------------------------- against live servers


# In a user and mount namespace: the demo checkpoint cache (the pod's emptyDir) bound first,
# a tmpfs on /tmp (the other emptyDir), then everything else read-only, as the pod's
# readOnlyRootFilesystem makes it. "$1" is the cache, the rest the server's command line.
READ_ONLY_ROOT = """set -e
cache="$1"; shift
mount -t tmpfs -o size=512m tmpfs /tmp
mkdir -p /tmp/.pod-cache
mount --bind "$cache" /tmp/.pod-cache
mount -o remount,bind,ro /
exec "$@"
"""


def _can_make_root_read_only(cache: str) -> bool:
    """unshare and unprivileged user namespaces exist, and nothing the server needs lives
    under /tmp (the tmpfs hides it)."""
    unshare = shutil.which("unshare")
    if not unshare or any(str(p).startswith("/tmp/") for p in (sys.prefix, sys.executable, cache, ROOT)):
        return False
    probe = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", "mount -o remount,bind,ro /"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def _demo_cache() -> str:
    """Where this machine keeps the demo checkpoint (the pod makes it in its emptyDir)."""
    return os.environ.get("BIFUSION_CACHE_DIR") or str(Path.home() / ".cache" / "bifusion")


@contextlib.contextmanager
def pod_like_server(docs, log_path: Path, read_only: bool):
    """``python -m bifusion_server`` with the container's environment from ``docs`` (the
    ConfigMap and env entries), on free loopback ports; with ``read_only``, on a read-only
    root filesystem where only the pod's writable volumes can be written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIFUSION_")}
    env.update(encoder_env(docs))
    cache = _demo_cache()
    env["BIFUSION_CACHE_DIR"] = "/tmp/.pod-cache" if read_only else cache
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "bifusion_server", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", str(metrics_port)]  # fmt: skip
    if read_only:
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", READ_ONLY_ROOT, "sh", cache,
                   *command]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process, f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_pod_environment_against_the_real_server(rendered, tmp_path, tum_folder_frames):
    """The CPU overlay's container environment runs the real entry point on a read-only root
    filesystem with only the pod's writable volumes: health stays NOT_SERVING until the model
    is loaded and warmed up (what the startup and readiness probes see), then the probes'
    check passes, a real frame is encoded, the scraped path serves every metric the alert
    rules and the autoscaler read, and SIGTERM's drain ends well inside the grace period."""
    docs = rendered["cpu"]
    container = encoder_container(docs)
    assert encoder_env(docs)["BIFUSION_CACHE_DIR"] == "/var/cache/bifusion"  # the pod's emptyDir
    read_only = _can_make_root_read_only(_demo_cache())
    if not read_only:
        warnings.warn(
            "the read-only root filesystem is not exercised here (no user namespaces)", stacklevel=1
        )
    log_path = tmp_path / "server.log"
    with pod_like_server(docs, log_path, read_only) as (process, address, metrics_address):
        seen = _health_until_serving(process, address, log_path)
        assert "NOT_SERVING" in seen, f"readiness would have passed before warm-up: {seen}"
        probe = container["readinessProbe"]["grpc"]
        assert health_status(address, service=probe.get("service", "")) == "SERVING"
        request = request_from_folder_frame(tum_folder_frames[0], max_points=MAX_POINTS)
        with BiFusionClient(address) as client:
            assert client.encode_request(request, timeout=120).num_points == MAX_POINTS

        path = encoder_pod(docs)["metadata"]["annotations"]["prometheus.io/path"]
        [monitor] = objects(rendered["gpu-production"], "ServiceMonitor").values()
        assert {e["path"] for e in monitor["spec"]["endpoints"]} == {path}
        with urllib.request.urlopen(f"http://{metrics_address}{path}", timeout=10) as response:
            available = exported(response.read().decode())
        [rule] = objects(rendered["gpu-production"], "PrometheusRule").values()
        exprs = _rule_exprs(rule) + adapter_queries()
        problems = [f"{name}: {problem}" for name, expr in exprs for problem in check_names(expr, available)]
        assert not problems, problems
        for _, query in adapter_queries():
            assert {available[n] for n in metric_names(query)} == {"gauge"}

        grace = encoder_pod(docs)["spec"]["terminationGracePeriodSeconds"]
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        process.send_signal(signal.SIGTERM)
        assert process.wait(grace - pre_stop) == 0, log_path.read_text()
    assert "Read-only file system" not in log_path.read_text()


def _health_until_serving(process, address: str, log_path: Path, timeout: float = 240) -> list[str]:
    """Every distinct health answer until SERVING (UNAVAILABLE: not listening yet)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            status = health_status(address, timeout=1.0)
        except grpc.RpcError as exc:
            status = exc.code().name
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "SERVING":
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"never SERVING: {seen}\n{log_path.read_text()}")


def test_tls_probe_command_passes_against_a_tls_server_with_the_manifest_settings(rendered, secrets, encoder):
    docs = rendered["gpu-production"]
    env = {k: v.replace("/etc/bifusion/tls/", f"{secrets}/").replace("/etc/bifusion/token/", f"{secrets}/")
           for k, v in encoder_env(docs).items() if k.startswith("BIFUSION_")}  # fmt: skip
    config = load_config([], env)
    settings = {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "token_file": config.token_file}
    with running_server(encoder, **settings) as live:
        port = live.address.rsplit(":", 1)[1]
        probe_env = {k: v for k, v in os.environ.items() if not k.startswith("BIFUSION_")}
        probe_env.update(env, BIFUSION_PORT=port)
        probe_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{probe_env.get('PATH', '')}"
        # The image installs docker/healthcheck.sh as the probes' bifusion-healthcheck.
        assert (
            "docker/healthcheck.sh /usr/local/bin/bifusion-healthcheck" in (DOCKER / "Dockerfile").read_text()
        )
        result = subprocess.run(
            [str(DOCKER / "healthcheck.sh")], env=probe_env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # What a kubelet gRPC probe would do (plaintext) fails on this port.
        with pytest.raises(grpc.RpcError):
            health_status(live.address, timeout=2.0)
        options = {"tls_ca": secrets / "ca.crt", "tls_server_name": "bifusion-encoder"}
        with BiFusionClient(live.address, token=TOKEN, **options) as client:
            assert client.model_info(timeout=30).feature_dim == 256
            assert client.health() == "SERVING"
        with BiFusionClient(live.address, **options) as client, pytest.raises(grpc.RpcError) as error:
            client.model_info(timeout=30)  # the token file from the Secret is in force
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- client-side round robin


def test_service_config_names_the_encoder_service_and_rejects_unknown_policies():
    config = balancing_service_config("round_robin")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["name"] == [{"service": "bifusion.v1.BiFusionEncoder"}]
    with pytest.raises(ValueError, match="load_balancing"):
        BiFusionClient("localhost:1", load_balancing="random")


def test_round_robin_client_spreads_calls_and_skips_a_draining_server(encoder, tum_folder_frames):
    """What a client does with dns:///bifusion-encoder:50051 (one address per pod): here two
    live servers behind one ipv4: target. Calls land on both; while one drains (a call still
    in flight on it) every new call succeeds on the other."""
    spy = ModelSpy(encoder)
    requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in tum_folder_frames]
    with running_server(encoder) as first, running_server(spy) as second:
        target = "ipv4:" + ",".join(s.address for s in (first, second))
        frames = [lambda s=s: s.metric("bifusion_frames_total") or 0.0 for s in (first, second)]
        with BiFusionClient(target, load_balancing="round_robin") as client:
            before = [f() for f in frames]
            for i in range(8):
                assert (
                    client.encode_request(requests[i % len(requests)], timeout=120).num_points == MAX_POINTS
                )
            spread = [f() - b for f, b in zip(frames, before, strict=True)]
            assert sum(spread) == 8 and all(n > 0 for n in spread), f"not spread: {spread}"

            # Hold one call inside the second server's model, then drain it (as SIGTERM would).
            spy.gate.clear()
            spy.entered.clear()
            with ThreadPoolExecutor(1) as pool, BiFusionClient(second.address) as direct:
                held = pool.submit(direct.encode_request, requests[0], timeout=120)
                assert spy.entered.wait(60)
                drained = second.start_drain()
                try:
                    wait_until(lambda: health_status(second.address) == "NOT_SERVING", 30, "the drain")
                    first_before = frames[0]()
                    for i in range(4):
                        assert client.encode_request(requests[i], timeout=120).num_points == MAX_POINTS
                    assert frames[0]() - first_before == 4
                finally:
                    spy.gate.set()
                assert held.result(120).num_points == MAX_POINTS  # the drain let it finish
                drained.result(120)


# ---------------------------------------------------------------- TLS through Envoy


@pytest.fixture
def tls_replicas(encoder, secrets):
    tls = {"tls_cert": str(secrets / "tls.crt"), "tls_key": str(secrets / "tls.key")}
    tls["token_file"] = str(secrets / "token")
    with running_server(encoder, **tls) as first, running_server(encoder, **tls) as second:
        yield [first, second]


def test_tls_envoy_config_carries_tls_to_clients_and_to_tls_encoders(
    rendered, secrets, tls_replicas, tmp_path, tum_folder_frames
):
    """The production overlay's Envoy config, its replicas on loopback: a TLS client with the
    token reaches both TLS encoders through it, and Envoy's gRPC health checks pass over TLS."""
    text = one(rendered["gpu-production"], "ConfigMap", "bifusion-envoy")["data"]["envoy.yaml"]
    shipped = yaml.safe_load(text.replace("/etc/bifusion/tls/", f"{secrets}/"))
    listen, admin = free_port(), free_port()
    ports = [int(r.address.rsplit(":", 1)[1]) for r in tls_replicas]
    config = loopback_config(ports, listen, admin)
    for key in ("listeners", "clusters"):
        [ours], [theirs] = config["static_resources"][key], shipped["static_resources"][key]
        target, source = (
            (ours, theirs) if key == "clusters" else (ours["filter_chains"][0], theirs["filter_chains"][0])
        )
        target["transport_socket"] = source["transport_socket"]
    with running_envoy(config, tmp_path, admin):
        requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in tum_folder_frames]
        before = [r.metric("bifusion_frames_total") or 0.0 for r in tls_replicas]
        options = {"tls_ca": secrets / "ca.crt", "tls_server_name": "bifusion-serve", "token": TOKEN}
        # Envoy's least-request picks at random between idle replicas: with 6 calls all of
        # them landed on one replica about once in 32 runs; with CALLS (16), once in 32 768.
        with BiFusionClient(f"127.0.0.1:{listen}", **options) as client:
            for i in range(CALLS):
                assert (
                    client.encode_request(requests[i % len(requests)], timeout=120).num_points == MAX_POINTS
                )
        served = [
            (r.metric("bifusion_frames_total") or 0.0) - b for r, b in zip(tls_replicas, before, strict=True)
        ]
        assert sum(served) == CALLS and all(n > 0 for n in served), served


# ---------------------------------------------------------------- the autoscaler's signal


@contextlib.contextmanager
def prometheus_scraping(metrics_port: int, target_labels: dict[str, str], workdir: Path):
    """The real Prometheus with the shipped config, scraping one encoder whose series carry
    ``target_labels`` (what Kubernetes discovery adds: namespace, pod)."""
    port = free_port()
    config = prometheus_loopback_config(metrics_port, port)
    [encoder_job] = [job for job in config["scrape_configs"] if job["job_name"] == "bifusion-encoder"]
    encoder_job["static_configs"][0]["labels"] = target_labels
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}", "--log.level=warn",
               f"--storage.tsdb.path={workdir / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: process.poll() is not None or _answers(server), 60, "Prometheus", interval=0.25)
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(server) -> bool:
    try:
        server.query("up")
    except OSError:
        return False
    return True


def test_autoscaler_metric_follows_the_backlog_of_its_namespace(encoder, tum_folder_frames, tmp_path):
    """The adapter's query, as it runs for the HPA in namespace bifusion, over a real scrape:
    0 while idle, above 0 while frames wait for a busy model, and nothing for another
    namespace."""
    [(_, query)] = adapter_queries()
    spy = ModelSpy(encoder)
    requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in tum_folder_frames]
    labels = {"namespace": "bifusion", "pod": "bifusion-encoder-0"}
    with (
        running_server(spy, max_batch_size=2) as live,
        prometheus_scraping(live.server.metrics_port, labels, tmp_path) as prometheus,
    ):
        assert prometheus.wait_for(query, lambda v: True) == 0  # the series exists, idle
        spy.gate.clear()  # the model is busy: everything after its first batch waits
        spy.entered.clear()
        with ThreadPoolExecutor(8) as pool, BiFusionClient(live.address) as client:
            calls = [
                pool.submit(client.encode_request, requests[i % len(requests)], timeout=300) for i in range(8)
            ]
            try:
                assert spy.entered.wait(60)
                # Every frame not in the held batch (1 or 2 frames) waits, as scraped.
                depth = 'bifusion_queue_depth{namespace="bifusion"}'
                prometheus.wait_for(depth, lambda v: v == len(calls) - len(spy.batches[-1]))
                assert prometheus.wait_for(query, lambda v: v > 0) > 0
            finally:
                spy.gate.set()
            assert all(call.result(300).num_points == MAX_POINTS for call in calls)
        assert prometheus.query(query.replace('namespace="bifusion"', 'namespace="elsewhere"')) == []
