"""Scanner hardware profiles: the limits a sequence must respect on one scanner model.

Profiles are data: one TOML file per scanner in ``mrharmony/sequences/scanners/``,
validated into a frozen :class:`ScannerProfile`. A user can also pass the path of their
own TOML file wherever a scanner name is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import pypulseq as pp

from mrharmony.config import from_mapping, load_toml, param, resolve_named_toml
from mrharmony.errors import ConfigError, ScannerError

__all__ = ["GAMMA_HZ_PER_T", "ScannerProfile", "list_scanners", "load_scanner"]

#: Proton gyromagnetic ratio / 2π in Hz/T (CODATA 2018: 42.577 478 MHz/T; pypulseq uses 42.576).
GAMMA_HZ_PER_T = 42.576e6


@dataclass(frozen=True, kw_only=True)
class ScannerProfile:
    """Hardware limits of one scanner model, with units in the field names."""

    name: str = param(doc="short identifier, e.g. 'siemens-prisma'")
    vendor: str = param(doc="manufacturer")
    model: str = param(doc="model name")
    field_strength_t: float = param(doc="nominal main field", unit="T", gt=0, le=12)
    max_grad_mt_per_m: float = param(
        doc="maximum gradient amplitude per axis", unit="mT/m", gt=0, le=500
    )
    max_slew_t_per_m_per_s: float = param(
        doc="maximum slew rate per axis", unit="T/m/s", gt=0, le=1000
    )
    grad_raster_time_us: float = param(doc="gradient waveform raster", unit="us", gt=0, le=100)
    rf_raster_time_us: float = param(doc="RF waveform raster", unit="us", gt=0, le=100)
    adc_raster_time_us: float = param(doc="ADC dwell raster", unit="us", gt=0, le=100)
    block_duration_raster_us: float = param(doc="block duration raster", unit="us", gt=0, le=100)
    rf_ringdown_time_us: float = param(doc="RF ring-down after a pulse", unit="us", ge=0, le=1000)
    rf_dead_time_us: float = param(doc="RF dead time before a pulse", unit="us", ge=0, le=1000)
    adc_dead_time_us: float = param(doc="ADC dead time before/after", unit="us", ge=0, le=1000)
    adc_samples_limit: int = param(
        0, doc="maximum samples in one ADC event (0: no limit)", ge=0
    )
    adc_samples_divisor: int = param(4, doc="ADC sample counts must be a multiple of this", ge=1)
    max_b1_ut: float = param(
        20.0, doc="largest RF amplitude B1 the transmit coil delivers (default: a typical "
        "body-coil value, not from a data sheet)", unit="uT", gt=0, le=200,
    )
    source: str = param(doc="public spec sheet or 'typical value' note for the numbers")

    def __post_init__(self) -> None:
        ratio = self.block_duration_raster_us / self.grad_raster_time_us
        if abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(
                f"block_duration_raster_us: {self.block_duration_raster_us} us is not a "
                f"multiple of grad_raster_time_us {self.grad_raster_time_us} us"
            )

    @property
    def larmor_hz(self) -> float:
        """Proton Larmor frequency at the nominal field, in Hz."""
        return GAMMA_HZ_PER_T * self.field_strength_t

    @property
    def max_grad_hz_per_m(self) -> float:
        """Maximum gradient amplitude in Hz/m (pypulseq's internal unit)."""
        return self.max_grad_mt_per_m * 1e-3 * GAMMA_HZ_PER_T

    @property
    def max_slew_hz_per_m_per_s(self) -> float:
        """Maximum slew rate in Hz/m/s (pypulseq's internal unit)."""
        return self.max_slew_t_per_m_per_s * GAMMA_HZ_PER_T

    def to_opts(self) -> pp.Opts:
        """Return the pypulseq system limits for this scanner (never the global default)."""
        return pp.Opts(
            max_grad=self.max_grad_mt_per_m,
            grad_unit="mT/m",
            max_slew=self.max_slew_t_per_m_per_s,
            slew_unit="T/m/s",
            grad_raster_time=self.grad_raster_time_us * 1e-6,
            rf_raster_time=self.rf_raster_time_us * 1e-6,
            adc_raster_time=self.adc_raster_time_us * 1e-6,
            block_duration_raster=self.block_duration_raster_us * 1e-6,
            rf_ringdown_time=self.rf_ringdown_time_us * 1e-6,
            rf_dead_time=self.rf_dead_time_us * 1e-6,
            adc_dead_time=self.adc_dead_time_us * 1e-6,
            adc_samples_limit=self.adc_samples_limit,
            adc_samples_divisor=self.adc_samples_divisor,
            gamma=GAMMA_HZ_PER_T,
            B0=self.field_strength_t,
        )


def _shipped_dir() -> Path:
    return Path(str(resources.files("mrharmony.sequences") / "scanners"))


@cache
def list_scanners() -> tuple[str, ...]:
    """Names of the scanner profiles shipped with mrharmony, sorted."""
    return tuple(sorted(p.stem for p in _shipped_dir().glob("*.toml")))


@cache
def _load_shipped(name: str) -> ScannerProfile:
    path = _shipped_dir() / f"{name}.toml"
    return _load_file(path)


def _load_file(path: Path) -> ScannerProfile:
    data = load_toml(path)
    try:
        profile = from_mapping(ScannerProfile, data, source=str(path))
    except ScannerError:
        raise
    except ConfigError as exc:
        raise ScannerError(str(exc)) from None
    return profile


def load_scanner(name_or_path: str | Path) -> ScannerProfile:
    """Load a shipped scanner profile by name, or a user profile from a TOML path.

    Parameters
    ----------
    name_or_path : str or Path
        A shipped name (see :func:`list_scanners`) or the path of a TOML file with the
        fields of :class:`ScannerProfile`.

    Raises
    ------
    ScannerError
        Unknown name, unreadable file or invalid values (the message names the key).
    """
    if isinstance(name_or_path, ScannerProfile):
        return name_or_path
    ref = resolve_named_toml(name_or_path, list_scanners(), kind="scanner", error=ScannerError)
    return _load_shipped(ref) if isinstance(ref, str) else _load_file(ref)
