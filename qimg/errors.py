"""The two kinds of error qimg raises on purpose: bad checkpoints and bad user input."""


class QimgError(Exception):
    """Base class; the CLI and the server turn these into clean messages."""


class CheckpointError(QimgError):
    """A model folder, config or weight file is missing, malformed or does not fit the model."""


class InputError(QimgError, ValueError):
    """A request (prompt, image, size, option) is not acceptable."""


class Cancelled(QimgError):
    """A run stopped between steps because its caller asked it to (the `cancel` callback returned True)."""
