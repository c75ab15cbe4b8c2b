"""The compose stack, built and run: docker/Dockerfile's CPU image built with buildx, then
`docker compose up` of the encoder and Prometheus (compose.yaml + compose.cpu.yaml +
test/compose.test.yaml), checked the way an operator would, through 127.0.0.1 only.

Needs a Docker engine with buildx and compose v2: on a Debian host as root (CI) the module
sets one up with scripts/docker_engine.sh and stops the dockerd it started; elsewhere it uses
a running engine or skips, saying why. The tests run in file order on one stack.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import threading
import time
import urllib.parse
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
from deploy_tools import DOCKER, ROOT, ComposeProject, buildx_build, docker, docker_engine, image_size
from serving_harness import LOOPBACK, free_port, wait_until

from bifusion import BiFusionEncoder, EncodeOptions
from bifusion.checkpoint import save_checkpoint
from bifusion.config import ModelConfig
from bifusion.demo import demo_model
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame

pytestmark = pytest.mark.timeout(3600)  # a cold image build takes most of it

MAX_POINTS = 2000
TOLERANCE = 1e-4  # the service tests' bound (tests/test_serving_e2e.py)
ENCODER_IMAGE = "bifusion-serve:cpu"
PROMETHEUS_IMAGE = "bifusion-test/prometheus:debian"
HEALTHY_WITHIN = 240  # HEALTHCHECK start period (180 s) plus a check interval and slack


@pytest.fixture(scope="module")
def engine():
    with docker_engine():
        yield


@pytest.fixture(scope="module")
def images(engine, record_testsuite_property):
    """The CPU image and the test's Prometheus image, built with buildx (layer cache reused)."""
    seconds = buildx_build(
        ENCODER_IMAGE,
        DOCKER / "Dockerfile",
        ROOT,
        {"VARIANT": "cpu", "MAX_JOBS": str(os.cpu_count() or 2)},
        timeout=3000,
    )
    prometheus_seconds = buildx_build(
        PROMETHEUS_IMAGE, DOCKER / "test" / "prometheus.Dockerfile", DOCKER / "test", {}, timeout=600
    )
    size = image_size(ENCODER_IMAGE)
    record_testsuite_property("cpu_image_build_s", round(seconds, 1))
    record_testsuite_property("cpu_image_bytes", size)
    print(
        f"\nbuilt {ENCODER_IMAGE} in {seconds:.0f} s ({size / 1e9:.2f} GB),"
        f" Prometheus in {prometheus_seconds:.0f} s"
    )
    return size


@pytest.fixture(scope="module")
def checkpoint_name():
    """A trained-looking checkpoint (other weights than the demo's) placed in docker/models."""
    name = f"test-{uuid.uuid4().hex[:8]}.safetensors"
    path = DOCKER / "models" / name
    model = demo_model(seed=5)
    save_checkpoint(path, ModelConfig(), model.state_dict())
    path.chmod(0o644)  # written 0600; the container's user (uid 10001) must read it, as docs/deploy.md says
    yield name
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    """`docker compose up -d encoder prometheus` under a project name of its own, on free
    loopback ports; `down -v` at the end whatever happened."""
    project = ComposeProject(
        f"bifusion-test-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("compose") / ".env"
    )
    ports = {name: free_port() for name in ("grpc", "metrics", "prometheus")}
    project.set(
        GRAFANA_ADMIN_PASSWORD=uuid.uuid4().hex,  # Grafana is not started, but compose checks it
        BIFUSION_GRPC_HOST_PORT=str(ports["grpc"]),
        BIFUSION_METRICS_HOST_PORT=str(ports["metrics"]),
        PROMETHEUS_HOST_PORT=str(ports["prometheus"]),
        BIFUSION_IMAGE=ENCODER_IMAGE,
        BIFUSION_TEST_PROMETHEUS_IMAGE=PROMETHEUS_IMAGE,
        # Short drain: the stop test's calls take well under a second each.
        BIFUSION_DRAIN_SECONDS="20",
    )
    project.ports = ports
    project.grpc = f"{LOOPBACK}:{ports['grpc']}"
    try:
        project.run("up", "-d", "--no-build", "encoder", "prometheus", timeout=300)
        project.healthy_after = project.wait_healthy("encoder", HEALTHY_WITHIN)
        yield project
    finally:
        project.run("down", "-v", "--remove-orphans", "--timeout", "60", timeout=300, check=False)


