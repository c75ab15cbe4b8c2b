"""Memory after load: does the server's RSS come back after a fuzz-like campaign?

Starts ``python -m bifusion_server`` on the CPU (or --device), sends --warmup-messages, reads
the server's RSS, sends --messages more of the same mix, waits --settle-seconds, and reads it
again. The mix, from the real TUM frames at full size: good frames with 500 to 20 000 points
in every feature dtype (responses up to 20 MB), the seeded mutants of tests/test_serving_fuzz.py
made from a full-size frame (most fail in decoding, after their buffers were allocated), and
streams of both. Requests go in waves of --wave at once, as the fuzz test sends them.

Prints JSON: RSS (and the kernel's high-water mark) after start, after warm-up, after the
campaign, the growth over warm-up in per cent, and the status codes seen.

    python bench/soak.py [--messages 10000] [--warmup-messages 1000] [--out bench/results/soak-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client"), str(ROOT / "tests")]

import grpc  # noqa: E402
from test_serving_fuzz import mutants  # noqa: E402

from bench.encoder import DEFAULT_DATA  # noqa: E402
from bench.machine import describe, emit  # noqa: E402
from bench.serve import ServerChild  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402
from bifusion_wire import SERVICE_NAME  # noqa: E402

SEED = 20261204
GOOD_SHARE = 0.04  # of the messages: good frames, each a real model call
STREAM_SHARE = 0.05  # of the messages: sent in streams of 4
DTYPES = ("float32", "float16", "int8", "bfloat16")
POINTS = (500, 5000, 20_000)


def rss_bytes(pid: int) -> dict[str, int]:
    """The process's resident set now and its high-water mark (/proc/PID/status)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "high_water": fields["VmHWM"]}


def campaign(folder_frames, rng: random.Random, count: int) -> list[list[bytes]]:
    """``count`` messages as calls: one-message lists are unary calls, longer ones streams."""
    full = [request_from_folder_frame(f) for f in folder_frames]
    calls: list[list[bytes]] = []
    sent = 0
    while sent < count:
        base = rng.choice(full)
        if rng.random() < GOOD_SHARE:
            good = request_from_folder_frame(
                rng.choice(folder_frames),
                max_points=rng.choice(POINTS),
                output_dtype=rng.choice(DTYPES),
                color_format=rng.choice(("png", "raw")),
            )
            messages = [good.SerializeToString()]
        else:
            messages = mutants(base, rng, 1)
        if rng.random() < STREAM_SHARE:
            messages += mutants(base, rng, 3)
            rng.shuffle(messages)
        calls.append(messages)
        sent += len(messages)
    return calls


def send(channel, calls: list[list[bytes]], wave: int) -> Counter:
    unary = channel.unary_unary(f"/{SERVICE_NAME}/EncodeFrame")
    stream = channel.stream_stream(f"/{SERVICE_NAME}/EncodeStream")
    codes: Counter = Counter()
    for start in range(0, len(calls), wave):
        futures, streams = [], []
        for messages in calls[start : start + wave]:
            if len(messages) == 1:
                futures.append(unary.future(messages[0], timeout=600))
            else:
                streams.append(stream(iter(messages), timeout=600))
        for future in futures:
            error = future.exception()
            codes[grpc.StatusCode.OK.name if error is None else error.code().name] += 1
        for call in streams:
            try:
                for _ in call:
                    pass
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--warmup-messages", type=int, default=1000)
    parser.add_argument("--wave", type=int, default=32)
    parser.add_argument("--settle-seconds", type=float, default=2.0)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    for setting in args.server_env:  # the child inherits this process's environment
        name, _, value = setting.partition("=")
        os.environ[name] = value
    folder_frames = load_frames_folder(args.data)
    rng = random.Random(SEED)
    warmup = campaign(folder_frames, rng, args.warmup_messages)
    calls = campaign(folder_frames, rng, args.messages)
    server = ServerChild(args.device, max_batch_size=8, max_queue=256)
    try:
        server.wait_serving()
        pid = server.process.pid
        options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            started = rss_bytes(pid)
            codes = send(channel, warmup, args.wave)
            time.sleep(args.settle_seconds)
            warm = rss_bytes(pid)
            began = time.monotonic()
            codes += send(channel, calls, args.wave)
            seconds = time.monotonic() - began
            time.sleep(args.settle_seconds)
            after = rss_bytes(pid)
    finally:
        server.stop()
    mib = 1 << 20
    emit(
        {
            "machine": describe(args.device),
            "server_env": args.server_env,
            "messages": {"warmup": sum(map(len, warmup)), "campaign": sum(map(len, calls))},
            "campaign_seconds": round(seconds, 1),
            "rss_mib": {
                "started": round(started["rss"] / mib, 1),
                "after_warmup": round(warm["rss"] / mib, 1),
                "after_campaign": round(after["rss"] / mib, 1),
                "high_water": round(after["high_water"] / mib, 1),
            },
            "growth_over_warmup_percent": round(100.0 * (after["rss"] / warm["rss"] - 1.0), 1),
            "codes": dict(codes),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
