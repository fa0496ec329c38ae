"""Exception types. Every error qnalo raises on bad input is one of these, with a one-line message
that says what was wrong and what to do."""


class QnaloError(Exception):
    """Base class of qnalo's own errors."""


class InputError(QnaloError, ValueError):
    """An input array (or argument) the model cannot take: wrong rank, channels, dtype or size."""


class CheckpointError(QnaloError):
    """A weights file that cannot be read or does not match the model: truncated, foreign,
    missing/unexpected/mis-shaped keys."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something outside the allow-list of a state dict."""
