"""The server on CUDA: device reported, GPU memory gauges filled, served == in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from serving_harness import running_server

from bifusion import BiFusionEncoder, EncodeOptions

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
        assert live.metric("bifusion_gpu_memory_allocated_bytes") > 0
        assert live.metric("bifusion_gpu_memory_reserved_bytes") >= live.metric(
            "bifusion_gpu_memory_allocated_bytes"
        )
        info = [dict(labels) for name, labels in live.metrics() if name == "bifusion_model_info"]
        assert info and info[0]["device"].startswith("cuda")
