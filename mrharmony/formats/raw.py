"""ISMRMRD (MRD v1) raw data: the one reader, the one writer, the acquisition table.

- :class:`RawData` is raw data in memory (header + ``ismrmrd.Acquisition`` list) that
  every reconstruction starts from, whichever format it came from.
- :func:`read_raw` reads an ISMRMRD HDF5 dataset (ours, the C++ tools', converted vendor
  data) read-only and checks it; :func:`load_raw` also opens MRD v2 files
  (:mod:`mrharmony.formats.mrd2`) and Siemens twix files with their ``.seq``
  (:mod:`mrharmony.formats.twix`), chosen from the file's content.
- :func:`acquisition_table` builds the acquisition headers of a list of Pulseq ADC
  records (counters from labels, flags, geometry) for the simulator and the converters;
  :func:`write_raw` writes a whole dataset atomically and :class:`RawStreamWriter` one
  that arrives acquisition by acquisition (the streaming server's ``--save-raw``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import RawDataError
from mrharmony.fileio import atomic_path
from mrharmony.formats.flags import LABEL_COUNTERS, flag_mask, has_flag
from mrharmony.formats.header import parse_ismrmrd_header

__all__ = [
    "RawData",
    "RawStreamWriter",
    "acquisition_table",
    "acquisitions_from_records",
    "check_counters",
    "encoding_of",
    "load_raw",
    "noise_table",
    "raw_from_arrays",
    "read_raw",
    "read_raw_header",
    "sniff_format",
    "write_raw",
]


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


def acquisitions_from_records(records: np.ndarray, source: str) -> list[Any]:
    """Turn ISMRMRD HDF5 compound records (``ismrmrd.hdf5.acquisition_dtype``) into
    :class:`ismrmrd.Acquisition` objects, checking every size against its header.

    Raises
    ------
    RawDataError
        If an acquisition is empty or its data or trajectory size contradicts its header.
    """
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
        if not np.all(np.isfinite(raw)):
            raise RawDataError(f"{source}: acquisition {i} holds non-finite samples (NaN or "
                               "infinity): the file is corrupt")
        data = raw.view(np.complex64).reshape(nc, ns)
        acqs.append(
            ismrmrd.Acquisition(
                head, data=data.copy(), trajectory=traj.reshape(ns, nt).copy()
            )
        )
    return acqs


def _header_xml(f: Any, path: Path, dataset: str) -> Any:
    """The ISMRMRD XML header of an open HDF5 file's ``dataset`` group."""
    if dataset not in f:
        raise RawDataError(f"{path}: no group {dataset!r} (groups: {sorted(f.keys())})")
    if "xml" not in f[dataset]:
        raise RawDataError(f"{path}: {dataset}/xml (the ISMRMRD header) is missing")
    return f[dataset]["xml"][0]


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

    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise RawDataError(f"{path}: not an HDF5 file (ISMRMRD raw data are HDF5)")
    try:
        with h5py.File(path, "r") as f:
            xml = _header_xml(f, path, dataset)
            group = f[dataset]
            if "data" not in group or group["data"].shape[0] == 0:
                raise RawDataError(f"{path}: {dataset}/data holds no acquisitions")
            records = group["data"][()]
    except OSError as exc:
        raise RawDataError(f"{path}: cannot read HDF5 ({exc})") from exc
    header = parse_ismrmrd_header(xml, source=f"{path}: the ISMRMRD XML header")
    try:
        acqs = acquisitions_from_records(records, str(path))
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, RawDataError):
            raise
        raise RawDataError(f"{path}: acquisition records are malformed ({exc})") from exc
    return raw_from_acquisitions(header, acqs, source=str(path), path=path)


