"""Two MinkowskiEngine builds, A and B, timed on the same real frames in one run.

Each round runs one short encoder measurement per build, each in its own process (one
process can load only one MinkowskiEngine), alternating A, B, B, A, ... so machine noise
hits both alike. A build is a folder holding an installed MinkowskiEngine (e.g.
``pip install --no-deps --target DIR wheel``), put first on the process's path. Prints
JSON: per build and batch size, the median per-stage ms over rounds (and the CPU ms
of all threads per batch, which other load hardly moves), and B ÷ A. Also the U-Net's
kernel-map building alone (``unet_maps``: one frame's U-Net on fresh coordinates minus the
same on cached maps, paired in each process), the only code the canonical-maps patch
changes, and its B − A as a share of the whole U-Net; and the U-Net on cached maps
(``unet_cached_ms``: its convolutions and the rest, no map building), where the
deterministic-convolution patch acts, with B ÷ A.

    python bench/minkowski_ab.py --a DIR_A --b DIR_B [--rounds 6] [--batch-sizes 1 4]

The encoder refuses a build without the determinism patches at start-up; here those checks
only record what they found, so an unpatched build can serve as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA  # noqa: E402
from bench.machine import describe  # noqa: E402

# One measurement in a child process: stage ms (median of repeats) per batch size.
CHILD = """
import json, resource, statistics, sys
sys.path.insert(0, sys.argv[1])
import bifusion.encoder as enc
from bifusion.minkowski import (MinkowskiBuildError, ME, check_canonical_maps,
                                check_deterministic_convolution)
patches = {}
for name, check in (("canonical_maps", check_canonical_maps),
                    ("deterministic_convolution", check_deterministic_convolution)):
    try:
        check()
        patches[name] = True
    except MinkowskiBuildError:
        patches[name] = False
enc.check_cpu_determinism = lambda: None
from bench.encoder import real_frames
from pathlib import Path
data, points, repeats = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sizes = [int(s) for s in sys.argv[5].split(",")]
encoder = enc.BiFusionEncoder(device="cpu")
frames = real_frames(data)
options = enc.EncodeOptions(max_points=points)
rows = {}
for size in sizes:
    batch = [frames[i % len(frames)] for i in range(size)]
    encoder.encode(batch, options)
    stages = []
    for _ in range(repeats):
        # CPU seconds of every thread too: unlike wall time, they hardly move when other
        # processes share the cores.
        before = resource.getrusage(resource.RUSAGE_SELF)
        stages.append(dict(encoder.encode(batch, options)[0].timings_ms))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        stages[-1]["cpu_ms_all_threads"] = cpu * 1000
    rows[size] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
# The U-Net's kernel maps alone, the only code the canonical-maps patch changes: one frame's
# U-Net forward on fresh coordinates (every map built) and again on the same coordinate
# manager (every map cached); the paired difference is the time spent building maps.
import time, torch
captured = {}
unet = encoder.model.unet
forward = unet.forward
def capture(x):
    captured.setdefault("x", x)
    return forward(x)
unet.forward = capture
encoder.encode(batch[:1], options)
unet.forward = forward
x = captured["x"]
fresh, cached = [], []
with torch.inference_mode():
    for _ in range(repeats * 3):
        new = ME.SparseTensor(x.F.clone(), coordinates=x.C.clone(), device="cpu")
        started = time.perf_counter()
        unet(new)
        fresh.append((time.perf_counter() - started) * 1000)
        again = ME.SparseTensor(new.F, coordinate_map_key=new.coordinate_map_key,
                                coordinate_manager=new.coordinate_manager)
        started = time.perf_counter()
        unet(again)
        cached.append((time.perf_counter() - started) * 1000)
maps = {"voxels": len(x.C), "unet_fresh_ms": statistics.median(fresh),
        "unet_cached_ms": statistics.median(cached),
        "maps_ms": statistics.median(f - c for f, c in zip(fresh, cached))}
print(json.dumps({"me": ME.__file__, "patches": patches, "stage_ms": rows, "unet_maps": maps}))
"""


def measure(site: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(ROOT),
        str(args.data),
        str(args.points),
        str(args.repeats),
        ",".join(map(str, args.batch_sizes)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.exit(f"measuring {site} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="folder with build A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="folder with build B")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for round_index in range(args.rounds):
        order = ("a", "b") if round_index % 2 == 0 else ("b", "a")
        for name in order:
            runs[name].append(measure(getattr(args, name), args))

    def medians(name: str) -> dict:
        per_size = {}
        for size in map(str, args.batch_sizes):
            stages = [r["stage_ms"][size] for r in runs[name]]
            per_size[size] = {k: round(statistics.median(s[k] for s in stages), 1) for k in stages[0]}
        return per_size

    a, b = medians("a"), medians("b")
    maps = {
        name: {
            k: round(statistics.median(r["unet_maps"][k] for r in runs[name]), 2)
            for k in runs[name][0]["unet_maps"]
        }
        for name in runs
    }
    report = {
        "benchmark": "minkowski_ab",
        "machine": describe("cpu"),
        "points_per_frame": args.points,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "data": str(args.data),
        "builds": {name: {"folder": str(getattr(args, name)), **runs[name][0]["patches"]} for name in runs},
        "stage_ms": {"a": a, "b": b},
        "unet_maps": {
            **maps,
            "b_minus_a_ms": round(maps["b"]["maps_ms"] - maps["a"]["maps_ms"], 2),
            "b_minus_a_over_unet": round(
                (maps["b"]["maps_ms"] - maps["a"]["maps_ms"]) / maps["a"]["unet_fresh_ms"], 4
            ),
            "cached_b_over_a": round(maps["b"]["unet_cached_ms"] / maps["a"]["unet_cached_ms"], 3),
        },
        "b_over_a": {
            size: {k: round(b[size][k] / a[size][k], 3) for k in a[size] if a[size][k] > 0} for size in a
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
