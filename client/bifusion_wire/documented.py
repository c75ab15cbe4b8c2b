"""The wire contract with its comments, for server reflection (``grpcurl describe`` shows them).

Generated stubs register their files without source info, and protobuf's descriptor pools
drop it anyway, so reflection would serve bare descriptors. ``encoder.binpb`` (written by
scripts/generate_wire.py with ``--include_source_info``) keeps the comments;
:func:`documented_pool` hands it to reflection in place of the bare copy.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

DESCRIPTOR_SET = Path(__file__).with_name("encoder.binpb")


def documented_files(path: Path = DESCRIPTOR_SET) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    return {proto.name: proto for proto in files}


def same_definitions(documented: descriptor_pb2.FileDescriptorProto, serialized_pb: bytes) -> bool:
    """True when ``documented`` defines exactly what the registered file does (comments and
    json names aside): a stale descriptor set must never describe a different contract."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(documented)
    bare.ClearField("source_code_info")
    messages = list(bare.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return bare == descriptor_pb2.FileDescriptorProto.FromString(serialized_pb)


class DocumentedPool:
    """A descriptor pool for grpc_reflection: the default pool, except that files of the
    descriptor set copy themselves out with their comments. Any other file goes as it is."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None, path: Path = DESCRIPTOR_SET):
        self._pool = pool or descriptor_pool.Default()
        self._documented = documented_files(path)

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def FindFileByName(self, name: str):  # the DescriptorPool interface
        return self._wrap(self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str):
        return self._wrap(self._pool.FindFileContainingSymbol(symbol))

    def _wrap(self, descriptor):
        documented = self._documented.get(descriptor.name)
        if documented is None or not same_definitions(documented, descriptor.serialized_pb):
            return _DocumentedFile(descriptor, None, self)
        return _DocumentedFile(descriptor, documented, self)


class _DocumentedFile:
    """A FileDescriptor whose CopyToProto includes the source info; the rest is delegated."""

    def __init__(self, descriptor, documented, pool: DocumentedPool):
        self._descriptor, self._documented, self._pool = descriptor, documented, pool

    def __getattr__(self, name: str):
        return getattr(self._descriptor, name)

    @property
    def dependencies(self) -> list:
        return [self._pool._wrap(dependency) for dependency in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        if self._documented is None:
            self._descriptor.CopyToProto(proto)
        else:
            proto.CopyFrom(self._documented)


def documented_pool() -> DocumentedPool:
    """The pool to pass as ``enable_server_reflection(..., pool=documented_pool())``."""
    return DocumentedPool()
