"""Exception types. Every user-facing failure is one of these, with a one-line message."""


class FPDenoiseError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""


class InputError(FPDenoiseError, ValueError):
    """An input file, folder or array cannot be used (message names the path and the problem)."""


class CheckpointError(FPDenoiseError):
    """A model checkpoint is missing, unsafe, corrupt or does not match what is expected."""


class OutputError(FPDenoiseError, OSError):
    """An output cannot be written (permission, disk full, would overwrite the input...)."""
