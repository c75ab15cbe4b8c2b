"""The response path alone, in bytes/s: building a response's wire bytes on the server and
parsing them on the client, the plain protobuf way ("before") and in place ("after"), for each
feature dtype, on a real TUM frame's encoder output. Also the server's write into a
registered shared-memory region.

Prints JSON (and writes it to --out when given).

    python bench/response.py [--points 20000] [--repeats 20] [--out bench/results/response-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The checkout's packages, installed or not: bifusion*, and the client distribution in client/.
IMPORT_PATHS = [str(ROOT), str(ROOT / "client")]
sys.path[:0] = IMPORT_PATHS

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe, emit  # noqa: E402
from bifusion_client.result import EncodeResult, float32_features  # noqa: E402
from bifusion_server.client_shared_memory import SharedMemoryRegistry  # noqa: E402
from bifusion_server.respond import (  # noqa: E402
    reference_response,
    response_head,
    response_outputs,
    serialise_inline,
    without_padding,
)
from bifusion_wire import encoder_pb2 as pb  # noqa: E402
from bifusion_wire.tensor import from_tensor, shared_output_bytes  # noqa: E402

DTYPES = ("float32", "float16", "int8", "bfloat16")


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()``."""
    fn()  # first call: allocator, caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def protobuf_parse(message: bytes) -> dict[str, np.ndarray]:
    """The client before: protobuf parses (copying every bytes field), numpy views those, and
    features become float32 (float32 was copied again by ``astype``; the compact dtypes go
    through the same conversion as after, so only the parsing differs)."""
    response = pb.EncodeFrameResponse.FromString(message)
    arrays = {n: from_tensor(getattr(response, n), n) for n in ("alpha", "valid", "point_indices")}
    features = from_tensor(response.features, "features")
    dtype = response.features.dtype
    if dtype == "float32":
        arrays["features"] = features.astype(np.float32)
    else:
        scale = from_tensor(response.features_scale, "features_scale") if dtype == "int8" else None
        arrays["features"] = float32_features(features, dtype, scale)
    return arrays


def shared_memory_write(result, head, dtype: str, repeats: int) -> dict:
    """The server writing the outputs into a real /dev/shm region (what replaces the bytes)."""
    size = shared_output_bytes(len(result.features), result.features.shape[1], dtype, False)
    key = f"bifusion-bench-{os.getpid()}"
    path = Path("/dev/shm") / key
    with open(path, "wb") as f:
        f.truncate(size)
    registry = SharedMemoryRegistry()
    try:
        registry.register(pb.RegisterSharedMemoryRequest(name="bench", key=key, byte_size=size))
        ref = pb.SharedMemoryRef(region="bench", offset=0, byte_size=size)

        def write():
            lease = registry.lease(ref, size)
            try:
                lease.write(response_outputs(result, dtype))
                return head.SerializeToString()
            finally:
                lease.release()

        took = seconds(write, repeats)
    finally:
        registry.close()
        path.unlink()
    tensor_bytes = sum(o.nbytes for o in response_outputs(result, dtype))
    return {
        "tensor_bytes": tensor_bytes,
        "bytes_per_s": round(tensor_bytes / took),
        "ms": round(took * 1e3, 3),
    }


def measure(result, dtype: str, repeats: int) -> dict:
    head = response_head(result, model="bench", queue_ms=0.0, decode_ms=0.0, batch_size=1)
    after = serialise_inline(head, response_outputs(result, dtype))
    before = reference_response(head, result, dtype)
    assert without_padding(after) == without_padding(before)
    size = len(after)

    def rate(fn) -> dict:
        took = seconds(fn, repeats)
        return {"bytes_per_s": round(size / took), "ms": round(took * 1e3, 3)}

    build_before = rate(lambda: reference_response(head, result, dtype))
    build_after = rate(lambda: serialise_inline(head, response_outputs(result, dtype)))
    parse_before = rate(lambda: protobuf_parse(after))
    parse_after = rate(lambda: EncodeResult.from_bytes(after))
    return {
        "response_bytes": size,
        "server_build": {
            "before_protobuf": build_before,
            "after_in_place": build_after,
            "speedup": round(build_before["ms"] / build_after["ms"], 2),
        },
        "client_parse": {
            "before_protobuf": parse_before,
            "after_views": parse_after,
            "speedup": round(parse_before["ms"] / parse_after["ms"], 2),
        },
        "server_shared_memory_write": shared_memory_write(result, head, dtype, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--points", type=int, default=20_000, help="max_points of the encoded frame")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    from bifusion import BiFusionEncoder, EncodeOptions

    encoder = BiFusionEncoder(None, device="cpu")
    (result,) = encoder.encode(real_frames(args.data)[:1], EncodeOptions(max_points=args.points))
    report = {
        "benchmark": "response",
        "machine": describe("cpu"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "points": len(result.features),
        "repeats": args.repeats,
        "note": "before: protobuf messages (astype/tobytes, field assignment, SerializeToString; "
        "FromString copies every bytes field, features.astype copies again); "
        "after: one write per tensor into the final bytes, client arrays view the received bytes",
        "dtypes": {dtype: measure(result, dtype, args.repeats) for dtype in args.dtypes},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
