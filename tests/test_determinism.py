"""Same input, same bits on a CPU, by construction: MinkowskiEngine's CPU kernel maps come
out in canonical order (docker/minkowski/patch_canonical_maps.py), whatever the threads do.

The order checks are exact and fail on the unpatched library on any host and at any thread
count (its order follows its hash table). The repeat checks run with the cores kept busy,
where the unpatched library's order also changed from run to run.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from bifusion import EncodeOptions
from bifusion.minkowski import ME, MinkowskiBuildError, check_canonical_maps


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


def test_the_running_build_passes_the_start_up_check():
    check_canonical_maps()


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
