"""Non-Cartesian spoiled gradient echoes: 2D radial and 2D spiral-out."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pypulseq as pp
from scipy.linalg import solve_banded

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    GOLDEN_ANGLE_DEG,
    excitation_pulse,
    finalize,
    label,
    make_readout,
    new_sequence,
    rf_center_time,
    round_to,
    round_up,
    set_slice_offset,
    slice_positions_m,
    te_tr_fill,
    trapezoid,
)
from mrharmony.sequences.protocol import RadialProtocol, SpiralProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = ["build_radial", "build_spiral", "design_spiral", "spoke_angles"]

#: Spoke angles are written to [DEFINITIONS] as a list up to this many spokes; above it
#: only the ordering rule (``AngleOrdering`` and ``AngleIncrement``) is written.
MAX_LISTED_ANGLES = 4096
#: Longest spiral readout the builder accepts (T2* makes longer ones useless).
MAX_SPIRAL_READOUT_S = 0.1


# --------------------------------------------------------------------------- helpers



def _rotated(grad: SimpleNamespace, angle_rad: float) -> list[SimpleNamespace]:
    """Project an x trapezoid onto direction ``angle_rad`` in the x/y plane.

    Returns the x and y copies (scaled by cos and sin); a component that is zero is left
    out. Both keep the timing of ``grad``, so the vector amplitude and slew rate equal
    those of ``grad`` and stay within the per-axis limits it was designed for.
    """
    out = []
    for channel, factor in (("x", math.cos(angle_rad)), ("y", math.sin(angle_rad))):
        if abs(factor) < 1e-9:
            continue
        g = copy.copy(grad)
        g.channel = channel
        g.amplitude = grad.amplitude * factor
        g.area = grad.area * factor
        g.flat_area = grad.flat_area * factor
        out.append(g)
    return out


def spoke_angles(n_spokes: int, ordering: str) -> np.ndarray:
    """Radial spoke angles in radians, in acquisition order, all in ``[0, pi)``.

    ``"linear"``: ``pi * i / n_spokes``; ``"golden"``: ``i * GOLDEN_ANGLE_DEG`` modulo
    180 deg (111.25 deg increments).
    """
    i = np.arange(n_spokes)
    if ordering == "golden":
        return np.radians(np.mod(i * GOLDEN_ANGLE_DEG, 180.0))
    return np.pi * i / n_spokes


def _excitation(
    protocol: RadialProtocol | SpiralProtocol, system: pp.Opts, scanner: ScannerProfile
) -> tuple[SimpleNamespace, SimpleNamespace, float, float]:
    rf, gz, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=protocol.flip_deg,
        duration_s=round_up(protocol.rf_duration_ms * 1e-3, system.grad_raster_time),
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=protocol.slice_thickness_mm * 1e-3,
    )
    exc_block = round_up(pp.calc_duration(rf, gz), system.block_duration_raster)
    return rf, gz, exc_block, rf_center_time(rf)


# --------------------------------------------------------------------------- radial


def build_radial(protocol: RadialProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice radial RF-spoiled gradient echo.

    Each spoke is a Cartesian-style readout of ``matrix[0] * readout_oversampling``
    samples over ``fov_mm[0]`` (dk = 1/FOV) rotated in the x/y plane: sample ``i`` sits
    at ``k = (i - Nos//2) * dk/os`` along the spoke direction ``(cos a, sin a)``, so every
    spoke starts at ``|k| = N/2 * dk`` and passes through the k-space centre at sample
    ``Nos//2``. The readout prephaser and the spoiler along the spoke are rotated with
    it (their vector amplitude equals the designed per-axis amplitude). Angles are
    linear over 180 deg (``pi * i / n_spokes``) or golden-angle (111.25 deg increments
    modulo 180 deg). ``fov_mm[1]`` and ``matrix[1]`` only describe the reconstruction
    grid.

    Per TR: excitation, prephaser (readout prephaser and slice rephaser), TE fill,
    readout, spoiler (2 cycles per pixel along the spoke, 4 across the slice) and TR
    fill, with quadratic RF spoiling (the ADC phase follows the RF phase). TE is from
    the excitation centre to the spoke's centre sample. Slices are acquired
    sequentially; each ADC carries ``LIN`` = spoke index and ``SLC``.

    Parameters
    ----------
    protocol : RadialProtocol
        TE, TR (ms), flip (deg), FOV (mm), matrix, slices, spokes, angle ordering,
        receiver bandwidth (Hz/px), RF spoiling increment (deg).
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` plus ``Trajectory = "radial"``,
        ``NumberOfSpokes``, ``AngleOrdering``, ``AngleIncrement`` (rad), ``SpokeAngles``
        (rad, acquisition order, up to 4096 spokes), ``ReadoutBandwidth`` (Hz/px),
        ``RFSpoilingIncrement`` (deg) and ``DummyScans``.

    Raises
    ------
    ProtocolError
        TE or TR below the minimum, slice too thin, or bandwidth too high.
    """
    seq, system = new_sequence(scanner)
    raster = system.block_duration_raster
    fov_x = protocol.fov_mm[0] * 1e-3
    nx = protocol.matrix[0]
    thickness = protocol.slice_thickness_mm * 1e-3
    rf, gz, exc_block, t_rf_center = _excitation(protocol, system, scanner)
    ro = make_readout(
        system,
        scanner,
        fov_m=fov_x,
        n=nx,
        bandwidth_hz_per_px=protocol.readout_bandwidth_hz_per_px,
        oversampling=protocol.readout_oversampling,
    )
    gz_reph_area = -gz.area / 2
    t_pre = round_up(
        max(
            pp.calc_duration(pp.make_trapezoid(channel="x", area=a, system=system))
            for a in (ro.area_to_center, gz_reph_area)
        ),
        raster,
    )
    pre = trapezoid(channel="x", area=-ro.area_to_center, duration=t_pre, system=system)
    gz_pre = trapezoid(channel="z", area=gz_reph_area, duration=t_pre, system=system)
    spoil = pp.make_trapezoid(channel="x", area=2 * nx / fov_x, system=system)
    spoil_z = pp.make_trapezoid(channel="z", area=4 / thickness, system=system)
    t_spoil = round_up(max(pp.calc_duration(spoil), pp.calc_duration(spoil_z)), raster)
    t_ro = round_up(pp.calc_duration(ro.gx, ro.adc), raster)

    delay_te, delay_tr, te, tr = te_tr_fill(
        min_te_s=exc_block - t_rf_center + t_pre + ro.time_to_center_s,
        fixed_tr_s=exc_block + t_pre + t_ro + t_spoil,
        protocol=protocol,
        scanner=scanner,
        raster_s=raster,
    )

    angles = spoke_angles(protocol.n_spokes, protocol.angle_ordering)
    inc = math.radians(protocol.rf_spoiling_inc_deg)
    rf_phase = rf_inc = 0.0
    for i_slice, pos in enumerate(slice_positions_m(protocol)):
        set_slice_offset(rf, gz.amplitude, float(pos))
        base_phase = rf.phase_offset
        spokes: list[int | None] = [None] * protocol.dummy_scans + list(
            range(protocol.n_spokes)
        )
        for i_spoke in spokes:
            dummy = i_spoke is None
            angle = float(angles[0 if dummy else i_spoke])
            rf.phase_offset = base_phase + rf_phase
            ro.adc.phase_offset = rf_phase
            rf_inc = (rf_inc + inc) % (2 * math.pi)
            rf_phase = (rf_phase + rf_inc) % (2 * math.pi)
            seq.add_block(rf, gz, label("TRID", 1 if dummy else 2), pp.make_delay(exc_block))
            seq.add_block(*_rotated(pre, angle), gz_pre, pp.make_delay(t_pre))
            if delay_te > 0:
                seq.add_block(pp.make_delay(delay_te))
            readout = _rotated(ro.gx, angle)
            if dummy:
                seq.add_block(*readout, pp.make_delay(t_ro))
            else:
                seq.add_block(
                    *readout, ro.adc, label("LIN", i_spoke), label("SLC", i_slice),
                    pp.make_delay(t_ro),
                )
            seq.add_block(*_rotated(spoil, angle), spoil_z, pp.make_delay(t_spoil + delay_tr))

    increment = (
        math.radians(GOLDEN_ANGLE_DEG)
        if protocol.angle_ordering == "golden"
        else math.pi / protocol.n_spokes
    )
    extra: dict[str, object] = {
        "NumberOfSpokes": protocol.n_spokes,
        "AngleOrdering": protocol.angle_ordering,
        "AngleIncrement": increment,
        "ReadoutBandwidth": ro.bandwidth_hz_per_px,
        "RFSpoilingIncrement": protocol.rf_spoiling_inc_deg,
        "DummyScans": protocol.dummy_scans,
    }
    if protocol.n_spokes <= MAX_LISTED_ANGLES:
        extra["SpokeAngles"] = [float(a) for a in angles]
    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        trajectory="radial",
        ordering=f"{protocol.angle_ordering}-angle-sequential-slices",
        extra=extra,
    )


