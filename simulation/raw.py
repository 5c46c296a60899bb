"""Raw data of a virtual site: run a sequence on a phantom and write ISMRMRD (HDF5).

:func:`simulate_raw` is the whole receive chain of one scan:

1. the sequence: a ``.seq`` file (the vendor-agnostic path, run unchanged) or a protocol
   (TOML or :class:`~mrharmony.sequences.protocol.Protocol`), built on the site's scanner,
   in the vendor's native flavour with ``native=True`` (:mod:`.native`);
2. the site's fields on the phantom grid: shim residual B0 and B1+ scale
   (:mod:`.site`), receive sensitivities of the coil array and its noise covariance
   (:mod:`.coils`);
3. the Bloch simulation (:func:`mrharmony.simulation.engine.simulate`), with the site's
   gradient delays and amplitude errors;
4. thermal noise (:mod:`.noise`), the receiver's readout filter, native k-space filter,
   receiver gain; noise-scan acquisitions (``ACQ_IS_NOISE_MEASUREMENT``) first;
5. an ISMRMRD file: the header of the sequence library
   (:func:`mrharmony.sequences.header.ismrmrd_header`) completed with the coil labels,
   the site and the simulation settings, and one acquisition per ADC with flags,
   counters (from the Pulseq labels), geometry and, for non-Cartesian trajectories, the
   k-space positions.

Geometry: ``position`` is the slice (2D) or slab (3D) centre in LPS mm, and
``read_dir``/``phase_dir``/``slice_dir`` are the columns of the Pulseq rotation (identity:
x, y, z in LPS). With the FFT convention of the sequence library the voxel at
``position`` is index ``n // 2`` of each axis, so a reconstruction that follows
:mod:`mrharmony.recon.geometry` maps back onto the phantom's affine.

Files from other writers, without our ``FOV``/``MatrixSize`` definitions, get a header
derived from their k-space (:func:`_minimal_header`); Cartesian ones whose ``LIN``/``PAR``
labels never change get their counters (and ``REV``) from each readout's k-space.

Trajectories are written in cycles per FOV on the logical axes (read, phase, slice):
``k[1/m] * FOV[m]`` with the reconstructed FOV, so that the Cartesian grid points are
the integers ``-N/2 .. N/2-1`` (the SigPy / recon convention); the header's user
parameter ``trajectory_units`` says so.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import ConfigError, SequenceFileError, SimulationError
from mrharmony.formats.flags import flag_mask
from mrharmony.formats.raw import acquisition_table, adc_rotations, write_raw
from mrharmony.simulation.site import Site, b0_residual_hz, b1_scale_map, load_site

__all__ = [
    "ReceiveModel",
    "receive_model",
    "simulate_raw",
]


#: Total noise-scan samples per channel written before the imaging data.
NOISE_SAMPLES = 4096


# --------------------------------------------------------------------------- the chain


def _load_phantom(phantom: Any) -> Any:
    if isinstance(phantom, str | Path):
        from mrharmony.phantoms import Phantom

        return Phantom.load(phantom)
    return phantom


def _prepare_sequence(source: Any, site: Site, native: bool, workdir: Path) -> tuple[Any, Any, Any]:
    """(PulseqSequence, header source for ismrmrd_header, protocol or None)."""
    from mrharmony.formats.pulseq import read_pulseq
    from mrharmony.sequences import build, write_seq
    from mrharmony.sequences.protocol import Protocol, load_protocol
    from mrharmony.simulation.native import native_protocol

    protocol = None
    if isinstance(source, Protocol):
        protocol = source
    elif isinstance(source, str | Path) and Path(source).suffix.lower() == ".toml":
        protocol = load_protocol(source)
    if protocol is not None:
        if native:
            protocol = native_protocol(protocol, site)
        pp_seq = build(protocol, site.profile)
        path = write_seq(pp_seq, workdir / f"{protocol.name}.seq", check_timing=False)
        return read_pulseq(path), pp_seq, protocol
    if native:
        raise SimulationError(
            f"{source}: the native flavour needs the protocol (TOML), not a .seq file: a .seq "
            "is the vendor-agnostic implementation and runs unchanged"
        )
    path = Path(source)
    if not path.is_file():
        raise SequenceFileError(f"{path}: no such sequence file")
    return read_pulseq(path), path, None


def _base_header(header_source: Any, seq: Any, site: Site, n_coils: int) -> Any:
    """The sequence library's header when the file carries our definitions, else a minimal one."""
    import ismrmrd.xsd as mrd

    from mrharmony.sequences.header import ismrmrd_header

    defs = seq.definitions
    if "FOV" in defs and "MatrixSize" in defs:
        try:
            return ismrmrd_header(header_source, site.profile, receiver_channels=n_coils)
        except (SequenceFileError, ConfigError, KeyError, ValueError, IndexError):
            pass  # a third-party file pypulseq cannot read: build the minimal header below
    return _minimal_header(seq, site, n_coils, mrd)


