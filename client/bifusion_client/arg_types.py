"""argparse types that reject bad numbers at the flag, naming it, before anything is sent; and
the server address, completed with the service's port."""

from __future__ import annotations

import argparse
import math
import re


def positive_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def finite_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


DEFAULT_PORT = 50051
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?!\d*$)")  # unix:, ipv4:, dns:, … (not host:port)


def address(text: str) -> str:
    """A gRPC target with the service's port when none is given: gRPC itself would try 443.
    ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` and ``dns:[//authority/]host[:port]``;
    other schemes (``unix:``, ``ipv4:``, …) are passed on as they are."""
    prefix, rest = "", text.strip()
    dns = re.match(r"^dns:(//[^/]*/)?", rest)
    if dns:
        prefix, rest = dns.group(0), rest[dns.end() :]
    elif _SCHEME.match(rest):
        return text
    rest = rest[:-1] if rest.endswith(":") and not rest.endswith("::") else rest  # "host:"
    if not rest:
        raise argparse.ArgumentTypeError(f"needs a host, got {text!r}")
    if rest.startswith("["):
        has_port = re.search(r"\]:\d+$", rest) is not None
    elif rest.count(":") > 1:  # a bare IPv6 address
        return f"{prefix}[{rest}]:{DEFAULT_PORT}"
    else:
        has_port = ":" in rest
    return f"{prefix}{rest}" if has_port else f"{prefix}{rest}:{DEFAULT_PORT}"
