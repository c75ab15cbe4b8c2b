"""The batch policy: the chooser on given timings, the bounded sweep on a simulated device,
and --max-batch-size's parsing."""

from __future__ import annotations

import asyncio
import random

import pytest
from serving_harness import running_server

from bifusion_client.api import BiFusionClient
from bifusion_server import batch_policy
from bifusion_server.batch_policy import BatchPolicy, Setting, choose, sweep
from bifusion_server.config import ServerConfig, load_config


# The chooser ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seconds_per_frame, chosen",
    [
        # The AMD EPYC 2-vCPU host of the issue: batching costs, batch 1 wins.
        ({1: 0.510, 4: 0.565, 8: 0.595}, 1),
        # An H200: cheaper per frame up to 16, and 32 within 3 % of it: the larger.
        ({1: 0.048, 8: 0.025, 16: 0.0178, 32: 0.0180}, 32),
        # Flat within 3 %: the largest of the equals.
        ({1: 0.429, 4: 0.422, 8: 0.412}, 8),
        # The best in the middle, larger sizes clearly slower.
        ({1: 0.50, 2: 0.45, 4: 0.46, 8: 0.52}, 4),
        ({1: 0.50, 2: 0.45, 4: 0.47, 8: 0.52}, 2),
        ({4: 1.0}, 4),
    ],
)
def test_the_largest_batch_within_the_tolerance_of_the_best_is_chosen(seconds_per_frame, chosen):
    assert choose(seconds_per_frame) == Setting(chosen)


def test_the_tolerance_is_a_parameter_and_no_timings_is_an_error():
    timings = {1: 1.00, 2: 1.04, 4: 1.09}
    assert [choose(timings, t).batch_size for t in (0.0, 0.05, 0.10)] == [1, 2, 4]
    with pytest.raises(ValueError):
        choose({})


def test_the_3d_branch_per_frame_is_chosen_where_it_is_faster_and_whole_batches_on_a_tie():
    # This AMD host in one busy A/B: batch 8 through every stage 4.79 s a frame, with the
    # U-Net and fusion per frame 3.88 s.
    amd = {Setting(1): 0.51, Setting(2, 1): 0.49, Setting(4, 1): 0.47, Setting(8, 1): 0.46, Setting(8): 0.57}
    assert choose(amd) == Setting(8, 1)
    tie = {Setting(1): 0.50, Setting(8, 1): 0.45, Setting(8): 0.452}
    assert choose(tie) == Setting(8)  # within the tolerance: one U-Net call, as designed


# The sweep, on a simulated device and clock ----------------------------------------------
class SimulatedDevice:
    """Seconds per frame by setting (plain ints: whole batches), with multiplicative noise;
    advances a fake clock."""

    def __init__(self, per_frame: dict, noise: float = 0.0, seed: int = 0, fails_from=None):
        self.per_frame = {k if isinstance(k, Setting) else Setting(k): v for k, v in per_frame.items()}
        self.noise, self.fails_from = noise, fails_from
        self.random = random.Random(seed)
        self.now = 0.0
        self.calls: list[Setting] = []

    def clock(self) -> float:
        return self.now

    @property
    def sizes(self) -> list[int]:
        return [s.batch_size for s in self.calls]

    async def run(self, setting: Setting) -> float | None:
        self.calls.append(setting)
        if self.fails_from is not None and setting.batch_size >= self.fails_from:
            self.now += 0.01
            return None
        seconds = self.per_frame[setting] * (1 + self.random.uniform(-self.noise, self.noise))
        self.now += seconds * setting.batch_size
        return seconds


def run_sweep(device: SimulatedDevice, settings=None, budget=30.0, warm=True) -> BatchPolicy:
    settings = list(device.per_frame) if settings is None else settings
    return asyncio.run(sweep(device.run, settings, budget, clock=device.clock, warm_each_size=warm))


AMD_CPU = {1: 0.45, 2: 0.48, 4: 0.51, 8: 0.53}
GPU = {1: 0.048, 2: 0.035, 4: 0.029, 8: 0.025, 16: 0.0178, 32: 0.0180}


