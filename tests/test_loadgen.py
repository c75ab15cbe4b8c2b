"""The load generator that bench/serve.py and ``bifusion-client bench`` rely on."""

from __future__ import annotations

from serving_harness import running_server

from bifusion_client.api import BiFusionClient
from bifusion_client.loadgen import run_load
from bifusion_client.request import request_from_folder_frame


def test_a_timed_run_lasts_its_duration_and_counts_its_frames(encoder, tum_folder_frames):
    requests = [request_from_folder_frame(f, max_points=300) for f in tum_folder_frames[:2]]
    with running_server(encoder, max_batch_size=2) as live:
        report = run_load(lambda: BiFusionClient(live.address), requests, concurrency=2, duration_s=1.5)
    assert report["frames"] >= 2 and not report["errors"]
    assert report["wall_s"] >= 1.5
    assert report["latency_ms"]["p50"] > 0
