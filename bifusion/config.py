"""Architecture and preprocessing config stored beside the weights in a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ClipConfig:
    """open_clip ViT-B/16 truncated after ``layers`` transformer blocks."""

    model_name: str = "ViT-B-16"
    layers: int = 6
    # OpenAI CLIP weights were trained with QuickGELU; LAION/DataComp ones with GELU.
    quick_gelu: bool = True
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    width: int = 768


@dataclass(frozen=True)
class UNetConfig:
    """Res16UNet34C as in OneFormer3D/ESAM ``oneformer3d/mink_unet.py``."""

    in_channels: int = 3
    planes: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    init_dim: int = 32
    conv1_kernel_size: int = 5
    bn_momentum: float = 0.02


@dataclass(frozen=True)
class ModelConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    feature_dim: int = 256
    feature_map_size: tuple[int, int] = (30, 40)  # H, W of the upsampled 2D map
    voxel_size: float = 0.02
    voxel_mode: str = "round"  # "round" (seed design) or "floor" (ME / ESAM / OneFormer3D)
    color_mean: tuple[float, float, float] = (0.4779 * 255, 0.4303 * 255, 0.3750 * 255)
    color_std: tuple[float, float, float] = (0.2834 * 255, 0.2757 * 255, 0.2702 * 255)
    head_dropout: float = 0.1
    gate_hidden: int = 64
    gate_tau: float = 5.0
    se_hidden: int = 16
    max_points: int = 20_000
    min_depth: float = 0.1
    max_depth: float = 10.0
    occlusion_tau: float = 0.25
    # True for weights that were not trained: features carry no meaning.
    demo_weights: bool = False

    def __post_init__(self) -> None:
        if self.voxel_mode not in ("round", "floor"):
            raise CheckpointError(f"voxel_mode must be 'round' or 'floor', not {self.voxel_mode!r}")
        if self.voxel_size <= 0:
            raise CheckpointError("voxel_size must be positive")
        if not 0 < self.min_depth < self.max_depth:
            raise CheckpointError("need 0 < min_depth < max_depth")
        if self.max_points <= 0:
            raise CheckpointError("max_points must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise CheckpointError(f"config_version {version} is not supported (want {CONFIG_VERSION})")
        try:
            clip = ClipConfig(**_tuples(data.pop("clip", {})))
            unet = UNetConfig(**_tuples(data.pop("unet", {})))
            return cls(clip=clip, unet=unet, **_tuples(data))
        except TypeError as exc:
            raise CheckpointError(f"invalid model config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"model config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError("model config must be a JSON object")
        return cls.from_dict(data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON gives lists where the dataclasses hold tuples (kept hashable and frozen)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
