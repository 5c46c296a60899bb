"""Raw data of a virtual site: run a sequence on a phantom and write ISMRMRD (HDF5).

:func:`simulate_raw` is the whole receive chain of one scan:

1. the sequence: a Pulseq ``.seq`` file, run unchanged (building a protocol is the
   sequence library's job: ``mrharmony simulate PROTOCOL.toml`` builds it on the site's
   scanner first, in the vendor's native flavour with ``--native``, see
   :func:`mrharmony.simulation.cli.sequence_file` and :mod:`.native`);
2. the site's fields on the phantom grid: shim residual B0 and B1+ scale
   (:mod:`.site`), receive sensitivities of the coil array and its noise covariance
   (:mod:`.coils`);
3. the Bloch simulation (:func:`mrharmony.simulation.engine.simulate`), with the site's
   gradient delays and amplitude errors;
4. thermal noise (:mod:`.noise`), the receiver's readout filter, native k-space filter,
   receiver gain; noise-scan acquisitions (``ACQ_IS_NOISE_MEASUREMENT``) first;
5. an ISMRMRD file: the layout of the sequence's raw data
   (:func:`mrharmony.formats.layout.layout_from_seq`: header, counters from the Pulseq
   labels or the k-space, flags, geometry and, for non-Cartesian trajectories, the
   k-space positions) completed with the coil labels, the site and the simulation
   settings, written by :func:`mrharmony.formats.raw.write_raw`.

Geometry: ``position`` is the slice (2D) or slab (3D) centre in LPS mm, and
``read_dir``/``phase_dir``/``slice_dir`` are the columns of the Pulseq rotation (identity:
x, y, z in LPS). With the FFT convention of the sequence library the voxel at
``position`` is index ``n // 2`` of each axis, so a reconstruction that follows
:mod:`mrharmony.recon.geometry` maps back onto the phantom's affine.

Files from other writers, without our ``FOV``/``MatrixSize`` definitions, get a header
derived from their k-space; Cartesian ones whose ``LIN``/``PAR`` labels never change get
their counters (and ``REV``) from each readout's k-space (both in
:mod:`mrharmony.formats.layout`, shared with the twix converter).

Trajectories are written in cycles per FOV on the logical axes (read, phase, slice):
``k[1/m] * FOV[m]`` with the reconstructed FOV, so that the Cartesian grid points are
the integers ``-N/2 .. N/2-1`` (the SigPy / recon convention); the header's user
parameter ``trajectory_units`` says so.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import SequenceFileError, SimulationError
from mrharmony.formats.header import header_to_xml
from mrharmony.formats.layout import AcquisitionLayout, layout_from_seq
from mrharmony.formats.raw import noise_table, write_raw
from mrharmony.simulation.site import Site, b0_residual_hz, b1_scale_map, load_site
from mrharmony.simulation.timeline import check_spoiling

__all__ = [
    "ReceiveModel",
    "convergence_pct",
    "header_user_parameters",
    "isochromat_convergence",
    "receive_model",
    "simulate_raw",
]


log = logging.getLogger(__name__)

#: Total noise-scan samples per channel written before the imaging data.
NOISE_SAMPLES = 4096


# --------------------------------------------------------------------------- the chain


def _load_phantom(phantom: Any) -> Any:
    if isinstance(phantom, str | Path):
        from mrharmony.phantoms import Phantom

        return Phantom.load(phantom)
    return phantom


def _read_sequence(source: Any) -> Any:
    """The PulseqSequence of a ``.seq`` file; anything else is refused."""
    from mrharmony.formats.pulseq import read_pulseq

    if not isinstance(source, str | Path) or Path(source).suffix.lower() == ".toml":
        raise SimulationError(
            f"{source}: simulate_raw runs a Pulseq .seq file; build the protocol first "
            "(mrharmony seq build, mrharmony.sequences.build_file, or "
            "mrharmony.simulation.cli.sequence_file for the native flavour)"
        )
    path = Path(source)
    if not path.is_file():
        raise SequenceFileError(f"{path}: no such sequence file")
    return read_pulseq(path)


def _complete_header(header: Any, site: Site, labels: tuple[str, ...], info: dict[str, Any]) -> Any:
    import ismrmrd.xsd as mrd

    system = header.acquisitionSystemInformation or mrd.acquisitionSystemInformationType()
    profile = site.profile
    system.systemVendor = profile.vendor
    system.systemModel = profile.model
    system.systemFieldStrength_T = site.field_strength_t
    system.receiverChannels = len(labels)
    system.relativeReceiverNoiseBandwidth = float(info.pop("relative_noise_bandwidth"))
    system.institutionName = "mrharmony virtual site"
    system.stationName = site.name
    system.coilLabel = [mrd.coilLabelType(coilNumber=i, coilName=name)
                        for i, name in enumerate(labels)]
    header.acquisitionSystemInformation = system
    header.experimentalConditions = mrd.experimentalConditionsType(
        H1resonanceFrequency_Hz=round(site.larmor_hz)
    )
    header.measurementInformation = mrd.measurementInformationType(
        measurementID=f"{site.name}-seed{info['seed']}",
        patientPosition=mrd.patientPositionType.HFS,
        protocolName=str(info.get("protocol", "")),
    )
    header.subjectInformation = mrd.subjectInformationType(patientID=str(info.get("phantom", "")))
    strings, doubles = [], []
    for key, value in info.items():
        if isinstance(value, bool | str):
            strings.append(mrd.userParameterStringType(name=key, value=str(value)))
        else:
            doubles.append(mrd.userParameterDoubleType(name=key, value=float(value)))
    kept = header.userParameters  # the sequence's own (formats.layout: fat suppression, SMS)
    if kept is not None:
        doubles = list(kept.userParameterDouble or []) + doubles
        strings = list(kept.userParameterString or []) + strings
    header.userParameters = mrd.userParametersType(
        userParameterDouble=doubles, userParameterString=strings
    )
    return header


def _split(signal: np.ndarray, records: list[Any]) -> list[np.ndarray]:
    offsets = np.cumsum([0] + [r.num_samples for r in records])
    return [signal[:, offsets[i]:offsets[i + 1]] for i in range(len(records))]


def _filter_readouts(signal: np.ndarray, ns: np.ndarray, response: Any) -> np.ndarray:
    """Apply a frequency response along each ADC readout (grouped by length)."""
    offsets = np.concatenate(([0], np.cumsum(ns)))
    out = signal.copy()
    for n in np.unique(ns):
        starts = offsets[:-1][ns == n]
        idx = starts[:, None] + np.arange(n)[None, :]
        block = signal[:, idx]  # (coils, n_adc, n)
        spec = np.fft.fft(block, axis=-1) * response(int(n))[None, None, :]
        out[:, idx] = np.fft.ifft(spec, axis=-1).astype(np.complex64)
    return out


class SimulationWarning(UserWarning):
    """A simulation that runs but is unlikely to be what was meant."""


def _warn_if_outside_slices(seq: Any, phantom: Any) -> None:
    """Warn when a 2-D phantom's plane lies outside every slice the sequence excites.

    ``mrharmony simulate`` places the phantom where its affine says (the study runner
    moves it to isocentre first, like the operator's laser landmark); a 2-D phantom
    saved off-centre (e.g. the Shepp-Logan slice at z = -30 mm) then gives almost no
    signal, which is physics but rarely what was meant.
    """
    from mrharmony.formats.layout import excitation_thickness_m

    if int(phantom.shape[2]) != 1:
        return
    thick_m = float(excitation_thickness_m(seq))
    t_rf, blocks, uses = seq.rf_times()
    exc = [i for i, u in enumerate(uses) if u in ("excitation", "undefined")]
    if thick_m <= 0 or not exc:
        return
    affine = np.asarray(phantom.affine, dtype=np.float64)
    centre_ras = affine[:3, :3] @ ((np.array(phantom.shape, float) - 1) / 2) + affine[:3, 3]
    centre_m = centre_ras * np.array([-1.0, -1.0, 1.0]) * 1e-3  # RAS mm -> LPS m
    t_g, g = seq.gradient_waveforms_concat()
    lib = seq.rf_library
    ids = seq.event_ids()
    dist = []
    for i in exc:
        grad = np.array([np.interp(t_rf[i], t_g, g[:, a]) for a in range(3)])
        norm = float(np.linalg.norm(grad))
        if norm <= 0:
            return  # a non-selective excitation reaches every plane
        freq = float(lib[int(ids[int(blocks[i]), 0])].freq_offset_hz)
        dist.append(abs(centre_m @ grad / norm - freq / norm))
    if min(dist) > thick_m:
        warnings.warn(
            f"the 2-D phantom's plane (centre at {np.round(centre_ras, 1).tolist()} mm RAS) "
            f"is {min(dist) * 1e3:.1f} mm from the nearest excited slice ({thick_m * 1e3:.1f} "
            "mm thick): almost no signal; move it to isocentre (the study runner does)",
            SimulationWarning, stacklevel=3)


#: Isochromats-per-voxel multiple the convergence check compares the scan's count with.
CONVERGENCE_FACTOR = 4
#: Voxels (distinct tissues, slowest T2 first) the convergence check simulates.
CONVERGENCE_VOXELS = 4


def _probe_voxels(ph: Any, n_max: int) -> np.ndarray:
    """Flat indices of up to ``n_max`` voxels of distinct (T1, T2), slowest T2 first,
    each the one of its tissue nearest the grid centre."""
    pd = np.asarray(ph.pd, dtype=np.float64).ravel()
    t1 = np.asarray(ph.t1_ms, dtype=np.float64).ravel()
    t2 = np.asarray(ph.t2_ms, dtype=np.float64).ravel()
    inside = np.flatnonzero(pd > 0)
    if inside.size == 0:
        return inside
    idx = np.stack(np.unravel_index(inside, tuple(ph.shape)), axis=1).astype(np.float64)
    dist = np.linalg.norm(idx - (np.array(ph.shape, dtype=np.float64) - 1) / 2, axis=1)
    keys = np.round(np.stack([t1[inside], t2[inside]], axis=1), 1)
    _, first = np.unique(keys, axis=0, return_index=True)
    chosen = []
    for k in first:  # per tissue: its voxel nearest the centre
        same = np.all(keys == keys[k], axis=1)
        chosen.append(inside[same][np.argmin(dist[same])])
    chosen = np.array(chosen)
    return chosen[np.argsort(-t2[chosen], kind="stable")][:n_max]


def isochromat_convergence(
    seq: Any,
    phantom: Any,
    site: Site,
    isochromats_per_voxel: int,
    *,
    backend: str = "numpy",
    factor: int = CONVERGENCE_FACTOR,
    n_voxels: int = CONVERGENCE_VOXELS,
    spoiling: str = "none",
) -> float:
    """How much a scan's signal still depends on its number of isochromats per voxel.

    Spoiling, crushers and slice profiles act through the isochromats spread across each
    voxel (and, for a 2-D phantom, across the excited slice): with too few, unwanted
    coherence pathways survive and the raw data are wrong by an amount no later stage
    can see (a 10-echo multi-echo spin echo needs several hundred). This simulates a
    few voxels of distinct tissues (slowest T2 first: the ones whose pathways live
    longest) with ``n`` and ``factor * n`` isochromats, with the scan's site fields and
    gradient errors, and compares their whole signal.

    Parameters
    ----------
    seq : PulseqSequence
        The sequence.
    phantom : Phantom
        The object (placed as it will be simulated).
    site : Site
        The site (B0 residual, B1 map, gradient errors).
    isochromats_per_voxel : int
        The scan's count ``n``.
    backend : {"numpy", "cupy"}
        Engine backend.
    factor : int
        The comparison count is ``factor * n``.
    n_voxels : int
        Voxels (distinct tissues) simulated.
    spoiling : {"none", "ideal"}
        The scan's spoiling model.

    Returns
    -------
    float
        Largest relative L2 difference (over the probe voxels) between the two signals
        over all ADC samples, in percent; 0 when the phantom has no voxel.
    """
    import dataclasses

    from mrharmony.simulation.engine import simulate, timeline_for
    from mrharmony.simulation.spins import SpinSystem, through_plane_extent

    shape = tuple(int(v) for v in phantom.shape)
    probes = _probe_voxels(phantom, n_voxels)
    if probes.size == 0:
        return 0.0
    pd = np.zeros(int(np.prod(shape)), dtype=np.float32)
    pd[probes] = np.asarray(phantom.pd, dtype=np.float32).ravel()[probes]
    sub = dataclasses.replace(phantom, pd=pd.reshape(shape))
    affine = np.asarray(phantom.affine, dtype=np.float64)
    mask = np.asarray(phantom.mask).reshape(-1)
    two_d = shape[2] == 1
    sens = np.zeros((probes.size, int(np.prod(shape))), dtype=np.complex64)
    sens[np.arange(probes.size), probes] = 1.0
    signals, tl = [], None
    for n in (int(isochromats_per_voxel), int(isochromats_per_voxel) * int(factor)):
        spins = SpinSystem.from_phantom(
            sub, isochromats_per_voxel=n,
            b0_hz_extra=b0_residual_hz(site, affine, shape, mask=mask),
            b1_scale=b1_scale_map(site, affine, shape), subvoxel_positions=n > 1,
            through_plane_mm=through_plane_extent(seq, n) if two_d and n > 1 else None)
        if tl is None:  # one compile for both counts: only the isochromats differ
            tl = timeline_for(seq, spins, gradient_scale=site.gradient_scale,
                              gradient_delay_s=site.gradient_delay_s,
                              b0_t=site.field_strength_t, spoiling=spoiling)
        signals.append(np.asarray(simulate(seq, spins, coil_sens=sens, backend=backend,
                                           timeline=tl), dtype=np.complex128))
    ref = np.linalg.norm(signals[1], axis=1)
    diff = np.linalg.norm(signals[0] - signals[1], axis=1)
    ok = ref > 0
    return float(100 * np.max(diff[ok] / ref[ok])) if np.any(ok) else 0.0


def header_user_parameters(path: str | Path) -> dict[str, Any]:
    """The user parameters (double, long and string) of a raw file's header.

    Parameters
    ----------
    path : str or Path
        ISMRMRD HDF5 or MRD v2 file (only its header is read).

    Returns
    -------
    dict
        Name to value (float, int or str).
    """
    from mrharmony.formats.raw import read_raw_header

    user = read_raw_header(path).userParameters
    values: dict[str, Any] = {}
    for kind, cast in (("userParameterLong", int), ("userParameterDouble", float),
                       ("userParameterString", str)):
        for p in (getattr(user, kind, None) or []):
            values[p.name] = cast(p.value)
    return values


def convergence_pct(path: str | Path) -> float | None:
    """The ``isochromat_convergence_pct`` a simulated raw file's header records, if any
    (ISMRMRD HDF5 or MRD v2)."""
    pct = header_user_parameters(path).get("isochromat_convergence_pct")
    return None if pct is None else float(pct)


def simulate_raw(
    seq_path: str | Path,
    phantom: Any,
    site: Site | str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    backend: str = "numpy",
    native: bool = False,
    progress: bool = False,
    force: bool = False,
    isochromats_per_voxel: int = 1,
    noise: bool = True,
    header_info: Mapping[str, Any] | None = None,
    check_convergence: bool = False,
    fast_path_tol_pct: float | None = None,
    spoiling: str = "none",
) -> Path:
    """Simulate a scan of a phantom at a virtual site and write ISMRMRD raw data.

    Parameters
    ----------
    seq_path : str or Path
        A Pulseq ``.seq`` file, run unchanged (for the native flavour: the vendor's build
        of the protocol, :func:`mrharmony.simulation.cli.sequence_file`).
    phantom : Phantom or path
        The object (or its saved folder).
    site : Site, str or Path
        Site preset name, site TOML or :class:`Site`.
    out_path : str or Path
        ISMRMRD HDF5 file to write (dataset ``"dataset"``).
    seed : int
        Seed of the thermal noise: same seed, same file (isochromat positions are
        deterministic).
    backend : {"numpy", "cupy"}
        Array backend of the Bloch engine.
    native : bool
        Apply the site vendor's receive chain and reconstruction choices (k-space filter,
        prescan normalisation; :mod:`.native`) to the raw data.
    progress : bool
        Show the engine's progress bar.
    force : bool
        Replace an existing ``out_path``.
    isochromats_per_voxel : int
        Isochromats per voxel (> 1 models T2' dephasing and intravoxel spoiling: stratified
        through z, for a 2-D phantom in a 2-D scan over the excited slice; see
        :mod:`.spins`).
    noise : bool
        Add thermal noise (False: noiseless data; noise scans are then all zero).
    header_info : mapping, optional
        More user parameters for the header, after the simulation's own (numbers as
        doubles, strings and booleans as strings), e.g. the vendor's sequence choices of
        :func:`~.native.native_header_info`.
    check_convergence : bool
        Also measure how much the signal of a few voxels changes with 4x the isochromats
        (:func:`isochromat_convergence`) and write it into the header
        (``isochromat_convergence_pct``, ``isochromat_convergence_check``): a few
        percent or less means the spoiling and slice-profile pathways are resolved. The
        CLI and the study runner check; read it back with :func:`convergence_pct`.
    fast_path_tol_pct : float, optional
        Try the fast path (:mod:`.fastpath`: each tissue class once, the encoding and
        off-resonance phase per voxel) and use it when it differs from the full engine
        by at most this many percent of the peak signal on probe voxels; else (and by
        default) the full isochromat engine. The header records which path ran
        (``simulation_path``), the probe difference and, on a fall-back, why.
    spoiling : {"none", "ideal"}
        Spoiling model (:func:`~mrharmony.simulation.engine.simulate`): ``"ideal"`` sets
        the transverse magnetisation to zero before every excitation and inversion, so
        no coherence crosses from one shot to the next whatever the isochromat count
        (spoiled sequences only; a balanced one is refused). It removes the site
        differences of spoiler moments and RF-spoiling increments too. Recorded in the
        header (``spoiling``).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FileExistsError
        ``out_path`` exists and ``force`` is false (checked before simulating).
    SiteError, SequenceFileError, SimulationError, PhantomError
        Bad site, unreadable sequence, a protocol instead of a ``.seq``, bad phantom.
    """

    from mrharmony.simulation.engine import simulate
    from mrharmony.simulation.spins import SpinSystem, through_plane_extent

    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path}: exists (use --force / force=True to replace it)")
    if fast_path_tol_pct is not None and not (np.isfinite(fast_path_tol_pct)
                                              and fast_path_tol_pct > 0):
        raise SimulationError(f"fast_path_tol_pct: must be > 0, got {fast_path_tol_pct!r}")
    check_spoiling(spoiling)  # before any work
    site = load_site(site)
    ph = _load_phantom(phantom)
    shape = tuple(int(s) for s in ph.shape)
    affine = np.asarray(ph.affine, dtype=np.float64)
    mask = np.asarray(ph.mask).reshape(-1)

    seq = _read_sequence(seq_path)
    records = seq.adc_records()
    if not records:
        raise SimulationError(f"{seq_path}: the sequence has no ADC events, nothing to write")
    _warn_if_outside_slices(seq, ph)
    rx = receive_model(site, ph, prescan_normalize=native and site.native.prescan_normalize)
    n_coils = len(rx.labels)
    layout = layout_from_seq(
        seq, n_coils=n_coils, need_kspace=native and site.native.kspace_filter != "none",
        vendor=site.profile.vendor, model=site.profile.model,
        field_t=site.field_strength_t,
    )
    # A 2-D phantom in a 2-D (slice-selective, no partition encoding) scan is an object
    # uniform through z about its plane: its isochromats span the excited slice.
    two_d = shape[2] == 1 and int(layout.header.encoding[0].encodedSpace.matrixSize.z) <= 1
    spins = SpinSystem.from_phantom(
        ph, isochromats_per_voxel=isochromats_per_voxel,
        b0_hz_extra=b0_residual_hz(site, affine, shape, mask=mask),
        b1_scale=b1_scale_map(site, affine, shape),
        subvoxel_positions=isochromats_per_voxel > 1,
        through_plane_mm=(through_plane_extent(seq, isochromats_per_voxel)
                          if two_d and isochromats_per_voxel > 1 else None),
    )
    path_info: dict[str, Any] = {"simulation_path": "full"}
    signal, timeline = None, None
    if fast_path_tol_pct is not None:
        from mrharmony.simulation.fastpath import fast_simulate

        fast = fast_simulate(
            seq, spins, coil_sens=rx.sens, backend=backend, progress=progress,
            gradient_scale=site.gradient_scale, gradient_delay_s=site.gradient_delay_s,
            b0_t=site.field_strength_t, check_tol=fast_path_tol_pct / 100, seed=seed,
            spoiling=spoiling)
        signal, timeline = fast.signal, fast.timeline
        path_info = {"simulation_path": "fast" if signal is not None else "full",
                     "fast_path_classes": fast.n_classes, "fast_path_voxels": fast.n_voxels,
                     "fast_path_check_pct": fast.check_pct,
                     "fast_path_tol_pct": float(fast_path_tol_pct)}
        if signal is None:
            path_info["fast_path_fallback"] = fast.reason
        log.info("simulation path: %s%s", path_info["simulation_path"],
                 f" ({fast.reason})" if fast.reason else "")
    if signal is None:
        signal = simulate(
            seq, spins, coil_sens=rx.sens, backend=backend, progress=progress,
            gradient_scale=site.gradient_scale, gradient_delay_s=site.gradient_delay_s,
            b0_t=site.field_strength_t, timeline=timeline, spoiling=spoiling,
        )
    signal = np.asarray(signal, dtype=np.complex64).reshape(n_coils, -1)
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    if signal.shape[1] != ns.sum():
        raise SimulationError(f"engine returned {signal.shape[1]} samples per coil, the "
                              f"sequence has {ns.sum()} ADC samples")

    kind = site.native.kspace_filter if native else "none"
    records = layout.records
    traj_dims = layout.trajectory_dims
    chain = _receiver_chain(
        signal, records, site, rx.psi, voxel_mm3=float(np.prod(ph.voxel_size_mm)),
        rng=np.random.default_rng(seed), noise=noise, kspace_filter=kind,
        k_cyc=layout.k_cyc, enc=layout.header.encoding[0],
    )
    heads, data, trajs = _acquisitions(layout, chain, n_coils=n_coils)
    header = layout.header
    info: dict[str, Any] = {
        "site": site.name, "scanner": site.scanner, "vendor": site.vendor,
        "native": bool(native), "kspace_filter": kind,
        "prescan_normalize": bool(native and site.native.prescan_normalize),
        "readout_filter": site.receiver.readout_filter,
        "trajectory_units": "cycles_per_fov" if traj_dims else "none",
        "phantom": str(getattr(ph, "name", "") or "phantom"),
        "protocol": str(seq.definitions.get("Name", "")),
        "seed": int(seed),
        "noise_sigma_per_sample": chain.sigma0 if noise else 0.0,
        "snr_per_mm3_per_sqrt_s": chain.snr,
        "phantom_field_t": float(getattr(ph, "field_t", 0.0)),
        "b0_residual_ppm": site.b0.residual_ppm,
        "b1_center_pct": site.b1.center_pct,
        "receiver_gain_db": site.receiver.gain_db,
        "relative_noise_bandwidth": chain.relative_noise_bandwidth,
    }
    info["spoiling"] = spoiling
    info.update({k: v for k, v in path_info.items() if not (isinstance(v, float)
                                                            and not np.isfinite(v))})
    if check_convergence:
        info["isochromat_convergence_pct"] = isochromat_convergence(
            seq, ph, site, isochromats_per_voxel, backend=backend, spoiling=spoiling)
        info["isochromat_convergence_check"] = (
            f"{isochromats_per_voxel} vs {CONVERGENCE_FACTOR * isochromats_per_voxel} "
            "isochromats per voxel")
    info.update(header_info or {})
    header = _complete_header(header, site, rx.labels, info)
    return write_raw(out_path, header_to_xml(header), heads, data, trajs, force=force)


@dataclass(frozen=True)
class ReceiveModel:
    """The site's receive array on a phantom grid."""

    labels: tuple[str, ...]
    sens: np.ndarray  # (n_coils, n_voxels) complex64, C order, zero outside the object
    psi: np.ndarray  # (n_coils, n_coils) noise covariance (unit diagonal)


