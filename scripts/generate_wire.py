#!/usr/bin/env python3
"""Generate the Python wire package ``bifusion_wire`` from ``protos/bifusion/v1/encoder.proto``.

The proto is mapped to the virtual path ``bifusion_wire/encoder.proto`` so the stubs import
each other as ``bifusion_wire.encoder_pb2``: a top-level package of its own, apart from the
torch-only ``bifusion`` package, so robots can import it without torch.

Usage: python scripts/generate_wire.py [--out DIR]   (DIR defaults to client/, the client distribution)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "bifusion" / "v1"
PACKAGE = "bifusion_wire"
CLIENT_ROOT = ROOT / "client"
GENERATED = ("encoder_pb2.py", "encoder_pb2.pyi", "encoder_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Run protoc into ``out``; returns the generated files (under ``out/bifusion_wire``)."""
    from grpc_tools import protoc

    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"--proto_path={PACKAGE}={PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"{PACKAGE}/encoder.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
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
