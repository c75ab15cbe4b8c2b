"""Progress bars with rate and ETA on stderr (tqdm), silent when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None, description: str, enabled: bool = True, unit: str = "frame") -> tqdm:
    """A bar over ``total`` items (None: count and rate only). ``enabled=False`` or a stderr that
    is not a TTY (logs, pipes, CI) turns it off; the results on stdout are never mixed with it."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=None if enabled else True,  # None: off unless stderr is a TTY
        dynamic_ncols=True,
        smoothing=0.1,
    )


def emit(line: str) -> None:
    """Print a result line to stdout without tearing a bar that is on screen."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def warn(line: str) -> None:
    """A warning on stderr, above any bar on screen."""
    tqdm.write(f"warning: {line}", file=sys.stderr)
