"""Virtual sites: one scanner installation, as a TOML file validated into a frozen :class:`Site`.

A site is what makes "the same protocol" give different raw data from one scanner to the
next. It names a scanner hardware profile of the sequence library and adds:

- ``[b0]``: the main-field inhomogeneity left after shimming, as a spherical-harmonic
  residual (the degrees the shim cannot correct) of a given RMS in ppm;
- ``[b1]``: the transmit field, a global calibration scale and the centre brightening
  (dielectric standing-wave effect, ~0 at 1.5 T, 20-30 % at 3 T, more at 7 T);
- ``[coil]``: the receive array (Biot-Savart loops, see :mod:`mrharmony.simulation.coils`);
- ``[receiver]``: thermal noise (SNR scaled with field strength and voxel volume, see
  :mod:`mrharmony.simulation.noise`), receiver gain and the readout (anti-alias) filter;
- ``[gradients]``: gradient delays and amplitude scaling errors per axis;
- ``[native]``: the vendor's own implementation of a protocol (RF pulse, spoiling, k-space
  filter, prescan normalisation), used when a protocol is run in its native flavour (see
  :mod:`mrharmony.simulation.native`).

Example (``sites/siemens-prisma-3t.toml``)::

    name = "siemens-prisma-3t"
    scanner = "siemens-prisma"
    [b0]
    shim_order = 2
    residual_ppm = 0.08
    [coil]
    channels = 32
    geometry = "helmet"

Every key carries its unit in its name and every table is optional (defaults are an
ideal 3 T-like site with a single uniform receive channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import special

from mrharmony.config import from_mapping, load_toml, param, resolve_named_toml, to_mapping
from mrharmony.errors import ConfigError, ScannerError, SiteError

if TYPE_CHECKING:
    from mrharmony.sequences.scanner import ScannerProfile

__all__ = [
    "B0Config",
    "B1Config",
    "CoilConfig",
    "GradientConfig",
    "NativeConfig",
    "ReceiverConfig",
    "Site",
    "b0_residual_hz",
    "b1_scale_map",
    "list_sites",
    "load_site",
    "lps_positions_mm",
    "site_from_mapping",
]


@dataclass(frozen=True, kw_only=True)
class B0Config:
    """Main-field inhomogeneity left after shimming (added to the phantom's own b0_hz)."""

    shim_order: int = param(
        2, doc="highest spherical-harmonic degree the shim corrects (1: linear, 2: 2nd order)",
        ge=0, le=4,
    )
    residual_ppm: float = param(
        0.0, doc="RMS of the shim residual over the object (degrees shim_order+1, +2)",
        unit="ppm", ge=0, le=20,
    )
    radius_mm: float = param(
        90.0, doc="radius that normalises the harmonics (head size)", unit="mm", gt=10, le=500
    )
    seed: int = param(0, doc="seed of the residual's harmonic coefficients (fixed per site)", ge=0)


@dataclass(frozen=True, kw_only=True)
class B1Config:
    """Transmit field: global calibration and the quadratic centre brightening."""

    scale: float = param(1.0, doc="global transmit calibration (actual / nominal flip)", gt=0,
                         le=3)
    center_pct: float = param(
        0.0, doc="B1+ excess at isocentre relative to radius_mm (centre brightening)",
        unit="%", ge=-80, le=300,
    )
    tilt_pct: float = param(
        0.0, doc="left-right B1+ asymmetry: change from x = -radius_mm to +radius_mm (LPS x)",
        unit="%", ge=-100, le=100,
    )
    radius_mm: float = param(
        90.0, doc="radius where the quadratic term is zero", unit="mm", gt=10, le=500
    )


@dataclass(frozen=True, kw_only=True)
class CoilConfig:
    """Receive array: circular loops on a cylinder or a helmet around the head."""

    channels: int = param(1, doc="receive channels (1: uniform body-coil-like receive)", ge=1,
                          le=128)
    geometry: Literal["cylinder", "helmet"] = param(
        "cylinder", doc="loop layout: rings on a cylinder, or a spherical cap (helmet)"
    )
    radius_mm: float = param(
        140.0, doc="radius of the cylinder / helmet the loops sit on", unit="mm", gt=30, le=400
    )
    loop_radius_mm: float = param(
        0.0, doc="loop radius (0: from the loop spacing, neighbours overlapping)", unit="mm",
        ge=0, le=300,
    )
    center_mm: tuple[float, ...] = param(
        (0.0, 0.0, 0.0), doc="centre of the array in scanner LPS coordinates", unit="mm",
        length=3,
    )
    noise_coupling: float = param(
        0.2, doc="fraction of the sample-noise overlap correlation left after preamplifier "
        "decoupling (0: uncorrelated coils)", ge=0, lt=1,
    )


@dataclass(frozen=True, kw_only=True)
class ReceiverConfig:
    """Thermal noise, receiver gain and the ADC readout filter."""

    snr_ref: float = param(
        10.0, doc="image SNR of a fully relaxed PD=1 voxel of 1 mm^3 per sqrt(s) of total ADC "
        "time at 3 T (coil-combined, at the array's mean sensitivity)", gt=0,
    )
    field_exponent: float = param(
        1.65, doc="SNR ~ B0**field_exponent (1: body-noise limit; 1.65: Pohmann 2016 brain)",
        ge=0.5, le=2.5,
    )
    gain_db: float = param(0.0, doc="receiver gain applied to signal and noise", ge=-60, le=60)
    readout_filter: Literal["none", "raised-cosine"] = param(
        "raised-cosine", doc="anti-alias filter of the digital receiver along the readout"
    )
    readout_filter_rolloff: float = param(
        0.1, doc="fraction of the receiver bandwidth in the filter's cosine roll-off", ge=0,
        le=1,
    )


@dataclass(frozen=True, kw_only=True)
class GradientConfig:
    """Gradient-chain imperfections (per physical axis x, y, z in LPS)."""

    delay_us: tuple[float, ...] = param(
        (0.0, 0.0, 0.0), doc="gradient delay per axis relative to RF/ADC", unit="us",
        ge=-50, le=50, length=3,
    )
    scale_error_pct: tuple[float, ...] = param(
        (0.0, 0.0, 0.0), doc="gradient amplitude error per axis (calibration)", unit="%",
        ge=-20, le=20, length=3,
    )


@dataclass(frozen=True, kw_only=True)
class NativeConfig:
    """The vendor's own implementation choices, used for the native flavour of a protocol."""

    rf_shape: Literal["sinc-hanning", "sinc-hamming", "sinc", "slr", "gauss"] = param(
        "sinc-hanning", doc="excitation pulse shape of the vendor's product sequences"
    )
    rf_time_bw_product: float = param(
        4.0, doc="time-bandwidth product of the vendor's slice-selective pulses", gt=0.5, le=20
    )
    slice_profile: Literal["sharp", "standard", "fast"] = param(
        "standard", doc="vendor slice-profile mode (recorded; realised through the RF pulse)"
    )
    spoiler_cycles_per_voxel: float = param(
        2.0, doc="readout-axis spoiler moment, cycles of phase across one voxel", ge=0, le=32
    )
    crusher_cycles_per_slice: float = param(
        4.0, doc="slice-axis spoiler / crusher moment, cycles across the slice", ge=0, le=64
    )
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )
    kspace_filter: Literal["none", "hamming", "hanning", "fermi"] = param(
        "none", doc="k-space apodisation the vendor's recon applies"
    )
    kspace_filter_radius: float = param(
        0.9, doc="Fermi filter radius as a fraction of k_max", gt=0, le=1.5
    )
    kspace_filter_width: float = param(
        0.05, doc="Fermi filter transition width as a fraction of k_max", gt=0, le=1
    )
    prescan_normalize: bool = param(
        False, doc="receive-field intensity normalisation (Siemens Prescan Normalize, GE PURE, "
        "Philips CLEAR)"
    )


