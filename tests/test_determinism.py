"""Same input, same bits on a CPU, by construction: MinkowskiEngine's CPU kernel maps come
out in canonical order (docker/minkowski/patch_canonical_maps.py), and its convolution runs
every gemm on one thread with the kernel offsets in parallel
(docker/minkowski/patch_deterministic_convolution.py), whatever the threads do.

The order checks are exact and fail on the unpatched library on any host and at any thread
count (its order follows its hash table). The repeat checks run with the cores kept busy,
where the unpatched library's order also changed from run to run. The thread-count checks
compare bits across counts; the check that the convolution holds OpenBLAS at one thread
fails on the unpatched library on any host, also where its split happens not to round
differently.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TUM_DIR

from bifusion import EncodeOptions, configure_threads
from bifusion.minkowski import (
    ME,
    MinkowskiBuildError,
    check_canonical_maps,
    check_cpu_determinism,
    check_deterministic_convolution,
)
from bifusion.threads import MINKOWSKI_BACKEND, hold_on_this_thread


def real_voxels(frame, voxel_size=0.02) -> torch.Tensor:
    """A real frame's unique voxels (camera frame), as batch-0 MinkowskiEngine coordinates."""
    v, u = np.nonzero(frame.depth > 0)
    z = frame.depth[v, u] / frame.depth_scale
    k = frame.intrinsics
    xyz = np.stack(((u - k.cx) * z / k.fx, (v - k.cy) * z / k.fy, z), axis=1)
    voxels = np.unique(np.floor(xyz / voxel_size).astype(np.int32), axis=0)
    return torch.from_numpy(np.concatenate([np.zeros((len(voxels), 1), np.int32), voxels], 1))


@contextmanager
def busy_cores(n: int = 2):
    """Threads that keep the cores busy (torch releases the GIL), so OpenMP's threads are
    scheduled at uneven times as on a loaded host."""
    stop = threading.Event()

    def spin():
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a)

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def assert_canonical(pairs: dict, transposed: bool = False) -> None:
    """Every kernel offset's (input, output) pairs sorted by (output, input); a transposed
    map is the forward map with its columns swapped, so sorted by (input, output)."""
    assert pairs, "no kernel map"
    for offset, p in pairs.items():
        first, second = (p[0], p[1]) if transposed else (p[1], p[0])
        key = first.long() * (1 << 32) + second.long()
        assert bool((key[1:] > key[:-1]).all()), f"kernel offset {offset}: pairs not in canonical order"


@pytest.fixture(scope="module")
def frame_tensor(tum_frames):
    coordinates = real_voxels(tum_frames[0])
    return ME.SparseTensor(torch.ones(len(coordinates), 1), coordinates=coordinates, device="cpu")


def test_the_running_build_passes_the_start_up_checks():
    check_canonical_maps()
    check_deterministic_convolution()


def test_convolution_maps_are_canonical_at_every_stride(frame_tensor):
    manager, key = frame_tensor.coordinate_manager, frame_tensor.coordinate_map_key
    assert_canonical(manager.kernel_map(key, key, kernel_size=3))
    # The U-Net's down and up paths: a strided convolution and its transpose.
    down = ME.MinkowskiConvolution(1, 1, kernel_size=2, stride=2, dimension=3)(frame_tensor)
    assert_canonical(manager.kernel_map(key, down.coordinate_map_key, kernel_size=2, stride=2))
    assert_canonical(
        manager.kernel_map(down.coordinate_map_key, key, kernel_size=2, stride=2, is_transpose=True),
        transposed=True,
    )
    in_rows, out_rows = manager.stride_map(key, down.coordinate_map_key)
    assert_canonical({0: torch.stack([in_rows, out_rows])})


def test_field_map_is_canonical(tum_frames):
    xyz = real_voxels(tum_frames[1]).float()
    xyz[:, 1:] += 0.25  # off the voxel grid, as a frame's points are
    field = ME.TensorField(torch.ones(len(xyz), 1), coordinates=xyz, device="cpu")
    sparse = field.sparse()
    in_map, out_map = field.coordinate_manager.field_to_sparse_map(
        field.coordinate_field_map_key, sparse.coordinate_map_key
    )
    key = out_map.long() * (1 << 32) + in_map.long()
    assert bool((key[1:] > key[:-1]).all())


