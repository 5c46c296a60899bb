"""Siemens twix (``.dat``) measured with the Pulseq interpreter + its ``.seq`` → raw data.

A physicist writes a ``.seq``, the scanner's Pulseq interpreter plays it and writes a twix
file. The twix knows nothing about k-space (its counters are the interpreter's running
line count); the ``.seq`` knows everything about k-space but nothing about the scanner.
:func:`read_twix_raw` joins the two:

1. **twix** (``twixtools``; VB17 and VD/VE, multi-measurement files): the last
   measurement that holds image data unless ``measurement`` is given. The file is
   checked before it is parsed: a file shorter than its measurement table (VD/VE) or
   header, a measurement without its closing ``ACQEND`` block or a data block cut short
   is refused as truncated.
2. **ADC matching**: every data readout of the twix (everything except ``ACQEND``,
   ``SYNCDATA``, real-time/HP feedback and noise-adjust scans) is matched in playing
   order to an ADC event of the ``.seq`` (``NOISE``-labelled ADCs of the ``.seq`` to
   the noise-adjust readouts the interpreter flags for them). A readout the interpreter
   split into segments (long ADCs) is joined again. The numbers of ADCs and samples
   must agree; a mismatch is refused with both counts and, when the twix carries the
   MD5 signature of the ``.seq`` it played (``tSequenceVariant``, written by the
   interpreter since v1.4), both signatures; a twix whose ``tSequenceFileName`` is not
   the Pulseq interpreter is named as such. Matching counts with different signatures
   (or another sequence name) are logged as a warning (a ``.seq`` regenerated with
   identical timing still reconstructs).
3. **Layout from the** ``.seq`` (:func:`mrharmony.formats.layout.layout_from_seq`):
   header (encoding spaces, limits, trajectory, TE/TR/TI), acquisition headers
   (counters from labels, or from the file's own Cartesian k-space on the FFT grid;
   flags), and trajectories for non-Cartesian files. Readout direction (``IS_REVERSE``)
   comes from the sign of the readout k-space of each ADC. A Cartesian file whose
   excitations each read several phase-encoded lines of both polarities is EPI: its
   header trajectory becomes ``epi`` and every ADC carries its (kx, ky) trajectory in
   cycles/FOV, so that :mod:`mrharmony.recon.epi` regrids ramp-sampled lines from the
   real k-space. A readout with more samples than the matrix (oversampling, ramp
   sampling) keeps them all: the encoded space holds every sample, the recon space the
   ``.seq``'s matrix and FOV.
4. **Geometry from the twix**: the interpreter plays the ``.seq`` gradients x, y, z in
   the slice frame the operator prescribed. With the default prescription (transversal,
   phase A>>P, no in-plane rotation) x, y, z are the patient axes L, P, S (the
   toolkit's convention). The rotation of the prescribed frame relative to that default
   is taken from each readout's MDH quaternion, and the MDH slice position is the
   slice centre (LPS mm). Directions of every acquisition are that rotation applied to
   the ``.seq``'s own (ROTATIONS extension) directions; the ``.seq``'s slice offsets are
   added when the MDH positions do not already differ per slice.
5. **Noise**: noise-adjust readouts (``NOISEADJSCAN``) of the measurement, or of the
   noise-only measurement before it in a multi-measurement file, become
   ``IS_NOISE_MEASUREMENT`` acquisitions written first.
6. **Header**: system vendor/model, field strength, Larmor frequency, channel count,
   institution, patient position from the twix; FOV, matrix, TE/TR/TI from the ``.seq``.
   No sample is removed: readout oversampling stays in the data and the encoded vs
   reconstructed spaces of the header say what recon crops.

An EPI **reference scan** (the same EPI with phase encoding off, ``reference=``) adds its
readouts as ``IS_PHASECORR_DATA`` acquisitions (with their own trajectories and
``IS_REVERSE`` from their readout sign), which the Nyquist-ghost correction of
:func:`mrharmony.recon.epi.reconstruct_epi` uses.

:func:`convert_twix` writes the result as ISMRMRD HDF5 (``.h5``) or MRD v2 (``.mrd``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import RawDataError, SequenceFileError
from mrharmony.formats.flags import flag_mask, has_flag

__all__ = ["convert_twix", "is_twix", "read_twix_raw"]

_LOG = logging.getLogger("mrharmony.formats")

#: twix flags of blocks that are not ADC readouts of the ``.seq``.
_NOT_SEQ_ADC = ("ACQEND", "SYNCDATA", "RTFEEDBACK", "HPFEEDBACK", "NOISEADJSCAN")
#: Bytes of the VD/VE multi-measurement table at the start of the file.
_VD_TABLE_BYTES = 10240
#: Directions (columns read, phase, slice; LPS) that the siemens_to_ismrmrd quaternion
#: convention gives the default transversal prescription (A>>P, no in-plane rotation),
#: MDH quaternion (0.7071, 0, 0, 0.7071). The interpreter plays .seq x, y, z on that
#: frame as L, P, S.
_DEFAULT_FRAME = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


# --------------------------------------------------------------------------- sniffing


def _vd_table(path: Path, size: int) -> tuple[int, list[tuple[int, int]]] | None:
    """``(count, [(offset, length), ...])`` of a VD/VE file, or None for a VB file."""
    with open(path, "rb") as fh:
        first = np.frombuffer(fh.read(8), dtype="<u4")
    if first.size < 2 or not (first[0] < 10000 and 1 <= first[1] <= 64):
        return None
    if size < _VD_TABLE_BYTES:
        return int(first[1]), []
    import twixtools.hdr_def as hdr_def

    with open(path, "rb") as fh:
        table = np.frombuffer(fh.read(hdr_def.MultiRaidFileHeader.itemsize),
                              dtype=hdr_def.MultiRaidFileHeader)[0]
    count = int(table["hdr"]["count_"])
    entries = [(int(table["entry"][k]["off_"]), int(table["entry"][k]["len_"]))
               for k in range(min(count, 64))]
    return count, entries


def _has_config(path: Path, offset: int) -> bool:
    """A measurement header starts with its length, a buffer count and ``Config``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(16)
    return len(head) >= 15 and head[8:15] == b"Config\x00"