_SECTIONS: dict[str, type] = {
    "b0": B0Config,
    "b1": B1Config,
    "coil": CoilConfig,
    "receiver": ReceiverConfig,
    "gradients": GradientConfig,
    "native": NativeConfig,
}


@dataclass(frozen=True, kw_only=True)
class Site:
    """A virtual scanner installation (see the module docstring for the tables)."""

    name: str = param(doc="site identifier, e.g. 'siemens-prisma-3t'")
    scanner: str = param(doc="scanner profile name (see `mrharmony seq list`) or TOML path")
    description: str = param("", doc="free text shown by `mrharmony site list`")
    b0: B0Config = field(default_factory=B0Config)
    b1: B1Config = field(default_factory=B1Config)
    coil: CoilConfig = field(default_factory=CoilConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    native: NativeConfig = field(default_factory=NativeConfig)

    @property
    def profile(self) -> ScannerProfile:
        """The scanner hardware profile the site runs on."""
        from mrharmony.sequences.scanner import load_scanner

        return load_scanner(self.scanner)

    @property
    def field_strength_t(self) -> float:
        """Nominal main field of the site's scanner, in tesla."""
        return float(self.profile.field_strength_t)

    @property
    def vendor(self) -> str:
        """Manufacturer of the site's scanner."""
        return self.profile.vendor

    @property
    def larmor_hz(self) -> float:
        """Proton Larmor frequency at the site's field, in Hz."""
        return self.profile.larmor_hz

    @property
    def gradient_scale(self) -> tuple[float, float, float]:
        """Actual / nominal gradient amplitude per axis (x, y, z)."""
        s = [1.0 + e / 100.0 for e in self.gradients.scale_error_pct]
        return (s[0], s[1], s[2])

    @property
    def gradient_delay_s(self) -> tuple[float, float, float]:
        """Gradient delay per axis in seconds."""
        d = [v * 1e-6 for v in self.gradients.delay_us]
        return (d[0], d[1], d[2])

    def to_mapping(self) -> dict[str, Any]:
        """The site as TOML-compatible nested tables (inverse of :func:`site_from_mapping`)."""
        out: dict[str, Any] = {"name": self.name, "scanner": self.scanner}
        if self.description:
            out["description"] = self.description
        for key in _SECTIONS:
            out[key] = to_mapping(getattr(self, key))
        return out


def site_from_mapping(data: dict[str, Any], *, source: str = "site") -> Site:
    """Validate a mapping (parsed TOML) into a :class:`Site`.

    Raises
    ------
    SiteError
        Unknown table or key, wrong type or unit, value out of range, or a scanner name
        that is not a known profile (the message names the key).
    """
    if not isinstance(data, dict):
        raise SiteError(f"{source}: expected a table of keys")
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    sections: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        if key in data:
            if not isinstance(data[key], dict):
                raise SiteError(f"{source}: {key}: expected a table [{key}]")
            try:
                sections[key] = from_mapping(cls, data[key], source=f"{source}: [{key}]")
            except ConfigError as exc:
                raise SiteError(str(exc)) from None
    allowed = {"name", "scanner", "description"}
    for key in top:
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(key, sorted(allowed | set(_SECTIONS)), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SiteError(
                f"{source}: {key}: unknown key{hint} (keys: name, scanner, description; "
                f"tables: {', '.join(f'[{s}]' for s in _SECTIONS)})"
            )
    for key in ("name", "scanner"):
        if key not in top:
            raise SiteError(f"{source}: {key}: missing required key")
        if not isinstance(top[key], str):
            raise SiteError(f"{source}: {key}: expected a string, got {top[key]!r}")
    if not isinstance(top.get("description", ""), str):
        raise SiteError(f"{source}: description: expected a string")
    site = Site(**top, **sections)
    try:
        site.profile  # noqa: B018 - validate the scanner reference now, not at simulation time
    except ScannerError as exc:
        raise SiteError(f"{source}: scanner: {exc}") from None
    return site


def _shipped_dir() -> Path:
    return Path(str(resources.files("mrharmony.simulation") / "sites"))


@cache
def list_sites() -> tuple[str, ...]:
    """Names of the site presets shipped with mrharmony, sorted."""
    return tuple(sorted(p.stem for p in _shipped_dir().glob("*.toml")))


@cache
def _load_shipped(name: str) -> Site:
    return _load_file(_shipped_dir() / f"{name}.toml")


def _load_file(path: Path) -> Site:
    try:
        data = load_toml(path)
    except ConfigError as exc:
        raise SiteError(str(exc)) from None
    return site_from_mapping(data, source=str(path))


def load_site(name_or_path: str | Path | Site) -> Site:
    """Load a shipped site preset by name, or a user site from a TOML path.

    Parameters
    ----------
    name_or_path : str, Path or Site
        A preset name (see :func:`list_sites`), the path of a site TOML file, or a
        :class:`Site` (returned unchanged).

    Returns
    -------
    Site

    Raises
    ------
    SiteError
        Unknown name, unreadable file or invalid values (the message names the key).
    """
    if isinstance(name_or_path, Site):
        return name_or_path
    ref = resolve_named_toml(name_or_path, list_sites(), kind="site", error=SiteError)
    return _load_shipped(ref) if isinstance(ref, str) else _load_file(ref)


# --------------------------------------------------------------------------- field maps


def lps_positions_mm(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Scanner LPS positions (mm) of every voxel centre of a grid, C order, shape (N, 3).

    The grid's ``affine`` maps voxel indices to RAS+ mm; LPS is ``(-x, -y, z)`` of RAS.
    """
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    ras = np.asarray(affine, dtype=np.float64)[:3, :3] @ idx + np.asarray(affine)[:3, 3:4]
    ras[:2] *= -1.0
    return ras.T


def _real_solid_harmonics(pos_mm: np.ndarray, degree: int, radius_mm: float) -> np.ndarray:
    """Real regular solid harmonics ``(r/R)^l P_l^m(cos t) {cos, sin}(m phi)`` of one degree.

    Returns an array ``(2 * degree + 1, N)``, each row scaled to unit RMS on the sphere
    of radius ``radius_mm`` (so coefficients compare across degrees).
    """
    x, y, z = (pos_mm[:, i] / radius_mm for i in range(3))
    r = np.sqrt(x * x + y * y + z * z)
    cos_t = np.divide(z, r, out=np.ones_like(r), where=r > 0)
    phi = np.arctan2(y, x)
    rows = []
    for m in range(degree + 1):
        # P_l^m without the Condon-Shortley phase; normalised on the unit sphere below.
        plm = special.lpmv(m, degree, np.clip(cos_t, -1.0, 1.0)) * (-1.0) ** m
        norm = np.sqrt(
            (2 * degree + 1) / (2.0 if m == 0 else 1.0)
            * special.factorial(degree - m) / special.factorial(degree + m)
        )
        radial = r**degree * plm * norm
        rows.append(radial * np.cos(m * phi))
        if m > 0:
            rows.append(radial * np.sin(m * phi))
    return np.asarray(rows)


def b0_residual_hz(
    site: Site, affine: np.ndarray, shape: tuple[int, int, int], *, mask: np.ndarray | None = None
) -> np.ndarray:
    """Shim residual field of a site on a phantom grid, in Hz (float32, ``shape``).

    The model: a shim of order ``n`` removes spherical-harmonic degrees ``0..n``; what is
    left is dominated by the next two degrees. The residual is a sum of the real solid
    harmonics of degrees ``n+1`` and ``n+2`` (normalised on a sphere of ``radius_mm``),
    with coefficients drawn once from ``N(0, 1)`` with the site's ``[b0] seed`` (the
    higher degree at half weight), and scaled so that its RMS over ``mask`` (default:
    all voxels) is ``residual_ppm`` times the Larmor frequency.

    Parameters
    ----------
    site : Site
    affine : ndarray (4, 4)
        Voxel index to RAS+ mm.
    shape : tuple of 3 ints
    mask : ndarray of bool, optional
        Object voxels the RMS is measured over.
    """
    cfg = site.b0
    if cfg.residual_ppm == 0.0:
        return np.zeros(shape, dtype=np.float32)
    pos = lps_positions_mm(affine, shape)
    rng = np.random.default_rng(cfg.seed)
    field_map = np.zeros(pos.shape[0])
    for weight, degree in ((1.0, cfg.shim_order + 1), (0.5, cfg.shim_order + 2)):
        basis = _real_solid_harmonics(pos, degree, cfg.radius_mm)
        field_map += weight * (rng.standard_normal(basis.shape[0]) @ basis)
    sel = np.ones(pos.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if not sel.any():
        raise SiteError(f"site {site.name}: the B0 residual needs at least one object voxel")
    rms = float(np.sqrt(np.mean(field_map[sel] ** 2)))
    target_hz = cfg.residual_ppm * 1e-6 * site.larmor_hz
    if rms > 0:
        field_map *= target_hz / rms
    return field_map.reshape(shape).astype(np.float32)


def b1_scale_map(site: Site, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Relative transmit field B1+ (actual / nominal flip) on a phantom grid (float32).

    ``scale * (1 + c (1 - r^2 / R^2) + t x / (2 R))``, with ``c = center_pct / 100``,
    ``t = tilt_pct / 100``, ``r`` the distance from the isocentre (LPS, mm; the S-I
    distance is weighted by 0.7 since the standing-wave pattern is elongated along B0),
    ``R = radius_mm``; clipped to ``[0.05 scale, 3 scale]``. At 3 T a centre excess of
    20-30 % reproduces the measured central brightening of head B1+ maps.
    """
    cfg = site.b1
    pos = lps_positions_mm(affine, shape)
    r2 = pos[:, 0] ** 2 + pos[:, 1] ** 2 + (0.7 * pos[:, 2]) ** 2
    rel = (
        1.0
        + cfg.center_pct / 100.0 * (1.0 - r2 / cfg.radius_mm**2)
        + cfg.tilt_pct / 100.0 * pos[:, 0] / (2.0 * cfg.radius_mm)
    )
    rel = np.clip(rel, 0.05, 3.0) * cfg.scale
    return rel.reshape(shape).astype(np.float32)
