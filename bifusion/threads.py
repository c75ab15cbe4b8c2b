"""The encoder's CPU thread pools, sized in one place for the cores this process may use.

Three pools share the CPU while the encoder runs: torch's OpenMP team (intra-op
parallelism, one team per calling thread), MKL inside torch, and the OpenBLAS that
MinkowskiEngine links for its sparse convolutions (the project's build holds it at one
thread and parallelises over kernel offsets with OpenMP instead, so that a thread count
cannot change the bits). Left alone, each sizes itself for
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

import ctypes
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

# Read by torch's MKL at its first call; a value already in the environment wins. Strict
# conditional numerical reproducibility: Intel documents that MKL's gemm (the dense layers)
# then gives the same bits at any thread count on its AVX2 and AVX-512 code paths. On an AMD
# EPYC it did not for products of a few rows, which bifusion/fusion.py sums in order itself.
# No cost measured there (docs/benchmarks.md).
MKL_ENV_DEFAULTS = {"MKL_CBWR": "AUTO,STRICT"}

# OMP_WAIT_POLICY as the OpenMP runtime read it when it started ("" for unset); None until
# prepare_environment() ran.
_policy_at_start: str | None = None


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
    """Environment the OpenMP, MKL and OpenBLAS runtimes read once, at load: call before torch and
    MinkowskiEngine are imported (``import bifusion`` does)."""
    global _policy_at_start
    if _policy_at_start is not None:
        return
    torch_loaded = "torch" in sys.modules  # then its OpenMP runtime has read the environment
    before = os.environ.get("OMP_WAIT_POLICY", "")
    for name, value in {**OPENMP_ENV_DEFAULTS, **MKL_ENV_DEFAULTS}.items():
        os.environ.setdefault(name, value)
    # Pool sizes at load: $BIFUSION_THREADS wins over values inherited from a parent process
    # (a server starting one process per model instance); else keep what the user set.
    requested = requested_threads()
    threads = str(requested or cpu_budget())
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if requested is not None:
            os.environ[name] = threads
        else:
            os.environ.setdefault(name, threads)
    _policy_at_start = before if torch_loaded else os.environ.get("OMP_WAIT_POLICY", "")


def _openblas_function(library: ctypes.CDLL, name: str):
    """``name`` in an OpenBLAS build, also one with symbol affixes (scipy's ``scipy_..64_``)."""
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_"):
            function = getattr(library, f"{prefix}{name}{suffix}", None)
            if function is not None:
                return function
    return None


# MinkowskiEngine's compiled extension; it says when its CPU convolution holds its OpenBLAS
# at one thread (docker/minkowski/patch_deterministic_convolution.py).
MINKOWSKI_BACKEND = "MinkowskiEngineBackend._C"


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _openblas_held_by_minkowski() -> int | None:
    """The address of ``openblas_get_num_threads`` in the OpenBLAS MinkowskiEngine links,
    when its build runs every gemm on one thread (the same bits at any thread count); None
    when it does not, or is not loaded."""
    backend = sys.modules.get(MINKOWSKI_BACKEND)
    if backend is None or not getattr(backend, "deterministic_cpu_convolution", False):
        return None
    # dlsym on the extension's own handle searches it and its dependencies: its OpenBLAS.
    getter = getattr(ctypes.CDLL(backend.__file__), "openblas_get_num_threads", None)
    return _address(getter) if getter is not None else None


def set_openblas_threads(threads: int) -> dict[str, int]:
    """Size every OpenBLAS loaded in the process (MinkowskiEngine's, numpy's); returns each
    library's thread count after. MinkowskiEngine's stays at one thread where its build
    holds it there (its convolution parallelises over kernel offsets instead).

    Through ``openblas_set_num_threads`` itself: its pool is process-wide and the call works
    from any thread. (threadpoolctl >= 3.6 finds the libraries, but its limits there take
    effect only on the first thread that ever set them, and silently do nothing elsewhere,
    e.g. on a server's model thread.) An OpenBLAS built on OpenMP follows torch's count.
    """
    from threadpoolctl import threadpool_info

    held = _openblas_held_by_minkowski()
    counts = {}
    for info in threadpool_info():
        if info["internal_api"] != "openblas":
            continue
        library = ctypes.CDLL(info["filepath"])  # already loaded: the same handle
        getter = _openblas_function(library, "openblas_get_num_threads")
        single = held is not None and getter is not None and _address(getter) == held
        if info.get("threading_layer") != "openmp":
            setter = _openblas_function(library, "openblas_set_num_threads")
            if setter is not None:
                setter(1 if single else threads)
        counts[info["filepath"]] = getter() if getter is not None else info["num_threads"]
    return counts


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` set, for logs and benchmark records."""

    threads: int
    source: str  # "argument", BIFUSION_THREADS or "cpu budget"
    torch_threads: int
    blas_threads: dict[str, int]  # BLAS library file -> its thread count
    omp_wait_policy: str | None  # as the OpenMP runtime read it
    openmp_passive: bool  # False when torch loaded before bifusion could set the policy

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def configure_threads(num_threads: int | None = None) -> ThreadSettings:
    """Size torch (OpenMP and MKL) and every loaded OpenBLAS for ``num_threads`` threads,
    else ``$BIFUSION_THREADS``, else :func:`cpu_budget`. Process-wide: the settings hold
    whichever thread later runs the encoder. Idempotent; cheap enough to call per encoder."""
    import torch

    prepare_environment()
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads}")
        threads, source = num_threads, "argument"
    elif (env := requested_threads()) is not None:
        threads, source = env, THREADS_ENV
    else:
        threads, source = cpu_budget(), "cpu budget"

    # Intra-op threads: this thread's OpenMP team, MKL, and the count every thread started
    # from now on takes (older threads: hold_on_this_thread).
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    blas_threads = set_openblas_threads(threads)

    policy = _policy_at_start or None
    passive = (policy or "").upper() == "PASSIVE"
    if not passive:
        log.warning(
            "OpenMP's idle threads may spin against OpenBLAS's (OMP_WAIT_POLICY was %s when "
            "torch loaded): set OMP_WAIT_POLICY=PASSIVE in the environment or import bifusion "
            "before torch",
            policy or "unset",
        )
    settings = ThreadSettings(threads, source, torch.get_num_threads(), blas_threads, policy, passive)
    log.info(
        "CPU threads: %d (%s); torch intra-op %d, OpenBLAS %s, OMP_WAIT_POLICY %s",
        threads,
        source,
        settings.torch_threads,
        sorted(set(blas_threads.values())) or "not loaded",
        policy or "unset",
    )
    return settings


def hold_on_this_thread(settings: ThreadSettings) -> None:
    """Re-apply the intra-op thread count on the calling thread if it differs.

    torch keeps an OpenMP thread count per thread, fixed when that thread first ran a torch
    op (or called ``torch.set_num_threads``): a thread that predates :func:`configure_threads`
    keeps its old count (every core of the machine, say). Costs a lookup per call."""
    import torch

    if torch.get_num_threads() != settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
