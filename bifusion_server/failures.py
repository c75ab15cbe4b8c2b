"""What a model call can end with besides results, on either side of the process boundary.

Kept free of torch imports at module level: the instance child imports it before torch.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 500


class ModelFailed(Exception):
    """The model raised on a batch. ``kind`` decides the status of a frame that fails alone."""

    INTERNAL = "internal"  # a bug in the model or its inputs' handling
    OUT_OF_MEMORY = "out_of_memory"  # the device (or /dev/shm) had no room for the batch
    INVALID_INPUT = "invalid_input"  # the encoder refused a frame; ``field`` names the input

    def __init__(self, kind: str, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

    def as_tuple(self) -> tuple[str, str, str | None]:
        return self.kind, self.message, self.field


class InstanceLost(Exception):
    """The instance computing a batch died (or is restarting): its frames were not computed."""


def classify_failure(exc: BaseException) -> ModelFailed:
    """Map an exception raised by ``BiFusionEncoder.encode`` to a :class:`ModelFailed`."""
    import torch

    from bifusion import InputError

    if isinstance(exc, ModelFailed):
        return exc
    if isinstance(exc, InputError):
        return ModelFailed(ModelFailed.INVALID_INPUT, exc.message, exc.field)
    text = f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS]
    out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))
    )
    if out_of_memory:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # give the retry of a smaller batch the room back
        return ModelFailed(ModelFailed.OUT_OF_MEMORY, text)
    return ModelFailed(ModelFailed.INTERNAL, text)
