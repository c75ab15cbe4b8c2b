"""Device memory readings shared by the in-process instance and the instance child process."""

from __future__ import annotations


def gpu_memory(device) -> tuple[int, int] | None:
    """(allocated, reserved) bytes of a CUDA device, ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
