"""The wire contract says what it means: buf lint passes (comments on every element included),
and server reflection serves the proto's comments, so grpcurl describe shows them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_harness import ROOT, running_server

from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.documented import DESCRIPTOR_SET, DocumentedPool, same_definitions

BUF = Path(os.environ.get("BIFUSION_BUF", ROOT / ".tools" / "buf" / "node_modules" / ".bin" / "buf"))
# FileDescriptorProto field numbers, for source-info paths.
MESSAGE_TYPE, FIELD, SERVICE, METHOD = 4, 2, 6, 2


def reflected_file(address: str, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (response,) = stub.ServerReflectionInfo(iter([request]), timeout=30)
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]


def comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): location.leading_comments + location.trailing_comments
        for location in proto.source_code_info.location
    }


def field_path(proto, message: str, field: str) -> tuple[int, ...]:
    m = [m.name for m in proto.message_type].index(message)
    f = [f.name for f in proto.message_type[m].field].index(field)
    return (MESSAGE_TYPE, m, FIELD, f)


def test_reflection_serves_the_proto_comments(encoder):
    with running_server(encoder) as live:
        (proto,) = reflected_file(live.address, "bifusion.v1.EncodeFrameRequest")
        (health,) = reflected_file(live.address, "grpc.health.v1.Health")  # other files still served
    assert proto.name == pb.DESCRIPTOR.name and same_definitions(proto, pb.DESCRIPTOR.serialized_pb)
    assert health.package == "grpc.health.v1"
    found = comments(proto)
    pose = found[field_path(proto, "EncodeFrameRequest", "cam_to_world")]
    assert "T_world_cam (camera-to-world)" in pose and "rigid" in pose
    assert "metres" in found[field_path(proto, "EncodeFrameRequest", "points")]
    assert "one byte" in found[field_path(proto, "EncodeFrameResponse", "valid")]
    assert "Units per metre" in found[field_path(proto, "DepthImage", "depth_scale")]
    header = " ".join(found.values())
    for fact in ("x right, y down, z forward", "rectified", "registered to the colour image"):
        assert fact in header, fact
    service = found[(SERVICE, 0, METHOD, 1)]  # EncodeStream
    assert "one response per request, in request order" in service


def test_a_stale_descriptor_set_is_never_served_with_its_comments(tmp_path):
    """Comments that describe another contract are worse than none: the bare file goes instead."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    files.file[0].message_type[0].field[0].name = "renamed"
    stale = tmp_path / "stale.binpb"
    stale.write_bytes(files.SerializeToString())

    served = descriptor_pb2.FileDescriptorProto()
    DocumentedPool(path=stale).FindFileContainingSymbol("bifusion.v1.Tensor").CopyToProto(served)
    assert not served.source_code_info.location and served.message_type[0].field[0].name == "dtype"

    fresh = descriptor_pb2.FileDescriptorProto()
    DocumentedPool().FindFileContainingSymbol("bifusion.v1.Tensor").CopyToProto(fresh)
    assert fresh.source_code_info.location


def buf_or_skip() -> Path:
    if not BUF.exists():
        pytest.skip(f"buf not found at {BUF}: scripts/setup.sh installs it (npm @bufbuild/buf, .tools/buf)")
    return BUF


def buf_lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf_or_skip()), "lint"], cwd=root, capture_output=True, text=True, timeout=120)


def test_buf_lint_passes():
    done = buf_lint(ROOT)
    assert done.returncode == 0, f"buf lint failed:\n{done.stdout}{done.stderr}"


def test_buf_lint_fails_on_an_undocumented_field(tmp_path):
    """The lint really runs with the committed rules: a field without a comment fails it."""
    buf_or_skip()
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "bifusion" / "v1" / "encoder.proto"
    text = proto.read_text()
    comment = "  // Echoed in the response and named in errors; at most 256 characters.\n"
    assert comment in text
    proto.write_text(text.replace(comment, ""))
    done = buf_lint(tmp_path)
    assert done.returncode != 0 and 'Field "frame_id" should have a non-empty comment' in done.stdout
