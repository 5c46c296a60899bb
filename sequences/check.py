"""Checking any Pulseq file against a scanner: timing rules, duration, gradient use.

Works on `.seq` files from any writer (pypulseq, MATLAB Pulseq, JEMRIS, ...), not only
ours. Timing is checked with pypulseq's ``check_timing`` on the scanner's rasters and dead
times (or, without a scanner, on the rasters the file declares).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pypulseq as pp

from mrharmony.sequences.io import read_seq
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T, ScannerProfile, load_scanner

__all__ = ["CheckReport", "GradientUsage", "check_file", "check_sequence", "gradient_usage"]


@dataclass(frozen=True)
class GradientUsage:
    """Peak gradient amplitude and slew rate per axis (x, y, z)."""

    max_grad_mt_per_m: tuple[float, float, float]
    max_slew_t_per_m_per_s: tuple[float, float, float]
    #: Largest jump (mT/m) between the end of one block and the start of the next.
    max_jump_mt_per_m: float


def gradient_usage(seq: pp.Sequence) -> GradientUsage:
    """Measure peak |G| and |dG/dt| per axis from the sequence's gradient waveforms.

    Trapezoids are piecewise linear, so the slew between corner points is exact;
    arbitrary waveforms are sampled on the gradient raster and the slew is the finite
    difference between samples. A step between points at the same time (a waveform
    that does not start where the previous one ended) is reported as ``max_jump``.

    Parameters
    ----------
    seq : pypulseq.Sequence

    Returns
    -------
    GradientUsage
        Amplitudes in mT/m and slew rates in T/m/s.
    """
    waves = seq.waveforms()
    gmax, smax = [], []
    jump = 0.0
    for w in waves[:3]:
        w = np.asarray(w, dtype=float)
        if w.size == 0 or w.shape[-1] == 0:
            gmax.append(0.0)
            smax.append(0.0)
            continue
        t, g = w[0], w[1]
        gmax.append(float(np.max(np.abs(g))) / GAMMA_HZ_PER_T * 1e3)
        dt = np.diff(t)
        dg = np.diff(g)
        moving = dt > 1e-9
        slew = np.abs(dg[moving] / dt[moving]) if np.any(moving) else np.zeros(1)
        smax.append(float(np.max(slew)) / GAMMA_HZ_PER_T)
        if np.any(~moving):
            jump = max(jump, float(np.max(np.abs(dg[~moving]))) / GAMMA_HZ_PER_T * 1e3)
    return GradientUsage(
        max_grad_mt_per_m=tuple(gmax),  # type: ignore[arg-type]
        max_slew_t_per_m_per_s=tuple(smax),  # type: ignore[arg-type]
        max_jump_mt_per_m=jump,
    )


@dataclass(frozen=True)
class CheckReport:
    """Result of checking one sequence against one scanner (or its own rasters)."""

    scanner: str | None
    timing_ok: bool
    timing_errors: tuple[str, ...]
    duration_s: float
    n_blocks: int
    te_s: tuple[float, ...] | None
    tr_s: float | None
    ti_s: tuple[float, ...] | None
    usage: GradientUsage
    max_grad_mt_per_m: float | None
    max_slew_t_per_m_per_s: float | None
    definitions: dict[str, Any] = field(default_factory=dict)

    @property
    def gradients_ok(self) -> bool:
        """True when every axis stays within the scanner's amplitude and slew limits."""
        if self.max_grad_mt_per_m is None or self.max_slew_t_per_m_per_s is None:
            return True
        tol = 1 + 1e-6
        return max(self.usage.max_grad_mt_per_m) <= self.max_grad_mt_per_m * tol and max(
            self.usage.max_slew_t_per_m_per_s
        ) <= self.max_slew_t_per_m_per_s * tol

    @property
    def ok(self) -> bool:
        """True when timing and gradient limits both pass."""
        return self.timing_ok and self.gradients_ok


def _as_tuple(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    return tuple(float(v) for v in np.atleast_1d(value))


def _format_error(err: Any) -> str:
    kind = getattr(err, "error_type", "?")
    where = f"block {getattr(err, 'block', '?')} {getattr(err, 'event', '')}"
    fld = getattr(err, "field", "")
    value = getattr(err, "value", None)
    detail = f" ({fld} = {value * 1e6:.3f} us)" if isinstance(value, float) else ""
    if kind == "RASTER":
        detail += f" not on {getattr(err, 'raster', '')}"
    return f"{where}: {kind}{detail}"


def check_sequence(
    seq: pp.Sequence, scanner: ScannerProfile | str | None = None, *, max_errors: int = 20
) -> CheckReport:
    """Check a sequence's timing and gradient use against a scanner.

    Parameters
    ----------
    seq : pypulseq.Sequence
        Any sequence (built here or read from a file).
    scanner : ScannerProfile or str, optional
        The scanner to check against. Without it the sequence's current system limits
        are used for timing and no amplitude/slew verdict is given.
    max_errors : int
        How many timing errors to keep in the report.

    Returns
    -------
    CheckReport
    """
    profile = load_scanner(scanner) if scanner is not None else None
    if profile is not None:
        seq.system = profile.to_opts()
    ok, errors = seq.check_timing()
    duration, n_blocks, _ = seq.duration()
    defs = dict(seq.definitions)
    return CheckReport(
        scanner=profile.name if profile else None,
        timing_ok=bool(ok),
        timing_errors=tuple(_format_error(e) for e in errors[:max_errors]),
        duration_s=float(duration),
        n_blocks=int(n_blocks),
        te_s=_as_tuple(defs.get("TE")),
        tr_s=float(np.atleast_1d(defs["TR"])[0]) if "TR" in defs else None,
        ti_s=_as_tuple(defs.get("TI")),
        usage=gradient_usage(seq),
        max_grad_mt_per_m=profile.max_grad_mt_per_m if profile else None,
        max_slew_t_per_m_per_s=profile.max_slew_t_per_m_per_s if profile else None,
        definitions=defs,
    )


def check_file(path: str | Path, scanner: ScannerProfile | str | None = None) -> CheckReport:
    """Read a `.seq` file (any writer) and check it; see :func:`check_sequence`.

    Without a scanner the file's own declared rasters (``GradientRasterTime``,
    ``RadiofrequencyRasterTime``, ``AdcRasterTime``, ``BlockDurationRaster``) are used.

    Raises
    ------
    SequenceFileError
        If the file is missing or cannot be parsed.
    """
    seq = read_seq(path, scanner)
    if scanner is None:
        d = seq.definitions
        seq.system = pp.Opts(
            grad_raster_time=float(np.atleast_1d(d.get("GradientRasterTime", 10e-6))[0]),
            rf_raster_time=float(np.atleast_1d(d.get("RadiofrequencyRasterTime", 1e-6))[0]),
            adc_raster_time=float(np.atleast_1d(d.get("AdcRasterTime", 100e-9))[0]),
            block_duration_raster=float(np.atleast_1d(d.get("BlockDurationRaster", 10e-6))[0]),
        )
    return check_sequence(seq, scanner)
