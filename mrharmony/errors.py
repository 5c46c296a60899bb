"""Domain errors.

Every error a user can cause by bad input is a subclass of :class:`MrHarmonyError`
and of the matching built-in (``ValueError`` or ``FileNotFoundError``), so callers can
catch either. The CLI prints these as one line and exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HarmonizeError",
    "ModelFileError",
    "MrHarmonyError",
    "PhantomError",
    "ProtocolError",
    "RawDataError",
    "ReconError",
    "ScannerError",
    "SequenceFileError",
    "SimulationError",
    "SiteError",
    "StreamError",
    "StudyError",
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


class PhantomError(MrHarmonyError, ValueError):
    """A phantom is inconsistent or its files are corrupt (names the map and the problem)."""


class SiteError(ConfigError):
    """A virtual-site definition is unknown or malformed."""


class SimulationError(MrHarmonyError, ValueError):
    """A sequence cannot be simulated on a phantom as requested."""


class RawDataError(MrHarmonyError, ValueError):
    """ISMRMRD raw data are unreadable, incomplete or inconsistent."""


class ReconError(MrHarmonyError, ValueError):
    """A reconstruction cannot be done as requested (method, backend, missing data)."""


class StreamError(MrHarmonyError, ValueError):
    """A violation of the MRD streaming protocol (names the message and the problem)."""


class HarmonizeError(MrHarmonyError, ValueError):
    """Harmonization input is unusable: confounded covariates, unknown batch, bad shapes."""


class ModelFileError(MrHarmonyError, ValueError):
    """A saved model file is corrupt or from an incompatible format version."""


class StudyError(ConfigError):
    """A study definition is invalid (names the entry) or a study stage failed."""
