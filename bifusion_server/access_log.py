"""One log line per encoder RPC, on the ``bifusion.access`` logger, with repeated errors rate-limited.

A line carries the method, status, frame id, peer, request and response bytes, latency and,
for a stream, how many frames it carried. Error lines with the same status, method and peer
address are logged at most ``burst`` times per ``interval_s``; the next one logged after that
says how many were suppressed, so a client hammering the server with bad requests cannot
flood the log but every error is still accounted for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass

ACCESS_LOGGER = "bifusion.access"


@dataclass
class CallRecord:
    """What one RPC did; filled in as the call goes on."""

    method: str
    peer: str
    status: str = "OK"
    frame_id: str = ""
    frames: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    latency_ms: float = 0.0
    suppressed: int = 0  # earlier lines like this one that were not logged

    def add_request(self, size: int) -> None:
        self.frames += 1
        self.request_bytes += size

    def line(self) -> str:
        text = (
            f"{self.method} {self.status} frame_id={self.frame_id!r} peer={self.peer} "
            f"frames={self.frames} request_bytes={self.request_bytes} "
            f"response_bytes={self.response_bytes} latency_ms={self.latency_ms:.1f}"
        )
        return text + (f" suppressed={self.suppressed}" if self.suppressed else "")


# The record of the RPC being served; tasks a call starts (a stream's frames) share it.
current_call: ContextVar[CallRecord | None] = ContextVar("bifusion_current_call", default=None)


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7``: one client's connections share a key."""
    address, _, port = peer.rpartition(":")
    return address if address and port.isdigit() else peer


class AccessLog:
    def __init__(
        self,
        burst: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ):
        self._burst = burst
        self._interval = interval_s
        self._clock = clock
        self._log = logger or logging.getLogger(ACCESS_LOGGER)
        self._lock = threading.Lock()
        # (status, method, peer address) -> [window start, lines logged in it, suppressed since]
        self._windows: dict[tuple[str, str, str], list] = {}

    def record(self, call: CallRecord) -> None:
        if call.status != "OK" and not self._admit(call):
            return
        level = logging.INFO if call.status == "OK" else logging.WARNING
        self._log.log(level, "%s", call.line(), extra={"access": asdict(call)})

    def _admit(self, call: CallRecord) -> bool:
        """Whether this error line may be logged; sets ``call.suppressed`` when it carries a count."""
        key = (call.status, call.method, peer_address(call.peer))
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self._interval:
                suppressed = window[2] if window else 0
                self._windows[key] = [now, 1, 0]
                self._forget_old(now)
                call.suppressed = suppressed
                return True
            if window[1] < self._burst:
                window[1] += 1
                return True
            window[2] += 1
            return False

    def _forget_old(self, now: float) -> None:
        """Drop windows long over (their suppressed counts are lost, as their peers went quiet)."""
        if len(self._windows) > 1024:
            for key in [k for k, w in self._windows.items() if now - w[0] >= 2 * self._interval]:
                del self._windows[key]