def test_the_sweep_stays_within_its_budget_and_times_what_fits():
    device = SimulatedDevice(AMD_CPU)
    policy = run_sweep(device, budget=30.0)
    assert policy.measured and policy.setting == Setting(1)
    assert policy.sweep_seconds == device.now <= 30.0
    assert set(policy.seconds_per_frame) == {Setting(b) for b in (1, 2, 4, 8)}
    assert policy.seconds_per_frame[Setting(1)] == pytest.approx(0.45)
    # Clearly slower settings are timed once; the rest as often as the budget allows.
    assert policy.calls[Setting(8)] == 1 and policy.calls[Setting(1)] >= 3
    # A budget that only fits the small sizes: the big ones are never started.
    short = SimulatedDevice(AMD_CPU)
    policy = run_sweep(short, budget=5.0)
    assert short.now <= 5.0 and 8 not in short.sizes and policy.max_batch_size == 1


def test_the_cpu_candidates_fit_in_thirty_seconds_and_find_the_3d_branch_per_frame():
    # Per-frame seconds in the proportions this AMD host showed (CLIP gains from the batch,
    # the whole-batch U-Net loses).
    cpu = {Setting(1): 0.45, Setting(2, 1): 0.44, Setting(4, 1): 0.42, Setting(8, 1): 0.41, Setting(8): 0.50}
    device = SimulatedDevice(cpu, noise=0.02)
    settings, budget = batch_policy.candidates("cpu"), batch_policy.budget_seconds("cpu")
    policy = run_sweep(device, settings, budget, warm=False)  # as on a CPU
    assert device.now <= 30.0 and policy.setting == Setting(8, 1)
    assert policy.calls[Setting(8, 1)] >= 3 and policy.calls[Setting(8)] == 1  # 22 % slower: dropped
    assert len(device.calls) == sum(policy.calls.values())  # no untimed call on a CPU
    # With untimed calls (as on a GPU), one per batch size, however many settings share it.
    warmed = SimulatedDevice(cpu)
    policy = run_sweep(warmed, settings, budget)
    assert warmed.sizes.count(8) == sum(policy.calls[s] for s in policy.calls if s.batch_size == 8) + 1


def test_the_gpu_sweep_fits_in_ten_seconds_and_picks_a_big_batch():
    device = SimulatedDevice(GPU)
    policy = run_sweep(
        device, settings=batch_policy.candidates("cuda"), budget=batch_policy.budget_seconds("cuda")
    )
    assert device.now <= 10.0 and policy.setting == Setting(32)
    assert min(policy.calls[Setting(16)], policy.calls[Setting(32)]) >= 3


def test_the_same_device_gets_the_same_choice_despite_noise():
    """±2 % noise per call, on devices whose settings are at least 3 % away from the
    tolerance's edge: the medians over interleaved rounds choose alike every time."""
    cases = (
        (AMD_CPU, 1),
        ({1: 0.45, 2: 0.43, 4: 0.41, 8: 0.40}, 8),
        ({1: 0.45, 2: 0.40, 4: 0.43, 8: 0.45}, 2),
    )
    for per_frame, expected in cases:
        choices = {
            run_sweep(SimulatedDevice(per_frame, noise=0.02, seed=seed)).max_batch_size for seed in range(20)
        }
        assert choices == {expected}


def test_a_size_that_does_not_run_ends_the_sweep_at_the_size_before():
    device = SimulatedDevice(GPU, fails_from=16)
    policy = run_sweep(device, budget=10.0)
    assert policy.max_batch_size == 8 and 32 not in device.sizes
    with pytest.raises(RuntimeError):
        run_sweep(SimulatedDevice(GPU, fails_from=1))


def test_a_pinned_policy_is_reported_as_set_by_the_flag():
    policy = BatchPolicy.pinned(4)
    message = policy.message()
    assert (message.measured, list(message.sweep), policy.max_batch_size) == (False, [], 4)
    assert "--max-batch-size" in policy.summary()


def test_candidates_are_bounded_by_the_queue_and_the_instances():
    cpu = batch_policy.candidates("cpu")
    assert {s.batch_size for s in cpu} == {1, 2, 4, 8} and Setting(8, 1) in cpu and Setting(8) in cpu
    # Instances in processes of their own take whole batches only.
    assert all(s.group_3d is None for s in batch_policy.candidates("cpu", per_frame_3d=False))
    assert [s.batch_size for s in batch_policy.candidates("cuda", limit=20)] == [1, 2, 4, 8, 16]
    assert batch_policy.candidates("cpu", limit=1) == (Setting(1),)
    assert batch_policy.budget_seconds("cpu") == 30.0 and batch_policy.budget_seconds("cuda") == 10.0
    assert batch_policy.budget_seconds("cpu", 3.0) == 3.0