def is_twix(path: str | Path) -> bool:
    """Whether a file is Siemens twix raw data (VB or VD/VE), from its first bytes.

    Parameters
    ----------
    path : str or Path
        Any file.

    Returns
    -------
    bool
        True for a VB file (header length, buffer count, ``Config`` at byte 8) or a
        VD/VE file (measurement table whose first entry starts with such a header).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 16:
            return False
        if _has_config(path, 0):
            return True
        table = _vd_table(path, size)
        if table is None or not table[1]:
            return False
        return _has_config(path, table[1][0][0])
    except OSError:
        return False


# --------------------------------------------------------------------------- twix side


@dataclass
class _Measurement:
    """One measurement of a twix file, reduced to what the conversion needs."""

    path: Path
    index: int
    count: int
    version: str  # "VB" or "VD/VE"
    hdr: dict[str, Any]
    readouts: list[Any]  # mdbs matched to the .seq's ADCs, in order
    noise: list[Any] = field(default_factory=list)
    noise_dwell_s: float | None = None

    def value(self, section: str, key: str) -> Any:
        sec = self.hdr.get(section) or {}
        return sec.get(key) if isinstance(sec, dict) else None

    @property
    def sequence_file(self) -> str:
        return str(self.value("MeasYaps", "tSequenceFileName") or "")

    @property
    def is_pulseq(self) -> bool:
        name = re.split(r"[\\/]", self.sequence_file)[-1]
        return "pulseq" in name.lower()

    @property
    def signature(self) -> str | None:
        for section in ("Dicom", "Meas"):
            value = self.value(section, "tSequenceVariant")
            if isinstance(value, str) and _HEX32.match(value.strip()):
                return value.strip().lower()
        return None


def _flags_of(mdb: Any) -> set[str]:
    return set(mdb.get_active_flags())


def _dwell_s(hdr: dict[str, Any]) -> float | None:
    rx = (hdr.get("MeasYaps") or {}).get("sRXSPEC") or {}
    dwell = rx.get("alDwellTime") if isinstance(rx, dict) else None
    if isinstance(dwell, list) and dwell and isinstance(dwell[0], int | float) and dwell[0]:
        return float(dwell[0]) * 1e-9
    return None


def _read_measurement(path: Path, measurement: int | None, *,
                      seq_noise: bool = False) -> _Measurement:
    """Parse a twix file with twixtools and pick the measurement (module docstring).

    With ``seq_noise`` (the ``.seq`` has ``NOISE``-labelled ADCs, which the interpreter
    flags ``NOISEADJSCAN``) the noise-adjust readouts stay among the readouts.
    """
    import twixtools

    if not path.is_file():
        raise RawDataError(f"{path}: no such file")
    if not is_twix(path):
        raise RawDataError(f"{path}: not Siemens twix raw data (no twix measurement header)")
    size = path.stat().st_size
    table = _vd_table(path, size)
    version = "VB" if table is None or _has_config(path, 0) else "VD/VE"
    starts = [(0, size)] if version == "VB" or table is None else table[1]
    for k, (off, length) in enumerate(starts):
        if length and off + length > size:
            raise RawDataError(
                f"{path}: truncated: measurement {k} of {len(starts)} needs bytes up to "
                f"{off + length}, the file has {size}"
            )
        with open(path, "rb") as fh:
            fh.seek(off)
            hdr_len = int(np.frombuffer(fh.read(4).ljust(4, b"\0"), dtype="<u4")[0])
        if off + hdr_len + 128 > size:
            raise RawDataError(
                f"{path}: truncated: the header of measurement {k} of {len(starts)} needs "
                f"bytes up to {off + hdr_len}, the file has {size}"
            )
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scans = twixtools.read_twix(str(path), parse_pmu=False, parse_geometry=False,
                                        verbose=False, keep_acqend=True, keep_syncdata=False)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise RawDataError(f"{path}: unreadable twix file ({exc})") from exc
    if not scans:
        raise RawDataError(f"{path}: the twix file holds no measurement")

    skip = set(_NOT_SEQ_ADC) - ({"NOISEADJSCAN"} if seq_noise else set())

    def readouts(scan: dict[str, Any]) -> list[Any]:
        return [m for m in scan["mdb"] if not _flags_of(m) & skip]

    def noise(scan: dict[str, Any]) -> list[Any]:
        return [m for m in scan["mdb"] if "NOISEADJSCAN" in _flags_of(m)]

    for k, scan in enumerate(scans):
        if not scan["mdb"] or "ACQEND" not in _flags_of(scan["mdb"][-1]):
            raise RawDataError(f"{path}: truncated: measurement {k} of {len(scans)} ends "
                               f"after {len(scan['mdb'])} data blocks without its ACQEND "
                               "block")
    with_data = [k for k, s in enumerate(scans) if readouts(s)]
    if measurement is None:
        if not with_data:
            raise RawDataError(f"{path}: none of the {len(scans)} measurement(s) holds "
                               "image readouts")
        index = with_data[-1]
    else:
        index = int(measurement)
        if not -len(scans) <= index < len(scans):
            raise RawDataError(f"{path}: measurement {measurement} does not exist; the file "
                               f"has {len(scans)} (0..{len(scans) - 1})")
        index %= len(scans)
        if index not in with_data:
            raise RawDataError(f"{path}: measurement {index} of {len(scans)} holds no image "
                               "readouts")
    scan = scans[index]
    meas = _Measurement(path=path, index=index, count=len(scans), version=version,
                        hdr=scan.get("hdr") or {}, readouts=readouts(scan))
    meas.noise = [] if seq_noise else noise(scan)
    meas.noise_dwell_s = _dwell_s(meas.hdr)
    if not meas.noise and index > 0 and not readouts(scans[index - 1]):
        meas.noise = noise(scans[index - 1])  # the noise-adjust measurement before it
        meas.noise_dwell_s = _dwell_s(scans[index - 1].get("hdr") or {})
    return meas


def _mdb_data(meas: _Measurement, mdb: Any, k: int, fh: Any = None) -> np.ndarray:
    """Samples (channels, samples) of one data block; ``fh``: the file, already open."""
    try:
        if fh is not None and getattr(mdb, "mem_pos", None) is not None:
            mdb.fid = fh  # twixtools reopens the file per block when its handle is closed
        data = np.asarray(mdb.data, dtype=np.complex64)
    except (ValueError, OSError) as exc:
        raise RawDataError(f"{meas.path}: truncated: data block {k} of measurement "
                           f"{meas.index} cannot be read ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != int(mdb.mdh.SamplesInScan):
        raise RawDataError(f"{meas.path}: truncated: data block {k} of measurement "
                           f"{meas.index} holds {data.size} of its "
                           f"{int(mdb.mdh.UsedChannels) * int(mdb.mdh.SamplesInScan)} samples")
    return data


# --------------------------------------------------------------------------- seq side


def _seq_signature(path: Path) -> str | None:
    """The MD5 hash of a ``.seq``'s ``[SIGNATURE]`` section, if it has one."""
    try:
        text = path.read_bytes()
    except OSError:
        return None
    pos = text.rfind(b"[SIGNATURE]")
    if pos < 0:
        return None
    match = re.search(rb"^\s*Hash\s+([0-9a-fA-F]+)", text[pos:], re.MULTILINE)
    return match.group(1).decode().lower() if match else None


