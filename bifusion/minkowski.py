"""The one place MinkowskiEngine is imported.

MinkowskiEngine 0.5.4 still uses ``collections.Sequence``, removed in Python 3.10;
restore the alias before importing it. Everything in the project imports ``ME`` from
here.
"""

import collections
import collections.abc
import warnings

if not hasattr(collections, "Sequence"):
    collections.Sequence = collections.abc.Sequence

# MinkowskiEngine warns about OMP_NUM_THREADS on every import when it is unset: bifusion's
# import has set it already (threads.prepare_environment, for the process's CPU budget).

# Known, harmless warnings of MinkowskiEngine 0.5.4 on current PyTorch: the CPU-only
# notice on every import and a deprecated sparse constructor it calls internally.
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")
warnings.filterwarnings("ignore", message=r"torch.sparse.SparseTensor\(indices, values, shape")

import MinkowskiEngine as ME  # noqa: E402
from MinkowskiEngineBackend import _C as backend  # noqa: E402  (its compiled extension)

__all__ = [
    "ME",
    "MinkowskiBuildError",
    "check_canonical_maps",
    "check_cpu_determinism",
    "check_deterministic_convolution",
]


class MinkowskiBuildError(RuntimeError):
    """The MinkowskiEngine build in use cannot give the encoder's guarantees."""


def check_canonical_maps() -> None:
    """Fail unless the CPU kernel maps come out in canonical (output, input) order.

    Same input, same bits on a CPU rests on docker/minkowski/patch_canonical_maps.py:
    without it each kernel offset's pairs are in thread-timing order and results vary
    run to run. The unpatched library's order follows its hash table, never sorted by
    output row, so a few hundred voxels tell the builds apart on any host, at any
    thread count. About a millisecond.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    voxels = torch.unique(torch.randint(0, 12, (600, 3), generator=generator), dim=0)
    coordinates = torch.cat([torch.zeros(len(voxels), 1, dtype=voxels.dtype), voxels], 1).int()
    x = ME.SparseTensor(torch.zeros(len(coordinates), 1), coordinates=coordinates, device="cpu")
    key = x.coordinate_map_key
    pairs = x.coordinate_manager.kernel_map(key, key, kernel_size=3)
    ordered = all(bool((p[1, 1:] > p[1, :-1]).all()) for p in pairs.values())
    if not ordered:
        raise MinkowskiBuildError(
            f"MinkowskiEngine at {ME.__file__} builds its CPU kernel maps in thread-timing "
            "order (it lacks docker/minkowski/patch_canonical_maps.py), so the same frame "
            "could give different bits from run to run; rerun scripts/setup.sh, which "
            "rebuilds it with the patch"
        )


def check_deterministic_convolution() -> None:
    """Fail unless the CPU convolution gives the same bits at any thread count.

    That rests on docker/minkowski/patch_deterministic_convolution.py: without it each
    kernel offset's gemm is split among OpenBLAS's threads by their number, and a feature
    can round differently with it. The patched extension module says so itself.
    """
    if not getattr(backend, "deterministic_cpu_convolution", False):
        raise MinkowskiBuildError(
            f"MinkowskiEngine at {ME.__file__} splits its CPU convolutions' gemms by "
            "OpenBLAS's thread count (it lacks docker/minkowski/patch_deterministic_convolution.py), "
            "so the same frame could give different bits at another thread count; rerun "
            "scripts/setup.sh, which rebuilds it with the patch"
        )


def check_cpu_determinism() -> None:
    """Both patches a CPU encoder's same-input-same-bits guarantee rests on."""
    check_canonical_maps()
    check_deterministic_convolution()
