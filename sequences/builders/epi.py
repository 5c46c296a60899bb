"""Single-shot 2D gradient-echo EPI and the blipped echo-planar readout it shares.

:func:`build_epi` (builder ``epi``) and the diffusion-weighted spin-echo EPI of
:mod:`.diffusion` (builder ``dwi_epi``) play one blipped echo-planar readout
(:class:`EPITrain`, designed by :func:`design_epi_train`):

- Lines alternate readout polarity; lines on the negative polarity carry ``REV = 1``.
  The polarity of the first line is chosen so that the k-space centre line
  (``ny // 2``) is always read on the positive polarity, hence the k-space centre
  sample is exactly sample ``os * nx // 2`` of that line.
- Phase encoding is blipped: a triangular blip of area ``1 / fov_y`` is split in two
  halves across the boundary of two line blocks, both halves lying inside the readout
  ramps (so with ``ramp_sampling = false`` the ADC, which sits on the flat top, never
  sees a blip). Lines are acquired bottom-up: line ``j`` at ``ky = (j - ny//2) / fov_y``
  (FFT convention, ``LIN = j``).
- ``navigator_lines`` lines without blips come before the imaging echo train, for
  Nyquist-ghost (odd/even) phase correction; they carry ``NAV = 1`` (and ``REV`` on
  reversed lines). They are read at the fixed ``ky = -1 / fov_y`` (``LIN = ny//2 - 1``,
  one line below centre, strong signal) rather than at ``ky = 0``, so that no
  navigator sample sits at ``k = 0``: the k-space centre, and hence TE, is reached only
  by the imaging echo train. Odd/even phase differences do not depend on ``ky``.
- With ``ramp_sampling = false`` the ADC covers the flat top only and the samples are
  on the uniform FFT grid (reversed lines: flip the sample order). With
  ``ramp_sampling = true`` the ADC spans the whole line (ramps included), the readout
  amplitude is raised so that the ADC window still covers ``nx / fov_x``, and the
  samples are *not* uniform in kx (definition ``RampSampling = 1``; regrid with the
  trajectory).

The receiver bandwidth per pixel is ``1 / (os * nx * dwell)`` with the dwell on the ADC
raster; the dwell is nudged (within 5 %) so that the ADC can be centred exactly on the
readout gradient on the RF raster (the achieved value is written as
``ReadoutBandwidth``, Hz/px, with ``EchoSpacing``, s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    acs_labels,
    check_positive_delay,
    excitation_pulse,
    fill_delay,
    finalize,
    label,
    new_sequence,
    rf_center_time,
    round_to,
    round_up,
    sampling,
    sampling_definitions,
    set_slice_offset,
    slice_positions_m,
    trapezoid,
)
from mrharmony.sequences.builders._fat import add_excitation, fat_definitions, fat_modules
from mrharmony.sequences.protocol import DWIEPIProtocol, EPIProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = [
    "CRUSHER_CYCLES",
    "TRID",
    "EPITrain",
    "build_epi",
    "design_epi_train",
    "slot_and_tr",
    "z_spoiler",
]

#: Names that moved to :mod:`.diffusion`, still importable from here (resolved lazily:
#: :mod:`.diffusion` imports this module).
_MOVED_TO_DIFFUSION = frozenset({"build_dwi_epi", "diffusion_directions", "stejskal_tanner_b"})

#: Crusher / spoiler area in cycles across the slice thickness.
CRUSHER_CYCLES = 4.0

#: TRID of each kind of shot (dummy, imaging, separate calibration reference).
TRID = {"dummy": 1, "imaging": 2, "reference": 3}


def _trap_area_to(t: float, amplitude: float, rise: float, flat: float, fall: float) -> float:
    """Area of a trapezoid (starting at 0) from its start to time ``t``."""
    if t <= 0:
        return 0.0
    if t <= rise:
        return amplitude * t * t / (2 * rise)
    if t <= rise + flat:
        return amplitude * (rise / 2 + t - rise)
    if t <= rise + flat + fall:
        tau = t - rise - flat
        return amplitude * (rise / 2 + flat + tau - tau * tau / (2 * fall))
    return amplitude * (rise / 2 + flat + fall / 2)


# --------------------------------------------------------------------------------------
# EPI readout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPITrain:
    """A designed blipped EPI readout (all times in s, areas in 1/m, gradients in Hz/m)."""

    gx_pos: SimpleNamespace
    gx_neg: SimpleNamespace
    adc: SimpleNamespace
    gy_first: SimpleNamespace
    gy_mid: SimpleNamespace
    gy_last: SimpleNamespace
    line_s: float
    ramp_s: float
    flat_s: float
    dwell_s: float
    n_samples: int
    ny: int
    n_nav: int
    #: Phase lines of the imaging echo train (true line indices, ascending, step ``step``).
    lines: tuple[int, ...]
    #: Line step of the train (the acceleration R; the blips have area R / fov_y).
    step: int
    #: Lines of each shot of the separate calibration reference (empty: none).
    ref_shots: tuple[tuple[int, ...], ...]
    dk_y: float
    #: Readout area of one line, and from the start of a positive line to its centre.
    area_line: float
    u_center: float
    #: Polarity (+1/-1) of the first line played (navigator or imaging).
    first_sign: int
    #: Time from the start of a positive line block to its k-space-centre sample.
    center_in_line_s: float
    #: x prephaser area bringing kx to the start of the first line.
    pre_x_area: float
    #: y prephaser area before the first played line (navigator ky or first imaging ky).
    pre_y_area: float
    #: y area between navigators and the imaging lines (0 without navigators).
    pre2_y_area: float
    t_pre2_s: float
    bandwidth_hz_per_px: float
    ramp_sampling: bool

    def sign(self, m: int) -> int:
        """Polarity of the ``m``-th line played (navigators first)."""
        return self.first_sign * (1 if m % 2 == 0 else -1)

    def prep(
        self, system: pp.Opts, z_area: float = 0.0
    ) -> tuple[list[SimpleNamespace], float]:
        """Prephaser gradients (x, y and an optional z area) and their common duration
        (long enough for the reference shots' prephasers too)."""
        areas = {"x": self.pre_x_area, "y": self.pre_y_area, "z": z_area}
        durations = [
            pp.calc_duration(pp.make_trapezoid(channel=ch, area=a, system=system))
            for ch, a in areas.items()
            if abs(a) > 0
        ]
        t_pre = round_up(max(durations, default=system.grad_raster_time),
                         system.block_duration_raster)
        if self.ref_shots:
            t_pre = max(t_pre, self.prep_duration(system, z_area))
        grads = [
            trapezoid(channel=ch, area=a, duration=t_pre, system=system)
            for ch, a in areas.items()
            if abs(a) > 0
        ]
        return grads, t_pre

    @property
    def center_position(self) -> int:
        """Position of the k-space-centre line in the imaging train."""
        return self.lines.index(self.ny // 2)

    def time_to_center(self, t_pre: float) -> float:
        """Time from the start of the prephaser block to the k-space-centre sample."""
        lines_before = self.n_nav + self.center_position
        return t_pre + self.t_pre2_s + lines_before * self.line_s + self.center_in_line_s

    def duration(self, t_pre: float) -> float:
        """Duration from the start of the prephaser block to the end of the last line.

        With a separate reference, the longest of the imaging and reference shots."""
        refs = [t_pre + self._ref_delay(shot) + len(shot) * self.line_s
                for shot in self.ref_shots]
        return max([self.imaging_duration(t_pre), *refs])

    def imaging_duration(self, t_pre: float) -> float:
        """Duration from the prephaser start to the end of the imaging train's last line."""
        return t_pre + self.t_pre2_s + (self.n_nav + len(self.lines)) * self.line_s

    def _ref_delay(self, shot: tuple[int, ...]) -> float:
        """Delay before a reference shot's lines that puts its line nearest the k-space
        centre at the imaging centre's time (the same TE), or 0 when it cannot."""
        m_ref = int(np.argmin(np.abs(np.asarray(shot) - self.ny // 2)))
        lines_between = self.n_nav + self.center_position - m_ref
        return max(self.t_pre2_s + lines_between * self.line_s, 0.0)

    def ref_prep(self, system: pp.Opts, shot: tuple[int, ...], t_pre: float,
                 z_area: float = 0.0) -> list[SimpleNamespace]:
        """Prephasers (duration ``t_pre``) of a reference shot: its first line, positive."""
        areas = {"x": -self.u_center, "y": (shot[0] - self.ny // 2) * self.dk_y, "z": z_area}
        return [trapezoid(channel=ch, area=a, duration=t_pre, system=system)
                for ch, a in areas.items() if abs(a) > 0]

    def prep_duration(self, system: pp.Opts, z_area: float = 0.0) -> float:
        """Shortest prephaser block of the reference shots (0 without them)."""
        out = 0.0
        for shot in self.ref_shots:
            for ch, a in (("x", -self.u_center), ("y", (shot[0] - self.ny // 2) * self.dk_y),
                          ("z", z_area)):
                if abs(a) > 0:
                    out = max(out, pp.calc_duration(
                        pp.make_trapezoid(channel=ch, area=a, system=system)))
        return round_up(out, system.block_duration_raster) if out else 0.0

    def add_reference(
        self,
        seq: pp.Sequence,
        system: pp.Opts,
        shot: tuple[int, ...],
        t_pre: float,
        *,
        z_area: float = 0.0,
        labels: list[SimpleNamespace],
    ) -> float:
        """Append one shot of the separate calibration reference (prephasers, centring
        delay, lines ``shot`` with the imaging blips and echo spacing, no navigators).

        Returns the duration from the prephaser start to the end of its last line (s).
        """
        seq.add_block(*self.ref_prep(system, shot, t_pre, z_area), pp.make_delay(t_pre))
        delay = self._ref_delay(shot)
        if delay > 0:
            seq.add_block(pp.make_delay(delay))
        for j, line in enumerate(shot):
            s = 1 if j % 2 == 0 else -1
            events: list[Any] = [self.gx_pos if s > 0 else self.gx_neg]
            if len(shot) > 1:
                events.append(self.gy_first if j == 0 else (
                    self.gy_last if j == len(shot) - 1 else self.gy_mid))
            events += [self.adc, label("NAV", 0), label("REV", int(s < 0)),
                       label("LIN", line), *labels]
            seq.add_block(*events)
        return t_pre + delay + len(shot) * self.line_s

    def add_to(
        self,
        seq: pp.Sequence,
        system: pp.Opts,
        prep_grads: list[SimpleNamespace],
        t_pre: float,
        *,
        acquire: bool,
        labels: list[SimpleNamespace],
    ) -> None:
        """Append prephasers, navigators and the echo train to ``seq``."""
        seq.add_block(*prep_grads, pp.make_delay(t_pre))
        m = 0
        for _ in range(self.n_nav):
            s = self.sign(m)
            events: list[Any] = [self.gx_pos if s > 0 else self.gx_neg]
            if acquire:
                events += [
                    self.adc,
                    label("NAV", 1),
                    label("REV", int(s < 0)),
                    label("LIN", self.ny // 2 - 1),
                    *labels,
                ]
            seq.add_block(*events)
            m += 1
        if self.n_nav:
            gy2 = trapezoid(
                channel="y", area=self.pre2_y_area, duration=self.t_pre2_s, system=system
            )
            seq.add_block(gy2, pp.make_delay(self.t_pre2_s))
        n_lines = len(self.lines)
        for j, line in enumerate(self.lines):
            s = self.sign(m)
            if j == 0:
                gy = self.gy_first
            elif j == n_lines - 1:
                gy = self.gy_last
            else:
                gy = self.gy_mid
            events = [self.gx_pos if s > 0 else self.gx_neg, gy]
            if acquire:
                events += [
                    self.adc,
                    label("NAV", 0),
                    label("REV", int(s < 0)),
                    label("LIN", line),
                    *labels,
                ]
            seq.add_block(*events)
            m += 1

    def definitions(self) -> dict[str, Any]:
        """Builder-specific ``[DEFINITIONS]`` describing the readout."""
        return {
            "EchoSpacing": self.line_s,
            "ReadoutBandwidth": self.bandwidth_hz_per_px,
            "RampSampling": int(self.ramp_sampling),
            "EchoTrainLength": len(self.lines),
            "NavigatorLines": self.n_nav,
            "ReadoutRampTime": self.ramp_s,
            "ReadoutFlatTime": self.flat_s,
            "ADCDwell": self.dwell_s,
            "ADCDelayInLine": self.adc.delay,
            "PhaseEncodingDirection": "bottom-up",
        }


def _choose_dwell(
    system: pp.Opts, scanner: ScannerProfile, bandwidth: float, n_samples: int
) -> float:
    """ADC dwell for ``bandwidth`` Hz/px, nudged (<= 5 %) to allow an exactly centred ADC.

    The ADC start must be on the RF raster; centring an ADC of ``n * dwell`` on a line of
    whole gradient rasters needs ``n * dwell`` to be a multiple of twice the RF raster.
    """
    target = 1.0 / (bandwidth * n_samples)
    adc_r = system.adc_raster_time
    if target < adc_r * (1 - 1e-9) and round_to(target, adc_r) < adc_r:
        raise ProtocolError(
            f"readout_bandwidth_hz_per_px: {bandwidth:g} Hz/px needs a dwell below the "
            f"{adc_r * 1e6:g} us ADC raster of {scanner.name} (maximum "
            f"{1.0 / (adc_r * n_samples):.0f} Hz/px)"
        )
    dwell = max(round_to(target, adc_r), adc_r)
    # Search for a nearby dwell (multiples of the ADC raster) with n * dwell a multiple of
    # twice the RF raster; integer arithmetic in units of 1 ns.
    adc_ns = round(adc_r * 1e9)
    period_ns = round(2 * system.rf_raster_time * 1e9)
    step = period_ns // math.gcd(period_ns, n_samples * adc_ns)  # in ADC rasters
    candidate = max(round(target / (step * adc_r)), 1) * step * adc_r
    if abs(candidate - target) <= 0.05 * target:
        dwell = candidate
    return dwell


def design_epi_train(
    system: pp.Opts,
    scanner: ScannerProfile,
    protocol: EPIProtocol | DWIEPIProtocol,
) -> EPITrain:
    """Design the EPI readout for ``protocol`` within ``system`` limits.

    Raises
    ------
    ProtocolError
        If the bandwidth needs a dwell below the ADC raster or a readout gradient above
        the scanner maximum.
    """
    fov_x, fov_y = protocol.fov_mm[0] * 1e-3, protocol.fov_mm[1] * 1e-3
    nx, ny = int(protocol.matrix[0]), int(protocol.matrix[1])
    os_ = int(protocol.readout_oversampling)
    n_samples = nx * os_
    bw = float(protocol.readout_bandwidth_hz_per_px)
    g_raster = system.grad_raster_time
    rf_raster = system.rf_raster_time
    dead = system.adc_dead_time
    max_grad, max_slew = system.max_grad, system.max_slew
    dk_x, dk_y = 1.0 / fov_x, 1.0 / fov_y

    samp = sampling(protocol)
    step = int(samp.accelerations[0])
    lines = tuple(int(j) for j in np.flatnonzero(samp.pattern))
    acs_lines = np.flatnonzero(samp.acs) if samp.accelerated else np.zeros(0, int)
    ref_shots = tuple(
        shot for shot in (tuple(int(j) for j in acs_lines[s::step]) for s in range(step))
        if shot
    )

    dwell = _choose_dwell(system, scanner, bw, n_samples)
    t_adc = n_samples * dwell
    k_width = nx * dk_x  # area the ADC window must cover

    # Triangular blip of area step * dk_y, split in two halves of duration hb.
    blip = step * dk_y
    hb = round_up(max(math.sqrt(blip / max_slew), blip / max_grad, g_raster), g_raster)
    blip_peak = blip / hb

    def too_fast(amplitude: float, max_bw: float | None) -> ProtocolError:
        mt = amplitude / scanner.max_grad_hz_per_m * scanner.max_grad_mt_per_m
        limit = f" (maximum about {max_bw:.0f} Hz/px)" if max_bw else ""
        return ProtocolError(
            f"readout_bandwidth_hz_per_px: {bw:g} Hz/px needs an EPI readout gradient of "
            f"{mt:.1f} mT/m over a {fov_x * 1e3:g} mm FOV, above the "
            f"{scanner.max_grad_mt_per_m:g} mT/m {scanner.name} allows{limit}"
        )

    if not protocol.ramp_sampling:
        amplitude = k_width / t_adc
        if amplitude > max_grad:
            raise too_fast(amplitude, max_grad * fov_x / nx)
        ramp = round_up(max(amplitude / max_slew, hb, g_raster), g_raster)
        flat = round_up(t_adc + 2 * max(0.0, dead - ramp), g_raster)
        line = 2 * ramp + flat
        adc_delay = round_to((line - t_adc) / 2, rf_raster)
        while adc_delay < dead - 1e-12 or line - adc_delay - t_adc < dead - 1e-12:
            flat += g_raster
            line = 2 * ramp + flat
            adc_delay = round_to((line - t_adc) / 2, rf_raster)
    else:
        # The ADC spans the line (minus dead times). When the slew rate cannot make the
        # ramps that short, the line grows (the outer ramp parts are then not sampled).
        line = round_up(t_adc + 2 * dead, g_raster)
        amplitude = ramp = flat = adc_delay = None
        for _ in range(4000):
            adc_delay = round_to((line - t_adc) / 2, rf_raster)
            if adc_delay >= dead - 1e-12 and line - adc_delay - t_adc >= dead - 1e-12:
                # Ramps at least past the ADC dead time, so the ADC really samples them.
                ramp = round_up(max(hb, adc_delay + g_raster), g_raster)
                while 2 * ramp < line - 1e-12:
                    flat = line - 2 * ramp
                    window = _trap_area_to(
                        adc_delay + t_adc, 1.0, ramp, flat, ramp
                    ) - _trap_area_to(adc_delay, 1.0, ramp, flat, ramp)
                    amp = k_width / window
                    if amp <= max_grad and amp / ramp <= max_slew * (1 + 1e-9):
                        amplitude = amp
                        break
                    ramp += g_raster
            if amplitude is not None:
                break
            line += g_raster
        if amplitude is None:
            raise too_fast(k_width / t_adc, max_grad * fov_x / nx)

    gx_pos = pp.make_trapezoid(
        channel="x", amplitude=amplitude, rise_time=ramp, flat_time=flat, fall_time=ramp,
        system=system,
    )
    gx_neg = pp.make_trapezoid(
        channel="x", amplitude=-amplitude, rise_time=ramp, flat_time=flat, fall_time=ramp,
        system=system,
    )
    adc = pp.make_adc(num_samples=n_samples, dwell=dwell, delay=adc_delay, system=system)
    area_line = amplitude * (flat + ramp)
    center_time = adc_delay + (n_samples // 2 + 0.5) * dwell
    u_center = _trap_area_to(center_time, amplitude, ramp, flat, ramp)

    gy_first = pp.make_extended_trapezoid(
        channel="y", times=[0.0, line - hb, line], amplitudes=[0.0, 0.0, blip_peak],
        system=system,
    )
    gy_mid = pp.make_extended_trapezoid(
        channel="y",
        times=[0.0, hb, line - hb, line],
        amplitudes=[blip_peak, 0.0, 0.0, blip_peak],
        system=system,
    )
    gy_last = pp.make_extended_trapezoid(
        channel="y", times=[0.0, hb], amplitudes=[blip_peak, 0.0], system=system
    )

    n_nav = int(protocol.navigator_lines)
    first_sign = 1 if (n_nav + lines.index(ny // 2)) % 2 == 0 else -1
    pre_x = -u_center if first_sign > 0 else area_line - u_center
    ky_first = (lines[0] - ny // 2) * dk_y
    if n_nav:
        pre_y = -dk_y  # navigators at line ny//2 - 1
        pre2_y = ky_first - pre_y
        t_pre2 = round_up(
            pp.calc_duration(pp.make_trapezoid(channel="y", area=pre2_y, system=system)),
            system.block_duration_raster,
        )
    else:
        pre_y, pre2_y, t_pre2 = ky_first, 0.0, 0.0

    return EPITrain(
        gx_pos=gx_pos,
        gx_neg=gx_neg,
        adc=adc,
        gy_first=gy_first,
        gy_mid=gy_mid,
        gy_last=gy_last,
        line_s=line,
        ramp_s=ramp,
        flat_s=flat,
        dwell_s=dwell,
        n_samples=n_samples,
        ny=ny,
        n_nav=n_nav,
        lines=lines,
        step=step,
        ref_shots=ref_shots,
        dk_y=dk_y,
        area_line=area_line,
        u_center=u_center,
        first_sign=first_sign,
        center_in_line_s=center_time,
        pre_x_area=pre_x,
        pre_y_area=pre_y,
        pre2_y_area=pre2_y,
        t_pre2_s=t_pre2,
        bandwidth_hz_per_px=1.0 / t_adc,
        ramp_sampling=bool(protocol.ramp_sampling),
    )


def slot_and_tr(
    protocol: EPIProtocol | DWIEPIProtocol,
    scanner: ScannerProfile,
    system: pp.Opts,
    min_slot: float,
) -> tuple[float, float]:
    """Per-slice slot duration and the achieved volume TR (both s).

    The slot is ``tr_ms / n_slices`` on the block raster, at least ``min_slot`` (s, the
    shortest slice: excitation, readout and spoiler); TR is ``n_slices`` slots.

    Raises
    ------
    ProtocolError
        If ``tr_ms`` is shorter than ``n_slices x min_slot`` (names the minimum).
    """
    n = protocol.n_slices
    tr = protocol.tr_ms * 1e-3
    check_positive_delay(
        tr - n * min_slot, what="TR", key="tr_ms", requested_ms=protocol.tr_ms, scanner=scanner
    )
    slot = max(round_to(tr / n, system.block_duration_raster), round_up(
        min_slot, system.block_duration_raster))
    return slot, n * slot


def z_spoiler(system: pp.Opts, thickness_m: float) -> SimpleNamespace:
    """The shortest z trapezoid of ``CRUSHER_CYCLES`` cycles across ``thickness_m`` (m)."""
    return pp.make_trapezoid(channel="z", area=CRUSHER_CYCLES / thickness_m, system=system)


# --------------------------------------------------------------------------------------
# Gradient-echo EPI
# --------------------------------------------------------------------------------------


def build_epi(protocol: EPIProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a single-shot multi-slice 2D gradient-echo EPI.

    Per slice (one TR holds all slices, TR is the volume repetition time): slice-selective
    excitation (``use='excitation'``), a TE fill delay, prephasers (slice rephaser,
    readout prephaser, phase prephaser to the navigator line), ``navigator_lines``
    non-blipped lines (``NAV = 1``), a phase prephaser to the first line, the blipped
    echo train of ``matrix[1]`` lines (linear, bottom-up, ``LIN``, ``REV`` on reversed
    lines) and a z spoiler. TE is the time from the excitation centre to the k-space
    centre sample (line ``ny // 2``, sample ``os * nx // 2``). ``dummy_scans`` whole
    volumes are played first without ADC.

    Parameters
    ----------
    protocol : EPIProtocol
        TE, TR (ms; TR per volume), flip (deg), FOV (mm), matrix, slices, readout
        bandwidth (Hz/px), ``ramp_sampling``, ``navigator_lines``.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` plus ``EchoSpacing`` (s), ``ReadoutBandwidth``
        (Hz/px), ``RampSampling`` (0/1; 1 means the kx samples are not uniform),
        ``NavigatorLines``, ``EchoTrainLength`` and the readout timing.

    Raises
    ------
    ProtocolError
        TE (``te_ms``) or TR (``tr_ms``) below the minimum, slice too thin, or the
        bandwidth (``readout_bandwidth_hz_per_px``) too high for the scanner.
    """
    seq, system = new_sequence(scanner)
    thickness = protocol.slice_thickness_mm * 1e-3
    rf, gz, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=protocol.flip_deg,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=thickness,
    )
    chemsat, water = fat_modules(
        system, scanner, protocol, flip_deg=protocol.flip_deg, thickness_m=thickness,
        voxel_m=(protocol.fov_mm[0] * 1e-3 / protocol.matrix[0],
                 protocol.fov_mm[1] * 1e-3 / protocol.matrix[1], thickness),
    )
    if water is not None:
        gz = water.gz  # every sub-pulse's select gradient: rephaser -gz.area / 2
    train = design_epi_train(system, scanner, protocol)
    prep_grads, t_pre = train.prep(system, z_area=-gz.area / 2)
    spoil = z_spoiler(system, thickness)
    t_spoil = round_up(pp.calc_duration(spoil), system.block_duration_raster)

    exc_block = round_up(pp.calc_duration(rf, gz), system.block_duration_raster)
    t_rf_center = rf_center_time(rf)
    if water is not None:
        exc_block, t_rf_center = water.duration, water.centre_s
    t_fat = chemsat.duration if chemsat is not None else 0.0
    min_te = exc_block - t_rf_center + train.time_to_center(t_pre)
    delay_te = fill_delay(
        min_te, what="TE", key="te_ms", requested_ms=protocol.te_ms, scanner=scanner,
        raster_s=system.block_duration_raster,
    )
    te = min_te + delay_te
    min_slot = t_fat + exc_block + delay_te + train.duration(t_pre) + t_spoil
    slot, tr = slot_and_tr(protocol, scanner, system, min_slot)
    fill = slot - min_slot

    positions = slice_positions_m(protocol)
    samp = sampling(protocol)
    raster = system.block_duration_raster
    # dummies (no ADC), the separate calibration reference (one volume per shot), imaging
    volumes: list[tuple[str, tuple[int, ...]]] = (
        [("dummy", ())] * protocol.dummy_scans
        + [("reference", shot) for shot in train.ref_shots] + [("imaging", ())]
    )
    for kind, shot in volumes:
        for i_slice, pos in enumerate(positions):
            set_slice_offset(rf, gz.amplitude, float(pos))
            add_excitation(seq, rf, gz, chemsat=chemsat, water=water, position_m=float(pos),
                           labels=[label("TRID", TRID[kind])])
            if delay_te > 0:
                seq.add_block(pp.make_delay(delay_te))
            if kind == "reference":
                played = train.add_reference(
                    seq, system, shot, t_pre, z_area=-gz.area / 2,
                    labels=[label("SLC", i_slice), *acs_labels(samp, True, reference_only=True)],
                )
                pad = round_to(train.duration(t_pre) - played, raster)
            else:
                train.add_to(
                    seq, system, prep_grads, t_pre, acquire=kind == "imaging",
                    labels=[label("SLC", i_slice), *acs_labels(samp, False)],
                )
                pad = train.duration(t_pre) - train.imaging_duration(t_pre)
            seq.add_block(spoil, pp.make_delay(t_spoil + fill + pad))

    extra = train.definitions()
    extra["DummyScans"] = protocol.dummy_scans
    extra.update(sampling_definitions(samp, calibration_mode="separate"))
    extra.update(fat_definitions(chemsat, water, scanner))
    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        trajectory="epi",
        ordering="epi-single-shot-linear-sequential-slices",
        extra=extra,
    )


def __getattr__(name: str) -> object:
    """Resolve the names that moved to :mod:`.diffusion` (old imports keep working)."""
    if name in _MOVED_TO_DIFFUSION:
        from mrharmony.sequences.builders import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
