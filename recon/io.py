"""ISMRMRD input: read a dataset, split noise scans, prewhiten, sort into k-space arrays.

:func:`read_raw` reads any conformant ISMRMRD HDF5 dataset (ours, the C++ tools',
converted vendor data) read-only and checks it before any reconstruction starts.
:func:`sort_cartesian` places Cartesian readouts into ``(coils, kx, ky, kz)`` arrays per
``(slice, contrast, repetition, set)`` using the counters, honouring the flags:
noise scans, navigator and phase-correction lines (left out), reversed lines (flipped),
parallel-calibration lines (calibration buffer only) and parallel calibration *and*
imaging lines (both). Averages are averaged. Asymmetric echoes are placed so that
``center_sample`` lands on ``kx = nx // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import RawDataError

__all__ = [
    "CartesianBuffer",
    "RawData",
    "apply_prewhitening",
    "encoding_of",
    "noise_prewhitener",
    "read_raw",
    "sort_cartesian",
    "split_special",
]

# ISMRMRD acquisition flag numbers (1-based bit positions, as in ismrmrd.constants).
FLAG_NOISE = 19
FLAG_CALIB = 20
FLAG_CALIB_AND_IMAGING = 21
FLAG_REVERSE = 22
FLAG_NAVIGATION = 23
FLAG_PHASECORR = 24
FLAG_HPFEEDBACK = 26
FLAG_DUMMYSCAN = 27
FLAG_RTFEEDBACK = 28
FLAG_SURFACECOIL = 29
FLAG_PHASE_STAB_REF = 30
FLAG_PHASE_STAB = 31
_NOT_IMAGING = (
    FLAG_HPFEEDBACK, FLAG_DUMMYSCAN, FLAG_RTFEEDBACK, FLAG_SURFACECOIL,
    FLAG_PHASE_STAB_REF, FLAG_PHASE_STAB,
)


def _flag(acq: Any, flag: int) -> bool:
    return bool(int(acq.flags) & (1 << (flag - 1)))


@dataclass
class RawData:
    """An ISMRMRD dataset in memory.

    Attributes
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Parsed XML header.
    acquisitions : list of ismrmrd.Acquisition
        Imaging acquisitions (incl. calibration, navigator and phase-correction lines),
        in file order; noise scans excluded.
    noise : list of ismrmrd.Acquisition
        Noise-measurement acquisitions (flag ``ACQ_IS_NOISE_MEASUREMENT``).
    path : pathlib.Path or None
        The file the data came from.
    """

    header: Any
    acquisitions: list[Any]
    noise: list[Any] = field(default_factory=list)
    path: Path | None = None


def _acquisitions_from_records(records: np.ndarray, source: str) -> list[Any]:
    """Turn the HDF5 compound records into :class:`ismrmrd.Acquisition` objects."""
    import ismrmrd

    acqs = []
    for i, rec in enumerate(records):
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(rec["head"].tobytes())
        nc, ns, nt = int(head.active_channels), int(head.number_of_samples), int(
            head.trajectory_dimensions
        )
        if nc == 0 or ns == 0:
            raise RawDataError(
                f"{source}: acquisition {i} is empty ({nc} channels x {ns} samples)"
            )
        raw = np.asarray(rec["data"], dtype=np.float32)
        if raw.size != 2 * nc * ns:
            raise RawDataError(
                f"{source}: acquisition {i} holds {raw.size // 2} complex samples, "
                f"its header says {nc} channels x {ns} samples"
            )
        traj = np.asarray(rec["traj"], dtype=np.float32)
        if traj.size != nt * ns:
            raise RawDataError(
                f"{source}: acquisition {i} holds {traj.size} trajectory values, "
                f"its header says {ns} samples x {nt} dimensions"
            )
        data = raw.view(np.complex64).reshape(nc, ns)
        acqs.append(
            ismrmrd.Acquisition(
                head, data=data.copy(), trajectory=traj.reshape(ns, nt).copy()
            )
        )
    return acqs


def read_raw(path: str | Path, *, dataset: str = "dataset") -> RawData:
    """Read an ISMRMRD HDF5 dataset (read-only) and check it.

    Parameters
    ----------
    path : str or Path
        ISMRMRD/MRD HDF5 file.
    dataset : str
        Name of the dataset group inside the file.

    Returns
    -------
    RawData

    Raises
    ------
    RawDataError
        If the file is missing or not HDF5, the group, header or acquisitions are
        missing, the header does not parse, an acquisition is empty or inconsistent,
        or counters fall outside the encoded matrix.
    """
    import h5py
    import ismrmrd.xsd

    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise RawDataError(f"{path}: not an HDF5 file (ISMRMRD raw data are HDF5)")
    try:
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise RawDataError(
                    f"{path}: no group {dataset!r} (groups: {sorted(f.keys())})"
                )
            group = f[dataset]
            if "xml" not in group:
                raise RawDataError(f"{path}: {dataset}/xml (the ISMRMRD header) is missing")
            xml = group["xml"][0]
            if "data" not in group or group["data"].shape[0] == 0:
                raise RawDataError(f"{path}: {dataset}/data holds no acquisitions")
            records = group["data"][()]
    except OSError as exc:
        raise RawDataError(f"{path}: cannot read HDF5 ({exc})") from exc
    try:
        header = ismrmrd.xsd.CreateFromDocument(xml.decode() if isinstance(xml, bytes) else xml)
    except Exception as exc:  # the generated XML parser raises many types
        raise RawDataError(f"{path}: the ISMRMRD XML header does not parse ({exc})") from exc
    if not header.encoding:
        raise RawDataError(f"{path}: the ISMRMRD header has no <encoding>")
    try:
        acqs = _acquisitions_from_records(records, str(path))
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, RawDataError):
            raise
        raise RawDataError(f"{path}: acquisition records are malformed ({exc})") from exc
    noise = [a for a in acqs if _flag(a, FLAG_NOISE)]
    imaging = [a for a in acqs if not _flag(a, FLAG_NOISE)]
    if not imaging:
        raise RawDataError(f"{path}: only noise scans, no imaging acquisitions")
    channels = {int(a.active_channels) for a in imaging}
    if len(channels) > 1:
        raise RawDataError(f"{path}: acquisitions have different channel counts {sorted(channels)}")
    check_counters(header, imaging, source=str(path))
    return RawData(header=header, acquisitions=imaging, noise=noise, path=path)


def encoding_of(header: Any, acq: Any | None = None) -> Any:
    """The header ``<encoding>`` an acquisition refers to (``encoding_space_ref``)."""
    ref = 0 if acq is None else int(acq.encoding_space_ref)
    if ref >= len(header.encoding):
        raise RawDataError(
            f"encoding_space_ref {ref}: the header has only {len(header.encoding)} encoding(s)"
        )
    return header.encoding[ref]


def _limit(limits: Any, name: str) -> Any:
    return None if limits is None else getattr(limits, name, None)


def _encoded_offsets(header: Any, acq: Any) -> tuple[int, int, int, int]:
    """Encoded ny, nz and the offsets that put each limit's centre at n // 2."""
    enc = encoding_of(header, acq)
    ny = int(enc.encodedSpace.matrixSize.y)
    nz = int(enc.encodedSpace.matrixSize.z or 1)
    offsets = []
    for name, n in (("kspace_encoding_step_1", ny), ("kspace_encoding_step_2", nz)):
        lim = _limit(enc.encodingLimits, name)
        centre = n // 2 if lim is None or lim.center is None else int(lim.center)
        offsets.append(n // 2 - centre)
    return ny, nz, offsets[0], offsets[1]


def check_counters(header: Any, acquisitions: list[Any], *, source: str = "data") -> None:
    """Raise :class:`RawDataError` if a Cartesian line falls outside the encoded matrix."""
    enc = encoding_of(header)
    if str(enc.trajectory.value if hasattr(enc.trajectory, "value") else enc.trajectory) not in (
        "cartesian", "epi"
    ):
        return
    steps = np.array(
        [(a.idx.kspace_encode_step_1, a.idx.kspace_encode_step_2) for a in acquisitions]
    )
    ny, nz, oy, oz = _encoded_offsets(header, acquisitions[0])
    for axis, (n, off, name) in enumerate(
        ((ny, oy, "kspace_encode_step_1"), (nz, oz, "kspace_encode_step_2"))
    ):
        pos = steps[:, axis] + off
        bad = np.flatnonzero((pos < 0) | (pos >= n))
        if bad.size:
            i = int(bad[0])
            raise RawDataError(
                f"{source}: {bad.size} acquisition(s) have {name} outside the encoded matrix "
                f"0..{n - 1 - off} (first: acquisition {i} with {int(steps[i, axis])})"
            )


def split_special(acquisitions: list[Any]) -> dict[str, list[Any]]:
    """Split acquisitions by role: ``noise``, ``navigation`` (incl. phase correction),
    ``other`` (feedback, dummy scans) and ``imaging``."""
    out: dict[str, list[Any]] = {"noise": [], "navigation": [], "other": [], "imaging": []}
    for a in acquisitions:
        if _flag(a, FLAG_NOISE):
            out["noise"].append(a)
        elif _flag(a, FLAG_NAVIGATION) or _flag(a, FLAG_PHASECORR):
            out["navigation"].append(a)
        elif any(_flag(a, f) for f in _NOT_IMAGING):
            out["other"].append(a)
        else:
            out["imaging"].append(a)
    return out


def noise_prewhitener(
    noise: list[Any], *, dwell_us: float | None = None
) -> np.ndarray | None:
    """Prewhitening matrix ``W`` (coils x coils) from noise scans, or None without any.

    ``W = inv(L)`` with ``L L^H = C`` the noise covariance, so ``W @ data`` has identity
    covariance. When the imaging dwell time differs from the noise scans', ``C`` is
    rescaled by ``noise_dwell / dwell_us`` (noise variance is inversely proportional to
    dwell time).

    Raises
    ------
    RawDataError
        If the noise covariance is not positive definite (a dead or duplicated channel).
    """
    if not noise:
        return None
    samples = np.concatenate([np.asarray(a.data, dtype=np.complex128) for a in noise], axis=1)
    n = samples.shape[1]
    if n < 2:
        return None
    cov = samples @ samples.conj().T / (n - 1)
    noise_dwell = float(noise[0].sample_time_us) or 0.0
    if dwell_us and noise_dwell:
        cov *= noise_dwell / float(dwell_us)
    try:
        lower = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as exc:
        raise RawDataError(
            f"noise scans: the {cov.shape[0]}-channel noise covariance is not positive "
            "definite (a dead or duplicated channel?)"
        ) from exc
    return np.linalg.inv(lower).astype(np.complex64)


def apply_prewhitening(acquisitions: list[Any], whitener: np.ndarray | None) -> list[Any]:
    """Return copies of the acquisitions with ``whitener @ data`` (identity when None)."""
    import ismrmrd

    if whitener is None:
        return list(acquisitions)
    out = []
    for a in acquisitions:
        out.append(
            ismrmrd.Acquisition(
                a.getHead(), data=(whitener @ a.data).astype(np.complex64), trajectory=a.traj
            )
        )
    return out


@dataclass
class CartesianBuffer:
    """Sorted Cartesian k-space of one ``(slice, contrast, repetition, set)``.

    Attributes
    ----------
    kspace : numpy.ndarray
        complex64 ``(coils, nx, ny, nz)``, zeros where not sampled; the k-space centre is
        at ``(nx//2, ny//2, nz//2)``.
    mask : numpy.ndarray
        bool ``(ny, nz)``: phase/partition lines sampled for imaging.
    calib : numpy.ndarray or None
        complex64 ``(coils, nx, ny, nz)`` of separate calibration lines (``calib_mask``),
        None when the calibration is part of the imaging data.
    calib_mask : numpy.ndarray or None
        bool ``(ny, nz)``.
    readout_mask : numpy.ndarray
        bool ``(nx,)``: readout samples that were acquired (asymmetric echo).
    reference : ismrmrd.Acquisition
        An acquisition of this buffer, for geometry and counters.
    """

    kspace: np.ndarray
    mask: np.ndarray
    calib: np.ndarray | None
    calib_mask: np.ndarray | None
    readout_mask: np.ndarray
    reference: Any


def sort_cartesian(header: Any, acquisitions: list[Any]) -> dict[tuple[int, int, int, int], Any]:
    """Sort Cartesian acquisitions into k-space buffers.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
    acquisitions : list of ismrmrd.Acquisition
        Imaging and calibration lines (noise and navigators are ignored here).

    Returns
    -------
    dict
        ``(slice, contrast, repetition, set) -> CartesianBuffer``.

    Raises
    ------
    RawDataError
        If a line falls outside the encoded matrix or readouts are longer than it.
    """
    parts = split_special(acquisitions)
    lines = parts["imaging"]
    if not lines:
        raise RawDataError("no imaging acquisitions to sort (only noise/navigator lines)")
    ny, nz, oy, oz = _encoded_offsets(header, lines[0])
    enc = encoding_of(header, lines[0])
    nx = max(int(enc.encodedSpace.matrixSize.x), max(int(a.number_of_samples) for a in lines))
    nc = int(lines[0].active_channels)
    groups: dict[tuple[int, int, int, int], list[Any]] = {}
    for a in lines:
        key = (int(a.idx.slice), int(a.idx.contrast), int(a.idx.repetition), int(a.idx.set))
        groups.setdefault(key, []).append(a)
    out = {}
    for key, acqs in groups.items():
        k = np.zeros((nc, nx, ny, nz), np.complex64)
        counts = np.zeros((ny, nz), np.int32)
        kc = None
        ccounts = np.zeros((ny, nz), np.int32)
        ro_mask = np.zeros(nx, bool)
        for a in acqs:
            ns = int(a.number_of_samples)
            centre = int(a.center_sample) if a.center_sample else ns // 2
            start = nx // 2 - centre
            if start < 0 or start + ns > nx:
                raise RawDataError(
                    f"slice {key[0]} line {a.idx.kspace_encode_step_1}: {ns} samples with "
                    f"centre {centre} do not fit the encoded readout of {nx}"
                )
            data = np.asarray(a.data)
            if _flag(a, FLAG_REVERSE):
                data = data[:, ::-1]
            y = int(a.idx.kspace_encode_step_1) + oy
            z = int(a.idx.kspace_encode_step_2) + oz
            if not (0 <= y < ny and 0 <= z < nz):
                raise RawDataError(
                    f"slice {key[0]}: line ({a.idx.kspace_encode_step_1}, "
                    f"{a.idx.kspace_encode_step_2}) is outside the encoded matrix {ny} x {nz}"
                )
            is_calib = _flag(a, FLAG_CALIB) or _flag(a, FLAG_CALIB_AND_IMAGING)
            if is_calib and not _flag(a, FLAG_CALIB_AND_IMAGING):
                if kc is None:
                    kc = np.zeros_like(k)
                kc[:, start:start + ns, y, z] += data
                ccounts[y, z] += 1
                continue
            k[:, start:start + ns, y, z] += data
            counts[y, z] += 1
            ro_mask[start:start + ns] = True
        mask = counts > 0
        if not mask.any():
            raise RawDataError(f"slice {key[0]}: only calibration lines, no imaging lines")
        k[:, :, mask] /= counts[mask][None, None, :]
        cmask = None
        if kc is not None:
            cmask = ccounts > 0
            kc[:, :, cmask] /= ccounts[cmask][None, None, :]
        out[key] = CartesianBuffer(k, mask, kc, cmask, ro_mask, acqs[0])
    return out
