"""Thermal noise of the receive chain, and the digital receiver's readout filter.

Noise level. The site's ``[receiver] snr_ref`` is the image SNR of a fully relaxed
PD = 1 voxel of 1 mm^3 per square root of second of total ADC time at 3 T (coil-combined,
at the array's mean sensitivity; SNR = mean signal / standard deviation of the real
part of the complex image noise). It scales with the main field as
``(B0 / 3 T) ** field_exponent``: 1 in the body-noise limit, ~1.65 measured in the human
brain between 3 T and 9.4 T (Pohmann et al., MRM 75, 801 (2016)); the presets use 1.65 at
>= 3 T and a little less below.

With the simulated signal in units where one phantom voxel of proton density 1 gives a
signal of 1 (the engine's convention), a Fourier reconstruction ``ifft`` (with 1/N) of
N samples at dwell ``dt`` gives a voxel of volume ``V_recon`` the SNR
``V_recon / V_phantom * sqrt(N) / sigma``. Asking it to be
``snr(B0) * V_recon * sqrt(N dt)`` gives the per-sample standard deviation (each of the
real and imaginary parts)::

    sigma = 1 / (snr(B0) * V_phantom_mm3 * sqrt(dt_s))

so that noise scales with the voxel volume and with the receiver bandwidth
(``1 / sqrt(dwell)``) as it does on a scanner. Noise correlated between coils with the
covariance ``Psi`` is ``L w`` with ``L`` the Cholesky factor of ``Psi`` and ``w`` white.
"""

from __future__ import annotations

import numpy as np

from mrharmony.errors import SiteError

__all__ = [
    "correlated_noise",
    "noise_sigma",
    "readout_filter_response",
    "snr_at_field",
]

#: Field strength (T) at which the site's ``snr_ref`` is quoted.
REFERENCE_FIELD_T = 3.0


def snr_at_field(snr_ref: float, field_t: float, *, field_exponent: float) -> float:
    """Scale an SNR quoted at 3 T to another field: ``snr_ref * (B0 / 3 T) ** exponent``."""
    if field_t <= 0:
        raise SiteError(f"field strength: {field_t} T must be positive")
    return float(snr_ref * (field_t / REFERENCE_FIELD_T) ** field_exponent)


def noise_sigma(
    *, snr: float, voxel_volume_mm3: float, dwell_s: np.ndarray | float
) -> np.ndarray:
    """Per-sample noise standard deviation (real and imaginary parts each).

    Parameters
    ----------
    snr : float
        SNR per mm^3 per sqrt(s) at the site's field (:func:`snr_at_field`).
    voxel_volume_mm3 : float
        Volume of one phantom voxel in mm^3.
    dwell_s : float or ndarray
        ADC dwell time(s) in seconds.

    Returns
    -------
    ndarray
        ``1 / (snr * V * sqrt(dwell))`` in signal units (module docstring).
    """
    dwell = np.asarray(dwell_s, dtype=np.float64)
    if np.any(dwell <= 0):
        raise SiteError("noise: ADC dwell times must be positive")
    if snr <= 0 or voxel_volume_mm3 <= 0:
        raise SiteError(f"noise: snr ({snr}) and voxel volume ({voxel_volume_mm3} mm^3) "
                        "must be positive")
    return 1.0 / (snr * voxel_volume_mm3 * np.sqrt(dwell))


def correlated_noise(
    covariance: np.ndarray,
    sigma: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Complex Gaussian noise correlated between coils.

    Parameters
    ----------
    covariance : ndarray (n_coils, n_coils)
        Hermitian positive-definite noise covariance ``Psi`` (relative; unit diagonal
        for equal channels).
    sigma : ndarray (n_samples,)
        Standard deviation of the real and of the imaginary part of each sample.
    rng : numpy.random.Generator
        Seeded generator (the only source of randomness).

    Returns
    -------
    ndarray (n_coils, n_samples) complex64
        ``sigma * L (a + i b)`` with ``a, b ~ N(0, 1)``: ``E[n n^H] = 2 sigma^2 Psi``.

    Raises
    ------
    SiteError
        If the covariance is not positive definite.
    """
    psi = np.asarray(covariance)
    try:
        chol = np.linalg.cholesky(psi)
    except np.linalg.LinAlgError:
        raise SiteError("noise covariance: not positive definite") from None
    n_coils = psi.shape[0]
    sigma = np.asarray(sigma, dtype=np.float32)
    white = rng.standard_normal((2, n_coils, sigma.size), dtype=np.float32)
    w = (white[0] + 1j * white[1]).astype(np.complex64)
    out = (chol.astype(np.complex64) @ w) if n_coils > 1 else w * np.complex64(chol[0, 0])
    out *= sigma[None, :]
    return out


def readout_filter_response(n_samples: int, *, rolloff: float) -> np.ndarray:
    """Magnitude response of a raised-cosine anti-alias filter on the FFT grid.

    Flat (1) over the central ``1 - rolloff`` of the receiver bandwidth, a cosine
    roll-off to 0.5 (-6 dB) at the band edge +-BW/2. Returned in ``np.fft.fftfreq``
    order (float32, ``(n_samples,)``), to multiply the FFT of an ADC readout.
    """
    u = np.abs(np.fft.fftfreq(n_samples))  # frequency / receiver bandwidth, in [0, 0.5]
    if rolloff <= 0:
        return np.ones(n_samples, dtype=np.float32)
    u_pass = 0.5 * (1.0 - rolloff)
    x = np.clip((u - u_pass) / rolloff, 0.0, None)  # 0 .. 0.5 across the roll-off
    resp = np.where(u <= u_pass, 1.0, 0.5 * (1.0 + np.cos(np.pi * x)))
    return resp.astype(np.float32)
