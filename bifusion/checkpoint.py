"""Checkpoint files: safetensors weights with the model config in the file's metadata.

No pickle anywhere: weights load with ``safetensors``; foreign ``.pth`` files are read
with ``torch.load(weights_only=True)`` by the importers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError

FORMAT_NAME = "bifusion"
FORMAT_VERSION = "1"
METADATA_KEY = "bifusion"


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: Path | None = None


def save_checkpoint(path: str | Path, config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Write weights and config atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # One metadata key: safetensors writes several in a per-process random order, and
    # the file's sha256 must depend on its contents only.
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_dict()}
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return file_sha256(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY, "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a safetensors file: {exc}") from exc
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has unreadable BiFusion metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a BiFusion checkpoint (no '{METADATA_KEY}' metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata.get('format_version')!r}; this build reads {FORMAT_VERSION}"
        )
    config = ModelConfig.from_dict(metadata.get("config") or {})
    return Checkpoint(config=config, state_dict=tensors, sha256=file_sha256(path), path=path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_into(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
) -> None:
    """Strict load with one error listing every missing, unexpected and mis-shaped key."""
    incoming = dict(state_dict)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    misshaped = sorted(
        f"{k}: {tuple(incoming[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in set(expected) & set(incoming)
        if incoming[k].shape != expected[k].shape
    )
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: " + "; ".join(problems))
    module.load_state_dict(incoming, strict=True)