# The flag ---------------------------------------------------------------------------------
def test_max_batch_size_is_auto_by_default_and_a_number_pins_it():
    assert load_config([], env={}).max_batch_size == "auto"
    assert (
        load_config(["--max-batch-size", "auto"], env={"BIFUSION_MAX_BATCH_SIZE": "4"}).max_batch_size
        == "auto"
    )
    assert load_config(["--max-batch-size", "16"], env={}).max_batch_size == 16
    assert load_config([], env={"BIFUSION_MAX_BATCH_SIZE": "4"}).max_batch_size == 4
    assert ServerConfig(max_batch_size=2).max_batch_size == 2
    assert load_config(["--batch-sweep-seconds", "5"], env={}).batch_sweep_seconds == 5.0


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--max-batch-size", "eight"], {}),
        (["--max-batch-size", "0"], {}),
        (["--max-batch-size", "-2"], {}),
        (["--max-batch-size", "2.5"], {}),
        ([], {"BIFUSION_MAX_BATCH_SIZE": "big"}),
    ],
)
def test_a_bad_max_batch_size_is_refused_naming_the_flag(argv, env, capsys):
    with pytest.raises(SystemExit) as caught:
        load_config(argv, env=env)
    assert caught.value.code == 2
    assert "--max-batch-size must be auto or a whole number ≥ 1, not" in capsys.readouterr().err


# A real server ----------------------------------------------------------------------------
SWEEP_BUDGET_S = 3.0  # enough for batch 1 and perhaps 2 on a busy 2-core machine


def test_a_server_started_with_auto_measures_and_reports_its_choice(encoder, caplog):
    caplog.set_level("INFO", logger="bifusion.server")
    try:
        with running_server(encoder, max_batch_size="auto", batch_sweep_seconds=SWEEP_BUDGET_S) as live:
            policy = live.server.batch_policy
            group_3d = encoder.group_3d
            with BiFusionClient(live.address) as client:
                info = client.model_info()
            granularity = policy.setting.granularity
            chosen = live.metric("bifusion_max_batch_size", source="auto", granularity=granularity)
            sweep_1 = live.metric(
                "bifusion_batch_sweep_seconds_per_frame", batch_size="1", granularity="batch"
            )
    finally:
        encoder.group_3d = None  # the session's encoder, shared with other tests
    timed = policy.seconds_per_frame
    assert policy.measured and Setting(1) in timed
    assert live.server.batcher.max_batch_size == policy.max_batch_size and choose(timed) == policy.setting
    assert group_3d == policy.group_3d  # the encoder runs what was chosen
    assert info.limits.max_batch_size == policy.max_batch_size == chosen
    reported = info.batch_policy
    assert reported.measured and reported.tolerance == pytest.approx(batch_policy.TOLERANCE)
    assert reported.unet_frames == (policy.group_3d or 0)
    assert {(t.batch_size, t.unet_frames or None) for t in reported.sweep} == set(timed)
    assert reported.sweep[0].seconds_per_frame == pytest.approx(sweep_1) and sweep_1 > 0
    assert all(t.calls >= 1 for t in reported.sweep)
    # Bounded: only calls that fitted were started (the first two, at batch 1, always run).
    assert reported.sweep_seconds < SWEEP_BUDGET_S + 3 * timed[Setting(1)]
    assert any("batch policy: B=" in r.getMessage() for r in caplog.records)


def test_a_pinned_batch_size_is_reported_as_set_by_the_flag(encoder):
    with running_server(encoder, max_batch_size=3) as live:
        with BiFusionClient(live.address) as client:
            info = client.model_info()
        assert live.metric("bifusion_max_batch_size", source="flag", granularity="batch") == 3
        assert live.metric("bifusion_max_batch_size", source="auto", granularity="batch") is None
    assert info.limits.max_batch_size == 3 and not info.batch_policy.measured
    assert list(info.batch_policy.sweep) == [] and encoder.group_3d is None
