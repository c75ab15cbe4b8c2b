"""Admission control in decoded pixels and points, per request and over all admitted work.

The cost of a request is known from its header (the declared image size, the points tensor's
rows, ``options.max_points``) before any image is decoded: a small compressed request cannot
make the server decode a huge image, and a burst of large frames cannot hold more than the
queued budget in memory at once.

- Over the per-request budget: never acceptable, whatever the load -> ``OverRequestBudget``
  (the service answers INVALID_ARGUMENT, naming the field; retrying cannot help).
- Over what is left of the queued budget: acceptable later -> ``BudgetFull`` (the service
  answers RESOURCE_EXHAUSTED; retry with backoff, like a full queue).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bifusion_wire.tensor import FieldError


@dataclass(frozen=True)
class Cost:
    pixels: int  # decoded image pixels (width × height)
    points: int  # points the model processes
    points_field: str  # the proto field that sets ``points``


@dataclass(frozen=True)
class BudgetLimits:
    request_pixels: int
    request_points: int
    queued_pixels: int
    queued_points: int


class OverRequestBudget(FieldError):
    """One request costs more than any request may: ``field`` names what sets the cost."""


class BudgetFull(Exception):
    """The queued budget has no room for this request now."""


class Budget:
    """Counts the pixels and points of every admitted request until it is released.

    Thread-safe: requests are admitted from the decoding threads.
    """

    def __init__(self, limits: BudgetLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._pixels = 0
        self._points = 0

    @property
    def in_use(self) -> tuple[int, int]:
        """(pixels, points) admitted and not yet released."""
        with self._lock:
            return self._pixels, self._points

    def check(self, cost: Cost) -> None:
        """Raises ``OverRequestBudget`` for a request no load would ever let in."""
        limits = self.limits
        if cost.pixels > limits.request_pixels:
            raise OverRequestBudget(
                "intrinsics",
                f"a {cost.pixels}-pixel image is over the server's per-request budget of "
                f"{limits.request_pixels} pixels; send smaller images",
            )
        if cost.points > limits.request_points:
            raise OverRequestBudget(
                cost.points_field,
                f"{cost.points} points are over the server's per-request budget of "
                f"{limits.request_points}; ask for fewer points",
            )

    def admit(self, cost: Cost) -> None:
        """Reserves ``cost`` or raises ``BudgetFull``; every admit needs one ``release``."""
        self.check(cost)
        limits = self.limits
        with self._lock:
            pixels, points = self._pixels + cost.pixels, self._points + cost.points
            if pixels > limits.queued_pixels or points > limits.queued_points:
                raise BudgetFull(
                    f"the server's queued work is at its budget ({self._pixels} of {limits.queued_pixels} "
                    f"pixels, {self._points} of {limits.queued_points} points); retry with backoff"
                )
            self._pixels, self._points = pixels, points

    def release(self, cost: Cost) -> None:
        with self._lock:
            self._pixels -= cost.pixels
            self._points -= cost.points
