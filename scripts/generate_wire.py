#!/usr/bin/env python3
"""Generate the Python wire package ``bifusion_wire`` from ``protos/bifusion/v1/encoder.proto``.

The proto is mapped to the virtual path ``bifusion_wire/encoder.proto`` so the stubs import
each other as ``bifusion_wire.encoder_pb2``: a top-level package of its own, apart from the
torch-only ``bifusion`` package, so robots can import it without torch.

The stubs come from an old, pinned generator (GENERATOR_REQUIREMENTS) so that they run on the
protobuf and grpcio that Linux distributions ship (protobuf 3.20 / grpcio 1.51, the floor of
client/pyproject.toml) as well as on the newest: its protoc (21.x) emits gencode without the
runtime version check of protobuf >= 5.26, and its gRPC plugin emits stubs without the
GRPC_GENERATED_VERSION check and the ``_registered_method`` argument of grpcio >= 1.62. That
generator cannot share the development venv (it pins protobuf < 5), so it lives in a venv of
its own, built once and cached under ~/.cache/bifusion.

Also written: ``encoder.binpb``, a FileDescriptorSet of the proto *with* its comments
(source info), which the server's reflection serves so that ``grpcurl describe`` shows them.

Usage: python scripts/generate_wire.py [--out DIR]   (DIR defaults to client/, the client distribution)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "bifusion" / "v1"
PACKAGE = "bifusion_wire"
CLIENT_ROOT = ROOT / "client"
GENERATED = ("encoder_pb2.py", "encoder_pb2.pyi", "encoder_pb2_grpc.py", "encoder.binpb")
# grpcio-tools 1.51.3 bundles protoc 21.12. Pinned whole, so the output is byte-for-byte stable.
GENERATOR_REQUIREMENTS = ("grpcio-tools==1.51.3", "grpcio==1.51.3", "protobuf==4.21.12")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bifusion"


def generator_venv(python: str | None = None) -> Path:
    """The generator venv's interpreter, built on first use (needs PyPI or a pip cache once).

    ``python`` is the base interpreter (default: this one); grpcio-tools 1.51.3 ships wheels
    for CPython 3.7–3.11.
    """
    python = python or sys.executable
    key = hashlib.sha256("\n".join(GENERATOR_REQUIREMENTS).encode()).hexdigest()[:12]
    version = subprocess.run(
        [python, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    venv = CACHE / f"wire-generator-py{version}-{key}"
    interpreter = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return interpreter
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(interpreter), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *GENERATOR_REQUIREMENTS], check=True)
    (venv / ".complete").write_text("\n".join(GENERATOR_REQUIREMENTS) + "\n")
    return interpreter


def generate(out: Path, python: str | None = None) -> list[Path]:
    """Run the pinned protoc into ``out``; returns the generated files (under ``out/bifusion_wire``)."""
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    proto = f"{PACKAGE}/encoder.proto"
    path = f"--proto_path={PACKAGE}={PROTO_DIR}"
    runs = (
        [path, f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", proto],
        [path, "--include_source_info", f"--descriptor_set_out={out / PACKAGE / 'encoder.binpb'}", proto],
    )
    interpreter = generator_venv(python)
    for args in runs:
        done = subprocess.run(
            [str(interpreter), "-m", "grpc_tools.protoc", *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}\n{done.stderr}")
    return [out / PACKAGE / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=CLIENT_ROOT, help="output root (default: client/)")
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