@pytest.fixture(scope="module")
def reference(encoder, tum_frames):
    options = EncodeOptions(max_points=MAX_POINTS)
    return {f.frame_id: encoder.encode([f], options)[0] for f in tum_frames}


def requests_for(frames):
    return [request_from_folder_frame(f, max_points=MAX_POINTS) for f in frames]


def assert_matches(result, expected):
    assert result.frame_id == expected.frame_id
    np.testing.assert_array_equal(result.point_indices, expected.point_indices)
    np.testing.assert_array_equal(result.valid, expected.valid)
    np.testing.assert_allclose(result.features, expected.features, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(result.alpha, expected.alpha, rtol=0, atol=TOLERANCE)
    assert result.gate_mean == pytest.approx(expected.stats.gate_mean, abs=1e-5)
    assert result.valid_ratio == pytest.approx(expected.stats.valid_ratio, abs=1e-6)


def prometheus(stack, path: str, **query) -> dict:
    url = f"http://{LOOPBACK}:{stack.ports['prometheus']}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def prometheus_value(stack, expr: str) -> float | None:
    result = prometheus(stack, "/api/v1/query", query=expr)["result"]
    return float(result[0]["value"][1]) if result else None


def test_encoder_turns_healthy(stack):
    assert stack.inspect("encoder", "{{.State.Health.Status}}") == "healthy"
    assert stack.healthy_after < HEALTHY_WITHIN
    with BiFusionClient(stack.grpc) as client:
        assert client.health(timeout=10) == "SERVING"


def test_real_frames_through_the_port_match_the_in_process_encoder(
    stack, encoder, reference, tum_folder_frames
):
    with BiFusionClient(stack.grpc) as client:
        info = client.model_info(timeout=10)
        assert info.demo_weights and info.checkpoint_sha256 == encoder.info.checkpoint_sha256
        results = [client.encode_request(r, timeout=120) for r in requests_for(tum_folder_frames)]
    for result in results:
        assert_matches(result, reference[result.frame_id])
        assert result.model_id == encoder.info.checkpoint_sha256[:12]
    stack.last_result = results[-1]


def test_prometheus_scrapes_the_encoder_and_loaded_the_rules(stack):
    def encoder_target_up():
        targets = prometheus(stack, "/api/v1/targets")["activeTargets"]
        ours = [t for t in targets if t["labels"]["job"] == "bifusion-encoder"]
        return ours and all(t["health"] == "up" for t in ours)

    wait_until(encoder_target_up, 60, "Prometheus to scrape the encoder", interval=1.0)
    rules = [r for g in prometheus(stack, "/api/v1/rules")["groups"] for r in g["rules"]]
    shipped = (DOCKER / "prometheus" / "rules" / "bifusion.yml").read_text()
    assert len(rules) == len(re.findall(r"^\s*- (?:alert|record):", shipped, re.M)) > 0
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    # The gauges of the last frame equal what that frame's response carried.
    last = stack.last_result
    for expr, want in (
        ("bifusion_gate_mean_last", last.gate_mean),
        ("bifusion_valid_ratio_last", last.valid_ratio),
    ):
        wait_until(
            lambda expr=expr, want=want: (
                (v := prometheus_value(stack, expr)) is not None and abs(v - want) < 1e-6
            ),
            30,
            f"{expr} == {want} in Prometheus",
            interval=1.0,
        )
    assert prometheus_value(stack, "sum(bifusion_frames_total)") >= 5


def test_runs_as_non_root_with_read_only_models(stack):
    assert stack.run("exec", "-T", "encoder", "id", "-u").stdout.strip() == "10001"
    denied = stack.run("exec", "-T", "encoder", "touch", "/models/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    mounts = json.loads(stack.inspect("encoder", "{{json .Mounts}}"))
    models = next(m for m in mounts if m["Destination"] == "/models")
    assert models["RW"] is False and models["Source"] == str(DOCKER / "models")


def test_a_checkpoint_in_docker_models_is_served_once_named_in_env(
    stack, checkpoint_name, tum_frames, tum_folder_frames
):
    stack.set(BIFUSION_CHECKPOINT=f"/models/{checkpoint_name}")
    stack.run("up", "-d", "--no-build", "encoder", timeout=300)  # recreated with the new setting
    stack.wait_healthy("encoder", HEALTHY_WITHIN)
    path = DOCKER / "models" / checkpoint_name
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    trained = BiFusionEncoder(path, device="cpu")
    expected = trained.encode(tum_frames[:2], EncodeOptions(max_points=MAX_POINTS))
    with BiFusionClient(stack.grpc) as client:
        info = client.model_info(timeout=10)
        assert not info.demo_weights and info.checkpoint_sha256 == sha256
        results = [client.encode_request(r, timeout=120) for r in requests_for(tum_folder_frames[:2])]
    for result, want in zip(results, expected, strict=True):
        assert_matches(result, want)
        assert result.model_id == sha256[:12]


def test_sigkilled_server_is_restarted_by_its_policy(stack):
    pid = int(stack.inspect("encoder", "{{.State.Pid}}"))
    restarts = int(stack.inspect("encoder", "{{.RestartCount}}"))
    os.kill(pid, signal.SIGKILL)  # the server process itself, as a crash would end it

    def restarted() -> bool:
        return int(stack.inspect("encoder", "{{.RestartCount}}")) > restarts

    wait_until(restarted, 60, "a restart", interval=1.0)
    stack.wait_healthy("encoder", HEALTHY_WITHIN)
    with BiFusionClient(stack.grpc) as client:
        assert client.health(timeout=10) == "SERVING"


def test_stop_under_load_loses_no_call_in_flight_and_ends_the_rest_unavailable(stack, tum_folder_frames):
    """Four clients send back to back through docker's port proxy; `docker compose stop` sends
    SIGTERM. The calls in flight finish OK; each client's next call is refused UNAVAILABLE
    ("shutting down; retry on another instance") and, as that asks, the client goes elsewhere
    (here: stops). The drain ends well before compose's stop_grace_period and exits 0."""
    requests = requests_for(tum_folder_frames)
    with BiFusionClient(stack.grpc) as client:
        model_id = client.model_info(timeout=10).model_id
    outcomes: list[tuple[grpc.StatusCode, str, float]] = []  # code, details (OK: model id), end time
    stopped = threading.Event()
    give_up = time.monotonic() + 300

    def client_loop(i):
        with BiFusionClient(stack.grpc) as client:
            k = i
            while not stopped.is_set() and time.monotonic() < give_up:
                try:
                    result = client.encode_request(requests[k % len(requests)], timeout=120)
                    outcomes.append((grpc.StatusCode.OK, result.model_id, time.monotonic()))
                except grpc.RpcError as error:
                    outcomes.append((error.code(), error.details() or "", time.monotonic()))
                    return  # "retry on another instance": there is none, so this client is done
                k += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(outcomes) >= 4, 120, "the clients' first answers", interval=0.1)
        stop_began = time.monotonic()
        stack.run("stop", "encoder", timeout=180)
        stop_ended = time.monotonic()
    finally:
        stopped.set()
        for thread in threads:
            thread.join(180)
    codes = collections.Counter(code for code, _, _ in outcomes)
    OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
    # Never CANCELLED: a call whose frame is still coming through the proxy is in flight (or
    # refused) from its headers on (tests/test_serving_lifecycle.py has the slow-link case).
    assert set(codes) <= {OK, UNAVAILABLE}, (codes, [o for o in outcomes if o[0] != OK])
    assert all(details == model_id for code, details, _ in outcomes if code == OK)
    logs = stack.run("logs", "--no-color", "encoder").stdout
    in_flight = int(re.findall(r"draining: (\d+) requests in flight", logs)[-1])
    finished_after_stop = sum(1 for code, _, t in outcomes if code == OK and t > stop_began)
    assert finished_after_stop >= in_flight, (in_flight, codes)
    assert codes[UNAVAILABLE] == len(threads)  # each client was turned away once
    assert stop_ended - stop_began < 45  # drained, not killed at stop_grace_period
    assert stack.inspect("encoder", "{{.State.ExitCode}}") == "0"


def test_missing_grafana_password_is_refused(stack, tmp_path):
    bare = ComposeProject(stack.name, tmp_path / ".env", files=("compose.yaml",))
    bare.env_file.write_text("")
    refused = bare.run("config", "--quiet", check=False)
    assert refused.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD in docker/.env" in refused.stderr


def test_down_v_leaves_nothing(stack):
    assert any(stack.leftovers().values())  # the check sees the running stack
    stack.run("down", "-v", "--timeout", "60", timeout=300)
    assert stack.leftovers() == {"container": [], "network": [], "volume": []}
    assert docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.name}").stdout == ""


