"""The two kinds of error qimg raises on purpose: bad checkpoints and bad user input."""


class QimgError(Exception):
    """Base class; the CLI and the server turn these into clean messages."""


class CheckpointError(QimgError):
    """A model folder, config or weight file is missing, malformed or does not fit the model."""


class InputError(QimgError, ValueError):
    """A request (prompt, image, size, option) is not acceptable."""


class Cancelled(QimgError):
    """A run stopped between steps because its caller asked it to (the `cancel` callback returned True)."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an error's message, at most `limit` characters, for a one-line report (driver
    and runtime errors often run to many lines); the error's type name when its message is blank."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit - 3] + "..."