def _minimal_header(seq: Any, site: Site, n_coils: int, mrd: Any) -> Any:
    """Header for a file without our definitions: FOV and matrix from its k-space.

    The FOV is the file's ``FOV`` definition (metres per the Pulseq specification; values
    above 1 are taken as millimetres, as some older writers store them), else the inverse
    of the readout's k-space step. The matrix is the ``MatrixSize`` definition, else
    ``2 k_max FOV`` per logical axis (2D unless most readouts have a partition k at
    their in-plane k-space centre). A file
    whose every ADC is a straight line along the readout with constant phase/partition
    k (to 10 % of a k-space step) is Cartesian; anything else is ``other`` (non-Cartesian,
    trajectories written).
    """
    records = seq.adc_records()
    k = _logical_kspace(seq, records)
    ns = np.array([r.num_samples for r in records])
    offsets = np.concatenate(([0], np.cumsum(ns)))
    defs = seq.definitions
    fov = np.resize(np.atleast_1d(np.asarray(defs.get("FOV", [0.0]), dtype=float)), 3)
    if fov.max() > 1.0:
        fov = fov * 1e-3
    steps = np.abs(np.diff(k[: offsets[1], 0])) if ns[0] > 1 else np.zeros(1)
    step = float(np.median(steps[steps > 0])) if np.any(steps > 0) else 0.0
    if not np.all(fov[:2] > 0):
        fov[:] = 1.0 / step if step > 0 else 0.256
    fov[2] = fov[2] if fov[2] > 0 else fov[0]
    kmax = np.max(np.abs(k), axis=0)
    matrix = np.maximum(2 * np.round(kmax * fov), 1).astype(int)
    starts, ends = offsets[:-1], offsets[1:] - 1
    # 3D when most readouts sit off kz = 0 at their in-plane k-space centre (partition
    # encoding); a few stray ADCs (e.g. sync readouts without excitation) do not count.
    centre = starts + np.array([int(np.argmin(np.linalg.norm(k[a:b + 1, :2], axis=1)))
                                for a, b in zip(starts, ends, strict=True)])
    if np.mean(np.abs(k[centre, 2] * fov[2]) >= 0.5) <= 0.5:
        matrix[2] = 1
    given = defs.get("MatrixSize")
    if given is not None:
        given = np.atleast_1d(np.asarray(given, dtype=float)).astype(int)
        matrix[: min(3, given.size)] = given[:3]
    spread_yz = np.maximum.reduceat(k[:, 1:], starts) - np.minimum.reduceat(k[:, 1:], starts)
    cartesian = bool(np.all(spread_yz < 0.1 / fov[1:]) and np.all(
        np.abs(k[ends, 0] - k[starts, 0]) > 0.5 * (ns - 1) * step)) and step > 0
    if cartesian:
        matrix[0] = int(ns.max())
    enc = mrd.encodingSpaceType(
        matrixSize=mrd.matrixSizeType(x=int(matrix[0]), y=int(matrix[1]), z=int(matrix[2])),
        fieldOfView_mm=mrd.fieldOfViewMm(x=fov[0] * 1e3, y=fov[1] * 1e3, z=fov[2] * 1e3),
    )
    limits = mrd.encodingLimitsType(
        kspace_encoding_step_1=mrd.limitType(minimum=0, maximum=int(matrix[1]) - 1,
                                             center=int(matrix[1]) // 2),
        kspace_encoding_step_2=mrd.limitType(minimum=0, maximum=int(matrix[2]) - 1,
                                             center=int(matrix[2]) // 2),
    )
    encoding = mrd.encodingType(
        encodedSpace=enc, reconSpace=enc, encodingLimits=limits,
        trajectory=mrd.trajectoryType.CARTESIAN if cartesian else mrd.trajectoryType.OTHER,
    )
    return mrd.ismrmrdHeader(
        version=2,
        acquisitionSystemInformation=mrd.acquisitionSystemInformationType(),
        experimentalConditions=mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(site.larmor_hz)
        ),
        encoding=[encoding],
        sequenceParameters=mrd.sequenceParametersType(
            sequence_type=str(defs.get("Name", "unknown"))
        ),
    )


def _derived_labels(records: list[Any], k_cyc: np.ndarray, enc: Any) -> list[Any]:
    """Records with LIN/PAR/REV from their k-space (for files without LIN/PAR labels).

    The phase (partition) index is ``round(k * FOV)`` shifted so that the lines fill
    ``0 .. N-1``; the encoding limits' ``center`` is set to the index of k = 0 (writers
    differ: FFT convention ``-N/2 .. N/2-1`` or ``-N/2+1 .. N/2``).
    """
    import ismrmrd.xsd as mrd

    ns = np.array([r.num_samples for r in records])
    first = np.concatenate(([0], np.cumsum(ns)))[:-1]
    centre = first + ns // 2
    mat = enc.encodedSpace.matrixSize
    counters = []
    for axis, n, limit in ((1, mat.y, "kspace_encoding_step_1"),
                           (2, mat.z, "kspace_encoding_step_2")):
        idx = np.round(k_cyc[centre, axis]).astype(int)
        lo, hi = int(idx.min()), int(idx.max())
        zero = -lo if hi - lo < n else n // 2
        counters.append(np.clip(idx + zero, 0, max(n - 1, 0)) if n > 1 else np.zeros_like(idx))
        if n > 1:
            setattr(enc.encodingLimits, limit,
                    mrd.limitType(minimum=0, maximum=n - 1, center=min(zero, n - 1)))
    rev = (k_cyc[first + ns - 1, 0] < k_cyc[first, 0]).astype(int)  # EPI: reversed lines
    return [
        dataclasses.replace(r, labels={**r.labels, "LIN": int(a), "PAR": int(b), "REV": int(c)})
        if dataclasses.is_dataclass(r) else r
        for r, a, b, c in zip(records, counters[0], counters[1], rev, strict=True)
    ]


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


def _logical_kspace(seq: Any, records: list[Any]) -> np.ndarray:
    """k-space (1/m) of every ADC sample on the logical axes (read, phase, slice)."""
    k = np.asarray(seq.kspace_at_adc(), dtype=np.float64)
    rot, rotated = adc_rotations(records)
    if not rotated:
        return k
    ns = np.array([r.num_samples for r in records])
    per_sample = np.repeat(rot, ns, axis=0)  # (samples, 3, 3)
    return np.einsum("sji,sj->si", per_sample, k)


def simulate_raw(
    seq_path: str | Path | Any,
    phantom: Any,
    site: Site | str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    backend: str = "numpy",
    native: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    isochromats_per_voxel: int = 1,
    noise: bool = True,
) -> Path:
    """Simulate a scan of a phantom at a virtual site and write ISMRMRD raw data.

    Parameters
    ----------
    seq_path : str, Path or Protocol
        A Pulseq ``.seq`` file (run unchanged), or a protocol ``.toml`` / Protocol, built
        on the site's scanner (required for ``native=True``).
    phantom : Phantom or path
        The object (or its saved folder).
    site : Site, str or Path
        Site preset name, site TOML or :class:`Site`.
    out_path : str or Path
        ISMRMRD HDF5 file to write (dataset ``"dataset"``).
    seed : int
        Seed of the thermal noise and of the isochromat spread: same seed, same file.
    backend : {"numpy", "cupy"}
        Array backend of the Bloch engine.
    native : bool
        Run the site vendor's native flavour of the protocol (:mod:`.native`).
    progress : bool
        Show the engine's progress bar.
    overwrite : bool
        Replace an existing ``out_path``.
    isochromats_per_voxel : int
        Isochromats per voxel (> 1 models T2' dephasing).
    noise : bool
        Add thermal noise (False: noiseless data; noise scans are then all zero).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FileExistsError
        ``out_path`` exists and ``overwrite`` is false (checked before simulating).
    SiteError, SequenceFileError, SimulationError, PhantomError
        Bad site, unreadable sequence, native flavour of a ``.seq``, bad phantom.
    """
    import ismrmrd.xsd as mrd

    from mrharmony.simulation.engine import simulate
    from mrharmony.simulation.native import native_changes
    from mrharmony.simulation.spins import SpinSystem

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: exists (use --force / overwrite=True to replace it)")
    site = load_site(site)
    ph = _load_phantom(phantom)
    shape = tuple(int(s) for s in ph.shape)
    affine = np.asarray(ph.affine, dtype=np.float64)
    mask = np.asarray(ph.mask).reshape(-1)

    with tempfile.TemporaryDirectory(prefix="mrharmony-sim-") as work:
        seq, header_source, protocol = _prepare_sequence(seq_path, site, native, Path(work))
    records = seq.adc_records()
    if not records:
        raise SimulationError(f"{seq_path}: the sequence has no ADC events, nothing to write")
    rx = receive_model(site, ph, prescan_normalize=native and site.native.prescan_normalize)
    spins = SpinSystem.from_phantom(
        ph, isochromats_per_voxel=isochromats_per_voxel,
        b0_hz_extra=b0_residual_hz(site, affine, shape, mask=mask),
        b1_scale=b1_scale_map(site, affine, shape), seed=seed,
        subvoxel_positions=isochromats_per_voxel > 1,
    )
    signal = simulate(
        seq, spins, coil_sens=rx.sens, backend=backend, progress=progress,
        gradient_scale=site.gradient_scale, gradient_delay_s=site.gradient_delay_s,
        b0_t=site.field_strength_t,
    )
    n_coils = len(rx.labels)
    signal = np.asarray(signal, dtype=np.complex64).reshape(n_coils, -1)
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    if signal.shape[1] != ns.sum():
        raise SimulationError(f"engine returned {signal.shape[1]} samples per coil, the "
                              f"sequence has {ns.sum()} ADC samples")

    header = _base_header(header_source, seq, site, n_coils)
    enc = header.encoding[0]
    kind = site.native.kspace_filter if native else "none"
    cartesian = enc.trajectory == mrd.trajectoryType.CARTESIAN
    unlabelled = len(records) > 1 and all(
        len({r.labels.get(name, 0) for r in records}) == 1 for name in ("LIN", "PAR")
    )
    needs_k = kind != "none" or not cartesian or unlabelled
    k_cyc = _kspace_cycles_per_fov(seq, records, enc) if needs_k else None
    if cartesian and unlabelled and k_cyc is not None:
        records = _derived_labels(records, k_cyc, enc)  # third-party Cartesian file
    traj_dims = 0 if cartesian else (3 if enc.reconSpace.matrixSize.z > 1 else 2)
    chain = _receiver_chain(
        signal, records, site, rx.psi, voxel_mm3=float(np.prod(ph.voxel_size_mm)),
        rng=np.random.default_rng(seed), noise=noise, kspace_filter=kind, k_cyc=k_cyc, enc=enc,
    )

    heads, data, trajs = _acquisitions(seq, records, enc, chain, n_coils=n_coils,
                                       k_cyc=k_cyc if traj_dims else None, traj_dims=traj_dims)
    info: dict[str, Any] = {
        "site": site.name, "scanner": site.scanner, "vendor": site.vendor,
        "native": bool(native), "kspace_filter": kind,
        "prescan_normalize": bool(native and site.native.prescan_normalize),
        "readout_filter": site.receiver.readout_filter,
        "trajectory_units": "cycles_per_fov" if traj_dims else "none",
        "phantom": str(getattr(ph, "name", "") or "phantom"),
        "protocol": str(seq.definitions.get("Name", getattr(protocol, "name", ""))),
        "seed": int(seed),
        "noise_sigma_per_sample": chain.sigma0 if noise else 0.0,
        "snr_per_mm3_per_sqrt_s": chain.snr,
        "phantom_field_t": float(getattr(ph, "field_t", 0.0)),
        "b0_residual_ppm": site.b0.residual_ppm,
        "b1_center_pct": site.b1.center_pct,
        "receiver_gain_db": site.receiver.gain_db,
        "relative_noise_bandwidth": chain.relative_noise_bandwidth,
    }
    if native and protocol is not None:
        for key, value in native_changes(protocol, site)["recorded"].items():
            info[f"native_{key}"] = value
        for key in ("rf_time_bw_product", "rf_spoiling_inc_deg"):
            if hasattr(protocol, key):
                info[f"native_{key}"] = float(getattr(protocol, key))
    header = _complete_header(header, site, rx.labels, info)
    return write_raw(out_path, mrd.ToXML(header), heads, data, trajs, overwrite=overwrite)


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


def _kspace_cycles_per_fov(seq: Any, records: list[Any], enc: Any) -> np.ndarray:
    """k of every ADC sample on the logical axes, in cycles per reconstructed FOV."""
    fov = enc.reconSpace.fieldOfView_mm
    fov_m = np.array([fov.x, fov.y, fov.z], dtype=np.float64) * 1e-3
    return _logical_kspace(seq, records) * fov_m[None, :]


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
    seq: Any, records: list[Any], enc: Any, chain: _Chain, *, n_coils: int,
    k_cyc: np.ndarray | None, traj_dims: int,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    """Headers, data and trajectories of the noise scans followed by every ADC."""
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(ns)))
    defs = seq.definitions
    slice_pos = None
    if "SlicePositions" in defs and enc.reconSpace.matrixSize.z == 1:
        slice_pos = np.atleast_1d(np.asarray(defs["SlicePositions"], dtype=float)) * 1e3
    centers = None
    if k_cyc is not None:
        kabs = np.linalg.norm(k_cyc, axis=1)
        centers = np.array([int(np.argmin(kabs[offsets[i]:offsets[i + 1]]))
                            for i in range(len(records))])
    heads = acquisition_table(records, n_coils=n_coils, slice_positions_mm=slice_pos,
                              center_samples=centers, trajectory_dims=traj_dims)
    # a noise-free simulation has no noise to measure: no (all-zero) noise scans
    n_noise = chain.noise_lines if np.any(chain.noise_scan) else 0
    noise_records = [_NoiseRecord(0.0, chain.noise_samples, chain.noise_dwell_s)
                     for _ in range(n_noise)]
    noise_heads = acquisition_table(noise_records, n_coils=n_coils)
    noise_heads["flags"] = flag_mask("IS_NOISE_MEASUREMENT")
    all_heads = np.concatenate([noise_heads, heads])
    all_heads["scan_counter"] = np.arange(all_heads.size, dtype=np.uint32)
    data = _split(chain.noise_scan, noise_records) + _split(chain.signal, records)
    trajs = None
    if traj_dims and k_cyc is not None:
        k32 = k_cyc[:, :traj_dims].astype(np.float32)
        # noise scans sample no k-space: no trajectory (their header says 0 dimensions)
        trajs = [np.zeros((chain.noise_samples, 0), np.float32)] * n_noise
        trajs += [k32[offsets[i]:offsets[i + 1]] for i in range(len(records))]
    return all_heads, data, trajs


@dataclass(frozen=True)
class _NoiseRecord:
    t_start_s: float
    num_samples: int
    dwell_s: float
    labels: dict[str, int] = field(default_factory=dict)
    rotation: np.ndarray | None = None