# --------------------------------------------------------------------------- spiral


@dataclass(frozen=True)
class SpiralDesign:
    """A spiral-out gradient waveform on the gradient raster (x + i y, Hz/m).

    ``centres[m]`` is the gradient in the middle of raster interval ``m`` (what a Pulseq
    arbitrary gradient stores; the waveform is 0 at both ends). Over the spiral proper
    (the first ``n_spiral`` intervals, up to ``|k| >= kmax``) the piecewise-linear
    waveform through these values passes exactly through ``k = lam * theta *
    exp(i theta)`` at every raster edge (see :func:`_centres_through_edges`); a linear
    ramp-down (at up to the slew limit) follows.
    """

    centres: np.ndarray
    n_spiral: int
    dt: float
    lam: float
    kmax: float

    @property
    def k_end(self) -> complex:
        """k (1/m) at the end of the waveform: the exact integral of the piecewise-linear
        shape through 0, the centre samples and 0."""
        c = self.centres
        return complex((np.sum(c) - 0.25 * (c[0] + c[-1])) * self.dt)

    @property
    def duration(self) -> float:
        return len(self.centres) * self.dt

    @property
    def spiral_duration(self) -> float:
        return self.n_spiral * self.dt


def _spiral_theta(
    lam: float,
    theta_max: float,
    g_lim: float,
    slew: np.ndarray,
    dt: float,
    oversample: int,
    end_window: float = 0.0,
    end_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """theta(t) and theta'(t) at ``t = m * dt`` for the Archimedean spiral ``k = lam*theta``.

    Slew-limited regime: forward integration (step ``dt/oversample``) taking the largest
    angular acceleration that keeps the vector slew ``lam |(th'' - th th'^2) +
    i (2 th'^2 + th th'')|`` within ``slew[m]`` during raster interval ``m`` (the last
    value beyond the array; times ``end_factor`` for ``theta > theta_max - end_window``,
    which softens the junction with the ramp-down). Amplitude-limited regime (entered once ``lam th'
    sqrt(1 + th^2)`` reaches ``g_lim`` past the end of ``slew``; the centripetal slew only
    decreases from then on): the closed form ``F(th) = (th sqrt(1+th^2) + asinh th) / 2
    = g_lim t / lam + const``, inverted with Newton's method.
    """
    h = dt / oversample
    th = om = t = 0.0
    ts, ths, oms = [0.0], [0.0], [0.0]
    amp_limited = False
    t_profile = len(slew) * dt  # the closed form is only used after the profile ends
    t_stop = math.inf  # once theta_max is passed, run on to the next raster edge
    while t < t_stop - 1e-12:
        s_now = slew[min(int(t / dt + 1e-9), len(slew) - 1)]
        if th > theta_max - end_window:
            s_now *= end_factor
        a_q = 1.0 + th * th
        b_q = 2.0 * th * om * om
        c_q = (th * th + 4.0) * om**4 - (s_now / lam) ** 2
        disc = b_q * b_q - 4.0 * a_q * c_q
        acc = (-b_q + math.sqrt(disc)) / (2 * a_q) if disc >= 0 else -b_q / (2 * a_q)
        om_new = om + acc * h
        om_cap = g_lim / (lam * math.sqrt(1.0 + th * th))
        if om_new >= om_cap:
            om_new = om_cap
            amp_limited = True
        th += 0.5 * (om + om_new) * h
        om = om_new
        t += h
        ts.append(t)
        ths.append(th)
        oms.append(om)
        if amp_limited and th < theta_max and t >= t_profile:
            break
        if th >= theta_max and math.isinf(t_stop):
            t_stop = math.ceil(t / dt - 1e-9) * dt
    t_fine, th_fine, om_fine = np.array(ts), np.array(ths), np.array(oms)

    def big_f(x: np.ndarray) -> np.ndarray:
        return 0.5 * (x * np.sqrt(1 + x * x) + np.arcsinh(x))

    t_switch, th_switch = t_fine[-1], th_fine[-1]
    f0 = float(big_f(np.array(th_switch)))
    if th_switch < theta_max:  # amplitude-limited from t_switch on: closed form
        t_end = t_switch + lam * (float(big_f(np.array(theta_max))) - f0) / g_lim
    else:  # theta_max reached on the fine grid (which runs on to the next edge)
        t_end = float(np.interp(theta_max, th_fine, t_fine))
    n_edges = math.ceil(t_end / dt - 1e-9)
    t_edge = np.arange(n_edges + 1) * dt
    theta = np.interp(t_edge, t_fine, th_fine)
    omega = np.interp(t_edge, t_fine, om_fine)
    late = t_edge > t_switch + 1e-12
    if np.any(late):
        target = f0 + g_lim * (t_edge[late] - t_switch) / lam
        x = np.maximum(np.sqrt(2 * target), th_switch)
        for _ in range(60):
            step = (big_f(x) - target) / np.sqrt(1 + x * x)
            x = x - step
            if np.max(np.abs(step)) < 1e-12:
                break
        theta[late] = x
        omega[late] = g_lim / (lam * np.sqrt(1 + x * x))
    return theta, omega


def _centres_through_edges(k_edges: np.ndarray, dt: float, tail: np.ndarray) -> np.ndarray:
    """Centre samples whose piecewise-linear waveform passes through ``k_edges``.

    ``k_edges`` (complex, ``k_edges[0] = 0``) are the targets at the raster edges; the
    waveform starts at 0 and continues with the fixed centre samples ``tail`` (the
    ramp-down). The integral of the waveform over interval ``m`` is ``(g[m-1] + 6 g[m] +
    g[m+1]) dt / 8`` (``(5 g[0] + g[1]) dt / 8`` for the first), a diagonally dominant
    tridiagonal system. Plain interval means ``diff(k) / dt`` would leave a constant k
    offset of several percent of 1/FOV wherever the gradient turns quickly within one
    raster interval (the spiral's centre), rotating with each interleaf.
    """
    rhs = 8 * np.diff(k_edges) / dt
    n = len(rhs)
    rhs[-1] -= tail[0] if len(tail) else 0.0
    bands = np.zeros((3, n))
    bands[0, 1:] = 1.0
    bands[1, :] = 6.0
    bands[1, 0] = 5.0
    if not len(tail):
        bands[1, -1] = 5.0
    bands[2, :-1] = 1.0
    return solve_banded((1, 1), bands, rhs)


def design_spiral(
    fov_m: float,
    n: int,
    n_interleaves: int,
    max_grad: float,
    max_slew: float,
    dt: float,
    *,
    oversample: int = 8,
) -> SpiralDesign:
    """Time-optimal Archimedean spiral-out for ``n`` pixels over ``fov_m``.

    ``k(theta) = lam * theta * exp(i theta)`` with ``lam = n_interleaves / (2 pi fov)``,
    so neighbouring turns of the ``n_interleaves`` rotated copies are ``1/fov`` apart,
    running to ``kmax = n / (2 fov)``. The waveform starts at zero gradient, is
    slew-limited then amplitude-limited (see :func:`_spiral_theta`), and ends with a
    linear ramp-down at up to the slew limit. The raster samples pass exactly through the
    designed k at every raster edge (:func:`_centres_through_edges`). The result is
    verified on the raster (amplitude and slew, per axis and as a vector, including the
    half intervals to 0 at both ends); where the raster interpolation overshoots (the
    gradient turns fastest near the centre, and at the start of the ramp-down) the slew
    allowed there is lowered locally and the design repeated.

    Parameters
    ----------
    fov_m : float
        Field of view (m).
    n : int
        Matrix size (pixels across the FOV).
    n_interleaves : int
        Number of interleaves.
    max_grad, max_slew : float
        Vector gradient (Hz/m) and slew (Hz/m/s) limits.
    dt : float
        Gradient raster (s).

    Returns
    -------
    SpiralDesign
    """
    lam = n_interleaves / (2 * math.pi * fov_m)
    kmax = n / (2 * fov_m)
    theta_max = kmax / lam
    g_lim = 0.99 * max_grad
    slew = np.full(1, 0.99 * max_slew)  # per raster interval; last value holds beyond
    ramp_slew = 0.99 * max_slew
    end_window, end_factor = 0.0, 1.0
    for _ in range(40):
        theta, omega = _spiral_theta(
            lam, theta_max, g_lim, slew, dt, oversample, end_window, end_factor
        )
        k_spiral = lam * theta * np.exp(1j * theta)
        g_last = lam * omega[-1] * (1 + 1j * theta[-1]) * np.exp(1j * theta[-1])
        n_down = max(math.ceil(abs(g_last) / (ramp_slew * dt) - 1e-9), 1)
        ramp = g_last * (1 - (np.arange(n_down) + 0.5) / n_down)
        spiral = _centres_through_edges(k_spiral, dt, ramp)
        centres = np.concatenate([spiral, ramp])
        ratio = _limit_ratios(centres, max_grad, max_slew, dt)
        if np.max(ratio) <= 1 + 1e-9:
            return SpiralDesign(
                centres=centres, n_spiral=len(spiral), dt=dt, lam=lam, kmax=kmax
            )
        # ratio[j]: the worse of amplitude at sample j-1/j and slew between them.
        bad = np.nonzero(ratio > 1 + 1e-9)[0]
        m_spiral = len(spiral)
        if np.any(bad >= m_spiral - 2):
            ramp_slew *= 0.9
            end_factor *= 0.9
            end_window = 8 * float(omega[-1]) * dt
        early = bad[bad < m_spiral - 2]
        if early.size:
            if len(slew) < m_spiral:
                slew = np.concatenate([slew, np.full(m_spiral - len(slew), slew[-1])])
            for j in early:
                lo, hi = max(j - 3, 0), min(j + 3, len(slew) - 1)
                slew[lo:hi] *= min(0.97, 0.99 / ratio[j])
            # The closed-form tail needs a profile that ends back at the full slew.
            slew = np.concatenate([slew[: max(early) + 4], [0.99 * max_slew]])
        if ramp_slew < 0.3 * max_slew:
            g_lim *= 0.95
    raise RuntimeError("spiral design did not converge within the gradient limits")


def _limit_ratios(
    centres: np.ndarray, max_grad: float, max_slew: float, dt: float
) -> np.ndarray:
    """Per-step worst of |g|/max_grad and |slew|/max_slew (vector, hence per axis too)
    for the piecewise-linear waveform through 0, ``centres`` and 0."""
    p = np.concatenate([[0.0], centres, [0.0]])
    steps = np.concatenate([[dt / 2], np.full(len(centres) - 1, dt), [dt / 2]])
    slew = np.abs(np.diff(p)) / steps / max_slew
    amp = np.maximum(np.abs(p[:-1]), np.abs(p[1:])) / max_grad
    return np.maximum(slew, amp)


def _spiral_duration_estimate(fov_m: float, n: int, n_interleaves: int, g_lim: float) -> float:
    """Amplitude-limited readout time (s), a lower bound used to refuse huge readouts."""
    lam = n_interleaves / (2 * math.pi * fov_m)
    th = n / (2 * fov_m) / lam
    return lam * 0.5 * (th * math.sqrt(1 + th * th) + math.asinh(th)) / g_lim


def _within_limits(
    wx: np.ndarray, wy: np.ndarray, max_grad: float, max_slew: float, dt: float
) -> bool:
    """Whether a gradient pair (centre samples, 0 at both ends, piecewise linear) keeps
    amplitude and slew within the limits per axis and as a vector."""
    px = np.concatenate([[0.0], wx, [0.0]])
    py = np.concatenate([[0.0], wy, [0.0]])
    steps = np.concatenate([[dt / 2], np.full(len(wx) - 1, dt), [dt / 2]])
    sx, sy = np.diff(px) / steps, np.diff(py) / steps
    tol = 1 + 1e-9
    return bool(
        max(np.max(np.abs(px)), np.max(np.abs(py)), np.max(np.hypot(px, py))) <= max_grad * tol
        and max(np.max(np.abs(sx)), np.max(np.abs(sy)), np.max(np.hypot(sx, sy)))
        <= max_slew * tol
    )


def build_spiral(protocol: SpiralProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice spiral-out RF-spoiled gradient echo with interleaves.

    The Archimedean spiral ``k = lam * theta * exp(i theta)`` (``lam = n_interleaves /
    (2 pi FOV)``, FOV = ``fov_mm[0]``) runs from the k-space centre to ``kmax =
    matrix[0] / (2 FOV)``; interleaf ``j`` is rotated by ``2 pi j / n_interleaves``, so
    neighbouring turns across all interleaves are ``1/FOV`` apart (Nyquist). The
    waveform is time-optimal on the gradient raster (slew-limited near the centre,
    amplitude-limited outside; see :func:`design_spiral`) and is verified per axis and
    as a vector against ``max_grad`` / ``max_slew``. The amplitude limit is also capped
    at ``1 / (readout_oversampling * FOV * dwell)`` so that successive samples along the
    trajectory are at most ``1/(os * FOV)`` apart. After the spiral, the gradient ramps
    down (at up to the slew limit), then a trapezoid along ``-k_end`` rewinds the in-plane
    moment to zero while a z spoiler (4 cycles across the slice) plays; quadratic RF
    spoiling (ADC phase following) completes the spoiling.

    The ADC dwell is ``adc_dwell_us`` rounded to the scanner's ADC raster; it starts
    with the spiral (both after the ADC dead time) and its sample count, a multiple of
    the scanner's ``adc_samples_divisor``, covers the spiral up to ``kmax`` (a few
    samples of the ramp-down may follow). TE runs from the excitation centre to the
    first ADC sample, where ``k`` is 0. ``readout_bandwidth_hz_per_px`` is unused.
    Slices are sequential; each ADC carries ``LIN`` = interleaf and ``SLC``.

    Parameters
    ----------
    protocol : SpiralProtocol
        TE, TR (ms), flip (deg), FOV (mm), matrix, slices, interleaves, ADC dwell (us),
        RF spoiling increment (deg).
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` plus ``Trajectory = "spiral"``,
        ``Interleaves``, ``InterleafAngles`` (rad), ``KMax`` (1/m), ``SpiralLambda``
        (1/m per rad), ``ADCDwell`` (s), ``ReadoutDuration`` (s), ``RFSpoilingIncrement``
        (deg) and ``DummyScans``.

    Raises
    ------
    ProtocolError
        TE or TR below the minimum, slice too thin, readout longer than 100 ms
        (``n_interleaves``), or more samples than the scanner's ADC allows.
    """
    seq, system = new_sequence(scanner)
    raster = system.block_duration_raster
    dt = system.grad_raster_time
    fov_x = protocol.fov_mm[0] * 1e-3
    nx = protocol.matrix[0]
    n_il = protocol.n_interleaves
    thickness = protocol.slice_thickness_mm * 1e-3
    rf, gz, exc_block, t_rf_center = _excitation(protocol, system, scanner)

    dwell = max(round_to(protocol.adc_dwell_us * 1e-6, system.adc_raster_time),
                system.adc_raster_time)
    g_lim = min(system.max_grad, 1.0 / (protocol.readout_oversampling * fov_x * dwell))
    t_estimate = _spiral_duration_estimate(fov_x, nx, n_il, g_lim)
    if t_estimate > MAX_SPIRAL_READOUT_S:
        raise ProtocolError(
            f"n_interleaves: a {nx}-pixel spiral over {fov_x * 1e3:g} mm with {n_il} "
            f"interleave(s) and a {dwell * 1e6:g} us dwell needs a readout of at least "
            f"{t_estimate * 1e3:.0f} ms on {scanner.name}, above the "
            f"{MAX_SPIRAL_READOUT_S * 1e3:g} ms limit (use more interleaves or a shorter "
            "adc_dwell_us)"
        )
    design = design_spiral(fov_x, nx, n_il, g_lim, system.max_slew, dt)
    n_samples = math.ceil(design.spiral_duration / dwell - 1e-9)
    div = max(int(system.adc_samples_divisor), 1)
    n_samples = math.ceil(n_samples / div) * div
    if system.adc_samples_limit and n_samples > system.adc_samples_limit:
        raise ProtocolError(
            f"n_interleaves: the spiral readout needs {n_samples} ADC samples, above the "
            f"{system.adc_samples_limit} {scanner.name} allows in one ADC (use more "
            "interleaves or a longer adc_dwell_us)"
        )
    # Spiral and ADC start together after the ADC dead time, on both rasters.
    t0 = round_up(system.adc_dead_time, dt)
    while abs(round_to(t0, system.rf_raster_time) - t0) > 1e-12:
        t0 += dt
    adc = pp.make_adc(num_samples=n_samples, dwell=dwell, delay=t0, system=system)
    t_sp_block = round_up(
        max(t0 + design.duration, t0 + n_samples * dwell + system.adc_dead_time), raster
    )

    gz_reph = pp.make_trapezoid(channel="z", area=-gz.area / 2, system=system)
    t_reph = round_up(pp.calc_duration(gz_reph), raster)
    k_end = design.k_end
    rew = pp.make_trapezoid(channel="x", area=-abs(k_end), system=system)
    spoil_z = pp.make_trapezoid(channel="z", area=4 / thickness, system=system)
    t_spoil = round_up(max(pp.calc_duration(rew), pp.calc_duration(spoil_z)), raster)
    rew = trapezoid(channel="x", area=-abs(k_end), duration=t_spoil, system=system)

    delay_te, delay_tr, te, tr = te_tr_fill(
        min_te_s=exc_block - t_rf_center + t_reph + t0 + 0.5 * dwell,
        fixed_tr_s=exc_block + t_reph + t_sp_block + t_spoil,
        protocol=protocol,
        scanner=scanner,
        raster_s=raster,
    )

    il_angles = 2 * np.pi * np.arange(n_il) / n_il
    readouts = []
    centres = design.centres
    for phi in il_angles:
        w = centres * np.exp(1j * phi)
        if not _within_limits(w.real, w.imag, system.max_grad, system.max_slew, dt):
            raise RuntimeError("spiral waveform exceeds the gradient limits (builder bug)")
        grads = [
            pp.make_arbitrary_grad(
                channel=ch, waveform=wave, first=0.0, last=0.0, delay=t0, system=system
            )
            for ch, wave in (("x", w.real), ("y", w.imag))
        ]
        rew_angle = float(np.angle(k_end * np.exp(1j * phi)))
        readouts.append((grads, _rotated(rew, rew_angle)))

    inc = math.radians(protocol.rf_spoiling_inc_deg)
    rf_phase = rf_inc = 0.0
    for i_slice, pos in enumerate(slice_positions_m(protocol)):
        set_slice_offset(rf, gz.amplitude, float(pos))
        base_phase = rf.phase_offset
        shots: list[int | None] = [None] * protocol.dummy_scans + list(range(n_il))
        for i_il in shots:
            dummy = i_il is None
            grads, rewinder = readouts[0 if dummy else i_il]
            rf.phase_offset = base_phase + rf_phase
            adc.phase_offset = rf_phase
            rf_inc = (rf_inc + inc) % (2 * math.pi)
            rf_phase = (rf_phase + rf_inc) % (2 * math.pi)
            seq.add_block(rf, gz, label("TRID", 1 if dummy else 2), pp.make_delay(exc_block))
            seq.add_block(gz_reph, pp.make_delay(t_reph))
            if delay_te > 0:
                seq.add_block(pp.make_delay(delay_te))
            if dummy:
                seq.add_block(*grads, pp.make_delay(t_sp_block))
            else:
                seq.add_block(
                    *grads, adc, label("LIN", i_il), label("SLC", i_slice),
                    pp.make_delay(t_sp_block),
                )
            seq.add_block(*rewinder, spoil_z, pp.make_delay(t_spoil + delay_tr))

    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        trajectory="spiral",
        ordering="interleaved-sequential-slices",
        extra={
            "Interleaves": n_il,
            "InterleafAngles": [float(a) for a in il_angles],
            "KMax": design.kmax,
            "SpiralLambda": design.lam,
            "ADCDwell": dwell,
            "ReadoutDuration": n_samples * dwell,
            "RFSpoilingIncrement": protocol.rf_spoiling_inc_deg,
            "DummyScans": protocol.dummy_scans,
        },
    )