def _read_seq(path: str | Path) -> Any:
    from mrharmony.formats.pulseq import read_pulseq

    path = Path(path)
    if not path.is_file():
        raise SequenceFileError(f"{path}: no such .seq file")
    seq = read_pulseq(path)
    if not seq.adc_records():
        raise SequenceFileError(f"{path}: the sequence has no ADC events, nothing to match "
                                "the twix readouts to")
    return seq


def _layout(seq: Any, meas: _Measurement, n_coils: int) -> Any:
    """The acquisition layout of the ``.seq`` (:func:`.layout.layout_from_seq`)."""
    from mrharmony.formats.layout import layout_from_seq

    field_t = meas.value("Dicom", "flMagneticFieldStrength")
    return layout_from_seq(
        seq, n_coils=n_coils, need_kspace=True,
        vendor=str(meas.value("Dicom", "Manufacturer") or "SIEMENS"),
        model=meas.value("Dicom", "ManufacturersModelName") or None,
        field_t=float(field_t) if isinstance(field_t, int | float) and field_t else None,
    )


def _logical_kspace_cycles(seq: Any, records: list[Any], enc: Any) -> np.ndarray:
    """k of every ADC sample on the logical axes (read, phase, slice), cycles per FOV."""
    from mrharmony.formats.layout import logical_kspace

    fov = enc.reconSpace.fieldOfView_mm
    fov_m = np.array([fov.x, fov.y, fov.z or 1.0], dtype=np.float64) * 1e-3
    return logical_kspace(seq, records) * fov_m[None, :]


