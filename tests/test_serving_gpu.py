"""The server on CUDA: device reported, GPU memory gauges filled, served == in-process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from serving_harness import running_server

from bifusion import BiFusionEncoder, EncodeOptions
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_encoder():
    return BiFusionEncoder(device="cuda")


def test_served_on_cuda_matches_in_process_and_reports_gpu_memory(
    cuda_encoder, tum_frames, tum_folder_frames
):
    options = EncodeOptions(max_points=20_000)
    expected = {
        f.frame_id: r for f, r in zip(tum_frames, cuda_encoder.encode(tum_frames, options), strict=True)
    }
    with running_server(cuda_encoder) as live, BiFusionClient(live.address) as client:
        assert client.model_info().device.startswith("cuda")
        requests = [request_from_folder_frame(f, max_points=20_000) for f in tum_folder_frames]
        for result in client.encode_stream(requests):
            np.testing.assert_allclose(result.features, expected[result.frame_id].features, rtol=0, atol=1e-4)
        one = {"model_instance": "0"}
        assert live.metric("bifusion_gpu_memory_allocated_bytes", **one) > 0
        assert live.metric("bifusion_gpu_memory_reserved_bytes", **one) >= live.metric(
            "bifusion_gpu_memory_allocated_bytes", **one
        )
        info = [dict(labels) for name, labels in live.metrics() if name == "bifusion_model_info"]
        assert info and info[0]["device"].startswith("cuda")


def test_process_instances_on_cuda_match_in_process_and_each_report_gpu_memory(
    cuda_encoder, tum_frames, tum_folder_frames
):
    options = EncodeOptions(max_points=20_000)
    expected = {
        f.frame_id: r for f, r in zip(tum_frames, cuda_encoder.encode(tum_frames, options), strict=True)
    }
    with running_server(None, device="cuda", instances="2", max_batch_size=2) as live:
        assert all(i.info.device.startswith("cuda") for i in live.server.instances)
        requests = [request_from_folder_frame(f, max_points=20_000) for f in tum_folder_frames]
        with ThreadPoolExecutor(4) as pool, BiFusionClient(live.address) as client:
            results = list(pool.map(client.encode_request, requests * 4))
        for result in results:
            np.testing.assert_allclose(result.features, expected[result.frame_id].features, rtol=0, atol=1e-4)
        for name in ("0", "1"):
            assert live.metric("bifusion_batch_size_count", model_instance=name) > 0, name
            assert live.metric("bifusion_gpu_memory_allocated_bytes", model_instance=name) > 0, name


def test_the_auto_batch_sweep_on_cuda_fits_in_ten_seconds_and_batches(cuda_encoder):
    """On a GPU the sweep tries whole batches of 1 to 32 within 10 s; an H200 gained up to 16
    (docs/benchmarks.md), so the choice is a batch, and it runs every stage on it."""
    with running_server(cuda_encoder, max_batch_size="auto") as live, BiFusionClient(live.address) as client:
        policy = live.server.batch_policy
        reported = client.model_info().batch_policy
    # A call only starts when it should fit, with a quarter to spare.
    assert policy.measured and reported.sweep_seconds <= 10.5, reported
    assert policy.max_batch_size >= 8 and policy.group_3d is None and cuda_encoder.group_3d is None
    assert {t.unet_frames for t in reported.sweep} == {0}