def receive_model(site: Site, phantom: Any, *, prescan_normalize: bool = False) -> ReceiveModel:
    """Coil labels, sensitivities at every phantom voxel and noise covariance of a site.

    Parameters
    ----------
    site : Site
    phantom : Phantom
        Sensitivities are computed at its object voxels (``pd > 0``) and are zero
        elsewhere (no spins there).
    prescan_normalize : bool
        Flatten the receive profile (vendor prescan normalisation, :mod:`.native`).

    Returns
    -------
    ReceiveModel
        ``sens`` (n_coils, n_voxels) complex64 in the phantom's C order, as the Bloch
        engine takes them; a one-channel site has a uniform sensitivity 1.
    """
    from mrharmony.simulation import coils as coil_mod
    from mrharmony.simulation.native import prescan_normalize as flatten
    from mrharmony.simulation.site import lps_positions_mm

    shape = tuple(int(s) for s in phantom.shape)
    mask = np.asarray(phantom.mask).reshape(-1)
    pos_obj = lps_positions_mm(np.asarray(phantom.affine, dtype=np.float64), shape)[mask]
    if site.coil.channels == 1:
        labels: tuple[str, ...] = ("BODY",)
        sens_obj = np.ones((1, pos_obj.shape[0]), dtype=np.complex64)
        psi = np.ones((1, 1))
    else:
        cfg = site.coil
        array = coil_mod.make_coil_array(
            cfg.channels, geometry=cfg.geometry, radius_mm=cfg.radius_mm,
            loop_radius_mm=cfg.loop_radius_mm,
            center_mm=(cfg.center_mm[0], cfg.center_mm[1], cfg.center_mm[2]),
        )
        labels = array.labels
        sens_obj = coil_mod.receive_sensitivities(array, pos_obj)
        psi = coil_mod.noise_covariance(array, pos_obj, coupling=cfg.noise_coupling)
    if prescan_normalize:
        sens_obj = flatten(sens_obj)
    sens = np.zeros((len(labels), mask.size), dtype=np.complex64)
    sens[:, mask] = sens_obj
    return ReceiveModel(labels=labels, sens=sens, psi=psi)