# --------------------------------------------------------------------------- matching


def _match(meas: _Measurement, seq_path: Path, records: list[Any]) -> list[Any]:
    """Per ``.seq`` ADC, the twix readout(s) it became (segments joined later)."""
    want = np.array([r.num_samples for r in records], dtype=np.int64)
    have = np.array([int(m.mdh.SamplesInScan) for m in meas.readouts], dtype=np.int64)
    groups: list[list[Any]] = []
    j = 0
    ok = True
    for n in want:
        group, got = [], 0
        while j < have.size and got < n:
            group.append(meas.readouts[j])
            got += int(have[j])
            j += 1
        if got != n:
            ok = False
            break
        groups.append(group)
    if ok and j == have.size:
        return groups
    seq_sig, twix_sig = _seq_signature(seq_path), meas.signature
    sig = ""
    if twix_sig is not None:
        sig = (f"; the twix was measured with the .seq of signature {twix_sig}, "
               f"{seq_path.name} has {seq_sig or 'no signature'}")
    who = ""
    if not meas.is_pulseq:
        who = (f"; it was not measured with the Pulseq interpreter (tSequenceFileName "
               f"{meas.sequence_file!r})")
    raise RawDataError(
        f"{meas.path}: its {have.size} ADC readouts ({int(have.sum())} samples per channel) "
        f"do not match the {want.size} ADC events ({int(want.sum())} samples) of "
        f"{seq_path}{who}{sig}"
    )


