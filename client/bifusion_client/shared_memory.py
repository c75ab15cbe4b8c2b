"""The client's side of shared-memory outputs: POSIX shared-memory regions it creates,
registers with the server, reuses, and unregisters and unlinks on close.

Each request in flight gets a region of its own. The arrays of a result view that region;
the region is reused only once every array viewing it is gone (a finaliser on the view's
base array hands it back), so a result stays valid as long as you hold its arrays.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from multiprocessing import resource_tracker
from pathlib import Path

import grpc
import numpy as np
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import FieldError

MIB = 1024 * 1024
SHM_DIR = Path("/dev/shm")  # POSIX shared memory as Linux exposes it
# Regions one client may hold at once; more means results are being kept without end.
MAX_REGIONS = 64


class Region:
    """One shared-memory object (mode 0600: this user only) and its registration (an open
    RegisterSharedMemory call). Made with os and mmap rather than ``SharedMemory``, whose
    ``__del__`` fails while numpy arrays still view it; the resource tracker still unlinks it
    if this process dies without closing."""

    def __init__(self, size: int, register: Callable[[pb.RegisterSharedMemoryRequest], grpc.Call]):
        self.name = f"bifusion-{secrets.token_hex(8)}"
        self.size = size
        self.path = SHM_DIR / self.name
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        resource_tracker.register(f"/{self.name}", "shared_memory")
        try:
            # Allocated now, so a full /dev/shm fails here (ENOSPC) rather than as SIGBUS later.
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            self._unlink()
            raise
        finally:
            os.close(fd)
        try:
            request = pb.RegisterSharedMemoryRequest(name=self.name, key=self.name, byte_size=size)
            self.call = register(request)
            next(self.call)  # the server has mapped it (or the RpcError says why not)
        except BaseException:
            self._destroy()
            raise

    def close(self, unregister: Callable[[pb.UnregisterSharedMemoryRequest], object]) -> None:
        # The server may be gone or have forgotten it already; cancelling the call is enough then.
        with contextlib.suppress(grpc.RpcError):
            unregister(pb.UnregisterSharedMemoryRequest(name=self.name))
        self.call.cancel()
        self._destroy()

    def _destroy(self) -> None:
        self._unlink()
        with contextlib.suppress(BufferError):  # arrays still view it: the mapping goes when they do
            self.map.close()

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        resource_tracker.unregister(f"/{self.name}", "shared_memory")


class Slot:
    """One request's use of a region: the range it asks for, and views of what came back."""

    def __init__(self, region: Region, release: Callable[[Region], None]):
        self.region = region
        self._base = np.frombuffer(region.map, np.uint8, count=region.size)
        weakref.finalize(self._base, release, region)

    @property
    def ref(self) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region=self.region.name, offset=0, byte_size=self.region.size)

    def read(self, ref: pb.SharedMemoryRef) -> np.ndarray:
        if ref.region != self.region.name:
            raise FieldError("shared_memory.region", f"expected {self.region.name!r}, got {ref.region!r}")
        if ref.offset + ref.byte_size > self.region.size:
            raise FieldError("shared_memory.byte_size", "runs past the end of the region")
        return self._base[ref.offset : ref.offset + ref.byte_size]


class SharedMemoryPool:
    """Regions of one client, created on demand and reused."""

    def __init__(
        self,
        register: Callable[[pb.RegisterSharedMemoryRequest], grpc.Call],
        unregister: Callable[[pb.UnregisterSharedMemoryRequest], object],
    ):
        self._register = register
        self._unregister = unregister
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, needed: int) -> Slot:
        """A slot of at least ``needed`` bytes: a free region, or a new one (whole MiBs)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            fits = [r for r in self._free if r.size >= needed]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return Slot(region, self._release)
            if len(self._all) >= MAX_REGIONS:
                raise RuntimeError(
                    f"{MAX_REGIONS} shared-memory results are still held; copy the arrays you keep "
                    "(np.array(result.features)) and drop the results"
                )
        region = Region(-(-needed // MIB) * MIB, self._register)
        with self._lock:
            self._all.append(region)
        return Slot(region, self._release)

    def _release(self, region: Region) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(region)

    @property
    def regions(self) -> list[Region]:
        return list(self._all)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            region.close(self._unregister)
