"""Host ↔ device copies through reused page-locked (pinned) buffers.

On CUDA, page-locked host memory is what lets a copy run as one DMA transfer, but
allocating it (``cudaHostAlloc``) costs milliseconds per call, and copying from ordinary
pageable memory makes the driver stage the data through its own buffer first. So the
encoder packs a batch's inputs straight into a pinned buffer and sends it in one copy, and
receives its outputs into a pinned buffer whose numpy views become the results — no copy
on either side, and buffers are reused across calls: an input buffer once its copy has
finished, an output buffer once no result refers to it any more. On a CPU nothing is
pinned and nothing is copied twice.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ALIGN = 64  # bytes; every packed array starts at a multiple, fit for any dtype's view


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass
class _Buffer:
    tensor: torch.Tensor  # uint8, pinned
    claimed: bool = True  # handed out and being filled; then event or owner guards it
    event: torch.cuda.Event | None = None  # set while a copy from it may still run
    owner: weakref.ref | None = None  # set while results may still view it

    def busy(self) -> bool:
        if self.claimed or (self.owner is not None and self.owner() is not None):
            return True
        return self.event is not None and not self.event.query()

    def release(self, event: torch.cuda.Event | None = None, owner: weakref.ref | None = None) -> None:
        self.event, self.owner, self.claimed = event, owner, False


@dataclass
class PinnedPool:
    """Pinned byte buffers handed out for one use and taken back when no longer busy.

    Thread-safe. Allocating pinned memory costs about 0.5 ms per MB on an H200, ten times the
    copy into it (docs/benchmarks.md), and freeing it stalls the device, so every new buffer
    is at least as big as the biggest so far: served batch sizes go up and down with the
    load, and after the biggest batch every buffer fits every batch. Free buffers too small
    for a request are dropped when a bigger one is allocated, so the pool holds about one
    buffer per result still alive, plus one.
    """

    allocate: Callable[[int], torch.Tensor] = lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True)
    buffers: list[_Buffer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    allocations: int = 0  # how many host allocations (cudaHostAlloc) the pool has made
    peak: int = 0  # bytes of the biggest buffer allocated

    def acquire(self, nbytes: int) -> _Buffer:
        with self.lock:
            free = [b for b in self.buffers if not b.busy() and b.tensor.numel() >= nbytes]
            if free:
                buf = min(free, key=lambda b: b.tensor.numel())
                buf.event, buf.owner, buf.claimed = None, None, True
                return buf
            self.buffers = [b for b in self.buffers if b.busy()]  # the free ones are all too small
            # A quarter beyond the need so slowly growing batches do not allocate every call.
            size = max(_aligned(max(nbytes + nbytes // 4, ALIGN)), self.peak)
            self.peak = size
            buf = _Buffer(self.allocate(size))
            self.allocations += 1
            self.buffers.append(buf)
            return buf


@dataclass(frozen=True)
class Part:
    """One packed array: the concatenation of ``pieces`` (rows) as ``dtype``."""

    pieces: Sequence[np.ndarray]
    dtype: np.dtype
    row_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(len(p) for p in self.pieces), *self.row_shape)


class HostStaging:
    """Packs host arrays into device tensors and device tensors into host arrays."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.uploads = PinnedPool()
        self.downloads = PinnedPool()

    def upload(self, parts: Mapping[str, Part]) -> dict[str, torch.Tensor]:
        """Each part concatenated once, into pinned memory on CUDA, then one copy to the device."""
        if not self.cuda:
            return {n: torch.from_numpy(_concat(p, np.empty(p.shape, p.dtype))) for n, p in parts.items()}
        layout, total = _layout({name: (part.shape, np.dtype(part.dtype)) for name, part in parts.items()})
        buf = self.uploads.acquire(total)
        event = None
        try:
            host = buf.tensor.numpy()
            for name, part in parts.items():
                _concat(part, _view(host, *layout[name]))
            device_bytes = torch.empty(total, dtype=torch.uint8, device=self.device)
            device_bytes.copy_(buf.tensor[:total], non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        finally:
            buf.release(event=event)
        return {name: _tensor_view(device_bytes, *layout[name]) for name, part in parts.items()}

    def download(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Host arrays of the tensors; on CUDA, views of one pinned buffer, filled by one
        stream of copies and valid once this returns."""
        if not self.cuda:
            return {name: t.contiguous().numpy() for name, t in tensors.items()}
        specs = {name: (tuple(t.shape), _numpy_dtype(t.dtype)) for name, t in tensors.items()}
        layout, total = _layout(specs)
        buf = self.downloads.acquire(total)
        owner = buf.tensor.numpy()
        out = {}
        try:
            for name, t in tensors.items():
                _tensor_view(buf.tensor, *layout[name]).copy_(t, non_blocking=True)
                out[name] = _view(owner, *layout[name])
            torch.cuda.current_stream(self.device).synchronize()
        finally:
            buf.release(owner=weakref.ref(owner))  # every array in ``out`` keeps ``owner`` alive
        return out


def _layout(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
    layout, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        layout[name] = (offset, shape, dtype)
        offset += _aligned(nbytes)
    return layout, max(offset, ALIGN)


def _view(host: np.ndarray, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return host[offset : offset + nbytes].view(dtype).reshape(shape)


def _tensor_view(data: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return data[offset : offset + nbytes].view(_torch_dtype(dtype)).view(shape)


def _concat(part: Part, out: np.ndarray) -> np.ndarray:
    if len(part.pieces) == 1:
        np.copyto(out, part.pieces[0].reshape(out.shape), casting="unsafe")
    elif part.pieces:
        np.concatenate([p.reshape(-1, *part.row_shape) for p in part.pieces], out=out, casting="unsafe")
    return out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
