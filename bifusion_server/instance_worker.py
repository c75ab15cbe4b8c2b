"""The model instance child process: load the encoder, warm it up, then encode batches.

Started with the 'spawn' method by :class:`bifusion_server.instances.ProcessInstance`, whose
environment already holds this process's thread sizes (``BIFUSION_THREADS`` and the OpenMP
and OpenBLAS counts) before torch loads; the encoder applies them when it is built.

Messages on the pipe (tuples; arrays never travel through it, see ``instance_transfer.py``):
  child → parent  ("ready", ModelInfo, thread settings) | ("failed", reason)  once, after warm-up
  parent → child  ("encode", segment, packed frames, output offset, retired segments) | ("stop",)
  child → parent  ("done", packed results | None, in-band pickle | None, gpu memory, seconds)
                  | ("error", kind, message, field)
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("bifusion.server")


def instance_main(conn, spec: dict) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the parent drains, the
    # instances must keep computing until it stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec["log_level"],
        format=f"%(asctime)s %(levelname)s %(name)s[instance {spec['name']}]: %(message)s",
    )
    try:
        encoder = _load(spec)
    except Exception as exc:
        log.exception("cannot load or warm up the model")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    import torch

    threads = {"BIFUSION_THREADS": os.environ["BIFUSION_THREADS"], "torch": torch.get_num_threads()}
    conn.send(("ready", encoder.info, threads))
    _serve(conn, encoder)


def _load(spec: dict):
    from bifusion import BiFusionEncoder

    from .warmup import synthetic_frames

    encoder = BiFusionEncoder(
        spec["checkpoint"], device=spec["device"], amp=spec["amp"], threads=spec["threads"]
    )
    if spec["warmup_frames"]:
        started = time.monotonic()
        encoder.encode(synthetic_frames(spec["warmup_frames"]))
        log.info("warm-up: %d synthetic frames in %.2f s", spec["warmup_frames"], time.monotonic() - started)
    return encoder


def _serve(conn, encoder) -> None:
    import pickle

    import numpy as np

    from .device_memory import gpu_memory
    from .failures import classify_failure
    from .heap import IDLE_SECONDS, trim
    from .instance_transfer import SegmentMaps, pack, unpack

    maps = SegmentMaps()
    while True:
        try:
            if not conn.poll(IDLE_SECONDS):
                trim()  # as the server process does once idle (heap.py)
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "stop":
            return
        _, segment, packed_frames, out_offset, retired = message
        maps.retire(retired)
        buf = maps.view(segment)
        started = time.perf_counter()
        try:
            frames, options = unpack(packed_frames, np.frombuffer(buf, dtype=np.uint8))
            results = encoder.encode(frames, options, validate=False)
        except Exception as exc:
            failure = classify_failure(exc)
            log.warning("a batch failed: %s", failure.message, exc_info=failure.kind == failure.INTERNAL)
            conn.send(("error", *failure.as_tuple()))
            continue
        finally:
            frames = options = None  # the input views must not outlive the batch
        seconds = time.perf_counter() - started
        packed = pack(results, buf, out_offset)
        # Results larger than the parent's bound (never expected) still arrive, in the pipe.
        inband = pickle.dumps(results, protocol=5) if packed is None else None
        results = None
        conn.send(("done", packed, inband, gpu_memory(encoder.device), seconds))
