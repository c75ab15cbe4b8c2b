"""Objects between the server and its instance processes, their numpy arrays through POSIX
shared memory (clients' own regions are ``client_shared_memory.py``).

An object is pickled (protocol 5) with its contiguous arrays taken out of band; the
arrays' bytes are copied once into a shared-memory segment and the pickle itself, a few
kilobytes, travels through the pipe. The receiver rebuilds the arrays as views of the
segment: no second copy. The parent owns every segment (a :class:`SegmentPool`); the
child only maps the ones it is told about.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger("bifusion.server")

ALIGN = 64  # every array starts on a cache line
SEGMENT_GRANULE = 4 * 1024 * 1024  # segments are sized in 4 MiB steps so they can be reused
KEEP_FREE = 2  # free segments kept per pool; more are unlinked


class SharedMemoryExhausted(MemoryError):
    """No room in /dev/shm for a batch's frames and results."""


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class Packed:
    """A pickled object whose arrays lie in a segment at ``spans`` (offset, byte count)."""

    pickle: bytes
    spans: tuple[tuple[int, int], ...]
    end: int  # first free byte after the arrays


def pack(obj, buf: memoryview, offset: int = 0) -> Packed | None:
    """Pickle ``obj`` with its arrays copied into ``buf`` from ``offset``; ``None`` if they do not fit."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    spans, end = [], offset
    for raw in raws:
        start = aligned(end)
        spans.append((start, raw.nbytes))
        end = start + raw.nbytes
    if end > len(buf):
        return None
    for (start, size), raw in zip(spans, raws, strict=True):
        buf[start : start + size] = raw
    return Packed(data, tuple(spans), end)


def unpack(packed: Packed, base: np.ndarray):
    """Rebuild a packed object; its arrays are views of ``base`` (a uint8 array over the segment)."""
    return pickle.loads(packed.pickle, buffers=[base[start : start + size] for start, size in packed.spans])


class Segment:
    """One named shared-memory block, created by the parent."""

    def __init__(self, name: str, size: int):
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.name, self.size = self.shm.name, size
        try:
            # Reserve the pages now: a full /dev/shm then raises here instead of killing
            # whichever process first touches a page (SIGBUS).
            os.posix_fallocate(self.shm._fd, 0, size)
        except OSError as exc:
            self.destroy()
            raise SharedMemoryExhausted(
                f"no room for {size} bytes in /dev/shm ({exc.strerror}); give the container a larger "
                "shm_size or run fewer instances"
            ) from None

    def destroy(self) -> None:
        try:
            self.shm.close()
            self.shm.unlink()
        except (BufferError, FileNotFoundError) as exc:  # still viewed, or already gone
            log.debug("shared memory %s not released: %s", self.name, exc)


class SegmentPool:
    """The segments of one instance: reused once nothing views them, a few kept free."""

    def __init__(self, prefix: str):
        self._prefix = prefix
        self._lock = threading.Lock()
        self._free: list[Segment] = []
        self._count = 0
        self._retired: list[str] = []  # unlinked here; the child should unmap them too
        self._closed = False

    def acquire(self, nbytes: int) -> Segment:
        with self._lock:
            fitting = [s for s in self._free if s.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._free.remove(segment)
                return segment
            self._count += 1
            name = f"{self._prefix}-{self._count}"
        size = max(SEGMENT_GRANULE, -(-nbytes // SEGMENT_GRANULE) * SEGMENT_GRANULE)
        return Segment(name, size)

    def release(self, segment: Segment) -> None:
        with self._lock:
            if self._closed:
                segment.destroy()
                return
            self._free.append(segment)
            while len(self._free) > KEEP_FREE:
                smallest = min(self._free, key=lambda s: s.size)
                self._free.remove(smallest)
                self._retired.append(smallest.name)
                smallest.destroy()

    def release_when_unused(self, segment: Segment, base: np.ndarray) -> None:
        """Give ``segment`` back once ``base`` and every view of it are gone."""
        weakref.finalize(base, self.release, segment)

    def take_retired(self) -> list[str]:
        with self._lock:
            retired, self._retired = self._retired, []
            return retired

    def close(self) -> None:
        """Unlink the free segments now; segments still viewed are unlinked when released."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for segment in free:
            segment.destroy()


class SegmentMaps:
    """The child's side: segments mapped by name, kept mapped until the parent retires them."""

    def __init__(self) -> None:
        self._maps: dict[str, shared_memory.SharedMemory] = {}

    def view(self, name: str) -> memoryview:
        shm = self._maps.get(name)
        if shm is None:
            shm = self._maps[name] = _attach(name)
        return shm.buf

    def retire(self, names: list[str]) -> None:
        for name in names:
            shm = self._maps.pop(name, None)
            try:
                if shm is not None:
                    shm.close()
            except BufferError:  # still viewed: unmapped when the process ends
                log.debug("shared memory %s still viewed", name)


def _attach(name: str) -> shared_memory.SharedMemory:
    # The child shares the parent's resource tracker, which already tracks this name
    # (Python 3.11 registers attachments too; the tracker keeps a set, so nothing doubles).
    return shared_memory.SharedMemory(name=name, create=False)
