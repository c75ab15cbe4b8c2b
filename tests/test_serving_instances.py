"""Model instances in processes of their own (``--instances 2``): the same answers as the
encoder in-process, bit for bit, and an instance killed mid-batch fails only its own frames
with UNAVAILABLE while the other keeps serving, then comes back."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import to_frame
from serving_harness import health_status, running_server, server_process, wait_until

from bifusion import EncodeOptions
from bifusion_client.api import BiFusionClient
from bifusion_client.request import request_from_folder_frame
from bifusion_server.instance_transfer import SegmentPool, pack, unpack
from bifusion_server.instances import cores


@pytest.fixture(scope="module")
def two_instances():
    with running_server(None, device="cpu", instances="2", warmup_frames=0, max_batch_size=4) as live:
        yield live


def test_each_instance_is_a_child_process_with_its_share_of_the_cores(two_instances):
    instances = two_instances.server.instances
    assert [i.name for i in instances] == ["0", "1"]
    pids = {i.pid for i in instances}
    assert len(pids) == 2 and os.getpid() not in pids
    share = max(1, cores() // 2)
    for instance in instances:
        assert instance.ready and instance.threads == {"BIFUSION_THREADS": str(share), "torch": share}
    assert two_instances.metric("bifusion_instance_up", model_instance="0") == 1
    assert two_instances.metric("bifusion_instance_up", model_instance="1") == 1
    assert two_instances.server.encoder.info.demo_weights  # a ModelView: no model in this process


def test_results_cross_the_process_boundary_bit_for_bit(encoder, tum_frames):
    """The transport: real results through a real shared-memory segment, rebuilt as views."""
    options = EncodeOptions(max_points=20_000, return_points_world=True)
    results = encoder.encode(tum_frames[:2], options)
    pool = SegmentPool(f"bifusion-test-{os.getpid()}")
    segment = pool.acquire(64 * 1024 * 1024)
    try:
        packed = pack(results, segment.shm.buf, 4096)
        assert len(packed.pickle) < 16_384  # the pipe carries a few kB, not the 20 MB of features
        base = np.frombuffer(segment.shm.buf, dtype=np.uint8)
        rebuilt = unpack(packed, base)
        for got, want in zip(rebuilt, results, strict=True):
            for name in ("features", "alpha", "valid", "point_indices", "points_world"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
            assert np.shares_memory(got.features, base)  # a view of the segment, not a copy
            assert (got.stats, got.timings_ms, got.frame_id) == (want.stats, want.timings_ms, want.frame_id)
        del rebuilt, got, base
    finally:
        pool.release(segment)
        pool.close()


def test_served_results_match_the_in_process_encoder(two_instances, encoder, tum_folder_frames):
    """Each child runs one thread here, the test process two: the same bits all the same
    (each frame is a batch of one in both; the thread count cannot change a result)."""
    folder = tum_folder_frames[:3]
    with BiFusionClient(two_instances.address) as client:
        served = [
            client.encode_request(request_from_folder_frame(f, max_points=3000, world_points=True))
            for f in folder
        ]
    options = EncodeOptions(max_points=3000, return_points_world=True)
    for got, frame in zip(served, folder, strict=True):
        (want,) = encoder.encode([to_frame(frame)], options)
        for name in ("features", "alpha", "valid", "point_indices", "points_world"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@contextlib.contextmanager
def stopped(*pids: int):
    """The processes held (SIGSTOP) for the block, then let go; gone ones are skipped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def fail_an_instance_mid_batch(live, victim, requests, signum: int, reason: str) -> tuple[set, set]:
    """Six frames in flight; ``signum`` goes to ``victim``'s process while it holds a batch.
    Checks that exactly that batch's frames failed, with UNAVAILABLE naming ``reason``, and
    returns (the failed frame ids, the served ones)."""
    pid = victim.pid
    # Stopped, the victim keeps the batch it is given until the signal lands.
    with stopped(pid), BiFusionClient(live.address) as client, ThreadPoolExecutor(6) as pool:
        futures = {}
        for i in range(6):
            request = requests[i % len(requests)]
            request.frame_id = f"{signum}-{i}"
            futures[request.frame_id] = pool.submit(client.encode_request, request, 300)
        busy = f"a batch on instance {victim.name}"
        doomed = wait_until(lambda: set(victim.computing), timeout=120, what=busy)
        os.kill(pid, signum)
        failed, served = set(), set()
        for frame_id, future in futures.items():
            try:
                assert future.result().frame_id == frame_id
                served.add(frame_id)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert reason in error.details()
                failed.add(frame_id)
    assert failed == doomed and served == set(futures) - doomed
    return failed, served


