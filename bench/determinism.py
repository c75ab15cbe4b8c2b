"""Run-to-run determinism: the same batch of real frames encoded again and again.

Prints JSON: for each repeat, how far features and alpha moved from the first run (max
absolute difference, and how many frames differ at all) and whether points and `valid`
stayed identical; then the same across thread counts on a CPU, each count in a fresh
process started at that count (``BIFUSION_THREADS``), as a model instance is: a library may
size its kernels by the thread count it first sees, which switching counts within one
process would not show. On a CPU with both MinkowskiEngine patches every difference is 0;
on CUDA, MinkowskiEngine's kernels scatter with atomics, and this measures what that costs.

    python bench/determinism.py [--device cpu|cuda] [--batch-size 8] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe  # noqa: E402
from bifusion import BiFusionEncoder, EncodeOptions  # noqa: E402


def difference(first, again) -> dict:
    """How far one run's results are from the first run's."""
    return {
        "features_max_abs": float(
            max(np.abs(a.features - b.features).max() for a, b in zip(first, again, strict=True))
        ),
        "alpha_max_abs": float(
            max(np.abs(a.alpha - b.alpha).max() for a, b in zip(first, again, strict=True))
        ),
        "frames_differing": sum(
            not (np.array_equal(a.features, b.features) and np.array_equal(a.alpha, b.alpha))
            for a, b in zip(first, again, strict=True)
        ),
        "points_and_valid_identical": all(
            np.array_equal(a.point_indices, b.point_indices) and np.array_equal(a.valid, b.valid)
            for a, b in zip(first, again, strict=True)
        ),
    }


SAVED = ("features", "alpha", "valid", "point_indices")


def encode_in_a_fresh_process(threads: int, args) -> list[SimpleNamespace]:
    """The same batch encoded by this script in a new process started at ``threads``."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.npz"
        command = [sys.executable, __file__, "--data", str(args.data), "--batch-size", str(args.batch_size)]
        command += ["--points", str(args.points), "--repeats", "0", "--save", str(out)]
        environment = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        }
        subprocess.run(
            command, env={**environment, "BIFUSION_THREADS": str(threads)}, check=True, timeout=1800
        )
        saved = np.load(out)
        return [SimpleNamespace(**{n: saved[f"{n}{i}"] for n in SAVED}) for i in range(args.batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--thread-counts", type=int, nargs="*", default=[1, 2], help="CPU only")
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)  # a fresh process's results
    args = parser.parse_args()

    encoder = BiFusionEncoder(device=args.device)
    frames = real_frames(args.data)
    batch = [frames[i % len(frames)] for i in range(args.batch_size)]
    options = EncodeOptions(max_points=args.points)
    first = encoder.encode(batch, options)
    repeats = [difference(first, encoder.encode(batch, options)) for _ in range(args.repeats)]
    if args.save is not None:
        np.savez(args.save, **{f"{name}{i}": getattr(r, name) for i, r in enumerate(first) for name in SAVED})
        return
    across_threads = {}
    if encoder.device.type == "cpu":
        for count in args.thread_counts:
            across_threads[count] = difference(first, encode_in_a_fresh_process(count, args))
    report = {
        "benchmark": "determinism",
        "machine": describe(str(encoder.device)),
        # Set on some hosts to keep older OpenBLAS builds correct; they change its kernels.
        "blas_environment": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "MKL_CBWR"))},
        "batch_size": args.batch_size,
        "points_per_frame": first[0].stats.num_points,
        "repeats": repeats,
        "worst": {
            "features_max_abs": max(r["features_max_abs"] for r in repeats),
            "alpha_max_abs": max(r["alpha_max_abs"] for r in repeats),
            "runs_differing": sum(r["frames_differing"] > 0 for r in repeats),
        },
        "across_thread_counts": across_threads,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
