"""Optional dependencies, imported when a flag needs them (``bifusion-client[ros]``, ``[rerun]``)."""

from __future__ import annotations

import importlib

EXTRAS = {"ros": "rosbags", "rerun": "rerun-sdk"}


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed. Also a ValueError: a usage error the CLI reports
    in one line, like any other bad flag."""


def require(module: str, extra: str, purpose: str):
    """``module``, imported; or an error saying which extra to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs the {EXTRAS[extra]} package: pip install 'bifusion-client[{extra}]'"
        ) from None