def _check_pair(meas: _Measurement, seq_path: Path) -> None:
    """Log what matches but looks odd: another sequence, another signature."""
    if not meas.is_pulseq:
        _LOG.warning("%s: tSequenceFileName %r is not the Pulseq interpreter, but its ADCs "
                     "match %s", meas.path, meas.sequence_file, seq_path)
    seq_sig, twix_sig = _seq_signature(seq_path), meas.signature
    if twix_sig and seq_sig and twix_sig != seq_sig:
        _LOG.warning("%s: measured with the .seq of signature %s, %s has %s (regenerated?); "
                     "the ADC layouts match, converting", meas.path, twix_sig, seq_path,
                     seq_sig)


def _readout_data(meas: _Measurement, groups: list[list[Any]]) -> list[np.ndarray]:
    pos = {id(m): k for k, m in enumerate(meas.readouts)}
    data = []
    with open(meas.path, "rb") as fh:
        blocks = [[_mdb_data(meas, m, pos[id(m)], fh) for m in group] for group in groups]
    for parts in blocks:
        chans = {p.shape[0] for p in parts}
        if len(chans) != 1:
            raise RawDataError(f"{meas.path}: segments of one ADC have channel counts "
                               f"{sorted(chans)}")
        data.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
    chans = sorted({d.shape[0] for d in data})
    if len(chans) != 1:
        raise RawDataError(f"{meas.path}: readouts have different channel counts {chans}")
    return data


# --------------------------------------------------------------------------- geometry


def _quaternion_frame(q: np.ndarray) -> np.ndarray:
    """MDH quaternion (W, X, Y, Z) → columns read, phase, slice (siemens_to_ismrmrd)."""
    w, a, b, c = (float(v) for v in q)
    d = w
    first = [1 - 2 * (b * b + c * c), 2 * (a * b + c * d), 2 * (a * c - b * d)]
    second = [2 * (a * b - c * d), 1 - 2 * (a * a + c * c), 2 * (b * c + a * d)]
    third = [2 * (a * c + b * d), 2 * (b * c - a * d), 1 - 2 * (a * a + b * b)]
    # siemens_to_ismrmrd hands (phase, read, slice) to ismrmrd_quaternion_to_directions
    return np.array([second, first, third]).T


def _apply_geometry(heads: np.ndarray, groups: list[list[Any]]) -> None:
    """Directions and positions of the imaging heads from each readout's MDH slice data."""
    n = len(groups)
    pos = np.zeros((n, 3))
    rot = np.repeat(np.eye(3)[None], n, axis=0)
    for i, group in enumerate(groups):
        sd = group[0].mdh.SliceData
        p = sd.SlicePos
        pos[i] = (float(p.Sag), float(p.Cor), float(p.Tra))
        q = np.array(sd.Quaternion[:], dtype=np.float64)
        norm = np.linalg.norm(q)
        if norm > 0.5:
            rot[i] = _quaternion_frame(q / norm) @ _DEFAULT_FRAME.T
    for name in ("read_dir", "phase_dir", "slice_dir"):
        heads[name] = np.einsum("nij,nj->ni", rot, heads[name].astype(np.float64))
    seq_offsets = np.einsum("nij,nj->ni", rot, heads["position"].astype(np.float64))
    mdh_varies = float(np.ptp(pos, axis=0).max()) > 1e-3  # the interpreter knew the slices
    heads["position"] = pos if mdh_varies else pos + seq_offsets


# --------------------------------------------------------------------------- header


