"""Thread pools sized for the process's CPU budget: cgroup limits, BIFUSION_THREADS, OpenMP's
wait policy as the runtime really read it, and settings that hold on every thread."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from bifusion import threads

ROOT = Path(__file__).resolve().parents[1]
INHERITED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BIFUSION_THREADS", "MKL_CBWR")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_smallest_quota_on_the_path_to_the_root(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/kubepods/pod1/c1\n")
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods/cpu.max", "600000 100000\n")
    write(root / "kubepods/pod1/c1/cpu.max", "250000 100000\n")  # 2.5 cores: 2 whole ones
    assert threads.cgroup_cpu_limit(proc, root) == 2
    write(root / "kubepods/pod1/cpu.max", "50000 100000\n")  # half a core still gets one thread
    assert threads.cgroup_cpu_limit(proc, root) == 1


def test_cgroup_v2_without_a_quota_is_no_limit(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/user.slice\n")
    write(tmp_path / "cgroup/user.slice/cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(proc, tmp_path / "cgroup") is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing", tmp_path / "cgroup") is None


def test_cgroup_v1_quota_and_container_root(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "12:memory:/docker/abc\n5:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == 3
    # Inside a container the controller's root is the container's own cgroup.
    container = tmp_path / "container"
    write(container / "cpu,cpuacct/cpu.cfs_quota_us", "100000\n")
    write(container / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(proc, container) == 1
    write(container / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_limit(proc, container) is None


def test_cpu_budget_follows_the_affinity_mask():
    original = os.sched_getaffinity(0)
    assert threads.cpu_budget() <= len(original)
    try:
        os.sched_setaffinity(0, {min(original)})
        assert threads.cpu_budget() == 1
    finally:
        os.sched_setaffinity(0, original)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_bifusion_threads_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("BIFUSION_THREADS", value)
    with pytest.raises(ValueError, match="BIFUSION_THREADS"):
        threads.requested_threads()
    with pytest.raises(ValueError, match="BIFUSION_THREADS"):
        threads.configure_threads()


def test_bifusion_threads_and_argument(monkeypatch):
    monkeypatch.setenv("BIFUSION_THREADS", " 3 ")
    assert threads.requested_threads() == 3
    monkeypatch.setenv("BIFUSION_THREADS", "")
    assert threads.requested_threads() is None
    with pytest.raises(ValueError, match="num_threads"):
        threads.configure_threads(0)


def minkowski_openblas_path(paths) -> str:
    """Which of these loaded BLAS libraries MinkowskiEngine's extension links: the one whose
    ``openblas_get_num_threads`` is the function dlsym finds through the extension."""
    backend = ctypes.CDLL(sys.modules[threads.MINKOWSKI_BACKEND].__file__)
    wanted = ctypes.cast(backend.openblas_get_num_threads, ctypes.c_void_p).value
    getters = {p: threads._openblas_function(ctypes.CDLL(p), "openblas_get_num_threads") for p in paths}
    found = [p for p, f in getters.items() if f is not None and threads._address(f) == wanted]
    assert len(found) == 1, paths
    return found[0]


def test_settings_made_on_one_thread_hold_on_every_thread():
    """The encoder may be built on one thread and run on another: what configure_threads
    sets must be process-wide (torch intra-op count, every OpenBLAS pool)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    budget = threads.cpu_budget()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    try:
        made = []
        worker = threading.Thread(target=lambda: made.append(threads.configure_threads()))
        worker.start()
        worker.join()
        blas = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        minkowski = minkowski_openblas_path(blas)
        # MinkowskiEngine's OpenBLAS runs each gemm on one thread (its convolution
        # parallelises over kernel offsets); any other BLAS gets the budget.
        assert blas.pop(minkowski) == 1 == made[0].blas_threads[minkowski]
        assert all(count == budget for count in blas.values()), blas
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [budget]
        # This thread set its own count before: torch keeps it until the encoder re-applies.
        assert torch.get_num_threads() == 1
        threads.hold_on_this_thread(made[0])
        assert torch.get_num_threads() == budget
    finally:
        torch.set_num_threads(before)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with the environment a user would have (none of the
    thread variables this test process set for itself)."""
    environment = {k: v for k, v in os.environ.items() if k not in INHERITED}
    environment.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


REPORT = "import json, bifusion; print(json.dumps(bifusion.configure_threads().as_dict()))"


def test_bifusion_threads_sizes_every_pool_and_the_runtime_reads_passive():
    """As a server's instance process sees it: BIFUSION_THREADS=1 beside OMP_NUM_THREADS
    inherited from its parent. libgomp's own report (OMP_DISPLAY_ENV) shows what it read."""
    done = run_python(REPORT, BIFUSION_THREADS="1", OMP_NUM_THREADS="2")
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert settings["threads"] == 1 and settings["source"] == "BIFUSION_THREADS"
    assert settings["torch_threads"] == 1
    assert any("openblas" in path for path in settings["blas_threads"])
    assert set(settings["blas_threads"].values()) == {1}
    assert settings["openmp_passive"] is True
    assert "OMP_NUM_THREADS = '1'" in done.stderr
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in done.stderr
    assert "GOMP_SPINCOUNT = '0'" in done.stderr  # idle threads sleep at once


