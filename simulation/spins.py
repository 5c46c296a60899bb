"""Isochromat ensembles: what the Bloch engine simulates.

A :class:`SpinSystem` is a flat list of isochromats (one or more per phantom voxel) with
their position in scanner coordinates and their tissue parameters. It is built from a
:class:`~mrharmony.phantoms.Phantom` by :meth:`SpinSystem.from_phantom`, or directly from
arrays (tests, analytic checks).

Coordinates: the phantom affine maps voxel indices to RAS+ millimetres; the Pulseq
gradient axes are patient LPS (head-first supine), so ``x_lps = -x_ras``,
``y_lps = -y_ras``, ``z_lps = z_ras``, and positions are stored in metres.

T2' (reversible intravoxel dephasing) is represented, when ``isochromats_per_voxel > 1``,
by a deterministic Lorentzian spread of off-resonance: isochromat ``j`` of ``n`` sits at
the quantile ``(j + 0.5) / n`` of a Cauchy distribution of half width at half maximum
``1 / (2 pi T2')`` Hz, so the ensemble's free-induction decay approximates
``exp(-t / T2')`` (exactly as ``n`` grows) on top of the per-isochromat ``exp(-t / T2)``.

Sub-voxel positions (gradient spoiling). A spoiled steady state needs intravoxel
dephasing: the residual coherences of earlier excitations cancel only in the sum over a
continuum of spoiler phases. With ``subvoxel_positions`` the ``n`` isochromats of a voxel
sit at its in-plane centre and at ``n`` equally spaced (stratified, not random) heights
along the voxel's third (slice, z) axis, where the builders put their crushers, so that
the per-TR spoiler phases are ``n`` equally spaced values and every coherence pathway of
order < ``n`` cancels exactly (random positions leave ~1/sqrt(n) of every pathway, and
random in-plane offsets add random readout-spoiler phases that break the cancellation).

A 2-D phantom (one voxel through z) is modelled as an object that is uniform through z
about its plane: given the excited slice (:func:`through_plane_extent`), its isochromats
span an extent ``L`` of at least twice the slice thickness ``T`` (the slice profile and
its transition bands) chosen so that the slice-axis spoiler moment per TR winds a whole
number ``q`` of cycles over ``L`` with ``gcd(q, n) = 1``, and each isochromat carries
``PD L / (n T)``: the voxel's signal is ``(1/T) * integral of M_xy(z) dz``, which equals
``PD`` times the nominal-flip signal for an ideal rectangular profile (N = 1: one
isochromat at the plane, weight PD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.errors import PhantomError, SimulationError

__all__ = ["GAMMA_BAR_HZ_PER_T", "SpinSystem", "lorentzian_offsets_hz", "moment_unit",
           "through_plane_extent"]

#: Proton gyromagnetic ratio / (2 pi), Hz per tesla (CODATA 2018).
GAMMA_BAR_HZ_PER_T = 42.577478518e6

# RAS <-> LPS: flip the signs of x and y.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def lorentzian_offsets_hz(hwhm_hz: np.ndarray, n: int) -> np.ndarray:
    """Deterministic quantile sample of a Lorentzian (Cauchy) off-resonance distribution.

    Parameters
    ----------
    hwhm_hz : ndarray, shape (M,)
        Half width at half maximum per voxel in Hz (``1 / (2 pi T2')``); 0 gives no spread.
    n : int
        Isochromats per voxel.

    Returns
    -------
    ndarray, shape (M, n), float64
        Offsets in Hz: ``hwhm * tan(pi * ((j + 0.5) / n - 0.5))``; symmetric about 0,
        all zero when ``n == 1``.
    """
    q = (np.arange(n) + 0.5) / n
    unit = np.tan(np.pi * (q - 0.5))
    return np.asarray(hwhm_hz, dtype=np.float64)[:, None] * unit[None, :]


def _as_n(name: str, value: Any, n: int, dtype: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise SimulationError(f"SpinSystem.{name}: expected shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise SimulationError(f"SpinSystem.{name}: {bad} non-finite values")
    return arr


@dataclass(frozen=True, eq=False)
class SpinSystem:
    """A flat ensemble of isochromats (all arrays indexed by isochromat).

    Attributes
    ----------
    position_m : ndarray (N, 3) float64
        Position in scanner LPS coordinates, metres.
    pd : ndarray (N,)
        Proton density weight of the isochromat (the voxel's PD divided by the number of
        isochromats per voxel, so sums over a voxel give its PD).
    r1_per_s, r2_per_s : ndarray (N,)
        Relaxation rates 1/T1 and 1/T2 in 1/s (0 means no relaxation).
    df_hz : ndarray (N,)
        Off-resonance in Hz: B0 offset + chemical shift + T2' spread.
    b1_scale : ndarray (N,)
        Relative transmit B1+ (1 = nominal flip angle).
    d_m2_s : ndarray (N,) or (N, 6)
        Diffusivity in m^2/s, scalar or tensor ``Dxx, Dxy, Dxz, Dyy, Dyz, Dzz`` in LPS.
    voxel_index : ndarray (N,) int64
        Index into the flattened (C order) phantom grid; gathers coil sensitivities.
    n_voxels : int
        Number of voxels of the flattened phantom grid (``coil_sens.shape[1]``).
    field_t : float or None
        Field strength the chemical shifts were computed at (tesla), if known.
    """

    position_m: np.ndarray
    pd: np.ndarray
    r1_per_s: np.ndarray
    r2_per_s: np.ndarray
    df_hz: np.ndarray
    b1_scale: np.ndarray
    d_m2_s: np.ndarray
    voxel_index: np.ndarray
    n_voxels: int
    field_t: float | None = None

    def __post_init__(self) -> None:
        pos = np.asarray(self.position_m, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise SimulationError(f"SpinSystem.position_m: expected shape (N, 3), got {pos.shape}")
        n = pos.shape[0]
        if not np.all(np.isfinite(pos)):
            raise SimulationError("SpinSystem.position_m: non-finite positions")
        object.__setattr__(self, "position_m", pos)
        for name in ("pd", "r1_per_s", "r2_per_s", "df_hz", "b1_scale"):
            object.__setattr__(self, name, _as_n(name, getattr(self, name), n, np.float64))
        for name in ("r1_per_s", "r2_per_s"):
            bad = getattr(self, name) < 0
            if np.any(bad):
                raise SimulationError(
                    f"SpinSystem.{name}: {int(bad.sum())} negative rates "
                    f"(first at isochromat {int(np.argmax(bad))})"
                )
        d = np.asarray(self.d_m2_s, dtype=np.float64)
        if d.ndim == 0:
            d = np.full(n, d)
        if d.shape not in ((n,), (n, 6)):
            raise SimulationError(
                f"SpinSystem.d_m2_s: expected shape ({n},) or ({n}, 6), got {d.shape}"
            )
        if not np.all(np.isfinite(d)) or (d.ndim == 1 and np.any(d < 0)):
            raise SimulationError("SpinSystem.d_m2_s: diffusivity must be finite and >= 0")
        object.__setattr__(self, "d_m2_s", d)
        vi = np.asarray(self.voxel_index, dtype=np.int64)
        if vi.ndim == 0:
            vi = np.full(n, vi, dtype=np.int64)
        if vi.shape != (n,):
            raise SimulationError(f"SpinSystem.voxel_index: expected shape ({n},), got {vi.shape}")
        if n and (vi.min() < 0 or vi.max() >= self.n_voxels):
            raise SimulationError(
                f"SpinSystem.voxel_index: values must lie in [0, {self.n_voxels}), "
                f"got [{vi.min()}, {vi.max()}]"
            )
        object.__setattr__(self, "voxel_index", vi)

    @property
    def n_spins(self) -> int:
        """Number of isochromats N."""
        return int(self.position_m.shape[0])

    def __len__(self) -> int:
        return self.n_spins

    def diffusion_tensor_m2_s(self) -> np.ndarray:
        """Diffusivity as an (N, 6) tensor ``Dxx, Dxy, Dxz, Dyy, Dyz, Dzz`` (LPS, m^2/s)."""
        d = self.d_m2_s
        if d.ndim == 2:
            return d
        out = np.zeros((d.shape[0], 6))
        out[:, 0] = out[:, 3] = out[:, 5] = d
        return out

    def subset(self, index: slice | np.ndarray) -> SpinSystem:
        """Isochromats ``index`` (a slice or an index array) as a new SpinSystem."""
        return SpinSystem(
            position_m=self.position_m[index],
            pd=self.pd[index],
            r1_per_s=self.r1_per_s[index],
            r2_per_s=self.r2_per_s[index],
            df_hz=self.df_hz[index],
            b1_scale=self.b1_scale[index],
            d_m2_s=self.d_m2_s[index],
            voxel_index=self.voxel_index[index],
            n_voxels=self.n_voxels,
            field_t=self.field_t,
        )

    @classmethod
    def from_phantom(
        cls,
        phantom: Any,
        *,
        isochromats_per_voxel: int = 1,
        b0_hz_extra: np.ndarray | None = None,
        b1_scale: np.ndarray | None = None,
        subvoxel_positions: bool = False,
        through_plane_mm: tuple[float, float] | None = None,
        dtype: Any = np.float32,
    ) -> SpinSystem:
        """Isochromats for every voxel with PD > 0 of a phantom.

        Parameters
        ----------
        phantom : mrharmony.phantoms.Phantom
            Tissue maps (nx, ny, nz) and their RAS affine.
        isochromats_per_voxel : int
            Isochromats per voxel (>= 1). With more than one, T2' = 1/(1/T2* - 1/T2) is
            represented by a Lorentzian-quantile spread of off-resonance (see module doc).
        b0_hz_extra : ndarray (nx, ny, nz), optional
            Site B0 inhomogeneity in Hz, added to ``phantom.b0_hz``.
        b1_scale : ndarray (nx, ny, nz), optional
            Relative transmit B1+ per voxel (default 1).
        subvoxel_positions : bool
            Place the isochromats of a voxel at equally spaced heights along its third
            (slice) axis, at its in-plane centre, instead of all at its centre: gradient
            spoilers and crushers then dephase them as in tissue (see the module doc).
            The spread is the voxel's thickness, or ``through_plane_mm`` for a 2-D phantom.
        through_plane_mm : (float, float), optional
            2-D phantoms (``nz == 1``) with ``subvoxel_positions`` only: ``(L, T)``, the
            extent (mm) the isochromats span through z, centred on the phantom's plane,
            and the nominal slice thickness (mm) the signal is normalised to (each
            isochromat weighs ``PD L / (n T)``); from :func:`through_plane_extent`.
            Default: the voxel's own thickness, weight ``PD / n``.
        dtype : numpy dtype
            Precision the tissue values are rounded to (float32 by default, so that CPU
            and GPU runs see identical parameters); positions stay float64.

        Returns
        -------
        SpinSystem
            Ordered voxel by voxel (C order), isochromats of one voxel contiguous.

        Raises
        ------
        SimulationError
            If an extra map has the wrong shape, ``isochromats_per_voxel < 1``, or
            ``through_plane_mm`` is not two positive lengths.
        """
        if int(isochromats_per_voxel) != isochromats_per_voxel or isochromats_per_voxel < 1:
            raise SimulationError(
                f"isochromats_per_voxel: must be an integer >= 1, got {isochromats_per_voxel!r}"
            )
        n_iso = int(isochromats_per_voxel)
        if through_plane_mm is not None:
            tp = np.asarray(through_plane_mm, dtype=np.float64)
            if tp.shape != (2,) or not np.all(np.isfinite(tp)) or np.any(tp <= 0):
                raise SimulationError(
                    f"through_plane_mm: expected two lengths > 0 (extent, thickness) in mm, "
                    f"got {through_plane_mm!r}"
                )
        shape = tuple(np.shape(phantom.pd))
        if len(shape) != 3:
            raise PhantomError(f"pd: expected a 3-D (nx, ny, nz) map, got shape {shape}")
        for name, extra in (("b0_hz_extra", b0_hz_extra), ("b1_scale", b1_scale)):
            if extra is not None and np.shape(extra) != shape:
                raise SimulationError(
                    f"{name}: expected the phantom shape {shape}, got {np.shape(extra)}"
                )
        pd = np.asarray(phantom.pd, dtype=np.float64)
        mask = pd > 0
        flat = np.flatnonzero(mask.ravel())
        ijk = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.float64)
        affine = np.asarray(phantom.affine, dtype=np.float64)

        def per_voxel(arr: Any) -> np.ndarray:
            return np.asarray(arr, dtype=np.float64).ravel()[flat].astype(dtype).astype(np.float64)

        t1 = per_voxel(phantom.t1_ms)
        t2 = per_voxel(phantom.t2_ms)
        t2s = per_voxel(phantom.t2star_ms)
        bad = (t1 <= 0) | (t2 <= 0) | (t2s <= 0)
        if np.any(bad):
            raise PhantomError(
                f"t1_ms/t2_ms/t2star_ms: {int(bad.sum())} voxels with PD > 0 have a relaxation "
                "time <= 0"
            )
        df = per_voxel(phantom.b0_hz)
        if b0_hz_extra is not None:
            df = df + per_voxel(b0_hz_extra)
        cs = getattr(phantom, "chemical_shift_ppm", None)
        field_t = float(phantom.field_t)
        if cs is not None:
            df = df + per_voxel(cs) * 1e-6 * GAMMA_BAR_HZ_PER_T * field_t
        b1 = per_voxel(b1_scale) if b1_scale is not None else np.ones(flat.size)
        dti = getattr(phantom, "dti_mm2_s", None)
        if dti is not None:
            d = np.asarray(dti, dtype=np.float64).reshape(-1, 6)[flat].astype(dtype) * 1e-6
            # RAS -> LPS: components mixing one flipped axis with z change sign.
            d = d * np.array([1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
        else:
            d = per_voxel(phantom.adc_mm2_s) * 1e-6

        # T2' spread: 1/T2' = 1/T2* - 1/T2 (>= 0), HWHM = 1/(2 pi T2').
        r2prime = np.clip(1e3 / t2s - 1e3 / t2, 0.0, None)
        hwhm = r2prime / (2 * np.pi)
        spread = lorentzian_offsets_hz(hwhm, n_iso)  # (M, n_iso)

        weight = 1.0 / n_iso
        vox = np.repeat(ijk[:, None, :], n_iso, axis=1)
        if subvoxel_positions and n_iso > 1:
            extent = 1.0  # in voxels along the third axis
            if through_plane_mm is not None and shape[2] == 1:
                length_mm, thick_mm = (float(v) for v in through_plane_mm)
                voxel_z_mm = float(np.linalg.norm(affine[:3, 2]))
                extent = length_mm / voxel_z_mm
                weight = length_mm / (thick_mm * n_iso)
            vox[:, :, 2] += ((np.arange(n_iso) + 0.5) / n_iso - 0.5) * extent
        ras_mm = vox.reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]
        position_m = ras_mm * _RAS_TO_LPS * 1e-3

        def rep(a: np.ndarray) -> np.ndarray:
            return np.repeat(a, n_iso, axis=0)

        return cls(
            position_m=position_m,
            pd=rep(pd.ravel()[flat].astype(dtype).astype(np.float64) * weight),
            r1_per_s=rep(1e3 / t1),
            r2_per_s=rep(1e3 / t2),
            df_hz=(df[:, None] + spread).reshape(-1),
            b1_scale=rep(b1),
            d_m2_s=rep(d),
            voxel_index=rep(flat.astype(np.int64)),
            n_voxels=int(np.prod(shape)),
            field_t=field_t,
        )


def moment_unit(moments: np.ndarray, *, resolution: float, max_divisor: int = 12,
                tolerance: float = 0.02) -> float:
    """The largest unit of which every gradient moment is a whole multiple.

    Parameters
    ----------
    moments : ndarray
        Moments (cycles/m, >= 0), e.g. between consecutive RF pulses.
    resolution : float
        Moments below this (cycles/m) count as zero (no dephasing).
    max_divisor : int
        The unit is sought as ``m / j`` for the smallest significant moment ``m`` and
        ``j = 1 .. max_divisor``.
    tolerance : float
        Largest distance (in units) of a moment from a whole multiple.

    Returns
    -------
    float
        The unit (cycles/m), or 0 when there is no significant moment or no unit fits.
    """
    m = np.asarray(moments, dtype=np.float64)
    m = m[m > resolution]
    if m.size == 0:
        return 0.0
    base = float(m.min())
    for j in range(1, max_divisor + 1):
        unit = base / j
        ratio = m / unit
        if np.all(np.abs(ratio - np.round(ratio)) <= tolerance):
            return unit
    return 0.0


def through_plane_extent(seq: Any, isochromats_per_voxel: int) -> tuple[float, float] | None:
    """Through-plane extent of a 2-D phantom's isochromats for a slice-selective sequence.

    Parameters
    ----------
    seq : PulseqSequence
        The sequence (:func:`mrharmony.formats.pulseq.read_pulseq`).
    isochromats_per_voxel : int
        Isochromats per voxel ``n``.

    Returns
    -------
    (float, float) or None
        ``(L, T)`` in mm for :meth:`SpinSystem.from_phantom`: ``T`` is the slice thickness
        of the first slice-selective excitation (FWHM of its RF spectrum over its
        slice-select gradient, :mod:`mrharmony.formats.layout`); ``L >= 2 T`` is the
        smallest length over which the unit ``k`` (cycles/m) of the z gradient moments
        between consecutive RF pulses winds a whole number ``q`` of cycles with
        ``gcd(q, n) = 1`` (``q = L k``). The unit is the largest ``k`` of which every
        such moment (crushers around refocusing pulses, the slice-axis spoiler between
        excitations) is a whole multiple (:func:`moment_unit`); without one, the median
        moment between consecutive excitations (the spoiler) as before. A coherence
        pathway whose net moment is ``m k`` then winds ``m q`` cycles over the ``n``
        stratified isochromats and cancels exactly unless ``n`` divides ``m``: every
        unwanted pathway of order below ``n`` is gone (a 10-echo CPMG train has orders
        up to about 2 x 10 + 2 in units of its excitation-to-refocusing moment; fewer
        isochromats leave spurious echoes). Without a slice spoiler or crusher (less
        than half a cycle per slice), ``L = 2 T``. ``None`` when the sequence has no
        slice-selective excitation.
    """
    from mrharmony.formats.layout import excitation_thickness_m

    thick_m = float(excitation_thickness_m(seq))
    if not thick_m > 0:
        return None
    n = max(int(isochromats_per_voxel), 1)
    t_rf, _, uses = seq.rf_times()
    t_rf = np.asarray(t_rf, dtype=np.float64)
    is_exc = np.array([u in ("excitation", "undefined") for u in uses], dtype=bool)
    k = 0.0
    if t_rf.size >= 2:
        t_g, g = seq.gradient_waveforms_concat()
        t_g = np.asarray(t_g, dtype=np.float64)
        gz = np.asarray(g, dtype=np.float64)[:, 2]
        # exact integral of the piecewise-linear waveform, read at the pulse centres
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (gz[1:] + gz[:-1]) * np.diff(t_g))])
        at_rf = np.interp(t_rf, t_g, cum)
        k = moment_unit(np.abs(np.diff(at_rf)), resolution=0.05 / thick_m)
        if k == 0.0 and is_exc.sum() >= 2:
            k = float(np.median(np.abs(np.diff(at_rf[is_exc]))))
    if k * thick_m < 0.5:
        return 2e3 * thick_m, 1e3 * thick_m
    q = max(math.ceil(2.0 * thick_m * k - 1e-6), 1)
    while math.gcd(q, n) != 1:
        q += 1
    return 1e3 * q / k, 1e3 * thick_m
