"""Memory after load: once a fuzz-like campaign on full-size real frames is over and the
server idle, it gives the memory the load freed back to the system (heap.py). The long
campaign, RSS after warm-up against RSS after it, is bench/soak.py (numbers in
docs/serving.md, *Memory after load*)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import grpc
from serving_harness import server_process, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.soak import campaign, rss_bytes, send
from bifusion_server.heap import IDLE_SECONDS

MESSAGES = 300  # about a minute on two cores; 10 good frames among them
OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]


def test_the_memory_a_campaign_freed_goes_back_once_the_server_is_idle(tum_folder_frames):
    calls = campaign(tum_folder_frames, random.Random(20261204), MESSAGES)
    flags = ("--device", "cpu", "--warmup-frames", "0", "--max-queue", "256")
    with server_process(*flags) as live, grpc.insecure_channel(live.address, options=OPTIONS) as channel:
        pid = live.process.pid
        codes = send(channel, calls, 32)
        loaded = rss_bytes(pid)["rss"]  # the last call just ended: the trim is a second away
        assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
        assert codes["OK"] >= 5, codes  # real frames were served, not only refused
        # glibc kept 80-150 MB of freed heap after this campaign (runs on two cores); without
        # the trim RSS stays put to the MB.
        idle = wait_until(
            lambda: (rss := rss_bytes(pid)["rss"]) <= 0.97 * loaded and rss,
            timeout=IDLE_SECONDS + 15,
            what=f"RSS 3 % below {loaded >> 20} MiB (now {rss_bytes(pid)['rss'] >> 20} MiB)",
        )
    print(f"RSS as the campaign ended {loaded >> 20} MiB, once idle {idle >> 20} MiB")