# ---------------------------------------------------------------- the CUDA image
CUDA_IMAGE = "bifusion-serve:cuda"
# One architecture (Hopper) keeps the build within reach of a 2-core machine; the default
# list (7 entries) compiles every kernel 7 times. docs/deploy.md has the times.
CUDA_TEST_ARCH = "9.0"
CUDA_IMAGE_CHECK = """
import glob, os
from bifusion import BiFusionEncoder, EncodeOptions, Frame, Intrinsics  # first: it sets up threads
from bifusion.minkowski import ME, check_cpu_determinism
import numpy as np
import torch
site = os.path.dirname(os.path.dirname(torch.__file__))
so = glob.glob(os.path.join(site, "MinkowskiEngineBackend", "_C*.so"))[0]
kernels = open(so, "rb").read().count(bytes.fromhex("50ed55ba"))  # fatbin headers
nvcc = os.path.join(site, "nvidia", "cu13", "bin", "nvcc")
check_cpu_determinism()  # its CPU code carries the determinism patches too
# nvcc compiled its CPU convolution with OpenMP (the kernel's parallel region is there).
import re
parallel = bool(re.search(rb"ConvolutionForwardKernelCPU[0-9A-Za-z_]*[.]_omp_fn", open(so, "rb").read()))
# Without a GPU the same image serves on the CPU: one frame end to end, the same bits at
# one thread and at two.
rng = np.random.default_rng(0)
frame = Frame(color=rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
              depth=rng.uniform(0.5, 3.0, (120, 160)).astype(np.float32),
              intrinsics=Intrinsics(140.0, 140.0, 80.0, 60.0))
results = [BiFusionEncoder(device="cpu", threads=n).encode([frame], EncodeOptions(max_points=500))[0]
           for n in (1, 2)]
points = results[0].features.shape[0]
same = all(np.array_equal(results[0].features, r.features) for r in results)
print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), ME.is_cuda_available(),
      kernels, os.path.exists(nvcc), points, parallel, same)
"""