def test_mkl_runs_in_strict_reproducible_mode_unless_told_otherwise():
    """torch's MKL (the CLIP branch's gemms) in strict CNR mode gives the same bits at any
    thread count; MKL's own report (MKL_VERBOSE) shows the mode it read."""
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    gemm = "import bifusion, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    done = run_python(gemm, MKL_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    assert "CNR:AUTO,STRICT" in done.stdout, done.stdout[-2000:]
    done = run_python(gemm, MKL_VERBOSE="1", MKL_CBWR="COMPATIBLE")  # the user's value wins
    assert "CNR:COMPATIBLE" in done.stdout and "STRICT" not in done.stdout, done.stdout[-2000:]


def test_torch_imported_first_is_reported_not_hidden():
    done = run_python("import torch; " + REPORT)
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert settings["openmp_passive"] is False
    assert "OMP_WAIT_POLICY=PASSIVE" in done.stderr  # the warning says what to do
    assert "GOMP_SPINCOUNT = '300000'" in done.stderr  # and it is true: idle threads spin
    # Set in the environment (a Dockerfile, a parent process), it works whatever loads first.
    done = run_python("import torch; " + REPORT, OMP_WAIT_POLICY="passive")
    assert json.loads(done.stdout.strip().splitlines()[-1])["openmp_passive"] is True
    assert "GOMP_SPINCOUNT = '0'" in done.stderr


def test_the_encoder_configures_its_threads(encoder):
    settings = encoder.thread_settings
    assert settings.threads == (threads.requested_threads() or threads.cpu_budget())
    assert torch.get_num_threads() == settings.torch_threads == settings.threads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_built_on_one_thread_runs_on_another(tum_frames):
    """The server's model thread builds the encoder; anything may run it. The CPU half of a
    CUDA encoder (points, voxel keys, MinkowskiEngine's coordinate maps) gets the same pools."""
    from bifusion import BiFusionEncoder

    builder = ThreadPoolExecutor(1)
    try:
        gpu = builder.submit(BiFusionEncoder, device="cuda").result()
        assert gpu.thread_settings.threads == (threads.requested_threads() or threads.cpu_budget())
        on_builder = builder.submit(gpu.encode, tum_frames[:2]).result()
    finally:
        builder.shutdown()
    on_main = gpu.encode(tum_frames[:2])
    assert torch.get_num_threads() == gpu.thread_settings.torch_threads
    for a, b in zip(on_builder, on_main, strict=True):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.features, b.features, atol=1e-6)