def _fill_header(header: Any, meas: _Measurement, n_coils: int, info: dict[str, str]) -> None:
    import ismrmrd.xsd as mrd

    def num(section: str, key: str) -> float | None:
        for sec in (section, "Meas"):
            v = meas.value(sec, key)
            if isinstance(v, int | float) and v:
                return float(v)
        return None

    def text(section: str, key: str) -> str | None:
        for sec in (section, "Meas"):
            v = meas.value(sec, key)
            if isinstance(v, str) and v.strip():
                return v.strip()
        return None

    system = header.acquisitionSystemInformation or mrd.acquisitionSystemInformationType()
    system.systemVendor = text("Dicom", "Manufacturer") or "SIEMENS"
    system.systemModel = text("Dicom", "ManufacturersModelName")
    field_t = num("Dicom", "flMagneticFieldStrength") or num("Meas", "flNominalB0")
    system.systemFieldStrength_T = field_t
    system.receiverChannels = int(n_coils)
    system.institutionName = text("Dicom", "InstitutionName")
    serial = num("Dicom", "DeviceSerialNumber")
    if serial is not None:
        system.deviceSerialNumber = str(int(serial))
    header.acquisitionSystemInformation = system
    larmor = num("Dicom", "lFrequency")
    if larmor is not None:
        header.experimentalConditions = mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(larmor))
    elif field_t is not None:
        header.experimentalConditions = mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(field_t * 42.576e6))
    position = text("Dicom", "tPatientPosition") or text("Config", "PatientPosition")
    uid = num("Config", "MeasUID")
    header.measurementInformation = mrd.measurementInformationType(
        measurementID=None if uid is None else str(int(uid)),
        patientPosition=(mrd.patientPositionType(position)
                         if position in mrd.patientPositionType.__members__ else None),
        protocolName=text("MeasYaps", "tProtocolName") or text("Config", "ProtocolName"),
        sequenceName=meas.sequence_file or None,
    )
    params = header.userParameters or mrd.userParametersType()
    params.userParameterString = list(params.userParameterString or []) + [
        mrd.userParameterStringType(name=k, value=v) for k, v in info.items()]
    header.userParameters = params


# --------------------------------------------------------------------------- assembly


@dataclass
class _Parts:
    header: Any
    heads: np.ndarray
    data: list[np.ndarray]
    trajectories: list[np.ndarray] | None


def _noise_parts(meas: _Measurement, n_coils: int, dwell_s: float) -> tuple[np.ndarray, list]:
    from mrharmony.formats.raw import noise_table

    data = []
    with open(meas.path, "rb") as fh:
        blocks = [_mdb_data(meas, m, k, fh) for k, m in enumerate(meas.noise)]
    for d in blocks:
        if d.shape[0] != n_coils:
            _LOG.warning("%s: noise-adjust scans have %d channels, the imaging data %d; "
                         "noise scans left out", meas.path, d.shape[0], n_coils)
            return noise_table([], n_coils=n_coils, dwell_s=dwell_s), []
        data.append(d)
    dwell = meas.noise_dwell_s or dwell_s
    return noise_table([d.shape[1] for d in data], n_coils=n_coils, dwell_s=dwell), data




def _side(path: Path, seq_path: Path, measurement: int | None) -> tuple[Any, ...]:
    seq = _read_seq(seq_path)
    records = seq.adc_records()
    seq_noise = any(r.labels.get("NOISE", 0) for r in records)
    meas = _read_measurement(path, measurement, seq_noise=seq_noise)
    groups = _match(meas, seq_path, records)
    _check_pair(meas, seq_path)
    data = _readout_data(meas, groups)
    return seq, meas, records, groups, data


