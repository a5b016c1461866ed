"""Errors that mean "the user asked for something that cannot work": the CLI prints their message
as one line and exits with status 2. Their messages name the problem and the fix.

This module imports nothing, so the CLI can name these classes before torch is imported.
"""


class UserError(Exception):
    """A bad configuration or input, reported as one line."""


class ConfigError(UserError, ValueError):
    pass


class CheckpointError(UserError):
    """A checkpoint that cannot be read (a file missing or truncated); the message names it."""


class PotentialError(UserError, FloatingPointError):
    """A potential returned NaN or +inf for some sequences (−inf, φ = 0, is legal)."""
