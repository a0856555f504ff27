"""Exceptions that the command line turns into one clear line and exit code 2."""

from __future__ import annotations

__all__ = ["UserError", "DataNotFoundError", "CheckpointError", "ConfigError"]


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with status 2; the library
    raises it so Python callers get the same message.
    """


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset was not found; the message says where we looked and how to get it."""


class CheckpointError(UserError):
    """A checkpoint is unreadable, untrusted, truncated or belongs to another run."""


class ConfigError(UserError, ValueError):
    """A run configuration has unknown keys or invalid values."""
