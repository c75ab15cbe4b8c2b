"""Server configuration: command-line flags, each also settable as ``BIFUSION_<FLAG>`` (the flag wins)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
ENV_PREFIX = "BIFUSION_"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_INSTANCES = 16
LOG_FORMATS = ("text", "json")
AUTO = "auto"


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str | None = None  # None: the embedded demo checkpoint
    device: str = "auto"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str | None = None  # None: the same as host
    metrics_port: int = 9100  # 0 disables the metrics endpoint
    # "auto": measured at warm-up (batch_policy.py); a number pins it.
    max_batch_size: int | str = AUTO
    max_batch_delay_ms: float = 5.0
    max_queue: int = 64
    max_message_bytes: int = 64 * MIB
    # Admission budget (budget.py): decoded pixels and points per request and over all admitted.
    max_request_pixels: int = 8 * MIB  # 8 Mpx: a 3840×2160 frame fits
    max_request_points: int = 200_000
    max_queued_pixels: int = 32 * MIB
    max_queued_points: int = 4_000_000
    # Connections (gRPC server options).
    max_connections: int = 512
    max_concurrent_streams: int = 64  # per connection; more wait for a free one
    connection_idle_seconds: float = 300.0  # 0: idle connections are kept
    connection_age_seconds: float = 3600.0  # 0: connections may live for ever
    connection_age_grace_seconds: float = 300.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate it signed (mTLS)
    token: str | None = None
    token_file: str | None = None
    amp: bool = False
    instances: str = "auto"  # copies of the encoder on the device; "auto" or a count
    warmup_frames: int = 1
    batch_sweep_seconds: float = 0.0  # budget of the auto sweep; 0: the device's (batch_policy.py)
    drain_seconds: float = 30.0
    # A batch running longer is stuck (a hung kernel or driver): its instance is killed and
    # restarted, or, in the server process, health turns NOT_SERVING. 0: no watchdog.
    stall_timeout_seconds: float = 120.0
    log_level: str = "INFO"
    allow_shared_memory: bool = False  # same-host clients may have outputs written to their /dev/shm
    log_format: str = "text"
    access_log: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not DEVICE_PATTERN.match(self.device):
            problems.append(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"--{_flag(name)} must be within 0..65535")
        if self.max_batch_size != AUTO:
            size = _whole_number(self.max_batch_size)
            if size is None or size < 1:
                problems.append(
                    f"--max-batch-size must be auto or a whole number ≥ 1, not {self.max_batch_size!r}"
                )
            else:
                object.__setattr__(self, "max_batch_size", size)  # "8" from a flag or the environment
        for name in (
            "max_queue",
            "max_request_pixels",
            "max_request_points",
            "max_queued_pixels",
            "max_queued_points",
            "max_connections",
            "max_concurrent_streams",
        ):
            if getattr(self, name) < 1:
                problems.append(f"--{_flag(name)} must be ≥ 1")
        for name in (
            "max_batch_delay_ms",
            "warmup_frames",
            "batch_sweep_seconds",
            "drain_seconds",
            "stall_timeout_seconds",
            "connection_idle_seconds",
            "connection_age_seconds",
            "connection_age_grace_seconds",
        ):
            if getattr(self, name) < 0:
                problems.append(f"--{_flag(name)} must be ≥ 0")
        count = self.instances.isascii() and self.instances.isdigit() and int(self.instances)
        if self.instances != "auto" and not 1 <= count <= MAX_INSTANCES:
            problems.append(f"--instances must be auto or 1..{MAX_INSTANCES}, not {self.instances!r}")
        if self.max_message_bytes < MIB:
            problems.append("--max-message-bytes must be at least 1 MiB")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if self.token and self.token_file:
            problems.append("give --token or --token-file, not both")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.max_queued_pixels < self.max_request_pixels:
            problems.append("--max-queued-pixels must be at least --max-request-pixels")
        if self.max_queued_points < self.max_request_points:
            problems.append("--max-queued-points must be at least --max-request-points")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def effective_metrics_host(self) -> str:
        return self.host if self.metrics_host is None else self.metrics_host

    def bearer_token(self) -> str | None:
        """The token clients must send, read from ``token_file`` when that is how it was given."""
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
            if not token:
                raise ValueError(f"--token-file {self.token_file} is empty")
            return token
        return self.token or None

    def redacted(self) -> dict[str, object]:
        """The effective config for the log: the token itself never appears."""
        values = dataclasses.asdict(self)
        values["token"] = "<set>" if self.token else None
        return values


def _whole_number(value: int | str) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


HELP = {
    "checkpoint": "checkpoint file (.safetensors); default: the embedded random-init demo checkpoint",
    "device": "auto, cpu, cuda or cuda:N",
    "host": "address to listen on",
    "port": "gRPC port (0 picks a free one, logged at start)",
    "metrics_host": "address the /metrics endpoint listens on (default: --host); 127.0.0.1 keeps it local",
    "metrics_port": "Prometheus /metrics port; 0 disables it",
    "max_batch_size": "most frames per model call; auto = measured at warm-up on this device: the "
    "largest batch whose time per frame is within 3 per cent of the best (logged, in GetModelInfo and "
    "bifusion_max_batch_size)",
    "max_batch_delay_ms": "longest wait for more frames once a batch has one",
    "max_queue": "most frames waiting for the model; beyond it requests get RESOURCE_EXHAUSTED",
    "max_message_bytes": "largest request or response message, bytes",
    "max_request_pixels": "most decoded image pixels (width×height) one request may have; "
    "beyond it INVALID_ARGUMENT",
    "max_request_points": "most points one request may have the model process; beyond it INVALID_ARGUMENT",
    "max_queued_pixels": "most decoded pixels of all requests admitted and not yet answered; "
    "beyond it RESOURCE_EXHAUSTED",
    "max_queued_points": "most points of all requests admitted and not yet answered; "
    "beyond it RESOURCE_EXHAUSTED",
    "max_connections": "most client connections at once; more are closed as they connect",
    "max_concurrent_streams": "most calls at once on one connection; more wait (HTTP/2 flow control)",
    "connection_idle_seconds": "close a connection with no call for this long (0: never)",
    "connection_age_seconds": "ask clients to reconnect after this long, to rebalance (0: never)",
    "connection_age_grace_seconds": "how long calls may run on a connection past its age",
    "tls_cert": "PEM server certificate (enables TLS)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    "token": "bearer token the encoder RPCs require ('authorization: Bearer <token>' metadata)",
    "token_file": "file holding the bearer token",
    "amp": "fp16 autocast on CUDA",
    "instances": "copies of the encoder on the device, each in a process of its own (1: in the server "
    "process); auto = 1 (measured best on CPU and on an H200)",
    "warmup_frames": "synthetic frames run through the model before reporting SERVING (0 skips)",
    "batch_sweep_seconds": "time budget of the --max-batch-size auto sweep; 0 = the device's: 30 s on "
    "CPU, 10 s on a GPU",
    "drain_seconds": "on SIGTERM, how long in-flight requests may take to finish",
    "stall_timeout_seconds": "a batch computing longer is stuck: its instance process is killed and "
    "restarted (its frames get UNAVAILABLE); with one instance, in the server process, health is "
    "NOT_SERVING until it returns (0: never)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "allow_shared_memory": "let clients on this host register /dev/shm regions and have outputs written "
    "there (RegisterSharedMemory); off: those calls get FAILED_PRECONDITION",
    "log_format": "text or json (one JSON object a line)",
    "access_log": "one log line per RPC (logger bifusion.access)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bifusion-server",
        description="BiFusion encoder gRPC service. Every flag can also be set as BIFUSION_<FLAG> "
        "(e.g. BIFUSION_MAX_BATCH_SIZE=4); the flag wins.",
    )
    defaults = ServerConfig()
    for field in dataclasses.fields(ServerConfig):
        name = field.name
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        help_text = f"{HELP[name]}{_default_text(default)} [env {env_name(name)}]"
        if kind is bool:
            parser.add_argument(f"--{_flag(name)}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{_flag(name)}", type=kind, metavar=name.upper(), help=help_text)
    return parser


def _default_text(default) -> str:
    """`` (default: …)`` for --help; the parser's own defaults stay None so that an unset flag
    leaves the BIFUSION_* variable in charge."""
    if default is None:
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    return f" (default: {default})"


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags over ``BIFUSION_*`` environment variables over the defaults."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = {}
    defaults = ServerConfig()
    for field in dataclasses.fields(ServerConfig):
        name = field.name
        if args[name] is not None:
            values[name] = args[name]
            continue
        raw = env.get(env_name(name))
        if raw is None or raw == "":
            continue
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        try:
            values[name] = _parse_bool(raw) if kind is bool else kind(raw)
        except ValueError as exc:
            parser.error(f"{env_name(name)}={raw!r}: {exc}")
    try:
        config = ServerConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))
    return dataclasses.replace(config, log_level=config.log_level.upper())
