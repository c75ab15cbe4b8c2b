"""``bifusion-server`` / ``python -m bifusion_server``: run until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .config import ServerConfig, load_config
from .log_format import configure_logging

log = logging.getLogger("bifusion.server")


async def run(config: ServerConfig) -> int:
    """Serve until a signal; returns the process exit code."""
    from .app import BiFusionServer  # torch loads here, after the flags are known to be good

    server = BiFusionServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        await server.stop()
        return 1
    stopping = asyncio.create_task(stop.wait())
    loading = asyncio.create_task(server.wait_ready())
    await asyncio.wait((stopping, loading), return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and not loading.cancelled() and loading.exception() is not None:
        log.error("cannot load or warm up the model: %s", loading.exception())
        stopping.cancel()
        await server.stop()
        return 1
    await stopping
    log.info("signal received: draining (up to %.0f s)", config.drain_seconds)
    await server.drain()
    loading.cancel()
    if server.stuck:
        # The model's thread cannot be stopped, and Python waits for it at exit: for ever.
        log.error("exiting with a model batch still stuck (past --stall-timeout-seconds)")
        logging.shutdown()
        os._exit(1)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    sys.exit(asyncio.run(run(config)))
