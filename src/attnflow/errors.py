"""Every error attnflow raises on bad input.

Each message says what was wrong and what to do about it, in one line, so the
command line can print it as is and exit with code 2.
"""


class AttnflowError(Exception):
    """Base class: bad input or an unsupported setting, explained in one line."""


class BadArgumentError(AttnflowError, ValueError):
    """An argument has a value attnflow does not accept (unknown `heads=`, a layer out of range...)."""


class PromptError(AttnflowError, ValueError):
    """A prompt cannot be recorded: empty, or longer than the model's maximum positions."""


class UnsupportedModelError(AttnflowError, TypeError):
    """The model's attention cannot be recorded (no `attention_interface` call site, unknown model type)."""


class ModelNotFoundError(AttnflowError, FileNotFoundError):
    """A model directory or id could not be found locally."""


class DataError(AttnflowError, ValueError):
    """A data file or saved trace is missing, malformed, or of an unknown schema version."""


class StorageError(AttnflowError, OSError):
    """A file or folder cannot be written or read: no permission, a read-only or a full disk."""


class ShapeError(AttnflowError, ValueError):
    """A tensor has the wrong shape; the message names the expected one."""


class NonFiniteError(AttnflowError, ValueError):
    """A tensor holds NaN or inf; the message names the layer."""


class RemoteError(AttnflowError, RuntimeError):
    """A remote (NDIF) run cannot start: no API key, a model NDIF does not host, a version mismatch."""