@dataclass(frozen=True)
class _Chain:
    signal: np.ndarray  # (n_coils, samples) after noise, filters and gain
    noise_scan: np.ndarray  # (n_coils, n_noise_lines * noise_samples)
    noise_lines: int
    noise_samples: int
    noise_dwell_s: float
    sigma0: float  # per-sample noise std (real/imag) of the first ADC, after the gain
    snr: float
    relative_noise_bandwidth: float


def _receiver_chain(
    signal: np.ndarray, records: list[Any], site: Site, psi: np.ndarray, *, voxel_mm3: float,
    rng: np.random.Generator, noise: bool, kspace_filter: str, k_cyc: np.ndarray | None,
    enc: Any,
) -> _Chain:
    """Thermal noise, readout filter, vendor k-space filter and gain (in that order)."""
    from mrharmony.simulation import native as native_mod
    from mrharmony.simulation import noise as noise_mod

    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    dwell = np.array([r.dwell_s for r in records], dtype=np.float64)
    snr = noise_mod.snr_at_field(site.receiver.snr_ref, site.field_strength_t,
                                 field_exponent=site.receiver.field_exponent)
    sigma = noise_mod.noise_sigma(snr=snr, voxel_volume_mm3=voxel_mm3,
                                  dwell_s=np.repeat(dwell, ns))
    n_lines = max(1, int(np.ceil(NOISE_SAMPLES / ns[0])))
    sigma_scan = np.full(n_lines * int(ns[0]), sigma[0])
    n_coils = signal.shape[0]
    if noise:  # noise scans first, then the imaging noise: one seeded stream
        noise_scan = noise_mod.correlated_noise(psi, sigma_scan, rng)
        signal = signal + noise_mod.correlated_noise(psi, sigma, rng)
    else:
        noise_scan = np.zeros((n_coils, sigma_scan.size), dtype=np.complex64)
    rel_bw = 1.0
    if site.receiver.readout_filter == "raised-cosine":
        rolloff = site.receiver.readout_filter_rolloff

        def response(n: int) -> np.ndarray:
            return noise_mod.readout_filter_response(n, rolloff=rolloff)

        signal = _filter_readouts(signal, ns, response)
        noise_scan = _filter_readouts(noise_scan, np.full(n_lines, ns[0]), response)
        rel_bw = float(np.mean(response(int(ns[0])) ** 2))
    if kspace_filter != "none" and k_cyc is not None:
        # The vendor's recon apodises what was acquired: signal and noise alike.
        mat = np.array([enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y,
                        enc.reconSpace.matrixSize.z], dtype=np.float64)
        used = mat > 1
        k_norm = np.sqrt(np.sum((k_cyc[:, used] / (mat[used] / 2.0)) ** 2, axis=1))
        signal = signal * native_mod.kspace_filter_weights(
            k_norm, kspace_filter, radius=site.native.kspace_filter_radius,
            width=site.native.kspace_filter_width,
        )[None, :]
    gain = np.float32(10.0 ** (site.receiver.gain_db / 20.0))
    return _Chain(
        signal=(signal * gain).astype(np.complex64), noise_scan=(noise_scan * gain).astype(
            np.complex64), noise_lines=n_lines, noise_samples=int(ns[0]),
        noise_dwell_s=float(dwell[0]), sigma0=float(sigma[0] * gain), snr=snr,
        relative_noise_bandwidth=rel_bw,
    )


def _acquisitions(
    layout: AcquisitionLayout, chain: _Chain, *, n_coils: int,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    """Headers, data and trajectories of the noise scans followed by every ADC."""
    records = layout.records
    # a noise-free simulation has no noise to measure: no (all-zero) noise scans
    n_noise = chain.noise_lines if np.any(chain.noise_scan) else 0
    noise_heads = noise_table([chain.noise_samples] * n_noise, n_coils=n_coils,
                              dwell_s=chain.noise_dwell_s)
    all_heads = np.concatenate([noise_heads, layout.heads])
    all_heads["scan_counter"] = np.arange(all_heads.size, dtype=np.uint32)
    noise = [chain.noise_scan[:, k * chain.noise_samples:(k + 1) * chain.noise_samples]
             for k in range(n_noise)]
    data = noise + _split(chain.signal, records)
    trajs = None
    if layout.trajectories is not None:
        # noise scans sample no k-space: no trajectory (their header says 0 dimensions)
        trajs = [np.zeros((chain.noise_samples, 0), np.float32)] * n_noise
        trajs += layout.trajectories
    return all_heads, data, trajs


