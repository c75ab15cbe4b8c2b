"""What MKL's strict reproducible mode costs the CPU encoder: the same real frames encoded
with ``MKL_CBWR=AUTO,STRICT`` (what ``import bifusion`` sets unless the environment says
otherwise) and with MKL's reproducible mode off, each in its own process (MKL reads the
mode once), alternating strict, off, off, strict, ... so machine noise hits both alike.

Prints JSON: per mode, the median per-stage ms over rounds (CLIP is where torch's MKL
gemms run), the mode MKL reported (MKL_VERBOSE), and off ÷ strict.

    python bench/mkl_cnr_ab.py [--rounds 6] [--batch-size 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA  # noqa: E402
from bench.machine import describe  # noqa: E402

# One measurement in a child process. "off" drops the variable after bifusion set it and
# before MKL's first call, which is when MKL reads it.
CHILD = """
import json, os, statistics, sys
import bifusion
if sys.argv[1] == "off":
    del os.environ["MKL_CBWR"]
from bench.encoder import real_frames
from pathlib import Path
data, points, size, repeats = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
encoder = bifusion.BiFusionEncoder(device="cpu")
frames = real_frames(data)
batch = [frames[i % len(frames)] for i in range(size)]
options = bifusion.EncodeOptions(max_points=points)
encoder.encode(batch, options)
stages = [dict(encoder.encode(batch, options)[0].timings_ms) for _ in range(repeats)]
print(json.dumps({k: statistics.median(s[k] for s in stages) for k in stages[0]}))
"""


def measure(mode: str, args) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MKL_VERBOSE": "1"}
    env.pop("MKL_CBWR", None)
    command = [sys.executable, "-c", CHILD, mode, str(args.data), str(args.points)]
    command += [str(args.batch_size), str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.exit(f"measuring {mode} failed:\n{done.stderr[-2000:]}")
    reported = re.search(r"CNR:(\S+)", done.stdout)
    return json.loads(done.stdout.strip().splitlines()[-1]), reported.group(1) if reported else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"strict": [], "off": []}
    reported: dict[str, set[str]] = {"strict": set(), "off": set()}
    for round_index in range(args.rounds):
        for mode in ("strict", "off") if round_index % 2 == 0 else ("off", "strict"):
            stages, mode_seen = measure(mode, args)
            runs[mode].append(stages)
            reported[mode].add(mode_seen)
    medians = {
        mode: {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
        for mode, rows in runs.items()
    }
    report = {
        "benchmark": "mkl_cnr_ab",
        "machine": describe("cpu"),
        "batch_size": args.batch_size,
        "points_per_frame": args.points,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "mkl_reported": {mode: sorted(seen) for mode, seen in reported.items()},
        "stage_ms": medians,
        "off_over_strict": {
            k: round(medians["off"][k] / medians["strict"][k], 3)
            for k in medians["strict"]
            if medians["strict"][k] > 0
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