def _assemble(path: Path, seq_path: Path, measurement: int | None,
              reference: Path | None, reference_seq: Path | None) -> _Parts:
    import ismrmrd.xsd as mrd

    seq, meas, records, groups, data = _side(path, seq_path, measurement)
    n_coils = int(data[0].shape[0])
    layout = _layout(seq, meas, n_coils)
    header = layout.header
    heads = np.array(layout.heads, copy=True)
    if heads.size != len(records):
        raise RawDataError(f"{seq_path}: the layout has {heads.size} acquisitions for "
                           f"{len(records)} ADC events")
    _LOG.info("%s: counters from the .seq's %s", seq_path, layout.counters_source)
    enc = header.encoding[0]
    trajs = list(layout.trajectories) if layout.trajectories is not None else None
    _apply_geometry(heads, groups)
    seq_noise = np.array([bool(r.labels.get("NOISE", 0)) for r in records])
    if seq_noise.any():  # NOISE-labelled ADCs: noise scans, written first
        heads["flags"][seq_noise] = flag_mask("IS_NOISE_MEASUREMENT")
        heads["trajectory_dimensions"][seq_noise] = 0
        order = np.concatenate((np.flatnonzero(seq_noise), np.flatnonzero(~seq_noise)))
        heads = heads[order]
        data = [data[i] for i in order]
        if trajs is not None:
            trajs = [np.zeros((0, 0), np.float32) if seq_noise[i] else trajs[i]
                     for i in order]

    noise_heads, noise_data = _noise_parts(meas, n_coils, float(records[0].dwell_s))
    parts_heads = [noise_heads]
    parts_data: list[np.ndarray] = list(noise_data)
    parts_traj: list[np.ndarray | None] = [None] * len(noise_data)
    if reference is not None:
        if enc.trajectory != mrd.trajectoryType.EPI:
            raise RawDataError(f"{reference}: a reference scan is for EPI ghost correction; "
                               f"{seq_path} is not EPI")
        if reference_seq is None:
            raise RawDataError(f"{reference}: the reference scan needs its .seq "
                               "(--reference-seq)")
        r_heads, r_data, r_traj = _reference_parts(reference, reference_seq, heads, enc,
                                                   n_coils)
        parts_heads.append(r_heads)
        parts_data += r_data
        parts_traj += r_traj
    parts_heads.append(heads)
    parts_data += data
    parts_traj += trajs if trajs is not None else [None] * len(data)
    all_heads = np.concatenate(parts_heads)
    all_heads["scan_counter"] = np.arange(all_heads.size, dtype=np.uint32)
    info = {
        "twix_file": path.name, "twix_measurement": str(meas.index),
        "twix_version": meas.version, "seq_file": seq_path.name,
        "counters_source": str(layout.counters_source),
        "trajectory_units": "cycles_per_fov" if trajs is not None else "none",
    }
    if meas.signature:
        info["twix_seq_signature"] = meas.signature
    if (sig := _seq_signature(seq_path)) is not None:
        info["seq_signature"] = sig
    if reference is not None:
        info["reference_twix_file"] = reference.name
    _fill_header(header, meas, n_coils, info)
    has_traj = any(t is not None and t.size for t in parts_traj)
    return _Parts(header, all_heads, parts_data,
                  [t if t is not None else np.zeros((0, 0), np.float32) for t in parts_traj]
                  if has_traj else None)


