"""Importers for weights trained elsewhere.

- open_clip ViT-B/16 weight files (full CLIP or visual-only state dicts) for the 2D tower;
- OneFormer3D / ESAM checkpoints, whose ``backbone.*`` keys are a Res16UNet34C on
  MinkowskiEngine (conv weights named ``kernel``), for the U-Net;
- mmengine-style ``{"state_dict": ...}`` files of a whole BiFusion model, with a key
  prefix to strip.

Files are read without pickle: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError

# The U-Net's 1×1 ``final`` conv exists in OneFormer3D/ESAM but is not used here.
UNET_UNUSED_PREFIXES = ("final.",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file; unwraps ``state_dict``/``model`` containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): {exc}. "
            "Files holding arbitrary Python objects (pickled configs, TorchScript archives) are "
            "refused; re-save just the tensors (e.g. torch.save(ckpt['state_dict'], ...)) in a "
            "trusted environment."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed; everything else dropped."""
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"no key starts with {prefix!r} (keys look like: {sample})")
    return out


def open_clip_visual(path: str | Path, layers: int) -> dict[str, torch.Tensor]:
    """The 2D tower's weights (``visual`` module, first ``layers`` blocks) from an
    open_clip ViT weight file, keyed as in ``ClipTower.visual``."""
    state = read_state_dict(path)
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    visual = strip_prefix(state, prefix) if prefix else dict(state)
    if "conv1.weight" not in visual:
        raise CheckpointError(f"{path} does not look like an open_clip ViT (no {prefix}conv1.weight)")
    block = re.compile(r"transformer\.resblocks\.(\d+)\.")

    def kept(key: str) -> bool:
        match = block.match(key)
        if match:
            return int(match.group(1)) < layers
        return not key.startswith(("ln_post.", "proj", "attn_pool", "head"))

    return {k: v for k, v in visual.items() if kept(k)}


def oneformer3d_backbone(path: str | Path, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Res16UNet34C weights from a OneFormer3D/ESAM checkpoint, keyed as in ``Res16UNet34C``."""
    unet = strip_prefix(read_state_dict(path), prefix)
    return {k: v for k, v in unet.items() if not k.startswith(UNET_UNUSED_PREFIXES)}
