"""BiFusion encoder: CLIP ViT-B/16 and a MinkowskiEngine U-Net fused per point."""

from .encoder import BiFusionEncoder, ModelInfo
from .errors import CheckpointError, InputError
from .types import EncodeOptions, Frame, FrameResult, FrameStats, Intrinsics, Limits

__all__ = [
    "BiFusionEncoder",
    "CheckpointError",
    "EncodeOptions",
    "Frame",
    "FrameResult",
    "FrameStats",
    "InputError",
    "Intrinsics",
    "Limits",
    "ModelInfo",
]
