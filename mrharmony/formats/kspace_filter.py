"""The k-space apodisation filters, one definition for the simulator and the recon.

The simulator's vendor receive chain (:mod:`mrharmony.simulation.native`) apodises the
raw samples with these windows and records the filter's name in the ISMRMRD header
(``userParameters`` ``kspace_filter``); the reconstruction (:mod:`mrharmony.recon`,
option ``filter``) applies the same windows to the k-space it reconstructs. Both read the
meaning of the recorded name here, so a filter named in a raw file means one thing.

The windows are radial in normalised k-space: ``k = |k| / k_max`` with every axis
normalised by its own ``k_max = N / (2 FOV)`` (elliptical), so ``k = 1`` is the edge of the
acquired matrix along each axis.
"""

from __future__ import annotations

import numpy as np

from mrharmony.errors import ConfigError

__all__ = ["KSPACE_FILTERS", "kspace_window", "normalised_kspace_radius"]

#: Filter names, as the ISMRMRD header records them and the recon option takes them.
KSPACE_FILTERS = ("none", "hamming", "hanning", "fermi")


def kspace_window(
    k_norm: np.ndarray, kind: str, *, radius: float = 0.9, width: float = 0.05
) -> np.ndarray:
    """Radial k-space apodisation weights.

    Parameters
    ----------
    k_norm : ndarray
        ``|k| / k_max`` per sample (dimensionless), any shape.
    kind : {"none", "hamming", "hanning", "fermi"}
        ``hamming``: ``0.54 + 0.46 cos(pi k)``; ``hanning``: ``0.5 + 0.5 cos(pi k)`` (both
        for ``k <= 1``, the value at 1 beyond); ``fermi``: ``1 / (1 + exp((k - radius) /
        width))``.
    radius, width : float
        Fermi filter radius and transition width as fractions of ``k_max``.

    Returns
    -------
    ndarray float32, same shape as ``k_norm``

    Raises
    ------
    ConfigError
        An unknown filter name (callers re-raise it as their own domain error).
    """
    k = np.asarray(k_norm, dtype=np.float64)
    if kind == "none":
        w = np.ones_like(k)
    elif kind in ("hamming", "hanning"):
        a = 0.54 if kind == "hamming" else 0.5
        w = a + (1.0 - a) * np.cos(np.pi * np.clip(k, 0.0, 1.0))
    elif kind == "fermi":
        if not (radius > 0 and width > 0):
            raise ConfigError(f"kspace_filter 'fermi': radius {radius} and width {width} "
                              "must be > 0")
        w = 1.0 / (1.0 + np.exp(np.clip((k - radius) / width, -50.0, 50.0)))
    else:
        raise ConfigError(f"kspace_filter: unknown filter {kind!r} "
                          f"({', '.join(KSPACE_FILTERS)})")
    return w.astype(np.float32)


def normalised_kspace_radius(shape: tuple[int, ...]) -> np.ndarray:
    """``|k| / k_max`` on a Cartesian grid whose centre is index ``n // 2`` on every axis.

    Parameters
    ----------
    shape : tuple of int
        Grid shape; axes of length 1 do not count (a 2-D slice of a 3-D grid).

    Returns
    -------
    ndarray float64 of ``shape``
        ``sqrt(sum_axis ((i - n // 2) / (n / 2))^2)`` (the edge sample ``i = 0`` of an even
        axis is at 1).
    """
    r2 = np.zeros(shape, dtype=np.float64)
    for ax, n in enumerate(shape):
        if n < 2:
            continue
        g = (np.arange(n) - n // 2) / (n / 2.0)
        view = [1] * len(shape)
        view[ax] = n
        r2 = r2 + (g**2).reshape(view)
    return np.sqrt(r2)
