"""The batch policy: how many frames one model call takes (``--max-batch-size``), and whether
the U-Net and the fusion take them all at once or one frame at a time.

A number pins the batch size (the whole batch goes through every stage together). ``auto``
measures the policy at warm-up, on the device the model runs on and with frames of the
model's default size: a short sweep times each candidate :class:`Setting` and picks the
largest batch whose time per frame is within ``TOLERANCE`` of the best. On a GPU bigger
batches keep getting cheaper per frame until the device is full. On a small CPU the CLIP
tower gains from a batch while the 3D branch loses (its kernel maps, gathered features and
per-point intermediates grow with the batch and fall out of the caches: docs/benchmarks.md),
so the CPU candidates include batches whose U-Net and fusion run frame by frame
(``BiFusionEncoder.group_3d = 1``).

The sweep is bounded (``BUDGET_SECONDS``, or ``--batch-sweep-seconds``) and made to repeat
its choice on the same host: on a GPU each new batch size gets an untimed call first (a new
size allocates pinned buffers; a CPU has none, and its budget is better spent on timed calls),
the timed calls go round all settings in turn so that drift hits each alike, each setting's
figure is the median of its calls, and a setting clearly slower than the best after one round
is not timed again.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from bifusion import EncodeOptions

from .failures import ModelFailed
from .warmup import synthetic_frames

log = logging.getLogger("bifusion.server")


class Setting(NamedTuple):
    batch_size: int
    group_3d: int | None = None  # frames per U-Net and fusion call; None: the whole batch

    @property
    def label(self) -> str:
        return f"B={self.batch_size}" + ("" if self.group_3d is None else f" (3D per {self.group_3d})")

    @property
    def granularity(self) -> str:
        """Metric label: ``batch`` (every stage on the whole batch) or ``3d_per_frame``."""
        return (
            "batch" if self.group_3d is None else f"3d_per_{'frame' if self.group_3d == 1 else self.group_3d}"
        )


CANDIDATES = {
    "cpu": (Setting(1), Setting(2, 1), Setting(4, 1), Setting(8, 1), Setting(8)),
    "cuda": tuple(Setting(b) for b in (1, 2, 4, 8, 16, 32)),
}
BUDGET_SECONDS = {"cpu": 30.0, "cuda": 10.0}
TOLERANCE = 0.03  # per-frame time within 3 % of the best counts as the best
REPEATS = 5  # timed calls per setting, when the budget allows
DROP_AFTER_FIRST_ROUND = 0.15  # slower than the best by more: not timed again
SAFETY = 1.25  # a call is only started if this many times its expected time fits


@dataclass(frozen=True)
class BatchPolicy:
    """The batch size in use and, when measured, what the measurement found."""

    max_batch_size: int
    measured: bool  # False: set by --max-batch-size N
    group_3d: int | None = None  # frames per U-Net and fusion call; None: the whole batch
    # Median seconds per frame by setting, and the timed calls behind each (empty: pinned).
    seconds_per_frame: dict[Setting, float] = field(default_factory=dict)
    calls: dict[Setting, int] = field(default_factory=dict)
    sweep_seconds: float = 0.0
    tolerance: float = TOLERANCE

    @classmethod
    def pinned(cls, max_batch_size: int) -> BatchPolicy:
        return cls(max_batch_size, measured=False)

    @property
    def setting(self) -> Setting:
        return Setting(self.max_batch_size, self.group_3d)

    def message(self):
        """As the ``ModelInfo.batch_policy`` wire message."""
        from bifusion_wire import encoder_pb2 as pb

        return pb.BatchPolicy(
            measured=self.measured,
            sweep=[
                pb.BatchTiming(
                    batch_size=s.batch_size,
                    seconds_per_frame=seconds,
                    calls=self.calls[s],
                    unet_frames=s.group_3d or 0,
                )
                for s, seconds in sorted(self.seconds_per_frame.items(), key=lambda item: _order(item[0]))
            ],
            tolerance=self.tolerance if self.measured else 0.0,
            sweep_seconds=self.sweep_seconds,
            unet_frames=self.group_3d or 0,
        )

    def summary(self) -> str:
        if not self.measured:
            return f"max batch size {self.max_batch_size} (--max-batch-size)"
        figures = ", ".join(
            f"{s.label}: {1000 * seconds:.1f} ms ({self.calls[s]}×)"
            for s, seconds in sorted(self.seconds_per_frame.items(), key=lambda item: _order(item[0]))
        )
        return (
            f"{self.setting.label} (auto: the largest batch within {100 * self.tolerance:.0f} % of the "
            f"best time per frame; swept in {self.sweep_seconds:.1f} s, per frame: {figures})"
        )


def _order(setting: Setting) -> tuple[int, bool]:
    """Bigger batches later; at one size, the whole batch through every stage last (preferred
    on a tie: one U-Net call, as the design batches)."""
    return setting.batch_size, setting.group_3d is None


def choose(seconds_per_frame: Mapping[Setting | int, float], tolerance: float = TOLERANCE) -> Setting:
    """The largest batch whose time per frame is within ``tolerance`` of the best (plain ints
    are whole-batch settings)."""
    if not seconds_per_frame:
        raise ValueError("no batch size was timed")
    timings = {Setting(*s) if isinstance(s, tuple) else Setting(s): t for s, t in seconds_per_frame.items()}
    best = min(timings.values())
    return max((s for s, t in timings.items() if t <= best * (1 + tolerance)), key=_order)


def candidates(device_type: str, limit: int | None = None, per_frame_3d: bool = True) -> tuple[Setting, ...]:
    """Settings to try on this kind of device: batches of at most ``limit`` (e.g. the queue's
    size), and with the 3D branch per frame only where ``per_frame_3d`` (an in-process encoder)."""
    settings = CANDIDATES.get(device_type, CANDIDATES["cuda"])
    kept = tuple(
        s
        for s in settings
        if (limit is None or s.batch_size <= limit) and (per_frame_3d or s.group_3d is None)
    )
    return kept or (Setting(1),)


def budget_seconds(device_type: str, configured: float = 0.0) -> float:
    return configured or BUDGET_SECONDS.get(device_type, BUDGET_SECONDS["cuda"])


# Runs one call with a setting and returns its seconds per frame, or None when that batch
# size does not run on this device (out of memory): no bigger batch is tried then.
Runner = Callable[[Setting], Awaitable[float | None]]


async def resolve(
    setting: int | str, instances: Sequence, device_type: str, max_queue: int, budget_s: float = 0.0
) -> BatchPolicy:
    """The policy for ``--max-batch-size`` ``setting``: a number as given, or ``auto`` measured
    on ``instances`` (all of them at once, each given the same batch, as under load). The
    chosen 3D granularity is set on in-process encoders (``instance.encoder``); instances in
    processes of their own are swept with whole batches only."""
    if setting != "auto":
        return BatchPolicy.pinned(int(setting))
    encoders = [getattr(i, "encoder", None) for i in instances]
    in_process = all(e is not None and hasattr(e, "group_3d") for e in encoders)
    settings = candidates(device_type, max_queue, per_frame_3d=in_process)
    frames = synthetic_frames(max(s.batch_size for s in settings))
    options = [EncodeOptions()] * len(frames)

    async def run(setting: Setting) -> float | None:
        size = setting.batch_size
        if in_process:
            for encoder in encoders:
                encoder.group_3d = setting.group_3d
        started = time.perf_counter()
        try:
            await asyncio.gather(*(i.encode(frames[:size], options[:size]) for i in instances))
        except ModelFailed as failure:
            log.warning("batch sweep: %s does not run here: %s", setting.label, failure)
            return None
        return (time.perf_counter() - started) / (size * len(instances))

    budget = budget_seconds(device_type, budget_s)
    policy = await sweep(run, settings, budget, warm_each_size=device_type != "cpu")
    if in_process:
        for encoder in encoders:
            encoder.group_3d = policy.group_3d
    log.info("batch policy: %s", policy.summary())
    return policy


async def sweep(
    run: Runner,
    settings: Sequence[Setting | int],
    budget_s: float,
    repeats: int = REPEATS,
    tolerance: float = TOLERANCE,
    clock: Callable[[], float] = time.monotonic,
    warm_each_size: bool = True,
) -> BatchPolicy:
    """Times ``run`` for ``settings`` (plain ints: whole batches) within ``budget_s`` seconds
    and chooses.

    The smallest batch is always timed; a further call starts only if its expected time, times
    ``SAFETY``, still fits in the budget. ``warm_each_size``: an untimed call before the first
    timed one at each batch size.
    """
    started = clock()
    deadline = started + budget_s
    ordered = sorted((s if isinstance(s, tuple) else Setting(s) for s in settings), key=_order)
    timed: dict[Setting, list[float]] = {}
    call_seconds: dict[Setting, float] = {}  # wall time of the latest call with each setting
    warmed: set[int] = set()  # batch sizes called once already

    def expected(setting: Setting) -> float:
        if setting in call_seconds:
            return call_seconds[setting]
        dearest = max(call_seconds, key=lambda s: call_seconds[s] / s.batch_size)
        return call_seconds[dearest] * setting.batch_size / dearest.batch_size

    async def call(setting: Setting) -> float | None:
        began = clock()
        per_frame = await run(setting)
        call_seconds[setting] = clock() - began
        return per_frame

    def fits(seconds: float) -> bool:
        return clock() + SAFETY * seconds <= deadline

    # First round, smallest batch first: an untimed call at each new batch size, then a timed one.
    for setting in ordered:
        warm = warm_each_size and setting.batch_size not in warmed
        if timed and not fits((2 if warm else 1) * expected(setting)):
            break
        per_frame = await call(setting)
        if warm and per_frame is not None:
            warmed.add(setting.batch_size)
            per_frame = await call(setting)
        if per_frame is None:
            if not timed:
                raise RuntimeError(f"the model cannot run a batch of {setting.batch_size} frame(s)")
            break
        timed[setting] = [per_frame]
    # Further rounds over the settings still in the running, while a whole round fits.
    best = min(s[0] for s in timed.values())
    running = [s for s, t in timed.items() if t[0] <= best * (1 + DROP_AFTER_FIRST_ROUND)]
    for _ in range(repeats - 1):
        if not fits(sum(expected(s) for s in running)):
            break
        for setting in running:
            per_frame = await call(setting)
            if per_frame is not None:
                timed[setting].append(per_frame)
    medians = {s: statistics.median(t) for s, t in timed.items()}
    chosen = choose(medians, tolerance)
    return BatchPolicy(
        max_batch_size=chosen.batch_size,
        measured=True,
        group_3d=chosen.group_3d,
        seconds_per_frame=medians,
        calls={s: len(t) for s, t in timed.items()},
        sweep_seconds=clock() - started,
        tolerance=tolerance,
    )
