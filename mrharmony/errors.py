"""Domain errors.

Every error a user can cause by bad input is a subclass of :class:`MrHarmonyError`
and of the matching built-in (``ValueError`` or ``FileNotFoundError``), so callers can
catch either. The CLI prints these as one line and exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "MrHarmonyError",
    "ProtocolError",
    "ScannerError",
    "SequenceFileError",
]


class MrHarmonyError(Exception):
    """Base class of all errors caused by user input."""


class ConfigError(MrHarmonyError, ValueError):
    """A TOML configuration is malformed: unknown key, wrong type, wrong unit or out of range."""


class ProtocolError(ConfigError):
    """A protocol cannot be built on the chosen scanner (names the parameter and the limit)."""


class ScannerError(ConfigError):
    """A scanner profile is unknown or malformed."""


class SequenceFileError(MrHarmonyError, ValueError):
    """A ``.seq`` file cannot be read or does not carry what the caller needs."""