def test_cuda_image_builds_on_debian_with_kernels_and_torchs_cuda_libraries(
    engine, record_testsuite_property
):
    """The CUDA variant with PyPI's toolkit wheels, for sm_90 (no GPU needed to build or check
    it): MinkowskiEngine has CUDA support and compiled kernels, torch loads its CUDA and cuDNN
    libraries from the venv, no nvcc is left, and on a host without a GPU the image encodes
    on the CPU. Its cold build is the suite's longest step (docs/deploy.md has the times);
    BIFUSION_TEST_CUDA_IMAGE=0 leaves it out."""
    if os.environ.get("BIFUSION_TEST_CUDA_IMAGE") == "0":
        pytest.skip("BIFUSION_TEST_CUDA_IMAGE=0: the CUDA image is left out of this run")
    seconds = buildx_build(
        CUDA_IMAGE,
        DOCKER / "Dockerfile",
        ROOT,
        {"VARIANT": "cuda", "TORCH_CUDA_ARCH_LIST": CUDA_TEST_ARCH, "MAX_JOBS": str(os.cpu_count() or 2)},
        timeout=3 * 3600,
    )
    size = image_size(CUDA_IMAGE)
    record_testsuite_property("cuda_image_build_s", round(seconds, 1))
    record_testsuite_property("cuda_image_bytes", size)
    print(f"\nbuilt {CUDA_IMAGE} in {seconds:.0f} s ({size / 1e9:.2f} GB)")
    check = docker(
        "run", "--rm", "--entrypoint", "python", CUDA_IMAGE, "-P", "-c", CUDA_IMAGE_CHECK, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    torch_version, cuda, cudnn, me_cuda, kernels, has_nvcc, points, parallel, same = check.stdout.split()[-9:]
    assert torch_version.split("+")[0] == "2.14.1"  # the CUDA index names it 2.14.1+cu130
    assert cuda.startswith("13.0") and int(cudnn) > 0
    assert me_cuda == "True" and int(kernels) > 0 and has_nvcc == "False"
    assert int(points) == 500
    assert parallel == "True", "nvcc compiled MinkowskiEngine's CPU convolution without OpenMP"
    assert same == "True", "the CPU encode differs between 1 and 2 threads"