def _reference_parts(reference: Path, reference_seq: Path, img_heads: np.ndarray, enc: Any,
                     n_coils: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Phase-correction acquisitions of an EPI reference scan (phase encoding off)."""
    from mrharmony.formats.layout import readout_reversed
    from mrharmony.formats.raw import acquisition_table

    seq, _, records, _, data = _side(reference, reference_seq, None)
    if data[0].shape[0] != n_coils:
        raise RawDataError(f"{reference}: {data[0].shape[0]} channels, the EPI scan has "
                           f"{n_coils}")
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    off = np.concatenate(([0], np.cumsum(ns)))
    k = _logical_kspace_cycles(seq, records, enc)
    heads = acquisition_table(records, n_coils=n_coils, trajectory_dims=2)
    imaging = img_heads[~has_flag(img_heads["flags"], "IS_PHASECORR_DATA")
                        & ~has_flag(img_heads["flags"], "IS_NOISE_MEASUREMENT")]
    same = len(records) == imaging.size
    if not same:
        _LOG.warning("%s: %d reference readouts for %d EPI lines; all used as one reference",
                     reference, len(records), imaging.size)
    src = imaging if same else np.repeat(imaging[:1], len(records))
    heads["idx"] = src["idx"]
    for name in ("read_dir", "phase_dir", "slice_dir", "position"):
        heads[name] = src[name]
    heads["flags"] = flag_mask("IS_PHASECORR_DATA")
    heads["flags"][readout_reversed(k, ns)] |= flag_mask("IS_PHASECORR_DATA", "IS_REVERSE")
    heads["center_sample"] = [int(np.argmin(np.abs(k[off[i]:off[i + 1], 0])))
                              for i in range(len(records))]
    k2 = k[:, :2].astype(np.float32)
    _LOG.info("%s: %d reference readouts as phase-correction data", reference, len(records))
    return heads, data, [k2[off[i]:off[i + 1]] for i in range(len(records))]


# --------------------------------------------------------------------------- public API


def read_twix_raw(
    path: str | Path,
    seq: str | Path,
    measurement: int | None = None,
    *,
    reference: str | Path | None = None,
    reference_seq: str | Path | None = None,
) -> Any:
    """Read a Siemens twix file measured with a Pulseq ``.seq`` into raw data in memory.

    Parameters
    ----------
    path : str or Path
        The twix ``.dat`` (VB17 or VD/VE, single or multi-measurement).
    seq : str or Path
        The Pulseq file the scanner's Pulseq interpreter played.
    measurement : int, optional
        Measurement of a multi-measurement file (0-based; negative counts from the end;
        default: the last one that holds image readouts).
    reference : str or Path, optional
        EPI only: twix of the same EPI with phase encoding off; its readouts become
        ``IS_PHASECORR_DATA`` acquisitions for the Nyquist-ghost correction.
    reference_seq : str or Path, optional
        The ``.seq`` of ``reference`` (required with it).

    Returns
    -------
    mrharmony.formats.raw.RawData
        Header (system from the twix; FOV, matrix, TE/TR/TI from the ``.seq``), noise
        scans, and one acquisition per ADC of the ``.seq`` (complex64 samples as
        measured, trajectories in cycles/FOV where the data are not plain Cartesian).

    Raises
    ------
    RawDataError
        Missing, non-twix or truncated file; no such measurement; ADC counts or sample
        counts of the twix and the ``.seq`` differ (message names both, the signatures,
        and a non-Pulseq sequence name).
    SequenceFileError
        The ``.seq`` is missing, not a Pulseq file, or has no ADC events.
    """
    from mrharmony.formats.raw import raw_from_arrays

    path = Path(path)
    parts = _assemble(path, Path(seq), measurement,
                      None if reference is None else Path(reference),
                      None if reference_seq is None else Path(reference_seq))
    return raw_from_arrays(parts.header, parts.heads, parts.data, parts.trajectories,
                           source=str(path), path=path)


def convert_twix(
    meas: str | Path,
    seq: str | Path,
    output: str | Path,
    *,
    measurement: int | None = None,
    force: bool = False,
    reference: str | Path | None = None,
    reference_seq: str | Path | None = None,
) -> Path:
    """Convert a Siemens twix file + its Pulseq ``.seq`` into ISMRMRD HDF5 or MRD v2.

    Parameters
    ----------
    meas : str or Path
        The twix ``.dat``.
    seq : str or Path
        The ``.seq`` the scanner played.
    output : str or Path
        ``.mrd`` → MRD v2; anything else (``.h5``) → ISMRMRD HDF5.
    measurement : int, optional
        Measurement of a multi-measurement file (default: the last image measurement).
    force : bool
        Replace an existing ``output``.
    reference, reference_seq : str or Path, optional
        EPI reference scan (phase encoding off) and its ``.seq``, see
        :func:`read_twix_raw`.

    Returns
    -------
    Path
        The written file (written atomically: never a partial file).

    Raises
    ------
    FileExistsError
        ``output`` exists and ``force`` is false (checked before reading).
    RawDataError, SequenceFileError
        As :func:`read_twix_raw`; nothing is written.
    """
    from mrharmony.formats.header import header_to_xml
    from mrharmony.formats.raw import raw_from_arrays, write_raw

    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force / force=True to replace it)")
    meas = Path(meas)
    mrd2_out = output.suffix.lower() == ".mrd"
    if mrd2_out:
        try:
            from mrharmony.formats.mrd2 import write_mrd2_raw
        except ImportError:
            raise RawDataError(f"{output}: MRD v2 output is not available in this "
                               "installation (write .h5)") from None
    parts = _assemble(meas, Path(seq), measurement,
                      None if reference is None else Path(reference),
                      None if reference_seq is None else Path(reference_seq))
    if mrd2_out:
        raw = raw_from_arrays(parts.header, parts.heads, parts.data, parts.trajectories,
                              source=str(meas), path=meas)
        return Path(write_mrd2_raw(output, raw, force=force))
    raw_from_arrays(parts.header, parts.heads, parts.data, parts.trajectories,
                    source=str(meas))  # the same checks as a reader: refuse before writing
    return write_raw(output, header_to_xml(parts.header), parts.heads, parts.data,
                     parts.trajectories, force=force)