def raw_from_acquisitions(
    header: Any, acquisitions: list[Any], *, source: str, path: Path | None = None
) -> RawData:
    """Split noise scans from imaging acquisitions and check the dataset.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Parsed header.
    acquisitions : list of ismrmrd.Acquisition
        All acquisitions in file order (noise scans included).
    source : str
        Name used in error messages.
    path : Path, optional
        The file the data came from.

    Returns
    -------
    RawData

    Raises
    ------
    RawDataError
        If there is no imaging acquisition, channel counts differ, or a Cartesian line
        falls outside the encoded matrix.
    """
    noise = [a for a in acquisitions if has_flag(a.flags, "IS_NOISE_MEASUREMENT")]
    imaging = [a for a in acquisitions if not has_flag(a.flags, "IS_NOISE_MEASUREMENT")]
    if not imaging:
        raise RawDataError(f"{source}: only noise scans, no imaging acquisitions")
    channels = {int(a.active_channels) for a in imaging}
    if len(channels) > 1:
        raise RawDataError(f"{source}: acquisitions have different channel counts "
                           f"{sorted(channels)}")
    check_counters(header, imaging, source=source)
    return RawData(header=header, acquisitions=imaging, noise=noise, path=path)


def raw_from_arrays(
    header: Any,
    heads: np.ndarray,
    data: list[np.ndarray],
    trajectories: list[np.ndarray] | None = None,
    *,
    source: str = "data",
    path: Path | None = None,
) -> RawData:
    """Raw data in memory from an acquisition table, without a file.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader or str
        Header object or its XML.
    heads : ndarray
        ``ismrmrd.hdf5.acquisition_header_dtype`` records (:func:`acquisition_table`).
    data : list of ndarray
        Per acquisition, complex ``(active_channels, number_of_samples)``.
    trajectories : list of ndarray, optional
        Per acquisition, ``(number_of_samples, trajectory_dimensions)``.
    source, path
        As in :func:`raw_from_acquisitions`.

    Returns
    -------
    RawData
    """
    records = _records(heads, data, trajectories)
    if isinstance(header, (str, bytes)):
        header = parse_ismrmrd_header(header, source=f"{source}: header")
    return raw_from_acquisitions(header, acquisitions_from_records(records, source),
                                 source=source, path=path)


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


def encoded_offsets(header: Any, acq: Any) -> tuple[int, int, int, int]:
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
    ny, nz, oy, oz = encoded_offsets(header, acquisitions[0])
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




