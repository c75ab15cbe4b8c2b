"""Giving the heap back after load (glibc).

A served frame allocates megabytes at a time (decoded images, the model's activations, a
20 MB response) on many threads. Once glibc's dynamic mmap threshold has risen past such
sizes it serves them from its per-thread arenas and keeps what is freed there: after a
fuzz campaign the server's RSS stayed hundreds of MB above its working set
(bench/soak.py). ``malloc_trim(0)`` returns the free pages of every arena; :class:`IdleTrim`
runs it once the server has been idle a moment, so load itself pays nothing. (Pinning the
threshold instead would make every large buffer a fresh mapping: 7 ms of page faults per
20 MB response instead of 0.6 ms, measured on the 2-core VM.) Elsewhere than glibc, a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from concurrent.futures import Executor

IDLE_SECONDS = 1.0  # trim once nothing has been in flight this long


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def trim() -> bool:
    """Returns free heap pages to the system; True if any were."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


class IdleTrim:
    """Trims the heap ``IDLE_SECONDS`` after the last call in flight ended, off the event loop."""

    def __init__(self, executor: Executor, idle_seconds: float = IDLE_SECONDS):
        self._executor = executor
        self._idle_seconds = idle_seconds
        self._timer: asyncio.TimerHandle | None = None

    def busy(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def idle(self) -> None:
        if _LIBC is None:
            return
        self.busy()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._idle_seconds, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        with contextlib.suppress(RuntimeError):  # the executor is shut down: the server is stopping
            loop.run_in_executor(self._executor, trim).add_done_callback(_ignore_outcome)


def _ignore_outcome(future) -> None:
    if not future.cancelled():
        future.exception()