def test_a_sparse_convolution_repeats_bit_for_bit_on_busy_cores(frame_tensor):
    torch.manual_seed(0)
    conv = ME.MinkowskiConvolution(1, 64, kernel_size=3, dimension=3)
    conv2 = ME.MinkowskiConvolution(64, 64, kernel_size=3, dimension=3)
    x = ME.SparseTensor(
        torch.randn(len(frame_tensor), 1, generator=torch.Generator().manual_seed(1)),
        coordinates=frame_tensor.C,
        device="cpu",
    )
    with torch.inference_mode():
        first = conv2(conv(x)).F
        with busy_cores():
            # A fresh tensor each time: its coordinate manager rebuilds every kernel map.
            for _ in range(4):
                y = ME.SparseTensor(x.F, coordinates=x.C, device="cpu")
                assert torch.equal(conv2(conv(y)).F, first)


def test_the_same_frame_encodes_bit_for_bit_on_busy_cores(encoder, tum_frames):
    options = EncodeOptions(max_points=4000)
    first = encoder.encode(tum_frames[2:3], options)[0]
    with busy_cores():
        for _ in range(3):
            again = encoder.encode(tum_frames[2:3], options)[0]
            np.testing.assert_array_equal(again.features, first.features)
            np.testing.assert_array_equal(again.alpha, first.alpha)
            np.testing.assert_array_equal(again.valid, first.valid)


def test_start_up_refuses_a_build_without_the_patch(monkeypatch):
    manager_type = ME.CoordinateManager
    original = manager_type.kernel_map

    def unpatched_order(self, *args, **kwargs):
        # The unpatched library's order: the same pairs, not sorted by output row.
        return {k: p.flip(1) for k, p in original(self, *args, **kwargs).items()}

    monkeypatch.setattr(manager_type, "kernel_map", unpatched_order)
    with pytest.raises(MinkowskiBuildError, match=r"patch_canonical_maps\.py.*rerun scripts/setup\.sh"):
        check_canonical_maps()
    from bifusion import BiFusionEncoder

    with pytest.raises(MinkowskiBuildError):
        BiFusionEncoder(device="cpu")


def minkowski_openblas() -> ctypes.CDLL:
    """The OpenBLAS MinkowskiEngine's extension links (dlsym on its handle searches there)."""
    return ctypes.CDLL(sys.modules[MINKOWSKI_BACKEND].__file__)


@contextmanager
def thread_count(n: int):
    """Every pool at ``n`` threads, MinkowskiEngine's OpenBLAS included, as the unpatched
    library would use it; the process's own settings afterwards."""
    before = configure_threads()
    try:
        hold_on_this_thread(configure_threads(n))
        minkowski_openblas().openblas_set_num_threads(n)
        yield
    finally:
        hold_on_this_thread(configure_threads(before.threads))


def reference_convolution(x, y, conv, transposed=False) -> torch.Tensor:
    """``conv(x) == y`` by its definition, in float64: y[o] = sum of x[i] @ W[k] over every
    pair (i, o) of every kernel offset k, from the library's own kernel map."""
    generator = conv.kernel_generator
    pairs = x.coordinate_manager.kernel_map(
        x.coordinate_map_key,
        y.coordinate_map_key,
        kernel_size=generator.kernel_size[0],
        stride=generator.kernel_stride[0],
        is_transpose=transposed,
    )
    weight = conv.kernel.detach().double()
    out = torch.zeros(len(y), weight.shape[-1], dtype=torch.float64)
    for k, p in pairs.items():
        out.index_add_(0, p[1].long(), x.F.double()[p[0].long()] @ weight[k])
    return out


