"""Errors the encoder raises on bad input or bad checkpoints."""


class InputError(ValueError):
    """A frame or option is invalid; ``field`` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class CheckpointError(ValueError):
    """A checkpoint or weight file cannot be loaded into the architecture."""
