"""Single-shot EPI reconstruction: ramp-sampling regridding and Nyquist-ghost correction.

Pipeline for the acquisitions of one slice (all lines, navigators included):

1. **Readout trajectory** of every line, in cycles per FOV along x, from the first
   available source:

   - ``acq.traj`` (column 0 = kx; units detected as in
     :func:`mrharmony.recon.noncartesian.trajectory_cycles_per_fov`); the trajectory
     gives the true direction of reversed lines, so no flip is applied;
   - the header's trajectory description with the ``userParameterDouble`` entries
     ``rampUpTime``, ``flatTopTime``, ``rampDownTime``, ``acqDelayTime`` and
     ``dwellTime`` (microseconds, the ISMRMRD/Siemens EPI convention), or our builder's
     ``RampSampling = 1``, ``ReadoutRampTime``, ``ReadoutFlatTime``, ``ADCDelayInLine``,
     ``ADCDwell`` (seconds, as in its ``[DEFINITIONS]``): a trapezoid whose
     ADC window spans ``nx`` cycles/FOV, sample ``i`` at ``acqDelay + (i + 0.5) dwell``
     (Pulseq), k = 0 at sample ``center_sample``;
   - else uniform samples ``(i - center_sample) / os``.

   Computed trajectories of lines flagged ``ACQ_IS_REVERSE`` are mirrored:
   ``k_rev(i) = k(n - 1 - i)``, which is what our EPI builder plays (its reversed lines
   pass k = 0 at sample ``n//2 - 1``).
2. **Regridding** to hybrid space (x, ky): for each distinct readout trajectory the
   Tikhonov-regularised least-squares inverse of the exact 1-D Fourier matrix from the
   ``n`` samples to ``n`` image points across the oversampled FOV. For uniform samples
   this is exactly the orthonormal centred inverse DFT; ramp-sampled lines need no
   separate interpolation step.
3. **Nyquist-ghost correction** from the phase-correction lines (``ACQ_IS_PHASECORR_DATA``,
   our builder's three navigators at ``ky = -1/FOV``, polarities +, -, + or -, +, -):
   the phase difference between the reversed and the forward navigators (forward
   navigators averaged, which cancels linear T2* and drift) is fitted as
   ``phi(x) = phi0 + phi1 * x`` (slope from the phase of the lag-one autocorrelation,
   then the constant; magnitude-weighted, coil-combined; Ahn & Cho 1987 style) and
   ``exp(-i phi)`` is applied to every reversed line.
4. Lines placed by ``kspace_encode_step_1`` (repeats averaged, missing lines zero), the
   orthonormal centred inverse FFT along ky, and the central ``nx`` of the oversampled
   readout kept.

The result is scaled like the orthonormal centred 2-D inverse FFT of the Cartesian
k-space (see :mod:`mrharmony.recon.nufft`). ky variation inside a line (blips on
ramp-sampled samples) is ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.backend import get_xp, to_numpy
from mrharmony.errors import ReconError
from mrharmony.formats.flags import NOT_IMAGING, flag_mask, has_flag
from mrharmony.recon.cartesian import fft_c
from mrharmony.recon.noncartesian import (
    KSpaceGeometry,
    header_geometry,
    trajectory_cycles_per_fov,
)

__all__ = [
    "EPIKSpace",
    "epi_kspace",
    "fit_ghost_phase",
    "ramp_trajectory",
    "reconstruct_epi",
    "regridding_matrix",
]

_LOG = logging.getLogger(__name__)

#: Flags of acquisitions that are neither imaging lines nor EPI navigators.
_IGNORED = int(flag_mask("IS_NOISE_MEASUREMENT", "IS_NAVIGATION_DATA", *NOT_IMAGING))
_RAMP_KEYS = ("rampUpTime", "flatTopTime", "rampDownTime", "acqDelayTime", "dwellTime")


def _trapezoid_area(t: np.ndarray, ramp_up: float, flat: float, ramp_down: float) -> np.ndarray:
    """Area (unit amplitude) of a trapezoid from its start to ``t``."""
    t = np.clip(t, 0.0, ramp_up + flat + ramp_down)
    up = np.minimum(t, ramp_up)
    area = up**2 / (2 * ramp_up) if ramp_up > 0 else np.zeros_like(t)
    area = area + np.clip(t - ramp_up, 0.0, flat)
    tau = np.clip(t - ramp_up - flat, 0.0, ramp_down)
    if ramp_down > 0:
        area = area + tau - tau**2 / (2 * ramp_down)
    return area


def ramp_trajectory(
    n_samples: int,
    nx: int,
    *,
    ramp_up_s: float,
    flat_s: float,
    ramp_down_s: float,
    adc_delay_s: float,
    dwell_s: float,
    center_sample: int | None = None,
) -> np.ndarray:
    """kx (cycles/FOV) of the samples of a forward ramp-sampled EPI line.

    Parameters
    ----------
    n_samples : int
        ADC samples per line.
    nx : int
        Reconstructed matrix along the readout; the ADC window spans ``nx`` cycles/FOV.
    ramp_up_s, flat_s, ramp_down_s : float
        Readout trapezoid timing, s.
    adc_delay_s : float
        ADC start from the start of the trapezoid, s.
    dwell_s : float
        ADC dwell, s; sample ``i`` at ``adc_delay + (i + 0.5) * dwell``.
    center_sample : int, optional
        Sample at k = 0; default ``n_samples // 2``.

    Returns
    -------
    ndarray, shape (n_samples,)
        float64, increasing.

    Raises
    ------
    ReconError
        If the timing is not positive or the ADC window has no gradient area.
    """
    if min(ramp_up_s, ramp_down_s, adc_delay_s) < 0 or flat_s < 0 or dwell_s <= 0:
        raise ReconError(
            f"EPI readout timing: need non-negative ramps/flat/delay and a positive dwell "
            f"(got {ramp_up_s}, {flat_s}, {ramp_down_s}, {adc_delay_s}, {dwell_s} s)"
        )
    t = adc_delay_s + (np.arange(n_samples) + 0.5) * dwell_s
    edges = np.array([adc_delay_s, adc_delay_s + n_samples * dwell_s])
    a_edges = _trapezoid_area(edges, ramp_up_s, flat_s, ramp_down_s)
    span = float(a_edges[1] - a_edges[0])
    if span <= 0:
        raise ReconError("EPI readout timing: the ADC window covers no gradient area")
    c = n_samples // 2 if center_sample is None else int(center_sample)
    a = _trapezoid_area(t, ramp_up_s, flat_s, ramp_down_s)
    return (a - a[c]) * nx / span


def regridding_matrix(kx: np.ndarray, nx: int, *, regularization: float = 1e-5) -> np.ndarray:
    """Least-squares map from non-uniform readout samples to oversampled x-space.

    Parameters
    ----------
    kx : ndarray, shape (n,)
        Sample positions, cycles per FOV.
    nx : int
        Reconstructed matrix; the ``n`` output points span ``n / nx`` FOVs.
    regularization : float
        Tikhonov weight relative to the largest eigenvalue of ``E^H E``.

    Returns
    -------
    ndarray, shape (n, n)
        complex128 ``R`` with ``x = R @ samples`` (orthonormal scale).
    """
    n = kx.size
    u = (np.arange(n) - n // 2) / nx  # FOV units
    e = np.exp(-2j * np.pi * np.outer(kx, u)) / np.sqrt(n)
    gram = e.conj().T @ e
    lam = regularization * float(np.linalg.eigvalsh(gram)[-1])
    return np.linalg.solve(gram + lam * np.eye(n), e.conj().T)


def fit_ghost_phase(forward: Any, reversed_: Any) -> tuple[float, float]:
    """Fit the odd/even phase ``phi(x) = phi0 + phi1 * x`` between navigator lines.

    Parameters
    ----------
    forward, reversed_ : ndarray, shape (n_coils, n)
        Hybrid-space (x) navigator lines of the two polarities.

    Returns
    -------
    phi0, phi1 : float
        Constant (rad, at the centre point ``n // 2``) and slope (rad per point) of the
        phase of ``reversed`` relative to ``forward``.
    """
    z = np.sum(to_numpy(reversed_) * np.conj(to_numpy(forward)), axis=0)
    n = z.size
    phi1 = float(np.angle(np.sum(z[1:] * np.conj(z[:-1]))))
    x = np.arange(n) - n // 2
    phi0 = float(np.angle(np.sum(z * np.exp(-1j * phi1 * x))))
    return phi0, phi1


def _ramp_timing(params: dict[str, float]) -> dict[str, float] | None:
    """Readout timing (s) from the header's trajectory description, if present.

    Accepts the ISMRMRD/Siemens names in microseconds (``rampUpTime``, ``flatTopTime``,
    ``rampDownTime``, ``acqDelayTime``, ``dwellTime``) or our builder's ``[DEFINITIONS]``
    names in seconds (``ReadoutRampTime``, ``ReadoutFlatTime``, ``ADCDelayInLine``,
    ``ADCDwell``, used only when ``RampSampling`` is 1).
    """
    if all(k in params for k in _RAMP_KEYS):
        return {
            "ramp_up_s": params["rampUpTime"] * 1e-6,
            "flat_s": params["flatTopTime"] * 1e-6,
            "ramp_down_s": params["rampDownTime"] * 1e-6,
            "adc_delay_s": params["acqDelayTime"] * 1e-6,
            "dwell_s": params["dwellTime"] * 1e-6,
        }
    ours = ("ReadoutRampTime", "ReadoutFlatTime", "ADCDelayInLine", "ADCDwell")
    if params.get("RampSampling", 0) == 1 and all(k in params for k in ours):
        return {
            "ramp_up_s": params["ReadoutRampTime"],
            "flat_s": params["ReadoutFlatTime"],
            "ramp_down_s": params["ReadoutRampTime"],
            "adc_delay_s": params["ADCDelayInLine"],
            "dwell_s": params["ADCDwell"],
        }
    return None


def _line_trajectories(geom: KSpaceGeometry, acqs: list[Any]) -> list[np.ndarray]:
    """kx in cycles/FOV for every acquisition (module docstring, step 1)."""
    nx = geom.matrix[0]
    dims = {int(a.trajectory_dimensions) for a in acqs}
    if min(dims) >= 1:
        kx_all = np.concatenate([np.asarray(a.traj, dtype=np.float64)[:, :1] for a in acqs])
        kx_all = trajectory_cycles_per_fov(kx_all, geom.matrix, geom.fov_mm)[:, 0]
        out, start = [], 0
        for a in acqs:
            n = int(a.number_of_samples)
            out.append(kx_all[start:start + n])
            start += n
        return out
    timing = _ramp_timing(geom.user_parameters)
    out = []
    for a in acqs:
        n = int(a.number_of_samples)
        center = int(a.center_sample) or n // 2
        if timing is not None:
            kx = ramp_trajectory(n, nx, **timing, center_sample=center)
        else:
            kx = (np.arange(n) - center) * (nx / n)
        if has_flag(a.flags, "IS_REVERSE"):
            kx = kx[::-1].copy()
        out.append(kx)
    return out


def _to_hybrid(
    data: list[np.ndarray], kx: list[np.ndarray], nx: int, regularization: float
) -> np.ndarray:
    """Regrid every line to x-space: (n_coils, n_lines, n) complex128."""
    n_samples = {d.shape[1] for d in data}
    if len(n_samples) != 1:
        raise ReconError(f"acquisitions: EPI lines differ in sample count {sorted(n_samples)}")
    stack = np.stack(data, axis=1)  # (n_coils, n_lines, n)
    keys = [np.round(k, 6).tobytes() for k in kx]
    out = np.empty(stack.shape, dtype=np.complex128)
    for key in dict.fromkeys(keys):
        lines = np.array([i for i, k in enumerate(keys) if k == key])
        r = regridding_matrix(kx[lines[0]], nx, regularization=regularization)
        out[:, lines, :] = stack[:, lines, :] @ r.T
    return out


_CALIB_ONLY = int(flag_mask("IS_PARALLEL_CALIBRATION"))
_CALIB_ANY = int(flag_mask("IS_PARALLEL_CALIBRATION", "IS_PARALLEL_CALIBRATION_AND_IMAGING"))


def _calibration_only(acqs: list[Any]) -> np.ndarray:
    """Lines flagged ``IS_PARALLEL_CALIBRATION`` without ``..._AND_IMAGING`` (a separate
    reference scan): calibration data that never enter the image k-space."""
    both = int(flag_mask("IS_PARALLEL_CALIBRATION_AND_IMAGING"))
    return np.array([bool(int(a.flags) & _CALIB_ONLY) and not int(a.flags) & both
                     for a in acqs], dtype=bool)


def _regridded(
    header: Any, acquisitions: Sequence[Any], regularization: float
) -> tuple[KSpaceGeometry, list[Any], np.ndarray]:
    """Checked lines (noise and non-imaging flags dropped) and their hybrid-space
    (x, oversampled) regridding ``(n_coils, n_lines, n)`` (module docstring, steps 1-2)."""
    geom = header_geometry(header)
    nx = geom.matrix[0]
    acqs = [a for a in acquisitions if not int(a.flags) & _IGNORED]
    if not any(not has_flag(a.flags, "IS_PHASECORR_DATA") for a in acqs):
        raise ReconError("acquisitions: no EPI imaging lines to reconstruct")
    coils = {int(a.active_channels) for a in acqs}
    if len(coils) != 1:
        raise ReconError(f"acquisitions: inconsistent coil counts {sorted(coils)}")
    empty = [i for i, a in enumerate(acqs) if int(a.number_of_samples) == 0]
    if empty:
        raise ReconError(f"acquisitions: {len(empty)} have zero samples (first #{empty[0]})")
    data = [np.asarray(a.data, dtype=np.complex64) for a in acqs]
    hybrid = _to_hybrid(data, _line_trajectories(geom, acqs), nx, regularization)
    n = hybrid.shape[2]
    if n < nx:
        raise ReconError(f"acquisitions: {n} samples per line, fewer than the {nx}-point matrix")
    return geom, acqs, hybrid


def _ghost_correction(hybrid: np.ndarray, fwd: np.ndarray, rev: np.ndarray
                      ) -> np.ndarray | None:
    """``exp(-i phi(x))`` for the reversed lines from the navigators ``fwd``/``rev``
    (boolean line selections of ``hybrid``); None without navigators of both polarities."""
    if not (fwd.any() and rev.any()):
        return None
    phi0, phi1 = fit_ghost_phase(hybrid[:, fwd].mean(axis=1), hybrid[:, rev].mean(axis=1))
    n = hybrid.shape[2]
    x = np.arange(n) - n // 2
    return np.exp(-1j * (phi0 + phi1 * x))


def _place_lines(hybrid: np.ndarray, lines: np.ndarray, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid lines ``(n_coils, k, n)`` placed at ``lines`` of ``(n_coils, n, ny)``
    (repeats averaged, missing lines zero) and the bool mask of placed lines."""
    ksp = np.zeros((hybrid.shape[0], hybrid.shape[2], ny), dtype=np.complex128)
    counts = np.bincount(lines, minlength=ny).astype(float)
    np.add.at(ksp, (slice(None), slice(None), lines), np.moveaxis(hybrid, 1, 2))
    ksp /= np.maximum(counts, 1.0)
    return ksp, counts > 0


@dataclass
class EPIKSpace:
    """EPI lines of one image as Cartesian k-space (see :func:`epi_kspace`).

    Attributes
    ----------
    kspace : numpy.ndarray
        complex64 ``(coils, nx, ny)``: the imaging lines (calibration-only lines left
        out), recon matrix along x, zeros where not sampled; centre at ``(nx//2, ny//2)``.
    mask : numpy.ndarray
        bool ``(ny,)``: lines sampled for imaging.
    calibration : numpy.ndarray or None
        complex64 ``(coils, nx, ny)``: the lines flagged ``IS_PARALLEL_CALIBRATION`` or
        ``..._AND_IMAGING``; None when there are none.
    calibration_mask : numpy.ndarray or None
        bool ``(ny,)``.
    ghost_correction : str
        Where the Nyquist-ghost phase of the imaging / calibration lines came from.
    """

    kspace: np.ndarray
    mask: np.ndarray
    calibration: np.ndarray | None
    calibration_mask: np.ndarray | None
    ghost_correction: str


def epi_kspace(
    header: Any,
    acquisitions: Sequence[Any],
    *,
    navigators: Sequence[Any] | None = None,
    ghost_correction: bool = True,
    regularization: float = 1e-5,
) -> EPIKSpace:
    """EPI lines of one slice/contrast/repetition/set turned into Cartesian k-space.

    Steps 1-3 of the module docstring (ramp regridding to hybrid space with the
    readout reversal undone, Nyquist-ghost correction), the central ``nx`` points of
    the oversampled x kept and the centred orthonormal FFT along x taken back to
    k-space, so the Cartesian parallel-imaging recon (GRAPPA, SENSE) runs on the lines;
    its inverse FFT gives back exactly the coil images of :func:`reconstruct_epi` where
    every line is sampled.

    The ghost phase of the imaging lines comes from the navigators among
    ``acquisitions`` that are not flagged as calibration; that of the calibration
    lines from the navigators flagged ``IS_PARALLEL_CALIBRATION`` (a reference scan's
    own), else the same as the imaging lines'. When ``acquisitions`` hold no
    navigators of both polarities, those in ``navigators`` (another image of the same
    slice) are used; without any, no correction is applied (logged).

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Dataset header (recon matrix and FOV; optional EPI trajectory description).
    acquisitions : sequence of ismrmrd.Acquisition
        Prewhitened lines of one image, navigators and calibration lines included.
    navigators : sequence of ismrmrd.Acquisition, optional
        Fallback navigators (``ACQ_IS_PHASECORR_DATA``) of the same slice.
    ghost_correction : bool
        Apply the navigator-based Nyquist-ghost correction.
    regularization : float
        Tikhonov weight of the readout regridding (relative).

    Returns
    -------
    EPIKSpace

    Raises
    ------
    ReconError
        As :func:`reconstruct_epi`.
    """
    own = [a for a in acquisitions if not int(a.flags) & _IGNORED]
    own_nav = [has_flag(a.flags, "IS_PHASECORR_DATA") for a in own]
    extra = [a for a in (navigators or []) if has_flag(a.flags, "IS_PHASECORR_DATA")
             and not int(a.flags) & _IGNORED] if not any(own_nav) else []
    geom, acqs, hybrid = _regridded(header, list(own) + extra, regularization)
    nx, ny = geom.matrix[0], geom.matrix[1]
    n = hybrid.shape[2]
    is_extra = np.arange(len(acqs)) >= len(own)
    is_nav = np.array([has_flag(a.flags, "IS_PHASECORR_DATA") for a in acqs])
    is_rev = np.array([has_flag(a.flags, "IS_REVERSE") for a in acqs])
    is_cal = np.array([bool(int(a.flags) & _CALIB_ANY) for a in acqs])
    cal_only = _calibration_only(acqs)
    source = "none"
    if ghost_correction:
        nav_img = is_nav & ~is_cal
        img_corr = _ghost_correction(hybrid, nav_img & ~is_rev, nav_img & is_rev)
        nav_cal = is_nav & is_cal
        cal_corr = _ghost_correction(hybrid, nav_cal & ~is_rev, nav_cal & is_rev)
        img_src = ("navigators of another image of the slice" if is_extra.any()
                   else "navigators of the image")
        if img_corr is None:
            _LOG.info("EPI: no navigators of both polarities; ghost correction skipped")
        if cal_corr is None:
            cal_corr, cal_src = img_corr, img_src
        else:
            cal_src = "navigators of the calibration scan"
        lines_img = is_rev & ~is_nav & ~cal_only
        lines_cal = is_rev & ~is_nav & cal_only
        if img_corr is not None:
            hybrid[:, lines_img] *= img_corr
        if cal_corr is not None:
            hybrid[:, lines_cal] *= cal_corr
        source = (f"imaging lines: {img_src if img_corr is not None else 'none'}; "
                  f"calibration lines: {cal_src if cal_corr is not None else 'none'}")

    lines = np.array([int(a.idx.kspace_encode_step_1) for a in acqs])
    data = ~is_nav
    bad = lines[data][(lines[data] < 0) | (lines[data] >= ny)]
    if bad.size:
        raise ReconError(
            f"acquisitions: kspace_encode_step_1 = {int(bad[0])} outside the {ny} encoded lines"
        )
    start = n // 2 - nx // 2

    def to_k(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hyb, mask = _place_lines(hybrid[:, sel], lines[sel], ny)
        return fft_c(hyb[:, start:start + nx], axes=(1,)).astype(np.complex64), mask

    img_sel = data & ~cal_only
    k, mask = to_k(img_sel) if img_sel.any() else (
        np.zeros((hybrid.shape[0], nx, ny), np.complex64), np.zeros(ny, bool))
    cal_sel = data & is_cal
    ck, cmask = to_k(cal_sel) if cal_sel.any() else (None, None)
    return EPIKSpace(k, mask, ck, cmask, source)


def reconstruct_epi(
    header: Any,
    acquisitions: Sequence[Any],
    *,
    backend: str = "numpy",
    ghost_correction: bool = True,
    regularization: float = 1e-5,
) -> np.ndarray:
    """Reconstruct one slice of single-shot EPI (ramp regridding + ghost correction).

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Dataset header (recon matrix and FOV; optional EPI trajectory description).
    acquisitions : sequence of ismrmrd.Acquisition
        Prewhitened lines of one slice/contrast/repetition, readout oversampling not
        removed, navigators (``ACQ_IS_PHASECORR_DATA``) included.
    backend : {"numpy", "cupy"}
        Where the FFT along ky runs (regridding is small and stays on the CPU).
    ghost_correction : bool
        Apply the navigator-based Nyquist-ghost correction (skipped, with a log
        message, when no navigators of both polarities are present).
    regularization : float
        Tikhonov weight of the readout regridding (relative).

    Returns
    -------
    ndarray, shape (n_coils, nx, ny)
        complex64 coil images, orthonormal scale.

    Raises
    ------
    ReconError
        No imaging lines, inconsistent coil or sample counts, line counters beyond the
        encoded matrix, or unrecognised trajectory units.
    """
    if backend not in ("numpy", "cupy"):
        raise ReconError(f"backend: expected 'numpy' or 'cupy', got {backend!r}")
    geom, acqs, hybrid = _regridded(header, acquisitions, regularization)
    nx, ny = geom.matrix[0], geom.matrix[1]
    n = hybrid.shape[2]
    is_nav = np.array([has_flag(a.flags, "IS_PHASECORR_DATA") for a in acqs])
    is_rev = np.array([has_flag(a.flags, "IS_REVERSE") for a in acqs])
    if ghost_correction:
        correction = _ghost_correction(hybrid, is_nav & ~is_rev, is_nav & is_rev)
        if correction is not None:
            hybrid[:, is_rev & ~is_nav] *= correction
        else:
            _LOG.info("EPI: no navigators of both polarities; ghost correction skipped")

    lines = np.array([int(a.idx.kspace_encode_step_1) for a in acqs])
    img_lines = ~is_nav & ~_calibration_only(acqs)
    bad = lines[img_lines][(lines[img_lines] < 0) | (lines[img_lines] >= ny)]
    if bad.size:
        raise ReconError(
            f"acquisitions: kspace_encode_step_1 = {int(bad[0])} outside the {ny} encoded lines"
        )
    ksp, _ = _place_lines(hybrid[:, img_lines], lines[img_lines], ny)
    start = n // 2 - nx // 2
    ksp = ksp[:, start:start + nx]
    xp = get_xp("cuda" if backend == "cupy" else "cpu")
    k = xp.asarray(ksp)
    img = xp.fft.fftshift(xp.fft.ifft(xp.fft.ifftshift(k, axes=2), axis=2, norm="ortho"),
                          axes=2)
    return to_numpy(img).astype(np.complex64)