def adc_rotations(records: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(n_acq, 3, 3) rotation per ADC (identity where none) and a flag 'any rotated'."""
    rot = np.repeat(np.eye(3)[None], len(records), axis=0)
    rotated = False
    for i, rec in enumerate(records):
        if rec.rotation is not None:
            rot[i] = np.asarray(rec.rotation, dtype=np.float64)
            rotated = True
    return rot, np.asarray(rotated)


def acquisition_table(
    records: list[Any],
    *,
    n_coils: int,
    slice_positions_mm: np.ndarray | None = None,
    center_samples: np.ndarray | None = None,
    trajectory_dims: int = 0,
) -> np.ndarray:
    """ISMRMRD acquisition headers of all ADCs, built at once.

    Parameters
    ----------
    records : list of ADCRecord
        From :meth:`PulseqSequence.adc_records` (anything with ``t_start_s``,
        ``num_samples``, ``dwell_s``, ``labels`` and ``rotation``), in playing order.
    n_coils : int
        Receive channels.
    slice_positions_mm : ndarray, optional
        Offset of each slice (``SLC`` label) along the slice direction, in mm.
    center_samples : ndarray of int, optional
        k-space centre sample per ADC (default ``num_samples // 2``).
    trajectory_dims : int
        2 or 3 when trajectories are stored, else 0.

    Returns
    -------
    ndarray
        Structured array of ``ismrmrd.hdf5.acquisition_header_dtype``, one per ADC, with
        counters, flags (first/last in encode steps, slice, contrast, set, repetition,
        average, phase; reverse; phase-correction navigators; last in measurement),
        geometry and sample times.
    """
    from ismrmrd.hdf5 import acquisition_header_dtype

    n = len(records)
    head = np.zeros(n, dtype=acquisition_header_dtype)
    head["version"] = 1
    head["scan_counter"] = np.arange(n, dtype=np.uint32)
    t = np.array([r.t_start_s for r in records], dtype=np.float64)
    head["acquisition_time_stamp"] = np.round(t / 2.5e-3).astype(np.uint32)  # 2.5 ms ticks
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    head["number_of_samples"] = ns
    head["available_channels"] = n_coils
    head["active_channels"] = n_coils
    masks = np.zeros(16, dtype=np.uint64)
    for c in range(n_coils):
        masks[c // 64] |= np.uint64(1) << np.uint64(c % 64)
    head["channel_mask"] = masks
    head["center_sample"] = ns // 2 if center_samples is None else center_samples
    head["trajectory_dimensions"] = trajectory_dims
    head["sample_time_us"] = np.array([r.dwell_s for r in records]) * 1e6

    labels = {name: np.array([int(r.labels.get(name, 0)) for r in records], dtype=np.int64)
              for name in (*LABEL_COUNTERS, "NAV", "REV")}
    for name, counter in LABEL_COUNTERS.items():
        values = labels[name]
        if np.any(values < 0) or np.any(values > 65535):
            raise RawDataError(
                f"label {name}: values {values.min()}..{values.max()} do not fit the ISMRMRD "
                f"counter {counter} (0..65535)"
            )
        head["idx"][counter] = values

    rot, _ = adc_rotations(records)
    head["read_dir"] = rot[:, :, 0]
    head["phase_dir"] = rot[:, :, 1]
    head["slice_dir"] = rot[:, :, 2]
    if slice_positions_mm is not None and len(slice_positions_mm):
        offs = np.asarray(slice_positions_mm, dtype=np.float64)
        slc = np.clip(labels["SLC"], 0, offs.size - 1)
        head["position"] = offs[slc][:, None] * rot[:, :, 2]

    flags = np.zeros(n, dtype=np.uint64)
    flags[labels["REV"] > 0] |= flag_mask("IS_REVERSE")
    nav = labels["NAV"] > 0
    flags[nav] |= flag_mask("IS_PHASECORR_DATA")
    imaging = ~nav
    lab = {k: labels[k] for k in LABEL_COUNTERS}

    def mark(keys: tuple[str, ...], first: str, last: str) -> None:
        idx = np.flatnonzero(imaging)
        if idx.size == 0:
            return
        key = np.stack([lab[k][idx] for k in keys], axis=1) if keys else np.zeros((idx.size, 1))
        _, first_pos = np.unique(key, axis=0, return_index=True)
        _, last_rev = np.unique(key[::-1], axis=0, return_index=True)
        flags[idx[first_pos]] |= flag_mask(first)
        flags[idx[idx.size - 1 - last_rev]] |= flag_mask(last)

    image = ("SLC", "ECO", "SET", "REP", "AVG", "PHS")
    mark(image, "FIRST_IN_ENCODE_STEP1", "LAST_IN_ENCODE_STEP1")
    if np.any(lab["PAR"] > 0):
        mark(image, "FIRST_IN_ENCODE_STEP2", "LAST_IN_ENCODE_STEP2")
    mark(("SLC", "REP"), "FIRST_IN_SLICE", "LAST_IN_SLICE")
    mark(("ECO", "SLC", "REP"), "FIRST_IN_CONTRAST", "LAST_IN_CONTRAST")
    mark(("SET", "SLC", "REP"), "FIRST_IN_SET", "LAST_IN_SET")
    mark(("PHS", "SLC", "REP"), "FIRST_IN_PHASE", "LAST_IN_PHASE")
    mark(("AVG", "SLC", "REP"), "FIRST_IN_AVERAGE", "LAST_IN_AVERAGE")
    mark(("REP",), "FIRST_IN_REPETITION", "LAST_IN_REPETITION")
    if imaging.any():
        flags[np.flatnonzero(imaging)[-1]] |= flag_mask("LAST_IN_MEASUREMENT")
    head["flags"] = flags
    return head


@dataclass(frozen=True)
class _NoiseRecord:
    t_start_s: float
    num_samples: int
    dwell_s: float
    labels: dict[str, int] = field(default_factory=dict)
    rotation: np.ndarray | None = None


def noise_table(samples: list[int], *, n_coils: int, dwell_s: float) -> np.ndarray:
    """Acquisition headers of noise scans (flag ``IS_NOISE_MEASUREMENT``, no trajectory).

    Parameters
    ----------
    samples : list of int
        Samples per noise acquisition.
    n_coils : int
        Receive channels.
    dwell_s : float
        Sample spacing (s), recorded as ``sample_time_us`` (prewhitening scales by it).

    Returns
    -------
    ndarray
        ``acquisition_header_dtype`` records, one per noise acquisition.
    """
    heads = acquisition_table([_NoiseRecord(0.0, int(n), float(dwell_s)) for n in samples],
                              n_coils=n_coils)
    heads["flags"] = flag_mask("IS_NOISE_MEASUREMENT")
    return heads


def _records(
    heads: np.ndarray, data: list[np.ndarray], trajectories: list[np.ndarray] | None
) -> np.ndarray:
    """``ismrmrd.hdf5.acquisition_dtype`` records of headers, data and trajectories."""
    from ismrmrd.hdf5 import acquisition_dtype

    if len(data) != heads.size:
        raise RawDataError(f"{heads.size} acquisition headers but {len(data)} data arrays")
    if trajectories is not None and len(trajectories) != heads.size:
        raise RawDataError(f"{heads.size} acquisition headers but {len(trajectories)} "
                           "trajectories")
    records = np.empty(heads.size, dtype=acquisition_dtype)
    records["head"] = heads
    empty = np.zeros(0, dtype=np.float32)
    data_col = np.empty(heads.size, dtype=object)
    traj_col = np.empty(heads.size, dtype=object)
    for i, d in enumerate(data):  # one vlen entry per acquisition (not per sample)
        data_col[i] = np.ascontiguousarray(d, dtype=np.complex64).reshape(-1).view(np.float32)
        t = None if trajectories is None else trajectories[i]
        traj_col[i] = empty if t is None else np.ascontiguousarray(t, np.float32).reshape(-1)
    records["data"] = data_col
    records["traj"] = traj_col
    return records


def write_raw(
    path: str | Path,
    header_xml: str,
    heads: np.ndarray,
    data: list[np.ndarray],
    trajectories: list[np.ndarray] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write an ISMRMRD HDF5 file (group ``dataset``: ``xml`` and ``data``) atomically.

    The one ISMRMRD writer of the toolkit: the simulator and the converters write
    through it (the streaming server appends through :class:`RawStreamWriter`). The
    file is written under a temporary name and renamed, so no partial file is ever left.
    A ``path`` ending in ``.mrd`` is written as MRD v2 instead
    (:func:`mrharmony.formats.mrd2.write_mrd2_acquisitions`, same acquisitions and order).

    Parameters
    ----------
    path : str or Path
        Output file.
    header_xml : str
        ISMRMRD XML header.
    heads : ndarray
        ``acquisition_header_dtype`` records (:func:`acquisition_table`).
    data : list of ndarray
        Per acquisition, complex64 ``(active_channels, number_of_samples)``.
    trajectories : list of ndarray, optional
        Per acquisition, float32 ``(number_of_samples, trajectory_dimensions)``; an entry
        may be ``None`` or empty for acquisitions without a trajectory (noise scans).
    force : bool
        Replace an existing file.

    Returns
    -------
    Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is false.
    RawDataError
        If the numbers of headers, data arrays and trajectories differ, or a size
        contradicts its header.
    """
    import h5py

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    records = _records(heads, data, trajectories)
    if path.suffix == ".mrd":  # MRD v2 (mrharmony.formats.mrd2), acquisitions in this order
        from mrharmony.formats.mrd2 import write_mrd2_acquisitions

        acqs = acquisitions_from_records(records, str(path))
        return write_mrd2_acquisitions(path, header_xml, acqs, force=force)
    for i, rec in enumerate(records):
        h = rec["head"]
        nc, ns, nt = int(h["active_channels"]), int(h["number_of_samples"]), int(
            h["trajectory_dimensions"])
        if rec["data"].size != 2 * nc * ns or rec["traj"].size != nt * ns:
            raise RawDataError(
                f"{path}: acquisition {i}: {rec['data'].size // 2} samples and "
                f"{rec['traj'].size} trajectory values for a header of {nc} channels x "
                f"{ns} samples x {nt} trajectory dimensions"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp, h5py.File(tmp, "w") as fh:
        grp = fh.create_group("dataset")
        xml = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml[0] = header_xml.encode()
        grp.create_dataset("data", data=records, maxshape=(None,),
                           chunks=(min(max(heads.size, 1), 1024),))
    return path


def sniff_format(path: str | Path) -> str:
    """The raw-data format of a file, from its content: ``"ismrmrd"`` (HDF5 with a
    ``dataset`` group), ``"mrd2"`` (MRD v2 binary stream file) or ``"twix"`` (Siemens
    ``.dat``, VB or VD/VE).

    Raises
    ------
    RawDataError
        If the file is missing or none of these.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{path}: no such file")
    if h5py.is_hdf5(path):
        return "ismrmrd"
    from mrharmony.formats import mrd2, twix

    if mrd2.is_mrd2(path):
        return "mrd2"
    if twix.is_twix(path):
        return "twix"
    raise RawDataError(f"{path}: not ISMRMRD (HDF5), MRD v2 or Siemens twix raw data")


def load_raw(path: str | Path, *, seq: str | Path | None = None,
             measurement: int | None = None, reference: str | Path | None = None,
             reference_seq: str | Path | None = None) -> RawData:
    """Read raw data in any supported format into :class:`RawData`.

    Parameters
    ----------
    path : str or Path
        An ISMRMRD HDF5 file, an MRD v2 file, or a Siemens twix ``.dat``.
    seq : str or Path, optional
        The Pulseq file the scanner played (required for twix).
    measurement : int, optional
        twix only: which measurement of a multi-measurement file (default: the last
        image measurement).
    reference, reference_seq : str or Path, optional
        twix EPI only: the same EPI measured with phase encoding off and its ``.seq``;
        its readouts become phase-correction data for ghost correction.

    Returns
    -------
    RawData

    Raises
    ------
    RawDataError
        If the format is unknown, or a twix file comes without its ``.seq``.
    """
    kind = sniff_format(path)
    if kind != "twix" and (seq is not None or measurement is not None
                           or reference is not None or reference_seq is not None):
        raise RawDataError(f"{path}: a .seq, measurement or reference scan goes with Siemens "
                           f"twix input; this is {kind}")
    if kind == "ismrmrd":
        return read_raw(path)
    if kind == "mrd2":
        from mrharmony.formats.mrd2 import read_mrd2_raw

        return read_mrd2_raw(path)
    if seq is None:
        raise RawDataError(f"{path}: a Siemens twix file needs the .seq the scanner played "
                           "(--seq SEQ.seq)")
    from mrharmony.formats.twix import read_twix_raw

    return read_twix_raw(path, seq, measurement=measurement, reference=reference,
                         reference_seq=reference_seq)


def read_raw_header(path: str | Path) -> Any:
    """Read only the header of an ISMRMRD HDF5 or MRD v2 raw file.

    The acquisitions are not read (an HDF5 file's ``data`` dataset is not touched; an
    MRD v2 stream is closed after its header), so this costs the same for a 10 GB file
    as for a small one. The header goes through the same strict parser as
    :func:`load_raw`.

    Parameters
    ----------
    path : str or Path
        ISMRMRD HDF5 (``dataset/xml``) or MRD v2 file.

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader

    Raises
    ------
    RawDataError
        If the file is missing, not one of these formats (Siemens twix files carry no
        ISMRMRD header), has no header, or the header does not parse.
    """
    import h5py

    from mrharmony.formats.header import parse_ismrmrd_header

    kind = sniff_format(path)
    path = Path(path)
    if kind == "ismrmrd":
        try:
            with h5py.File(path, "r") as f:
                xml = _header_xml(f, path, "dataset")
        except OSError as exc:
            raise RawDataError(f"{path}: cannot read HDF5 ({exc})") from exc
        return parse_ismrmrd_header(xml, source=f"{path}: the ISMRMRD XML header")
    if kind == "mrd2":
        from mrharmony.formats.mrd2 import read_mrd2_header

        return read_mrd2_header(path)
    raise RawDataError(f"{path}: a Siemens twix file has no ISMRMRD header of its own "
                       "(read it with load_raw and its .seq)")


class RawStreamWriter:
    """Write a received stream into an ISMRMRD HDF5 file as it arrives.

    The file is written under ``<path>.part``. Acquisitions are buffered as wire bytes
    and written in one block (one resize, one write, one HDF5 flush) by :meth:`flush`:
    the server calls it whenever a slice is complete, and it happens on its own once
    ``flush_bytes`` are buffered, so the per-acquisition cost is one list append.
    :meth:`close` (always called, also when the client disconnects) writes what is
    buffered and renames the file to ``path``, so a killed client leaves a complete,
    readable file.

    Parameters
    ----------
    path : Path
        Final file name.
    header_xml : str
        ISMRMRD header of the stream.
    flush_bytes : int
        Buffered acquisition bytes that trigger a :meth:`flush` (bytes).
    """

    def __init__(self, path: Path, header_xml: str, *, flush_bytes: int = 16 << 20) -> None:
        import h5py

        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.count = 0
        self.waveforms = 0
        self.flush_bytes = int(flush_bytes)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._file = h5py.File(self.part, "w")
        grp = self._file.create_group("dataset")
        xml = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml[0] = header_xml.encode()
        self._group = grp
        self._file.flush()

    def append(self, payload: bytes) -> None:
        """Buffer one acquisition given as its wire bytes (header, trajectory, data);
        written by the next :meth:`flush`."""
        self._pending.append(payload)
        self._pending_bytes += len(payload)
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered acquisitions in one block and flush the file."""
        if not self._pending:
            return
        from ismrmrd.hdf5 import acquisition_dtype

        if "data" not in self._group:
            self._group.create_dataset("data", shape=(0,), maxshape=(None,),
                                       dtype=acquisition_dtype, chunks=(64,))
        ds = self._group["data"]
        head_dtype = acquisition_dtype["head"]
        off = head_dtype.itemsize
        recs = np.empty((len(self._pending),), dtype=acquisition_dtype)
        recs["head"] = np.frombuffer(b"".join([p[:off] for p in self._pending]), head_dtype)
        trajs, datas = recs["traj"], recs["data"]  # object (variable-length) fields
        heads = recs["head"]
        sizes = np.stack([heads["number_of_samples"], heads["active_channels"],
                          heads["trajectory_dimensions"]], axis=1).astype(np.int64).tolist()
        for k, payload in enumerate(self._pending):
            ns, nc, nt = sizes[k]
            trajs[k] = np.frombuffer(payload, np.float32, count=ns * nt, offset=off)
            datas[k] = np.frombuffer(payload, np.float32, count=2 * ns * nc,
                                     offset=off + 4 * ns * nt)
        ds.resize(self.count + len(recs), axis=0)
        ds[self.count:self.count + len(recs)] = recs
        self.count += len(recs)
        self._pending.clear()
        self._pending_bytes = 0
        self._file.flush()

    def append_waveform(self, wav: Any) -> None:
        """Append one waveform and flush."""
        from ismrmrd.hdf5 import waveform_dtype, waveform_header_dtype

        if "waveforms" not in self._group:
            self._group.create_dataset("waveforms", shape=(0,), maxshape=(None,),
                                       dtype=waveform_dtype, chunks=(64,))
        ds = self._group["waveforms"]
        rec = np.empty((1,), dtype=waveform_dtype)
        rec[0]["head"] = np.frombuffer(wav.getHead(), dtype=waveform_header_dtype)[0]
        rec[0]["data"] = np.ascontiguousarray(wav.data, np.uint32).reshape(-1)
        ds.resize(self.waveforms + 1, axis=0)
        ds[self.waveforms] = rec[0]
        self.waveforms += 1
        self._file.flush()

    def abort(self) -> None:
        """Drop what is buffered, close the file and delete the partial ``.part`` file.

        For a writer that failed (full disk, read-only folder): nothing is left behind.
        Safe to call more than once and after an error inside h5py.
        """
        self._pending.clear()
        self._pending_bytes = 0
        if self._file:
            with contextlib.suppress(Exception):
                self._file.close()
        with contextlib.suppress(OSError):
            self.part.unlink()

    def close(self) -> Path:
        """Write what is buffered, close the file and move it to its final name."""
        if self._file:
            try:
                self.flush()
            finally:
                self._file.close()
            os.replace(self.part, self.path)
        return self.path


