"""Vendor-native flavour of a protocol: what a site's product sequence would do differently.

Running "the same" protocol on Siemens, GE, Philips and United Imaging scanners with the
vendors' own sequences differs in implementation details that change the images:

- before the scan (sequence design): the excitation pulse (shape, time-bandwidth product,
  hence the slice profile), the spoiler/crusher moments and the RF-spoiling phase
  increment (Siemens FLASH 50 deg, GE SPGR 117 deg, Philips T1-FFE 150 deg);
- after the scan (the vendor's receive chain and reconstruction): the k-space
  apodisation filter (e.g. GE's Fermi filter, Philips' Hamming) and the receive-field
  intensity normalisation (Siemens Prescan Normalize, GE PURE, Philips CLEAR).

:func:`native_protocol` applies the first group wherever the sequence library's
protocol classes have a field for it (the caller builds the ``.seq`` of the native
protocol: the simulator runs ``.seq`` files only); :func:`native_changes` reports what was
applied and what the protocol has no field for, :func:`native_header_info` what the raw
data's header records. :func:`kspace_filter_weights` and
:func:`prescan_normalize` implement the second group on the raw data: the k-space filter
multiplies the samples (and is recorded in the ISMRMRD header), prescan normalisation
divides the receive sensitivities by their root-sum-of-squares, i.e. it flattens the
array's receive profile as the vendor's body-coil-referenced correction does.

The vendor-agnostic path (a shared ``.seq`` file) runs the file unchanged: only the
site's physics (fields, coils, noise, gradients, readout filter) applies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mrharmony.errors import ConfigError, SiteError
from mrharmony.formats.kspace_filter import kspace_window
from mrharmony.sequences.protocol import Protocol
from mrharmony.simulation.site import NativeConfig, Site

__all__ = [
    "MISSING_PROTOCOL_FIELDS",
    "RF_SHAPE_APODIZATION",
    "kspace_filter_weights",
    "native_changes",
    "native_header_info",
    "native_protocol",
    "prescan_normalize",
]

#: Window of the sinc excitation for each vendor pulse shape (``Protocol.rf_apodization``).
#: An SLR pulse is not a windowed sinc; it is modelled by the Hamming-windowed sinc of the
#: same time-bandwidth product, whose flatter passband is closest to it.
RF_SHAPE_APODIZATION: dict[str, float] = {
    "sinc-hanning": 0.5,
    "sinc-hamming": 0.46,
    "sinc": 0.0,
    "slr": 0.46,
}

#: Vendor choices that are recorded but no protocol field applies (none at present
#: beyond the approximation of SLR pulses above).
MISSING_PROTOCOL_FIELDS: dict[str, str] = {}

# Builders whose excitation is kept as the protocol gives it: bSSFP needs its short,
# low time-bandwidth pulse for the shortest TR (vendors do the same).
_KEEP_RF = {"bssfp"}


def native_changes(protocol: Protocol, site: Site) -> dict[str, Any]:
    """What the native flavour changes for this protocol at this site.

    Returns
    -------
    dict
        ``applied``: ``{field: (protocol value, vendor value)}`` for protocol fields that
        change; ``recorded``: vendor choices without a protocol field, with their values.
    """
    cfg: NativeConfig = site.native
    fields = {f.name for f in dataclasses.fields(protocol)}
    applied: dict[str, tuple[Any, Any]] = {}
    if "rf_time_bw_product" in fields and protocol.builder not in _KEEP_RF:
        applied["rf_time_bw_product"] = (protocol.rf_time_bw_product, cfg.rf_time_bw_product)
    if "rf_spoiling_inc_deg" in fields:
        applied["rf_spoiling_inc_deg"] = (
            protocol.rf_spoiling_inc_deg,  # type: ignore[attr-defined]
            cfg.rf_spoiling_inc_deg,
        )
    if "rf_apodization" in fields and protocol.builder not in _KEEP_RF:
        if cfg.rf_shape not in RF_SHAPE_APODIZATION:
            raise SiteError(f"native.rf_shape: unknown shape {cfg.rf_shape!r} "
                            f"(one of {', '.join(RF_SHAPE_APODIZATION)})")
        applied["rf_apodization"] = (protocol.rf_apodization,
                                     RF_SHAPE_APODIZATION[cfg.rf_shape])
    for key in ("spoiler_cycles_per_voxel", "crusher_cycles_per_slice"):
        if key in fields:
            applied[key] = (getattr(protocol, key), getattr(cfg, key))
    applied = {k: v for k, v in applied.items() if v[0] != v[1]}
    recorded = {key: getattr(cfg, key) for key in MISSING_PROTOCOL_FIELDS}
    recorded["rf_shape"] = cfg.rf_shape
    recorded["slice_profile"] = cfg.slice_profile
    return {"applied": applied, "recorded": recorded}


def native_protocol(protocol: Protocol, site: Site) -> Protocol:
    """The site vendor's implementation of ``protocol``.

    Replaces the excitation time-bandwidth product and pulse window (not for bSSFP),
    the spoiler and crusher moments and the RF-spoiling increment with the vendor's
    values of ``site.native``, wherever the protocol class has the field.

    Parameters
    ----------
    protocol : Protocol
        A validated protocol (any builder).
    site : Site

    Returns
    -------
    Protocol
        A new frozen protocol of the same class (the input is unchanged).
    """
    changes = native_changes(protocol, site)["applied"]
    if not changes:
        return protocol
    return dataclasses.replace(protocol, **{k: v[1] for k, v in changes.items()})


def native_header_info(protocol: Protocol, site: Site) -> dict[str, Any]:
    """The vendor's sequence choices of the native flavour, as the raw header records them.

    Parameters
    ----------
    protocol : Protocol
        The protocol (as written, or already native: the result is the same).
    site : Site

    Returns
    -------
    dict
        ``native_<choice>`` of the choices without a protocol field
        (:func:`native_changes`' ``recorded``: pulse shape, slice profile), then
        ``native_rf_time_bw_product`` and ``native_rf_spoiling_inc_deg`` (float) of the
        native protocol where it has these fields; for ``simulate_raw(header_info=...)``.
    """
    native = native_protocol(protocol, site)
    info: dict[str, Any] = {f"native_{key}": value
                            for key, value in native_changes(native, site)["recorded"].items()}
    for key in ("rf_time_bw_product", "rf_spoiling_inc_deg"):
        if hasattr(native, key):
            info[f"native_{key}"] = float(getattr(native, key))
    return info


def kspace_filter_weights(
    k_norm: np.ndarray, kind: str, *, radius: float = 0.9, width: float = 0.05
) -> np.ndarray:
    """Radial k-space apodisation weights of the vendor's recon filter.

    The windows are defined once, in :func:`mrharmony.formats.kspace_filter.kspace_window`
    (the recon's ``filter`` option uses the same definition); this wrapper reports an
    unknown name as a :class:`~mrharmony.errors.SiteError`.

    Parameters
    ----------
    k_norm : ndarray
        ``|k| / k_max`` per sample (elliptical: each axis normalised by its own
        ``k_max = N / (2 FOV)``), any shape.
    kind : {"none", "hamming", "hanning", "fermi"}
    radius, width : float
        Fermi filter radius and transition width as fractions of ``k_max``.

    Returns
    -------
    ndarray float32, same shape as ``k_norm``
    """
    try:
        return kspace_window(k_norm, kind, radius=radius, width=width)
    except ConfigError as exc:
        if isinstance(exc, SiteError):
            raise
        raise SiteError(str(exc)) from exc


def prescan_normalize(sens: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Flatten the array's receive profile: divide by the root-sum-of-squares.

    Parameters
    ----------
    sens : ndarray (n_coils, N) complex
        Receive sensitivities.
    mask : ndarray of bool (N,), optional
        Object voxels; the mean RSS over them is kept, so the signal scale is unchanged.

    Returns
    -------
    ndarray (n_coils, N) complex64
        Sensitivities whose RSS equals that mean everywhere (where the RSS exceeds 1 % of
        its mean; weaker voxels are left as they are, as the vendors clip the correction).
    """
    rss = np.sqrt(np.sum(np.abs(sens).astype(np.float64) ** 2, axis=0))
    sel = np.ones(rss.size, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    mean = float(rss[sel].mean()) if sel.any() else float(rss.mean())
    gain = np.where(rss > 0.01 * mean, mean / np.maximum(rss, 1e-30), 1.0)
    return (sens * gain[None, :]).astype(np.complex64)
