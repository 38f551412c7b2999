"""Errors at the library's boundary: files, user arguments, `.vqz` bytes.

Each carries a one-line message that names the bad input and what was expected;
the CLI turns any `VQVAEError` into that line on stderr and exit code 2.
"""


class VQVAEError(Exception):
    """Base class of every error the CLI reports as a one-liner with exit code 2."""


class DataError(VQVAEError):
    """A dataset URI, file or array that cannot be used as training or input data."""


class ConfigError(VQVAEError):
    """A configuration value out of its allowed range."""


class RunError(VQVAEError):
    """A run directory that is missing, incomplete or made by an incompatible version."""


class CodecError(VQVAEError):
    """A `.vqz` file that is truncated, corrupted, of another version or of another model."""
