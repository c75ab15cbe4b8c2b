"""Host staging: packed uploads and downloads are exact, and buffers are reused only when free."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from bifusion.devices import CPU_ONLY_MINKOWSKI, full_precision_float32, resolve_device
from bifusion.staging import HostStaging, Part, PinnedPool

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def parts(rng, n):
    return {
        "color": Part(
            [rng.integers(0, 255, (n, 3), dtype=np.uint8), np.zeros((7, 3), np.uint8)],
            np.dtype(np.uint8),
            (3,),
        ),
        "depth": Part(
            [rng.random(n, dtype=np.float32), rng.integers(0, 9, 5).astype(np.uint16)], np.dtype(np.float32)
        ),
        "pose": Part([rng.random((2, 4, 4))], np.dtype(np.float64), (4, 4)),
        "flags": Part([np.array([True, False, True])], np.dtype(np.bool_)),
        "empty": Part([], np.dtype(np.float32), (6,)),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_upload_and_download_round_trip_exactly(device, rng):
    staging = HostStaging(torch.device(device))
    sent = parts(rng, 1001)
    on_device = staging.upload(sent)
    assert all(t.device.type == device for t in on_device.values())
    back = staging.download(on_device)
    for name, part in sent.items():
        expected = (
            np.concatenate([p.reshape(-1, *part.row_shape) for p in part.pieces]).astype(part.dtype)
            if part.pieces
            else np.empty((0, 6), np.float32)
        )
        assert back[name].dtype == expected.dtype and back[name].shape == expected.shape, name
        np.testing.assert_array_equal(back[name], expected)


def test_pool_reuses_a_buffer_once_no_result_views_it():
    pool = PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    first = pool.acquire(1000)
    assert pool.acquire(10) is not first  # handed out and not yet released: never shared
    owner = first.tensor.numpy()
    view = owner[:10]
    first.release(owner=weakref.ref(owner))
    del owner
    second = pool.acquire(1000)  # the first is still viewed: a new buffer
    assert second is not first and pool.allocations == 3
    second.release()
    del view
    gc.collect()
    assert pool.acquire(900) in (first, second)  # free again, big enough: reused
    assert pool.allocations == 3
    big = pool.acquire(10**6)
    assert big.tensor.numel() >= 10**6 and pool.allocations == 4
    # The free buffer was too small for it and is gone; the ones handed out stay.
    assert len(pool.buffers) == 3


def test_pool_stops_allocating_once_it_has_seen_the_biggest_batch(rng):
    """Served batches go up and down with the load while earlier results are still being
    sent: after the biggest batch has come once, every buffer fits every batch."""
    pool = PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    frame_bytes = 20_000 * (256 * 4 + 13)
    held = []  # the results of the last two batches are still being serialised
    for step, batch_size in enumerate([1, 2, 4, 16, *rng.integers(1, 17, 300)]):
        buf = pool.acquire(int(batch_size) * frame_bytes)
        owner = buf.tensor.numpy()
        buf.release(owner=weakref.ref(owner))
        held = [*held[-1:], owner]
        if step == 3:
            after_biggest = pool.allocations
    assert pool.allocations <= after_biggest + 2  # the buffers the overlap needs, then none
    assert len(pool.buffers) <= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encodes_reuse_pinned_buffers_and_held_results_stay_intact(tum_frames):
    from bifusion import BiFusionEncoder, EncodeOptions

    encoder = BiFusionEncoder(device="cuda")
    options = EncodeOptions(max_points=5000)
    held = encoder.encode(tum_frames[:2], options)
    copy = [r.features.copy() for r in held]
    for _ in range(5):
        encoder.encode(tum_frames[:2], options)  # results dropped at once
    # One input buffer, and two output buffers (the held results' and the reused one).
    assert encoder.staging.uploads.allocations <= 2
    assert encoder.staging.downloads.allocations == 2
    for result, features in zip(held, copy, strict=True):
        np.testing.assert_array_equal(result.features, features)


def test_cuda_with_a_cpu_only_minkowski_fails_at_once_naming_the_fix(monkeypatch):
    import bifusion.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "minkowski_has_cuda", lambda: False)
    for device in ("cuda", "auto", "cuda:0"):
        with pytest.raises(RuntimeError, match=r"re-run scripts/setup\.sh on this GPU host") as info:
            resolve_device(device)
        assert "--device cpu" in str(info.value)
    assert resolve_device("cpu") == torch.device("cpu")
    assert CPU_ONLY_MINKOWSKI.count("{") == 2


def test_float32_runs_without_tf32_once_an_encoder_exists(encoder):
    full_precision_float32()
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    else:
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
