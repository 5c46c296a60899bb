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
from typing import Any

import numpy as np

from mrharmony.backend import get_xp, to_numpy
from mrharmony.errors import ReconError
from mrharmony.formats.flags import NOT_IMAGING, flag_mask, has_flag
from mrharmony.recon.noncartesian import (
    KSpaceGeometry,
    header_geometry,
    trajectory_cycles_per_fov,
)

__all__ = ["fit_ghost_phase", "ramp_trajectory", "reconstruct_epi", "regridding_matrix"]

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
    geom = header_geometry(header)
    nx, ny = geom.matrix[0], geom.matrix[1]
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

    is_nav = np.array([has_flag(a.flags, "IS_PHASECORR_DATA") for a in acqs])
    is_rev = np.array([has_flag(a.flags, "IS_REVERSE") for a in acqs])
    if ghost_correction:
        fwd, rev = is_nav & ~is_rev, is_nav & is_rev
        if fwd.any() and rev.any():
            phi0, phi1 = fit_ghost_phase(hybrid[:, fwd].mean(axis=1),
                                         hybrid[:, rev].mean(axis=1))
            x = np.arange(n) - n // 2
            correction = np.exp(-1j * (phi0 + phi1 * x))
            hybrid[:, is_rev & ~is_nav] *= correction
        else:
            _LOG.info("EPI: no navigators of both polarities; ghost correction skipped")

    lines = np.array([int(a.idx.kspace_encode_step_1) for a in acqs])
    img_lines = ~is_nav
    bad = lines[img_lines][(lines[img_lines] < 0) | (lines[img_lines] >= ny)]
    if bad.size:
        raise ReconError(
            f"acquisitions: kspace_encode_step_1 = {int(bad[0])} outside the {ny} encoded lines"
        )
    ksp = np.zeros((hybrid.shape[0], n, ny), dtype=np.complex128)
    counts = np.bincount(lines[img_lines], minlength=ny).astype(float)
    np.add.at(ksp, (slice(None), slice(None), lines[img_lines]),
              np.moveaxis(hybrid[:, img_lines], 1, 2))
    ksp /= np.maximum(counts, 1.0)
    start = n // 2 - nx // 2
    ksp = ksp[:, start:start + nx]
    xp = get_xp("cuda" if backend == "cupy" else "cpu")
    k = xp.asarray(ksp)
    img = xp.fft.fftshift(xp.fft.ifft(xp.fft.ifftshift(k, axes=2), axis=2, norm="ortho"),
                          axes=2)
    return to_numpy(img).astype(np.complex64)
