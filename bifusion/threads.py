"""The encoder's CPU thread pools, sized in one place for the cores this process may use.

Three pools share the CPU while the encoder runs: torch's OpenMP team (intra-op
parallelism, one team per calling thread), MKL inside torch, and the threaded OpenBLAS
that MinkowskiEngine links for its sparse convolutions. Left alone, each sizes itself for
every core of the machine (not the container's CPU limit), and OpenMP's idle threads spin
while OpenBLAS works and the other way round, so the U-Net ran at half speed or worse
depending on which thread happened to build or run the encoder.

:func:`prepare_environment` runs when :mod:`bifusion` is imported, before torch loads,
because OpenMP reads its wait policy only once, when the runtime starts.
:func:`configure_threads` runs when an encoder is built and sizes every pool for
:func:`cpu_budget` cores, or for ``$BIFUSION_THREADS`` when set (a server running several
model instances in separate processes gives each its share).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bifusion")

THREADS_ENV = "BIFUSION_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Set before the OpenMP runtime starts; a value already in the environment wins.
# PASSIVE: idle OpenMP threads sleep at once instead of spinning for a while, so they do
# not take cores from OpenBLAS's threads (or another process's) between parallel regions.
OPENMP_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

_started_after_torch: bool | None = None  # None until prepare_environment() ran


def _cgroup_quota(quota: str, period: str) -> int | None:
    """Whole cores a CFS quota allows (at least 1), or None when unlimited."""
    if quota in ("max", "-1") or int(quota) <= 0:
        return None
    return max(1, math.floor(int(quota) / int(period)))


def _cgroup_v2_limit(relative: str, root: Path) -> int | None:
    """The smallest ``cpu.max`` on the path from this process's cgroup up to the root."""
    limits = []
    folder = root / relative.lstrip("/")
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()
            limits.append(_cgroup_quota(quota, period))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min((n for n in limits if n is not None), default=None)


def _cgroup_v1_limit(relative: str, root: Path) -> int | None:
    for controller in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        base = root / controller
        # Inside a container the controller's root is this process's own cgroup.
        for folder in (base / relative.lstrip("/"), base):
            try:
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
                return _cgroup_quota(quota, period)
            except (OSError, ValueError):
                continue
    return None


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """Whole cores this process's cgroup (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) allows;
    None when there is no limit or no cgroup file to read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, relative = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            limits.append(_cgroup_v2_limit(relative, root))
        elif "cpu" in controllers.split(","):
            limits.append(_cgroup_v1_limit(relative, root))
    return min((n for n in limits if n is not None), default=None)


def cpu_budget() -> int:
    """Cores this process may use: its CPU affinity or its cgroup's CPU quota, whichever is
    smaller (``os.cpu_count()`` counts the machine's, which a container may not have)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota else cores)


def requested_threads() -> int | None:
    """``$BIFUSION_THREADS`` as a positive integer, None when unset or empty."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return threads


def prepare_environment() -> None:
    """Environment the OpenMP and OpenBLAS runtimes read once, at load: call before torch and
    MinkowskiEngine are imported (``import bifusion`` does)."""
    global _started_after_torch
    if _started_after_torch is not None:
        return
    _started_after_torch = "torch" in sys.modules
    threads = str(requested_threads() or cpu_budget())
    for name, value in {**OPENMP_ENV_DEFAULTS, "OMP_NUM_THREADS": threads}.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` set, for logs and benchmark records."""

    threads: int
    source: str  # "argument", BIFUSION_THREADS or "cpu budget"
    torch_threads: int
    blas_threads: dict[str, int]  # BLAS library file -> its thread count
    omp_wait_policy: str | None
    openmp_passive: bool  # False when torch was imported before bifusion set the policy

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def configure_threads(num_threads: int | None = None) -> ThreadSettings:
    """Size torch (OpenMP and MKL) and every loaded OpenBLAS for ``num_threads`` threads,
    else ``$BIFUSION_THREADS``, else :func:`cpu_budget`. Process-wide: the settings hold
    whichever thread later runs the encoder. Idempotent; cheap enough to call per encoder."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    prepare_environment()
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads}")
        threads, source = num_threads, "argument"
    elif (env := requested_threads()) is not None:
        threads, source = env, THREADS_ENV
    else:
        threads, source = cpu_budget(), "cpu budget"

    # Intra-op threads: ATen's global count, applied to each new calling thread's OpenMP
    # team and to MKL.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    # OpenBLAS (MinkowskiEngine's and numpy's): one global pool each, whichever thread calls.
    threadpool_limits(limits=threads, user_api="blas")
    blas_threads = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    policy = os.environ.get("OMP_WAIT_POLICY")
    passive = (policy or "").upper() == "PASSIVE" and not _started_after_torch
    if not passive:
        log.warning(
            "OpenMP's idle threads may spin against OpenBLAS's (OMP_WAIT_POLICY=%s%s): set "
            "OMP_WAIT_POLICY=PASSIVE in the environment or import bifusion before torch",
            policy,
            ", torch was imported first" if _started_after_torch else "",
        )
    return ThreadSettings(threads, source, torch.get_num_threads(), blas_threads, policy, passive)
