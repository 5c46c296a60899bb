"""Simultaneous multi-slice (SMS) excitation for the 2-D builders: multiband pulses + CAIPI.

A protocol with ``multiband_factor = MB > 1`` and ``n_slices = N`` (a multiple of MB)
excites ``G = N / MB`` slice groups; group ``g`` holds the slices ``g + j G``
(``j = 0 .. MB - 1``), ``G x (slice thickness + gap)`` apart, excited together.

- **Multiband pulse** (:class:`Multiband`): the single-band pulse ``s(t)`` modulated to
  every slice of the group and summed (complex), relative to the group centre ``c``::

      s_MB(t) = s(t) sum_j exp(i (2 pi G_z (p_j - c) (t - t_c) + phi_j + theta_j(line)))

  played with the frequency offset ``G_z c`` of the group centre (and its phase, as any
  slice offset, :func:`~._common.set_slice_offset`). ``t_c`` is the single-band pulse's
  centre (stored as the RF ``center``, so TE and k-space are measured from it whatever
  the shape of the sum). ``phi_j`` are the band phases: ``"zero"`` (the plain sum, peak
  ``MB x`` the single-band peak) or ``"wong"`` (Wong 2012's phase schedule, which lowers
  the peak for MB >= 3; the table is :func:`sigpy.mri.rf.multiband.mb_phs_tab`'s; for
  MB = 2 no phase lowers the peak, so it is the plain sum). The peak B1 over every pulse
  played is checked against the scanner's ``max_b1_ut`` and refused naming the limit
  (:class:`~mrharmony.errors.ProtocolError`, key ``multiband_factor``).
- **CAIPI by RF phase cycling** (gradient-echo, one line per excitation): slice ``j`` of
  the group gets the extra RF phase ``theta_j(m) = 2 pi j shift m`` on phase-encoding
  line ``m = LIN - ny // 2`` (centred, so the k-space centre line has none). The data
  of slice ``j`` then carry ``exp(-i theta_j(m))`` (Pulseq RF phases enter the signal
  conjugated, as the simulator plays them), a phase ramp along ky that moves the slice by
  ``j shift FOV`` along phase in the collapsed image (FFT convention:
  ``np.roll(slice_j, +j shift ny, axis=phase)``), which is what the slice separation in
  :mod:`mrharmony.recon.sms` undoes.
- **Single-band reference** (the calibration slice-GRAPPA/SENSE need): every slice is
  first acquired alone (the single-band pulse), ``multiband_reference_lines`` centre
  lines (default all), labelled ``REF = 1, IMA = 0`` (ISMRMRD
  ``ACQ_IS_PARALLEL_CALIBRATION``) with ``SLC`` the true slice index. The collapsed
  imaging lines carry ``SLC = g`` (the slice group) and ``REF = IMA = 0``.

``[DEFINITIONS]`` (only when MB > 1): ``MultibandFactor``, ``CaipiShift`` (fraction of
the phase FOV), ``MultibandPhases`` (rad), ``MultibandGroups`` (G),
``MultibandReferenceLines``, ``MultibandPeakB1`` (uT); ``SlicePositions`` stays the N true
slice positions. :mod:`mrharmony.formats.layout` turns them into the header's
``parallelImaging.multiband`` and user parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import label, set_slice_offset
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T, ScannerProfile

__all__ = ["Multiband", "band_phases", "caipi_phases", "make_multiband", "slice_groups"]


def band_phases(factor: int, schedule: str) -> np.ndarray:
    """Phases (rad) of the bands of a multiband pulse.

    Parameters
    ----------
    factor : int
        Multiband factor MB (number of bands).
    schedule : {"zero", "wong"}
        ``zero``: all 0 (plain sum); ``wong``: Wong (ISMRM 2012, p. 2209) peak-minimising
        phases for MB >= 3 (from SigPy's table), 0 for MB <= 2.

    Returns
    -------
    ndarray
        (MB,) phases in rad.
    """
    if schedule == "wong" and factor >= 3:
        from sigpy.mri.rf.multiband import mb_phs_tab

        return np.asarray(mb_phs_tab(int(factor), "phs_mod"), dtype=np.float64)
    return np.zeros(int(factor))


def caipi_phases(factor: int, shift: float, line: int) -> np.ndarray:
    """CAIPI RF phases (rad) of the MB slices of a group on centred phase line ``line``.

    ``theta_j = 2 pi j shift line`` (wrapped to [0, 2 pi)), ``j = 0 .. MB - 1``.
    """
    return np.mod(2 * math.pi * np.arange(factor) * shift * line, 2 * math.pi)


def slice_groups(n_slices: int, factor: int) -> list[np.ndarray]:
    """Slice indices of each group: group ``g`` holds slices ``g + j G``, ``G = N / MB``."""
    n_groups = n_slices // factor
    return [g + n_groups * np.arange(factor) for g in range(n_groups)]


@dataclass
class Multiband:
    """The multiband excitation of a protocol (see the module docstring)."""

    factor: int
    shift: float
    phases_rad: np.ndarray
    groups: list[np.ndarray]
    reference_lines: int
    single: SimpleNamespace
    gz_amplitude: float
    peak_b1_ut: float = 0.0

    def _modulation(self, offsets_m: np.ndarray, line: int) -> np.ndarray:
        rf = self.single
        tc = float(rf.center)
        theta = caipi_phases(self.factor, self.shift, line)
        t = np.asarray(rf.t, dtype=np.float64)[:, None]
        arg = (2 * math.pi * self.gz_amplitude * offsets_m[None, :] * (t - tc)
               + self.phases_rad[None, :] + theta[None, :])
        return np.exp(1j * arg).sum(axis=1)

    def pulse(self, group: int, positions_m: np.ndarray, line: int) -> SimpleNamespace:
        """The multiband RF event of slice group ``group`` for centred phase line ``line``.

        Parameters
        ----------
        group : int
            Slice-group index.
        positions_m : ndarray
            All N slice positions (m).
        line : int
            Phase-encoding line ``LIN - ny // 2`` (sets the CAIPI phases).

        Returns
        -------
        SimpleNamespace
            A copy of the single-band pulse with the summed waveform, the group centre's
            frequency offset and phase, and ``center`` at the single-band centre.
        """
        pos = np.asarray(positions_m, dtype=np.float64)[self.groups[group]]
        centre = float(pos.mean())
        rf = copy.copy(self.single)
        rf.signal = np.asarray(self.single.signal) * self._modulation(pos - centre, line)
        set_slice_offset(rf, self.gz_amplitude, centre)
        return rf

    def check_b1(self, scanner: ScannerProfile, positions_m: np.ndarray, lines: np.ndarray,
                 *, flip_deg: float, duration_ms: float) -> None:
        """Refuse the protocol when any multiband pulse played exceeds ``max_b1_ut``.

        Sets :attr:`peak_b1_ut` (the largest peak over all groups and CAIPI states).
        """
        states = {tuple(np.round(caipi_phases(self.factor, self.shift, int(m)), 9)): int(m)
                  for m in lines}
        peak = 0.0
        for g in range(len(self.groups)):
            for m in states.values():
                peak = max(peak, float(np.max(np.abs(self.pulse(g, positions_m, m).signal))))
        self.peak_b1_ut = peak / GAMMA_HZ_PER_T * 1e6
        if self.peak_b1_ut > scanner.max_b1_ut:
            single = float(np.max(np.abs(self.single.signal))) / GAMMA_HZ_PER_T * 1e6
            raise ProtocolError(
                f"multiband_factor: the MB{self.factor} pulse ({duration_ms:g} ms, "
                f"{flip_deg:g} deg per band; single band {single:.1f} uT) needs a peak B1 of "
                f"{self.peak_b1_ut:.1f} uT, above the {scanner.max_b1_ut:g} uT "
                f"{scanner.name} allows (max_b1_ut); lower flip_deg or multiband_factor, or "
                f"lengthen rf_duration_ms"
            )

    def reference_labels(self) -> list[SimpleNamespace]:
        """``REF = 1, IMA = 0``: a line of the single-band reference (calibration only)."""
        return [label("REF", 1), label("IMA", 0)]

    def imaging_labels(self) -> list[SimpleNamespace]:
        """``REF = IMA = 0``: a collapsed (multiband) imaging line."""
        return [label("REF", 0), label("IMA", 0)]

    def reference_line_set(self, ny: int) -> np.ndarray:
        """Phase lines of the single-band reference: the centred block of the reference
        lines (``ny // 2 - L // 2 ..``)."""
        start = ny // 2 - self.reference_lines // 2
        return np.arange(start, start + self.reference_lines)

    def definitions(self) -> dict[str, Any]:
        """``[DEFINITIONS]`` of the multiband acquisition."""
        return {
            "MultibandFactor": int(self.factor),
            "CaipiShift": float(self.shift),
            "MultibandPhases": [float(p) for p in self.phases_rad],
            "MultibandGroups": len(self.groups),
            "MultibandReferenceLines": int(self.reference_lines),
            "MultibandPeakB1": round(float(self.peak_b1_ut), 4),
        }


def make_multiband(protocol: Any, rf: SimpleNamespace, gz: SimpleNamespace) -> Multiband | None:
    """The :class:`Multiband` of a protocol (``None`` when ``multiband_factor`` is 1).

    Parameters
    ----------
    protocol : Protocol
        With ``multiband_factor``, ``caipi_shift_fraction``, ``multiband_phases``,
        ``reference_lines`` and ``n_slices``, ``matrix``.
    rf, gz : SimpleNamespace
        The single-band excitation pulse and its select gradient (Hz/m).
    """
    factor = int(getattr(protocol, "multiband_factor", 1))
    if factor <= 1:
        return None
    if not hasattr(rf, "center"):
        from pypulseq import calc_rf_center

        rf.center = calc_rf_center(rf)[0]
    return Multiband(
        factor=factor,
        shift=float(protocol.caipi_shift_fraction),
        phases_rad=band_phases(factor, protocol.multiband_phases),
        groups=slice_groups(int(protocol.n_slices), factor),
        reference_lines=int(protocol.reference_lines),
        single=copy.copy(rf),
        gz_amplitude=float(gz.amplitude),
    )
