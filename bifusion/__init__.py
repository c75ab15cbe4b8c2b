"""BiFusion encoder: CLIP ViT-B/16 and a MinkowskiEngine U-Net fused per point."""

# First, before torch loads: OpenMP reads its wait policy once, when its runtime starts.
from .threads import prepare_environment

prepare_environment()

from .encoder import BiFusionEncoder, ModelInfo  # noqa: E402
from .errors import CheckpointError, InputError  # noqa: E402
from .threads import configure_threads, cpu_budget  # noqa: E402
from .types import EncodeOptions, Frame, FrameResult, FrameStats, Intrinsics, Limits  # noqa: E402

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
    "configure_threads",
    "cpu_budget",
]