def test_the_sparse_convolution_and_its_transpose_compute_their_definition(frame_tensor):
    torch.manual_seed(2)
    x = ME.SparseTensor(torch.randn(len(frame_tensor), 16), coordinates=frame_tensor.C, device="cpu")
    same = ME.MinkowskiConvolution(16, 32, kernel_size=3, dimension=3)
    down = ME.MinkowskiConvolution(16, 32, kernel_size=2, stride=2, dimension=3)
    up = ME.MinkowskiConvolutionTranspose(32, 8, kernel_size=2, stride=2, dimension=3)
    with torch.inference_mode():
        y, z = same(x), down(x)
        w = up(z)
        for source, result, conv, transposed in ((x, y, same, False), (x, z, down, False), (z, w, up, True)):
            expected = reference_convolution(source, result, conv, transposed)
            assert result.F.shape == expected.shape
            torch.testing.assert_close(result.F.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_convolution_runs_every_gemm_on_one_openblas_thread(frame_tensor):
    """What makes its bits independent of the thread count: whatever OpenBLAS was set to, a
    convolution leaves it at one thread (the unpatched library uses and keeps the count)."""
    openblas = minkowski_openblas()
    conv = ME.MinkowskiConvolution(1, 8, kernel_size=3, dimension=3)
    try:
        openblas.openblas_set_num_threads(4)
        assert openblas.openblas_get_num_threads() == 4
        with torch.inference_mode():
            conv(frame_tensor)
        assert openblas.openblas_get_num_threads() == 1
    finally:
        configure_threads()


def test_a_sparse_convolution_gives_the_same_bits_at_every_thread_count(frame_tensor):
    torch.manual_seed(0)
    convs = [ME.MinkowskiConvolution(1, 64, kernel_size=3, dimension=3)]
    convs += [ME.MinkowskiConvolution(64, 64, kernel_size=3, dimension=3) for _ in range(2)]
    up = ME.MinkowskiConvolutionTranspose(64, 32, kernel_size=2, stride=2, dimension=3)
    down = ME.MinkowskiConvolution(64, 64, kernel_size=2, stride=2, dimension=3)
    features = torch.randn(len(frame_tensor), 1, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        y = ME.SparseTensor(features, coordinates=frame_tensor.C, device="cpu")
        with torch.inference_mode():
            for conv in convs:
                y = conv(y)
            return up(down(y)).F

    results = {}
    for n in (1, 2, 3, 4):
        with thread_count(n):
            results[n] = run()
    for n, result in results.items():
        assert torch.equal(result, results[1]), f"{n} threads: max {float((result - results[1]).abs().max())}"


# One encode in a fresh process, at the thread count its environment gives: a process
# started at another count builds its kernels (oneDNN's among them) for that count, which an
# in-process switch would not show.
ENCODE_IN_A_FRESH_PROCESS = """
import dataclasses, sys, numpy as np, bifusion
from bench.encoder import real_frames
from pathlib import Path
frames = real_frames(Path(sys.argv[1]))
options = bifusion.EncodeOptions(max_points=4000)
# Four frames: the squeeze-excitation then multiplies four rows, a product small enough
# for a BLAS to split by thread count; the last has a handful of points.
sparse = frames[0].depth.copy()
sparse.flat[np.arange(sparse.size) % 25013 != 0] = 0
batch = frames[1:4] + [dataclasses.replace(frames[0], depth=sparse)]
results = bifusion.BiFusionEncoder(device="cpu").encode(batch, options)
names = ("features", "alpha", "valid")
saved = {f"{name}{i}": getattr(r, name) for i, r in enumerate(results) for name in names}
np.savez(sys.argv[2], **saved)
"""


def test_the_same_batch_encodes_bit_for_bit_in_processes_started_at_other_thread_counts(tmp_path):
    root = Path(__file__).resolve().parents[1]
    results = {}
    for n in (1, 2, 3):
        environment = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        }
        environment.update(BIFUSION_THREADS=str(n), PYTHONPATH=str(root))
        out = tmp_path / f"{n}.npz"
        done = subprocess.run(
            [sys.executable, "-c", ENCODE_IN_A_FRESH_PROCESS, str(TUM_DIR), str(out)],
            env=environment,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results[n] = np.load(out)
    assert 0 < results[1]["valid3"].size < 16, "the last frame should keep only a handful of points"
    for n, result in results.items():
        for name in results[1].files:
            np.testing.assert_array_equal(result[name], results[1][name], err_msg=f"{name} at {n} threads")


def test_start_up_refuses_a_build_whose_convolution_splits_gemms(monkeypatch):
    monkeypatch.setattr(sys.modules[MINKOWSKI_BACKEND], "deterministic_cpu_convolution", False)
    with pytest.raises(
        MinkowskiBuildError, match=r"patch_deterministic_convolution\.py.*rerun scripts/setup\.sh"
    ):
        check_cpu_determinism()
    from bifusion import BiFusionEncoder

    with pytest.raises(MinkowskiBuildError, match="thread count"):
        BiFusionEncoder(device="cpu")
