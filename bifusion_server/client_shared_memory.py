"""Shared-memory outputs for clients on the same host (``--allow-shared-memory``); the
server's own transfers to its instance processes are ``instance_transfer.py``.

A client creates a POSIX shared-memory object (a file under /dev/shm), registers it under a
name, and asks a request's outputs to be written into a byte range of it; the response then
carries (region, offset, byte size) references instead of the bytes.

What the server guarantees: it maps only regular files directly under /dev/shm (no paths,
no symlinks), never more than their real size, and writes only inside a range that a request
named and that no other request in flight holds; before each write it checks the object was
not shrunk meanwhile. A registration lives as long as its RegisterSharedMemory stream.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import OUTPUT_ALIGNMENT as ALIGNMENT
from bifusion_wire.tensor import FieldError

SHM_DIR = Path("/dev/shm")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REQUEST_FIELD = "output_shared_memory"


def aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class Region:
    """One mapped shared-memory object. Closed when unregistered and no write is using it."""

    def __init__(self, name: str, key: str, byte_size: int):
        if not NAME_PATTERN.match(name):
            raise FieldError("name", f"must be 1-128 of A-Z a-z 0-9 . _ -, got {name!r}")
        if not NAME_PATTERN.match(key) or key in (".", ".."):
            raise FieldError("key", f"must name an object directly under {SHM_DIR} (no '/'), got {key!r}")
        if byte_size <= 0:
            raise FieldError("byte_size", "must be > 0")
        try:
            fd = os.open(SHM_DIR / key, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise FieldError("key", f"cannot open {SHM_DIR / key} for writing: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FieldError("key", f"{SHM_DIR / key} is not a shared-memory object")
            if info.st_size < byte_size:
                raise FieldError(
                    "byte_size", f"{byte_size} is larger than the object's real size, {info.st_size} bytes"
                )
            # Back every page now: tmpfs allocates on first write, and a write that finds
            # /dev/shm full would kill the server with SIGBUS instead of failing here.
            try:
                os.posix_fallocate(fd, 0, byte_size)
            except OSError as exc:
                raise FieldError(
                    "byte_size", f"cannot back {byte_size} bytes in {SHM_DIR}: {exc.strerror}"
                ) from None
            self._map = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.name, self.key, self.byte_size = name, key, byte_size
        self._lock = threading.Lock()
        self._users = 0
        self._unregistered = False
        self._held: list[tuple[int, int]] = []  # ranges of requests in flight
        # Set once unregistered; (un)registration runs on the event loop's thread.
        self.unregistered = asyncio.Event()

    def hold(self, offset: int, size: int) -> None:
        with self._lock:
            if self._unregistered:
                raise FieldError(f"{REQUEST_FIELD}.region", f"region {self.name!r} was unregistered")
            for start, end in self._held:
                if offset < end and start < offset + size:
                    raise FieldError(
                        REQUEST_FIELD,
                        f"bytes {offset}..{offset + size} of region {self.name!r} overlap "
                        f"{start}..{end}, the output of a request still in flight",
                    )
            self._held.append((offset, size + offset))
            self._users += 1

    def release(self, offset: int, size: int) -> None:
        with self._lock:
            self._held.remove((offset, offset + size))
            self._users -= 1
            close = self._unregistered and self._users == 0
        if close:
            self._close()

    def view(self, offset: int, size: int) -> memoryview:
        """The range to write, after checking the object still holds it (writing past the end
        of a shrunk object would kill the server with SIGBUS)."""
        if os.fstat(self._fd).st_size < self.byte_size:
            raise FieldError(f"{REQUEST_FIELD}.region", f"region {self.name!r} was shrunk after registration")
        return memoryview(self._map)[offset : offset + size]

    def unregister(self) -> None:
        self.unregistered.set()
        with self._lock:
            self._unregistered = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        self._map.close()
        os.close(self._fd)


@dataclass
class Lease:
    """A request's range of a region, held from decoding until its response is built."""

    region: Region
    offset: int
    byte_size: int
    refs: list[pb.SharedMemoryRef] = field(default_factory=list)
    _released: bool = False

    def write(self, outputs) -> list[pb.SharedMemoryRef]:
        """Writes each output (``respond.Output``) at the next aligned offset of the range."""
        position, refs = self.offset, []
        end = self.offset + self.byte_size
        for output in outputs:
            if position + output.nbytes > end:
                raise FieldError(
                    f"{REQUEST_FIELD}.byte_size",
                    f"too small: the outputs need more than {self.byte_size} bytes",
                )
            view = self.region.view(position, output.nbytes)
            try:
                output.write_into(view)
            finally:
                view.release()
            refs.append(pb.SharedMemoryRef(region=self.region.name, offset=position, byte_size=output.nbytes))
            position = aligned(position + output.nbytes)
        return refs

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.region.release(self.offset, self.byte_size)


class SharedMemoryRegistry:
    """The server's registered regions, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, request: pb.RegisterSharedMemoryRequest) -> Region:
        with self._lock:
            if request.name in self._regions:
                raise FieldError("name", f"a region named {request.name!r} is already registered")
            region = Region(request.name, request.key, request.byte_size)
            self._regions[request.name] = region
            return region

    def unregister(self, name: str, region: Region | None = None) -> bool:
        """Forgets ``name`` (only if it is still ``region``, when given); False if unknown."""
        with self._lock:
            current = self._regions.get(name)
            if current is None or (region is not None and current is not region):
                return False
            del self._regions[name]
        current.unregister()
        return True

    def lease(self, ref: pb.SharedMemoryRef, needed: int) -> Lease:
        """Holds ``ref``'s range for one request whose outputs need at most ``needed`` bytes."""
        with self._lock:
            region = self._regions.get(ref.region)
        if region is None:
            raise FieldError(f"{REQUEST_FIELD}.region", f"no region named {ref.region!r} is registered")
        if ref.offset % ALIGNMENT:
            raise FieldError(
                f"{REQUEST_FIELD}.offset", f"must be a multiple of {ALIGNMENT}, got {ref.offset}"
            )
        if ref.offset >= region.byte_size:
            raise FieldError(
                f"{REQUEST_FIELD}.offset", f"{ref.offset} is past the region's {region.byte_size} bytes"
            )
        if ref.byte_size > region.byte_size - ref.offset:
            raise FieldError(
                f"{REQUEST_FIELD}.byte_size",
                f"offset {ref.offset} + {ref.byte_size} bytes runs past the region's {region.byte_size}",
            )
        if ref.byte_size < needed:
            raise FieldError(
                f"{REQUEST_FIELD}.byte_size",
                f"too small: this request's outputs may need {needed} bytes, got {ref.byte_size}",
            )
        region.hold(ref.offset, ref.byte_size)
        return Lease(region, ref.offset, ref.byte_size)

    def close(self) -> None:
        with self._lock:
            names = list(self._regions)
        for name in names:
            self.unregister(name)

    def __len__(self) -> int:
        return len(self._regions)

    def __contains__(self, name: str) -> bool:
        return name in self._regions
