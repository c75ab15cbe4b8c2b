"""The embedded default: a deterministic random-init checkpoint, made once and cached.

Its features carry no meaning; it exists so the service and its tests run end to end
where no trained weights can be fetched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import ModelConfig
from .model import BiFusionModel

DEMO_SEED = 0
DEMO_NAME = "bifusion-demo-v1.safetensors"
log = logging.getLogger("bifusion")


def cache_dir() -> Path:
    base = (
        os.environ.get("BIFUSION_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bifusion"
    )
    return Path(base)


def demo_model(config: ModelConfig | None = None, seed: int = DEMO_SEED) -> BiFusionModel:
    """A freshly initialised model whose weights depend only on ``seed``."""
    config = config or ModelConfig(demo_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BiFusionModel(config)


def default_checkpoint_path() -> Path:
    """Path of the demo checkpoint, creating it on first use."""
    path = cache_dir() / DEMO_NAME
    if not path.is_file():
        log.info("creating the demo checkpoint at %s", path)
        model = demo_model()
        save_checkpoint(path, model.config, model.state_dict())
    return path