def test_a_killed_instance_fails_only_its_frames_and_comes_back(two_instances, tum_folder_frames):
    live = two_instances
    victim = live.server.instances[0]
    old_pid = victim.pid
    requests = [request_from_folder_frame(f, max_points=10_000) for f in tum_folder_frames]
    doomed, _ = fail_an_instance_mid_batch(live, victim, requests, signal.SIGKILL, "model instance 0 died")
    with BiFusionClient(live.address) as client:
        # The other instance keeps serving while the dead one restarts; health stays SERVING.
        assert health_status(live.address) == "SERVING"
        served = client.encode_request(request_from_folder_frame(tum_folder_frames[0], max_points=500), 300)
        assert served.num_points == 500
        wait_until(lambda: victim.ready, timeout=240, what="instance 0 to restart")
        assert victim.pid != old_pid
        assert live.metric("bifusion_instance_restarts_total", model_instance="0") == 1
        assert live.metric("bifusion_instance_up", model_instance="0") == 1
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="UNAVAILABLE") == len(doomed)
        after = client.encode_request(request_from_folder_frame(tum_folder_frames[1], max_points=500))
        assert after.num_points == 500


def test_a_stalled_instance_is_killed_and_replaced(two_instances, tum_folder_frames, monkeypatch):
    """A child that stops answering (SIGSTOP: a hung kernel, as the server sees it) is killed
    once its batch passes the stall timeout; only its frames fail, and it comes back."""
    live = two_instances
    instances = live.server.instances
    wait_until(lambda: all(i.ready for i in instances), timeout=240, what="both instances up")
    monkeypatch.setattr(live.server.batcher, "stall_timeout_s", 10.0)  # far above a real batch here
    victim = instances[1]
    old_pid = victim.pid
    stalls = live.metric("bifusion_instance_stalls_total", model_instance="1")
    restarts = live.metric("bifusion_instance_restarts_total", model_instance="1")
    unavailable = live.metric("bifusion_requests_total", rpc="EncodeFrame", code="UNAVAILABLE") or 0
    requests = [request_from_folder_frame(f, max_points=3000) for f in tum_folder_frames]
    doomed, _ = fail_an_instance_mid_batch(live, victim, requests, signal.SIGSTOP, "model instance 1 stalled")
    wait_until(lambda: victim.ready, timeout=240, what="instance 1 to restart")
    assert victim.pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # killed and reaped, not left stopped
    assert live.metric("bifusion_instance_stalls_total", model_instance="1") == stalls + 1
    assert live.metric("bifusion_instance_stalls_total", model_instance="0") == 0
    assert live.metric("bifusion_instance_restarts_total", model_instance="1") == restarts + 1
    unavailable_now = live.metric("bifusion_requests_total", rpc="EncodeFrame", code="UNAVAILABLE")
    assert unavailable_now == unavailable + len(doomed)


def test_an_instance_that_has_answered_is_not_killed_as_stalled(two_instances):
    """The stall timer can come due just after the child's answer arrived: no kill then."""
    instance = two_instances.server.instances[0]
    wait_until(lambda: instance.ready, timeout=240, what="instance 0 up")
    pid = instance.pid
    assert instance.stalled(120.0) is False
    assert instance.pid == pid and instance.ready
    os.kill(pid, 0)  # still running


def test_sigterm_drains_through_instance_processes_and_leaves_nothing_behind(tum_folder_frames):
    flags = ("--device", "cpu", "--instances", "2", "--warmup-frames", "0", "--max-batch-size", "1")
    with server_process(*flags, "--drain-seconds", "120") as live:
        pids = [int(p) for p in re.findall(r"model instance \d ready \(pid (\d+)", live.log_text())]
        assert len(pids) == 2
        requests = [request_from_folder_frame(f, max_points=2000) for f in tum_folder_frames[:4]]
        with ThreadPoolExecutor(len(requests)) as pool, BiFusionClient(live.address) as client:
            with stopped(*pids):  # held, so that all four are surely in flight when SIGTERM comes
                futures = [pool.submit(client.encode_request, r, 300) for r in requests]
                wait_until(
                    lambda: live.metric("bifusion_inflight_requests") == len(requests), what="all in flight"
                )
                live.process.send_signal(signal.SIGTERM)
                wait_until(lambda: "draining: 4 requests in flight" in live.log_text(), what="the drain")
            results = [f.result() for f in futures]  # none lost
        assert [r.num_points for r in results] == [2000] * len(requests)
        assert live.process.wait(60) == 0
        server_pid = live.process.pid
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not glob.glob(f"/dev/shm/bifusion-{server_pid}-*")
