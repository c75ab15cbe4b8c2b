"""The admission budget: decoded pixels and points per request and over all admitted work."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from serving_harness import ModelSpy, running_server, wait_until
from test_serving_overload import model_held_busy, request

from bifusion_client.api import BiFusionClient, error_field
from bifusion_client.request import build_request
from bifusion_server import service
from bifusion_server.budget import Budget, BudgetFull, BudgetLimits, Cost, OverRequestBudget

VGA_PIXELS = 640 * 480


def limits(**overrides) -> BudgetLimits:
    values = {"request_pixels": 100, "request_points": 10, "queued_pixels": 250, "queued_points": 25}
    return BudgetLimits(**{**values, **overrides})


def test_budget_admits_until_full_and_releases():
    budget = Budget(limits())
    cost = Cost(pixels=100, points=5, points_field="options.max_points")
    budget.admit(cost)
    budget.admit(cost)
    with pytest.raises(BudgetFull, match="200 of 250 pixels"):
        budget.admit(cost)
    assert budget.in_use == (200, 10)
    budget.release(cost)
    budget.admit(cost)
    budget.release(cost)
    budget.release(cost)
    assert budget.in_use == (0, 0)


def test_budget_counts_points_as_well_as_pixels():
    budget = Budget(limits())
    for _ in range(2):
        budget.admit(Cost(pixels=1, points=10, points_field="points.shape"))
    with pytest.raises(BudgetFull, match="20 of 25 points"):
        budget.admit(Cost(pixels=1, points=10, points_field="points.shape"))


@pytest.mark.parametrize(
    "cost, field",
    [
        (Cost(pixels=101, points=1, points_field="options.max_points"), "intrinsics"),
        (Cost(pixels=1, points=11, points_field="points.shape"), "points.shape"),
    ],
)
def test_a_request_over_the_per_request_budget_is_never_admitted(cost, field):
    budget = Budget(limits())
    with pytest.raises(OverRequestBudget) as caught:
        budget.admit(cost)
    assert caught.value.field == field
    assert budget.in_use == (0, 0)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def amplifying_request():
    """A 4096×4096 frame of constant colour and depth: about 100 KB compressed, 16.8 Mpx decoded."""
    side = 4096
    color = np.full((side, side, 3), 128, np.uint8)
    depth = np.full((side, side), 5000, np.uint16)
    request = build_request(color, depth, (2000, 2000, 2047.5, 2047.5), depth_scale=5000.0, max_points=500)
    request.color.data, request.depth.data = png(color), png(depth)  # compressed harder
    assert len(request.SerializeToString()) < 120_000
    return request


def test_a_small_request_that_decodes_huge_is_refused_from_its_header(encoder, monkeypatch):
    request = amplifying_request()
    decoded = []
    monkeypatch.setattr(service, "decode_request", lambda *args: decoded.append(args))
    with running_server(encoder) as live, BiFusionClient(live.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.encode_request(request, timeout=60)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error_field(error) == "intrinsics"
        assert "16777216-pixel image is over the server's per-request budget of 8388608" in error.details()
        # Refused before its images are decoded (that takes 1.5 s and +500 MB).
        assert decoded == []
        assert live.metric("bifusion_frames_total") == 0
        assert live.server._service._budget.in_use == (0, 0)


def test_queued_budget_full_is_resource_exhausted_and_frees_up(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    config = {"max_batch_size": 1, "max_request_pixels": VGA_PIXELS, "max_queued_pixels": 2 * VGA_PIXELS}
    with model_held_busy(spy, frame, **config) as (live, stub, busy):
        budget = live.server._service._budget
        queued = stub.EncodeFrame.future(request(frame, "queued"), timeout=120)
        wait_until(lambda: budget.in_use[0] == 2 * VGA_PIXELS, what="two frames admitted")
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeFrame(request(frame, "over budget"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queued work is at its budget (614400 of 614400 pixels" in caught.value.details()
        spy.gate.set()
        assert busy.result().frame_id == "busy" and queued.result().frame_id == "queued"
        assert "over budget" not in spy.seen
        wait_until(lambda: budget.in_use == (0, 0), what="the budget to be given back")
        assert stub.EncodeFrame(request(frame, "after"), timeout=60).frame_id == "after"
        assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="RESOURCE_EXHAUSTED") == 1


def test_refused_and_cancelled_requests_give_their_budget_back(encoder, tum_folder_frames):
    spy, frame = ModelSpy(encoder), tum_folder_frames[0]
    with model_held_busy(spy, frame, max_batch_size=1) as (live, stub, busy):
        budget = live.server._service._budget
        doomed = stub.EncodeFrame.future(request(frame, "doomed"), timeout=60)
        wait_until(lambda: live.server.batcher.queued == 1, what="'doomed' to be queued")
        assert doomed.cancel()
        bad = request(frame, "bad")
        bad.depth.data = bad.depth.data[:100]
        with pytest.raises(grpc.RpcError):
            stub.EncodeFrame(bad, timeout=10)
        spy.gate.set()
        busy.result()
        wait_until(lambda: budget.in_use == (0, 0), what="the budget to be given back")
