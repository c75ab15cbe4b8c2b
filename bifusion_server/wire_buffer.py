"""A ``bytes`` object filled in place: gRPC's Python server sends only ``bytes``, and building
a response in a ``bytearray`` would cost one more full copy to convert it.

This is the C API's own pattern: ``PyBytes_FromStringAndSize(NULL, n)`` makes an
uninitialised bytes object that its creator may fill before anyone else sees it.
"""

from __future__ import annotations

import ctypes

_new = ctypes.pythonapi.PyBytes_FromStringAndSize
_new.restype = ctypes.py_object
_new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_address = ctypes.pythonapi.PyBytes_AsString
_address.restype = ctypes.c_void_p
_address.argtypes = (ctypes.py_object,)


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """An uninitialised ``bytes`` of ``size`` and a writable byte view of it. Fill every byte
    through the view, drop the view, then hand out the bytes; never write after that."""
    if size <= 0:
        return b"", memoryview(bytearray())
    out = _new(None, size)
    return out, memoryview((ctypes.c_char * size).from_address(_address(out))).cast("B")
