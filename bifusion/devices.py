"""Which device the encoder runs on, and the float32 precision it runs with there."""

from __future__ import annotations

import torch

from .minkowski import ME

CPU_ONLY_MINKOWSKI = (
    "MinkowskiEngine {version} in this environment was built without CUDA (CPU only), so the "
    "3D branch cannot run on {device}. Fix: re-run scripts/setup.sh on this GPU host (it builds "
    "MinkowskiEngine with CUDA when nvidia-smi sees a GPU; BIFUSION_DEVICE=cuda forces that), "
    "or use the CUDA image (docker build --build-arg VARIANT=cuda); or start with --device cpu."
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when torch sees a GPU. A CUDA device needs a CUDA build of
    MinkowskiEngine too: fail now, with the fix, rather than at the first request."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        if not minkowski_has_cuda():
            raise RuntimeError(CPU_ONLY_MINKOWSKI.format(version=ME.__version__, device=device))
    return device


def minkowski_has_cuda() -> bool:
    return bool(ME.is_cuda_available())


def full_precision_float32() -> None:
    """float32 matmuls and convolutions in full IEEE precision, never TF32: TF32 changes a
    value with the batch shape far more than summation order does. Process-wide, set once
    when an encoder is built; ``amp`` is the explicit fast mode."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the legacy flags must not be mixed in
        matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
