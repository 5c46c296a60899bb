"""MRD v2 (``mrd-python``, the yardl binary format of Pingvin/Gadgetron 5) raw and image files.

MRD v2 is read into the same in-memory objects as ISMRMRD (MRD v1): an
``ismrmrd.xsd.ismrmrdHeader`` and ``ismrmrd.Acquisition``\\ s in a
:class:`~mrharmony.formats.raw.RawData`, so every reconstruction works unchanged on
either format. The conversions are field by field and exact both ways for everything
both versions hold:

* **header** (:func:`header_to_mrd2`, :func:`header_from_mrd2`): subject, study and
  measurement information, acquisition system, experimental conditions, every encoding
  (spaces, the 18 limits, trajectory and its description, parallel imaging with
  multiband, echo train length), sequence parameters with diffusion, user parameters
  (base64 values as their base64 text in v2), waveform information. MRD v2 stores
  header reals as float32, so a v1 real comes back rounded to float32.
* **acquisitions** (:func:`acquisition_to_mrd2`, :func:`acquisition_from_mrd2`): flags
  (the same bit positions, :mod:`mrharmony.formats.flags`), every counter, time stamps,
  geometry, user values, data ``(channels, samples)``; the trajectory is
  ``(samples, dimensions)`` in v1 and ``(dimensions, samples)`` in v2. The v1
  ``channel_mask`` becomes the v2 ``channel_order`` (the numbers of its set bits) and
  back; v1 ``available_channels`` comes back as ``max(channels, highest channel + 1)``.
* **images** (:func:`image_to_mrd2`, :func:`image_from_mrd2`): header fields, pixels
  ``(channels, z, y, x)`` and meta attributes (numbers typed as int64/float64 in v2,
  text in v1).

The file layout is the one of ``mrd.BinaryMrdWriter``: the yardl magic ``b"yardl"``,
the binary format version, the protocol schema, the optional header, then a stream of
items. Streams use the same encoding: :class:`Mrd2Encoder` produces the bytes of a v2
stream piece by piece (the streaming client and server send them as they are made).
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import RawDataError
from mrharmony.fileio import atomic_path
from mrharmony.formats.header import header_to_xml

__all__ = [
    "MRD2_MAGIC",
    "Mrd2Encoder",
    "acquisition_bytes_from_mrd2",
    "acquisition_from_mrd2",
    "acquisition_header_from_mrd2",
    "acquisition_to_mrd2",
    "convert_mrd",
    "header_from_mrd2",
    "header_to_mrd2",
    "image_from_mrd2",
    "image_to_mrd2",
    "is_mrd2",
    "iter_mrd2",
    "open_mrd2_reader",
    "read_mrd2_header",
    "read_mrd2_images",
    "read_mrd2_raw",
    "waveform_from_mrd2",
    "write_mrd2_acquisitions",
    "write_mrd2_images",
    "write_mrd2_raw",
]

#: First bytes of every yardl binary stream (and so of every MRD v2 file or stream).
MRD2_MAGIC = b"yardl"
_SCHEMA_START = b'{"protocol":{"name":"Mrd",'
_USER_INTS = 8
_USER_FLOATS = 8
_PHYS_STAMPS = 3
_CHANNEL_MASKS = 16


# --------------------------------------------------------------------------- sniffing


def is_mrd2(path: str | Path) -> bool:
    """Whether a file is an MRD v2 binary file (yardl magic, format version 1, the
    ``Mrd`` protocol schema); False for anything else, also an unreadable file.

    Parameters
    ----------
    path : str or Path
        Any file.

    Returns
    -------
    bool
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(5 + 4 + 10 + len(_SCHEMA_START))
    except OSError:
        return False
    if not head.startswith(MRD2_MAGIC) or head[5:9] != b"\x01\x00\x00\x00":
        return False
    pos = 9  # the schema: unsigned varint length, then the JSON text
    while pos < len(head) and head[pos] & 0x80:
        pos += 1
    return head[pos + 1:pos + 1 + len(_SCHEMA_START)] == _SCHEMA_START


# --------------------------------------------------------------------------- header


def _norm(text: str) -> str:
    return text.replace("_", "").lower()


def _enum_v2(cls: Any, value: Any) -> Any:
    """The member of MRD v2 enum ``cls`` named like v1 enum member/text ``value``."""
    text = _norm(str(getattr(value, "value", value)))
    for member in cls:
        if _norm(member.name) == text:
            return member
    raise RawDataError(f"header: {value!r} has no MRD v2 {cls.__name__} counterpart")


def _enum_v1(cls: Any, member: Any) -> Any:
    """The member of v1 (xsdata) enum ``cls`` named like MRD v2 enum ``member``;
    None when v1 has none (MRD v2 ``CalibrationMode.NOACCELERATION``)."""
    text = _norm(member.name)
    for m in cls:
        if _norm(m.value) == text:
            return m
    return None


def _date_v2(value: Any) -> datetime.date:
    return datetime.date(int(value.year), int(value.month), int(value.day))


def _date_v1(value: datetime.date) -> Any:
    from xsdata.models.datatype import XmlDate

    return XmlDate(value.year, value.month, value.day)


def _time_v2(value: Any) -> Any:
    import mrd

    ns = ((int(value.hour) * 60 + int(value.minute)) * 60 + int(value.second)) * 10**9
    return mrd.Time(ns + int(value.fractional_second or 0))


def _time_v1(value: Any) -> Any:
    from xsdata.models.datatype import XmlTime

    ns = int(value.numpy_value.astype(np.int64))
    sec, frac = divmod(ns, 10**9)
    return XmlTime(sec // 3600, sec // 60 % 60, sec % 60, frac)


def _b64_v2(value: bytes) -> str:
    return base64.b64encode(bytes(value)).decode("ascii")


def _b64_v1(value: str) -> bytes:
    return base64.b64decode(value)


def _gender_v2(value: str) -> Any:
    import mrd

    return _enum_v2(mrd.PatientGender, value)


def _gender_v1(value: Any) -> str:
    return value.name


# A record is (v1 class name, v2 class name, fields); a field is (v1 name, v2 name, kind):
# kind None copies the value, "rec:<key>" converts a record, ("list", kind) each item,
# ("enum", v1 enum, v2 enum), or a pair of functions (to v2, to v1).
_DATE = (_date_v2, _date_v1)
_TIME = (_time_v2, _time_v1)
_USER_PARAMS = [
    ("userParameterLong", "user_parameter_long", ("list", "rec:upl")),
    ("userParameterDouble", "user_parameter_double", ("list", "rec:upd")),
    ("userParameterString", "user_parameter_string", ("list", "rec:ups")),
]
_RECORDS: dict[str, tuple[str, str, list[tuple[str, str, Any]]]] = {
    "header": ("ismrmrdHeader", "Header", [
        ("version", "version", None),
        ("subjectInformation", "subject_information", "rec:subject"),
        ("studyInformation", "study_information", "rec:study"),
        ("measurementInformation", "measurement_information", "rec:measurement"),
        ("acquisitionSystemInformation", "acquisition_system_information", "rec:system"),
        ("experimentalConditions", "experimental_conditions", "rec:conditions"),
        ("encoding", "encoding", ("list", "rec:encoding")),
        ("sequenceParameters", "sequence_parameters", "rec:sequence"),
        ("userParameters", "user_parameters", "rec:user"),
        ("waveformInformation", "waveform_information", ("list", "rec:waveform")),
    ]),
    "subject": ("subjectInformationType", "SubjectInformationType", [
        ("patientName", "patient_name", None),
        ("patientWeight_kg", "patient_weight_kg", None),
        ("patientHeight_m", "patient_height_m", None),
        ("patientID", "patient_id", None),
        ("patientBirthdate", "patient_birthdate", _DATE),
        ("patientGender", "patient_gender", (_gender_v2, _gender_v1)),
    ]),
    "study": ("studyInformationType", "StudyInformationType", [
        ("studyDate", "study_date", _DATE),
        ("studyTime", "study_time", _TIME),
        ("studyID", "study_id", None),
        ("accessionNumber", "accession_number", None),
        ("referringPhysicianName", "referring_physician_name", None),
        ("studyDescription", "study_description", None),
        ("studyInstanceUID", "study_instance_uid", None),
        ("bodyPartExamined", "body_part_examined", None),
    ]),
    "measurement": ("measurementInformationType", "MeasurementInformationType", [
        ("measurementID", "measurement_id", None),
        ("seriesDate", "series_date", _DATE),
        ("seriesTime", "series_time", _TIME),
        ("patientPosition", "patient_position",
         ("enum", "patientPositionType", "PatientPosition")),
        ("relativeTablePosition", "relative_table_position", "rec:xyz"),
        ("initialSeriesNumber", "initial_series_number", None),
        ("protocolName", "protocol_name", None),
        ("sequenceName", "sequence_name", None),
        ("seriesDescription", "series_description", None),
        ("measurementDependency", "measurement_dependency", ("list", "rec:dependency")),
        ("seriesInstanceUIDRoot", "series_instance_uid_root", None),
        ("frameOfReferenceUID", "frame_of_reference_uid", None),
        ("referencedImageSequence", "referenced_image_sequence", "rec:refimages"),
    ]),
    "xyz": ("threeDimensionalFloat", "ThreeDimensionalFloat",
            [("x", "x", None), ("y", "y", None), ("z", "z", None)]),
    "dependency": ("measurementDependencyType", "MeasurementDependencyType", [
        ("dependencyType", "dependency_type", None),
        ("measurementID", "measurement_id", None),
    ]),
    "refimages": ("referencedImageSequenceType", "ReferencedImageSequenceType", [
        ("referencedSOPInstanceUID", "referenced_sop_instance_uid", ("list", None)),
    ]),
    "system": ("acquisitionSystemInformationType", "AcquisitionSystemInformationType", [
        ("systemVendor", "system_vendor", None),
        ("systemModel", "system_model", None),
        ("systemFieldStrength_T", "system_field_strength_t", None),
        ("relativeReceiverNoiseBandwidth", "relative_receiver_noise_bandwidth", None),
        ("receiverChannels", "receiver_channels", None),
        ("coilLabel", "coil_label", ("list", "rec:coil")),
        ("institutionName", "institution_name", None),
        ("stationName", "station_name", None),
        ("deviceID", "device_id", None),
        ("deviceSerialNumber", "device_serial_number", None),
    ]),
    "coil": ("coilLabelType", "CoilLabelType",
             [("coilNumber", "coil_number", None), ("coilName", "coil_name", None)]),
    "conditions": ("experimentalConditionsType", "ExperimentalConditionsType",
                   [("H1resonanceFrequency_Hz", "h1resonance_frequency_hz", None)]),
    "encoding": ("encodingType", "EncodingType", [
        ("encodedSpace", "encoded_space", "rec:space"),
        ("reconSpace", "recon_space", "rec:space"),
        ("encodingLimits", "encoding_limits", "rec:limits"),
        ("trajectory", "trajectory", ("enum", "trajectoryType", "Trajectory")),
        ("trajectoryDescription", "trajectory_description", "rec:trajdesc"),
        ("parallelImaging", "parallel_imaging", "rec:parallel"),
        ("echoTrainLength", "echo_train_length", None),
    ]),
    "space": ("encodingSpaceType", "EncodingSpaceType", [
        ("matrixSize", "matrix_size", "rec:matrix"),
        ("fieldOfView_mm", "field_of_view_mm", "rec:fov"),
    ]),
    "matrix": ("matrixSizeType", "MatrixSizeType",
               [("x", "x", None), ("y", "y", None), ("z", "z", None)]),
    "fov": ("fieldOfViewMm", "FieldOfViewMm",
            [("x", "x", None), ("y", "y", None), ("z", "z", None)]),
    "limits": ("encodingLimitsType", "EncodingLimitsType", [
        (name, name, "rec:limit") for name in (
            "kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2",
            "average", "slice", "contrast", "phase", "repetition", "set", "segment",
            *(f"user_{i}" for i in range(8)))
    ]),
    "limit": ("limitType", "LimitType", [
        ("minimum", "minimum", None), ("maximum", "maximum", None), ("center", "center", None),
    ]),
    "trajdesc": ("trajectoryDescriptionType", "TrajectoryDescriptionType", [
        ("identifier", "identifier", None), *_USER_PARAMS, ("comment", "comment", None),
    ]),
    "upl": ("userParameterLongType", "UserParameterLongType",
            [("name", "name", None), ("value", "value", None)]),
    "upd": ("userParameterDoubleType", "UserParameterDoubleType",
            [("name", "name", None), ("value", "value", None)]),
    "ups": ("userParameterStringType", "UserParameterStringType",
            [("name", "name", None), ("value", "value", None)]),
    "upb": ("userParameterBase64Type", "UserParameterBase64Type",
            [("name", "name", None), ("value", "value", (_b64_v2, _b64_v1))]),
    "parallel": ("parallelImagingType", "ParallelImagingType", [
        ("accelerationFactor", "acceleration_factor", "rec:accel"),
        ("calibrationMode", "calibration_mode",
         ("enum", "calibrationModeType", "CalibrationMode")),
        ("interleavingDimension", "interleaving_dimension",
         ("enum", "interleavingDimensionType", "InterleavingDimension")),
        ("multiband", "multiband", "rec:multiband"),
    ]),
    "accel": ("accelerationFactorType", "AccelerationFactorType", [
        ("kspace_encoding_step_1", "kspace_encoding_step_1", None),
        ("kspace_encoding_step_2", "kspace_encoding_step_2", None),
    ]),
    "multiband": ("multibandType", "MultibandType", [
        ("spacing", "spacing", ("list", "rec:mbspacing")),
        ("deltaKz", "delta_kz", None),
        ("multiband_factor", "multiband_factor", None),
        ("calibration", "calibration", ("enum", "multibandCalibrationType", "Calibration")),
        ("calibration_encoding", "calibration_encoding", None),
    ]),
    "mbspacing": ("multibandSpacingType", "MultibandSpacingType",
                  [("dZ", "d_z", ("list", None))]),
    "sequence": ("sequenceParametersType", "SequenceParametersType", [
        ("TR", "t_r", ("list", None)),
        ("TE", "t_e", ("list", None)),
        ("TI", "t_i", ("list", None)),
        ("flipAngle_deg", "flip_angle_deg", ("list", None)),
        ("sequence_type", "sequence_type", None),
        ("echo_spacing", "echo_spacing", ("list", None)),
        ("diffusionDimension", "diffusion_dimension",
         ("enum", "diffusionDimensionType", "DiffusionDimension")),
        ("diffusion", "diffusion", ("list", "rec:diffusion")),
        ("diffusionScheme", "diffusion_scheme", None),
    ]),
    "diffusion": ("diffusionType", "DiffusionType", [
        ("gradientDirection", "gradient_direction", "rec:graddir"),
        ("bvalue", "bvalue", None),
    ]),
    "graddir": ("gradientDirectionType", "GradientDirectionType",
                [("rl", "rl", None), ("ap", "ap", None), ("fh", "fh", None)]),
    "user": ("userParametersType", "UserParametersType", [
        *_USER_PARAMS, ("userParameterBase64", "user_parameter_base64", ("list", "rec:upb")),
    ]),
    "waveform": ("waveformInformationType", "WaveformInformationType", [
        ("waveformName", "waveform_name", None),
        ("waveformType", "waveform_type",
         ("enum", "waveformInformationTypeWaveformType", "WaveformType")),
        ("userParameters", "user_parameters", "rec:user"),
    ]),
}  # fmt: skip


def _convert(value: Any, kind: Any, to_v2: bool) -> Any:
    import ismrmrd.xsd
    import mrd

    if value is None:
        return None
    if kind is None:
        return value
    if isinstance(kind, str):  # "rec:<key>"
        v1_name, v2_name, fields = _RECORDS[kind[4:]]
        cls = getattr(mrd, v2_name) if to_v2 else getattr(ismrmrd.xsd, v1_name)
        kwargs = {}
        for f1, f2, sub in fields:
            src, dst = (f1, f2) if to_v2 else (f2, f1)
            converted = _convert(getattr(value, src), sub, to_v2)
            if converted is not None:
                kwargs[dst] = converted
        return cls(**kwargs)
    if kind[0] == "list":
        return [_convert(v, kind[1], to_v2) for v in value]
    if kind[0] == "enum":
        return (_enum_v2(getattr(mrd, kind[2]), value) if to_v2
                else _enum_v1(getattr(ismrmrd.xsd, kind[1]), value))
    return kind[0](value) if to_v2 else kind[1](value)


def header_to_mrd2(header: Any) -> Any:
    """Convert an ISMRMRD (v1) header into an MRD v2 header, field by field.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader or str
        Header object or its XML.

    Returns
    -------
    mrd.Header

    Raises
    ------
    RawDataError
        If the XML does not parse or an enumeration value has no MRD v2 counterpart.
    """
    if isinstance(header, str | bytes):
        from mrharmony.formats.header import parse_ismrmrd_header

        header = parse_ismrmrd_header(header, source="header")
    return _convert(header, "rec:header", True)


def header_from_mrd2(header: Any) -> Any:
    """Convert an MRD v2 header into an ISMRMRD (v1) header, field by field.

    Parameters
    ----------
    header : mrd.Header

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader
        MRD v2 ``CalibrationMode.NOACCELERATION`` (absent from v1) becomes no
        ``calibrationMode``.
    """
    return _convert(header, "rec:header", False)


# --------------------------------------------------------------------------- acquisitions

_IDX = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast",
        "phase", "repetition", "set", "segment")
_OPTIONAL = ("scan_counter", "acquisition_time_stamp", "discard_pre", "discard_post",
             "center_sample", "encoding_space_ref", "sample_time_us")
_VECTORS = ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position")


def _channel_numbers(mask: Any) -> list[int]:
    out = []
    for word_index, word in enumerate(mask):
        word = int(word)
        bit = 0
        while word:
            if word & 1:
                out.append(64 * word_index + bit)
            word >>= 1
            bit += 1
    return out


def acquisition_to_mrd2(acq: Any) -> Any:
    """Convert an ``ismrmrd.Acquisition`` into an ``mrd.Acquisition``.

    Parameters
    ----------
    acq : ismrmrd.Acquisition

    Returns
    -------
    mrd.Acquisition
        Data ``(channels, samples)`` complex64, trajectory ``(dimensions, samples)``
        float32; ``channel_order`` holds the channel numbers set in ``channel_mask``.
    """
    import mrd

    h = acq.getHead()
    idx = h.idx
    head = mrd.AcquisitionHeader(
        flags=mrd.AcquisitionFlags(int(h.flags)),
        idx=mrd.EncodingCounters(**{k: int(getattr(idx, k)) for k in _IDX},
                                 user=[int(v) for v in idx.user]),
        measurement_uid=int(h.measurement_uid),
        physiology_time_stamp=[int(v) for v in h.physiology_time_stamp],
        channel_order=_channel_numbers(h.channel_mask),
        user_int=[int(v) for v in h.user_int],
        user_float=[float(v) for v in h.user_float],
        **{k: (float(getattr(h, k)) if k == "sample_time_us" else int(getattr(h, k)))
           for k in _OPTIONAL},
        **{k: np.array(getattr(h, k), dtype=np.float32) for k in _VECTORS},
    )
    data = np.ascontiguousarray(acq.data, dtype=np.complex64)
    traj = np.ascontiguousarray(np.asarray(acq.traj, dtype=np.float32).reshape(
        data.shape[1], int(h.trajectory_dimensions)).T)
    return mrd.Acquisition(head=head, data=data, trajectory=traj)


def _fixed(values: list[Any], n: int, what: str, where: str) -> list[Any]:
    if len(values) > n:
        raise RawDataError(f"{where}: {len(values)} {what}, ISMRMRD (v1) holds at most {n}")
    return list(values) + [0] * (n - len(values))


def acquisition_header_from_mrd2(head: Any, n_channels: int, n_samples: int,
                                 n_traj: int, *, where: str = "acquisition") -> Any:
    """The ``ismrmrd.AcquisitionHeader`` of an MRD v2 acquisition header.

    Parameters
    ----------
    head : mrd.AcquisitionHeader
    n_channels, n_samples, n_traj : int
        Data channels, samples per channel and trajectory dimensions.
    where : str
        Name used in error messages.

    Returns
    -------
    ismrmrd.AcquisitionHeader

    Raises
    ------
    RawDataError
        If a value does not fit its v1 field (a counter over 65535, more than 8 user
        values or 3 physiology time stamps, a channel number over 1023).
    """
    import ismrmrd

    out = ismrmrd.AcquisitionHeader()
    out.version = 1
    out.flags = int(head.flags)
    out.measurement_uid = int(head.measurement_uid)
    for k in _OPTIONAL:
        value = getattr(head, k)
        setattr(out, k, 0 if value is None else value)
    for k in ("center_sample", "discard_pre", "discard_post", "encoding_space_ref"):
        if getattr(head, k) is not None and int(getattr(head, k)) > 65535:
            raise RawDataError(f"{where}: {k} = {getattr(head, k)} does not fit ISMRMRD "
                               "(v1) uint16")
    out.physiology_time_stamp[:] = _fixed(head.physiology_time_stamp, _PHYS_STAMPS,
                                          "physiology time stamps", where)
    for k in _IDX:
        value = getattr(head.idx, k)
        value = 0 if value is None else int(value)
        if value > 65535:
            raise RawDataError(f"{where}: counter {k} = {value} does not fit ISMRMRD (v1) "
                               "uint16")
        setattr(out.idx, k, value)
    user = _fixed(head.idx.user, _USER_INTS, "user counters", where)
    if any(int(v) > 65535 for v in user):
        raise RawDataError(f"{where}: a user counter does not fit ISMRMRD (v1) uint16")
    out.idx.user[:] = user
    out.user_int[:] = _fixed(head.user_int, _USER_INTS, "user ints", where)
    out.user_float[:] = _fixed(head.user_float, _USER_FLOATS, "user floats", where)
    for k in _VECTORS:
        getattr(out, k)[:] = [float(v) for v in np.asarray(getattr(head, k)).reshape(3)]
    mask = [0] * _CHANNEL_MASKS
    for c in head.channel_order:
        c = int(c)
        if c >= 64 * _CHANNEL_MASKS:
            raise RawDataError(f"{where}: channel number {c} does not fit the ISMRMRD (v1) "
                               "channel mask (0..1023)")
        mask[c // 64] |= 1 << (c % 64)
    out.channel_mask[:] = mask
    if n_channels > 65535 or n_samples > 65535 or n_traj > 65535:
        raise RawDataError(f"{where}: {n_channels} channels x {n_samples} samples "
                           f"({n_traj} trajectory dimensions) do not fit ISMRMRD (v1) uint16")
    top = max((int(c) + 1 for c in head.channel_order), default=0)
    out.available_channels = max(n_channels, top)
    out.active_channels = n_channels
    out.number_of_samples = n_samples
    out.trajectory_dimensions = n_traj
    return out


def _acq_arrays(acq: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(acq.data)
    traj = np.asarray(acq.trajectory)
    if data.ndim != 2 or traj.ndim != 2:
        raise RawDataError(f"{where}: data or trajectory is not 2-D")
    if traj.size and traj.shape[1] != data.shape[1]:
        raise RawDataError(f"{where}: {traj.shape[1]} trajectory samples for "
                           f"{data.shape[1]} data samples")
    data = np.ascontiguousarray(data, dtype=np.complex64)
    n_traj = traj.shape[0] if traj.size else 0
    traj_v1 = np.ascontiguousarray(traj.T if traj.size else
                                   np.zeros((data.shape[1], 0)), dtype=np.float32)
    return data, traj_v1.reshape(data.shape[1], n_traj)


def acquisition_from_mrd2(acq: Any, *, where: str = "acquisition") -> Any:
    """Convert an ``mrd.Acquisition`` into an ``ismrmrd.Acquisition``.

    Parameters
    ----------
    acq : mrd.Acquisition
    where : str
        Name used in error messages.

    Returns
    -------
    ismrmrd.Acquisition

    Raises
    ------
    RawDataError
        See :func:`acquisition_header_from_mrd2`; also arrays of the wrong shape.
    """
    import ismrmrd

    data, traj = _acq_arrays(acq, where)
    head = acquisition_header_from_mrd2(acq.head, data.shape[0], data.shape[1],
                                        traj.shape[1], where=where)
    return ismrmrd.Acquisition(head, data=data.copy(), trajectory=traj.copy())


def acquisition_bytes_from_mrd2(acq: Any, *, where: str = "acquisition") -> tuple[Any, bytes]:
    """An MRD v2 acquisition as the v1 wire payload of an ACQUISITION message.

    Returns
    -------
    (ismrmrd.AcquisitionHeader, bytes)
        The header and the message bytes after the id (header, trajectory, data), as
        :meth:`ismrmrd.Acquisition.to_bytes` gives them.
    """
    data, traj = _acq_arrays(acq, where)
    head = acquisition_header_from_mrd2(acq.head, data.shape[0], data.shape[1],
                                        traj.shape[1], where=where)
    return head, bytes(head) + traj.tobytes() + data.tobytes()


def waveform_from_mrd2(wav: Any) -> Any:
    """Convert an MRD v2 waveform (``mrd.Waveform`` or ``mrd.StreamItem.WaveformUint32``)
    into an ``ismrmrd.Waveform`` (same header fields, data ``(channels, samples)`` uint32).

    Raises
    ------
    RawDataError
        If a size or id does not fit ISMRMRD (v1) uint16.
    """
    import ismrmrd

    wav = getattr(wav, "value", wav)
    data = np.atleast_2d(np.ascontiguousarray(wav.data, dtype=np.uint32))
    if max((*data.shape, int(wav.waveform_id))) > 65535:
        raise RawDataError(f"waveform: {data.shape} samples / id {wav.waveform_id} do not "
                           "fit ISMRMRD (v1) uint16")
    head = ismrmrd.WaveformHeader()
    head.version = 1
    head.flags = int(wav.flags)
    head.measurement_uid = int(wav.measurement_uid)
    head.scan_counter = int(wav.scan_counter)
    head.time_stamp = int(wav.time_stamp)
    head.sample_time_us = float(wav.sample_time_us)
    head.waveform_id = int(wav.waveform_id)
    head.channels, head.number_of_samples = data.shape
    return ismrmrd.Waveform(head, data)


# --------------------------------------------------------------------------- images

_IMAGE_ITEMS = {
    np.dtype(np.uint16): "ImageUint16", np.dtype(np.int16): "ImageInt16",
    np.dtype(np.uint32): "ImageUint32", np.dtype(np.int32): "ImageInt32",
    np.dtype(np.float32): "ImageFloat", np.dtype(np.float64): "ImageDouble",
    np.dtype(np.complex64): "ImageComplexFloat", np.dtype(np.complex128): "ImageComplexDouble",
}
_IMAGE_ITEM_NAMES = frozenset(f"StreamItem.{name}" for name in _IMAGE_ITEMS.values())
_INT_TEXT = re.compile(r"[+-]?\d+\Z")


def _meta_value_v2(text: Any) -> Any:
    import mrd

    if not isinstance(text, str):
        text = str(text)
    if _INT_TEXT.match(text.strip()) and -(2**63) <= int(text) < 2**63:
        return mrd.ImageMetaValue.Int64(int(text))
    try:
        number = float(text)
    except ValueError:
        return mrd.ImageMetaValue.String(text)
    if text.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return mrd.ImageMetaValue.String(text)
    return mrd.ImageMetaValue.Float64(number)


def image_to_mrd2(img: Any) -> Any:
    """Convert an ``ismrmrd.Image`` into an MRD v2 stream item (``mrd.StreamItem.Image*``).

    Parameters
    ----------
    img : ismrmrd.Image

    Returns
    -------
    mrd.StreamItem
        ``ImageFloat``, ``ImageComplexFloat``, ... after the pixel type; meta values
        that read as integers or reals become ``Int64``/``Float64``, the rest ``String``.

    Raises
    ------
    RawDataError
        If the pixel type has no MRD v2 image type.
    """
    import mrd

    h = img.getHead()
    data = np.ascontiguousarray(img.data)
    name = _IMAGE_ITEMS.get(data.dtype)
    if name is None:
        raise RawDataError(f"image: pixel type {data.dtype} has no MRD v2 image type")
    head = mrd.ImageHeader(
        image_type=mrd.ImageType(int(h.image_type) or mrd.ImageType.MAGNITUDE.value),
        flags=mrd.ImageFlags(int(h.flags)),
        measurement_uid=int(h.measurement_uid),
        field_of_view=np.array(h.field_of_view, dtype=np.float32),
        position=np.array(h.position, dtype=np.float32),
        col_dir=np.array(h.read_dir, dtype=np.float32),
        line_dir=np.array(h.phase_dir, dtype=np.float32),
        slice_dir=np.array(h.slice_dir, dtype=np.float32),
        patient_table_position=np.array(h.patient_table_position, dtype=np.float32),
        average=int(h.average), slice=int(h.slice), contrast=int(h.contrast),
        phase=int(h.phase), repetition=int(h.repetition), set=int(h.set),
        acquisition_time_stamp=int(h.acquisition_time_stamp),
        physiology_time_stamp=[int(v) for v in h.physiology_time_stamp],
        image_index=int(h.image_index), image_series_index=int(h.image_series_index),
        user_int=[int(v) for v in h.user_int], user_float=[float(v) for v in h.user_float],
    )
    meta = {}
    for key, value in dict(img.meta).items():
        values = value if isinstance(value, list) else [value]
        meta[str(key)] = [_meta_value_v2(v) for v in values]
    item_cls = getattr(mrd.StreamItem, name)
    return item_cls(mrd.Image(head=head, data=data, meta=meta))


def image_from_mrd2(image: Any, *, where: str = "image") -> Any:
    """Convert an MRD v2 image (``mrd.Image`` or an ``mrd.StreamItem.Image*``) into an
    ``ismrmrd.Image``.

    Parameters
    ----------
    image : mrd.Image or mrd.StreamItem
    where : str
        Name used in error messages.

    Returns
    -------
    ismrmrd.Image
        Meta values as text (``ismrmrd.Meta``).

    Raises
    ------
    RawDataError
        If a value does not fit its v1 field.
    """
    import ismrmrd

    image = getattr(image, "value", image)
    h = image.head
    data = np.ascontiguousarray(image.data)
    if data.ndim != 4:
        raise RawDataError(f"{where}: pixel array is {data.ndim}-D, expected "
                           "(channels, z, y, x)")
    img = ismrmrd.Image.from_array(data, transpose=False)
    img.flags = int(h.flags)
    img.measurement_uid = int(h.measurement_uid)
    img.field_of_view = tuple(float(v) for v in h.field_of_view)
    img.position = tuple(float(v) for v in h.position)
    img.read_dir = tuple(float(v) for v in h.col_dir)
    img.phase_dir = tuple(float(v) for v in h.line_dir)
    img.slice_dir = tuple(float(v) for v in h.slice_dir)
    img.patient_table_position = tuple(float(v) for v in h.patient_table_position)
    for k in ("average", "slice", "contrast", "phase", "repetition", "set", "image_index",
              "image_series_index"):
        value = getattr(h, k)
        value = 0 if value is None else int(value)
        if value > 65535:
            raise RawDataError(f"{where}: {k} = {value} does not fit ISMRMRD (v1) uint16")
        setattr(img, k, value)
    img.acquisition_time_stamp = int(h.acquisition_time_stamp or 0)
    img.physiology_time_stamp = tuple(_fixed(h.physiology_time_stamp, _PHYS_STAMPS,
                                             "physiology time stamps", where))
    img.image_type = int(h.image_type.value)
    img.user_int = tuple(_fixed(h.user_int, _USER_INTS, "user ints", where))
    img.user_float = tuple(_fixed(h.user_float, _USER_FLOATS, "user floats", where))
    meta = ismrmrd.Meta()
    for key, values in image.meta.items():
        texts = [repr(v.value) if isinstance(v.value, float) else str(v.value)
                 for v in values]
        meta[key] = texts[0] if len(texts) == 1 else texts
    img.meta = meta
    return img


# --------------------------------------------------------------------------- reading


def _limited_input(max_field_bytes: int) -> type:
    """The ``CodedInputStream`` of :func:`open_mrd2_reader`.

    It differs from mrd-python's in two ways. It refuses any single field (string,
    array) over ``max_field_bytes`` before allocating it, so a hostile length cannot make
    the reader allocate gigabytes. And it reads until it has the bytes it needs rather
    than taking one short read for the end of the data, so it also decodes a network
    stream whose bytes arrive in pieces (the source's ``readinto`` may return fewer bytes
    than asked, and 0 only at the end).
    """
    from mrd import _binary

    class LimitedInput(_binary.CodedInputStream):
        limit = int(max_field_bytes)

        def _read_fully(self, view: memoryview) -> int:
            got = 0
            while got < len(view):
                n = self._stream.readinto(view[got:])
                if not n:
                    break
                got += n
            return got

        def _fill_buffer(self, min_count: int = 0) -> None:
            remaining = self._last_read_count - self._offset
            if remaining > 0:
                self._buffer[:remaining] = bytes(
                    self._view[self._offset:self._last_read_count])
            total = remaining
            while True:
                n = self._stream.readinto(self._view[total:])
                total += n or 0
                if not n or total >= max(min_count, 1):
                    break
            self._last_read_count = total
            self._offset = 0
            self._at_end = total == 0
            if min_count > 0 and total < min_count:
                raise EOFError("Unexpected EOF")

        def _read_large(self, count: int) -> bytearray:
            if count > self.limit:
                raise _FieldTooLarge(count, self.limit)
            local = bytearray(count)
            view = memoryview(local)
            remaining = self._last_read_count - self._offset
            view[:remaining] = self._view[self._offset:self._last_read_count]
            self._offset = self._last_read_count
            if self._read_fully(view[remaining:]) < count - remaining:
                raise EOFError("Unexpected EOF")
            return local

        def read_view(self, count: int) -> memoryview:
            if count > len(self._buffer):
                return memoryview(self._read_large(count))
            return super().read_view(count)

        def read_bytearray(self, count: int) -> bytearray:
            if count > len(self._buffer):
                return self._read_large(count)
            return super().read_bytearray(count)

    return LimitedInput


class _FieldTooLarge(Exception):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"a field of {count} bytes is over the limit of {limit}")


def open_mrd2_reader(stream: Any, *, max_field_bytes: int) -> Any:
    """An ``mrd.BinaryMrdReader`` on a binary file object, with size-checked fields.

    Parameters
    ----------
    stream : io.BufferedIOBase
        Positioned at the yardl magic. ``readinto`` may return fewer bytes than asked
        (a socket); it returns 0 only at the end of the data.
    max_field_bytes : int
        Largest single field (string, array) accepted (bytes).

    Returns
    -------
    mrd.BinaryMrdReader
        Positioned at the header (``read_header()``, then ``read_data()``).

    Raises
    ------
    RuntimeError
        Bad magic, binary format version or protocol schema (not MRD v2 as
        ``mrd-python`` writes it).
    EOFError
        The stream ends first.
    """
    import mrd
    from mrd import _binary

    # BinaryMrdReader.__init__, with the coded input stream above (mrd-python internals,
    # pinned): magic, binary format version, then the protocol schema
    reader = mrd.BinaryMrdReader.__new__(mrd.BinaryMrdReader)
    mrd.MrdReaderBase.__init__(reader)
    reader._stream = _limited_input(max_field_bytes)(stream)
    if bytes(reader._stream.read_view(len(MRD2_MAGIC))) != MRD2_MAGIC:
        raise RuntimeError("Invalid magic bytes")
    if _binary.read_fixed_int32(reader._stream) != _binary.CURRENT_BINARY_FORMAT_VERSION:
        raise RuntimeError("Invalid binary format version")
    schema = _binary.string_serializer.read(reader._stream)
    if schema != mrd.MrdReaderBase.schema:
        raise RuntimeError("Invalid schema (another MRD v2 version; mrharmony reads the "
                           "schema of mrd-python 2.1)")
    reader._schema = schema
    return reader


def _mrd2_error(path: Path, exc: BaseException) -> RawDataError:
    if isinstance(exc, EOFError):
        return RawDataError(f"{path}: truncated MRD v2 file (it ends inside a record)")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RawDataError(f"{path}: not a readable MRD v2 file ({text})")


_DECODE_ERRORS = (EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
                  OverflowError, UnicodeDecodeError, MemoryError, _FieldTooLarge)


def _open_at_header(path: Path) -> tuple[Any, Any, Any]:
    """Open an MRD v2 file and read its header: (open file, reader, header or None).

    The caller closes the file; on any error it is closed here and the error raised
    (:class:`RawDataError` for a missing, foreign or undecodable file)."""
    if not path.is_file():
        raise RawDataError(f"{path}: no such file")
    if not is_mrd2(path):
        raise RawDataError(f"{path}: not an MRD v2 file (no yardl magic and Mrd schema)")
    fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        reader = open_mrd2_reader(fh, max_field_bytes=max(path.stat().st_size, 1 << 16))
        return fh, reader, reader.read_header()
    except _DECODE_ERRORS as exc:
        fh.close()
        raise _mrd2_error(path, exc) from None
    except BaseException:
        fh.close()
        raise


def iter_mrd2(path: str | Path) -> tuple[Any, Iterator[Any]]:
    """Open an MRD v2 file: its header and an iterator over its stream items.

    Parameters
    ----------
    path : str or Path
        An MRD v2 binary file.

    Returns
    -------
    (mrd.Header or None, iterator of mrd.StreamItem)
        The iterator closes the file when exhausted and raises :class:`RawDataError`
        on a truncated or corrupt file.

    Raises
    ------
    RawDataError
        If the file is missing, not MRD v2, or its header does not decode.
    """
    path = Path(path)
    fh, reader, header = _open_at_header(path)

    def items() -> Iterator[Any]:
        try:
            yield from reader.read_data()
        except _DECODE_ERRORS as exc:
            raise _mrd2_error(path, exc) from None
        finally:
            fh.close()

    return header, items()


def read_mrd2_header(path: str | Path) -> Any:
    """Read only the header of an MRD v2 file, as an ISMRMRD (v1) header.

    Parameters
    ----------
    path : str or Path
        An MRD v2 binary file.

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader
        Checked by the same strict parser as every ISMRMRD header.

    Raises
    ------
    RawDataError
        Missing file, not MRD v2, no header, or a header that does not decode.
    """
    from mrharmony.formats.header import parse_ismrmrd_header

    path = Path(path)
    fh, _, header = _open_at_header(path)
    fh.close()
    if header is None:
        raise RawDataError(f"{path}: the MRD v2 file has no header")
    return parse_ismrmrd_header(header_to_xml(header_from_mrd2(header)),
                                source=f"{path}: header")


def read_mrd2_raw(path: str | Path) -> Any:
    """Read an MRD v2 raw file into :class:`~mrharmony.formats.raw.RawData`.

    Header and acquisitions are converted to their ISMRMRD (v1) objects, so the data
    reconstruct exactly like the same data read from an ISMRMRD HDF5 file.

    Parameters
    ----------
    path : str or Path
        An MRD v2 binary file (``.mrd``).

    Returns
    -------
    RawData
        Noise scans in ``noise``; waveforms and images in the file are skipped.

    Raises
    ------
    RawDataError
        Missing, truncated or corrupt file; no header; no imaging acquisitions; a value
        that does not fit ISMRMRD (v1); counters outside the encoded matrix.
    """
    import mrd

    from mrharmony.formats.header import parse_ismrmrd_header
    from mrharmony.formats.raw import raw_from_acquisitions

    path = Path(path)
    header, items = iter_mrd2(path)
    acqs = []
    try:
        for i, item in enumerate(items):
            if isinstance(item, mrd.StreamItem.Acquisition):
                acqs.append(acquisition_from_mrd2(item.value, where=f"{path}: item {i}"))
    finally:
        items.close()
    if header is None:
        raise RawDataError(f"{path}: the MRD v2 file has no header (recon needs one)")
    if not acqs:
        raise RawDataError(f"{path}: the MRD v2 file holds no acquisitions")
    v1 = header_from_mrd2(header)
    # through the one strict parser: the same checks as an ISMRMRD file's header
    v1 = parse_ismrmrd_header(header_to_xml(v1), source=f"{path}: header")
    return raw_from_acquisitions(v1, acqs, source=str(path), path=path)


def read_mrd2_images(path: str | Path) -> tuple[Any, list[Any]]:
    """Read the images of an MRD v2 file.

    Parameters
    ----------
    path : str or Path
        An MRD v2 binary file.

    Returns
    -------
    (ismrmrd.xsd.ismrmrdHeader or None, list of ismrmrd.Image)
        :func:`mrharmony.recon.stream.client.image_to_recon` turns each image into a
        ``ReconImage``.

    Raises
    ------
    RawDataError
        Missing, truncated or corrupt file, or a file without images.
    """

    path = Path(path)
    header, items = iter_mrd2(path)
    images = []
    try:
        for i, item in enumerate(items):
            if type(item).__name__ in _IMAGE_ITEM_NAMES:
                images.append(image_from_mrd2(item, where=f"{path}: item {i}"))
    finally:
        items.close()
    if not images:
        raise RawDataError(f"{path}: the MRD v2 file holds no images")
    return (None if header is None else header_from_mrd2(header)), images


# --------------------------------------------------------------------------- writing


class _Sink:
    """A write-only binary file object collecting bytes in memory."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class Mrd2Encoder:
    """Encode an MRD v2 stream piece by piece (``mrd.BinaryMrdWriter`` into memory).

    ``begin(header)`` gives the magic, format version, schema and header; ``items([...])``
    the bytes of stream items; ``end()`` the end-of-stream marker. Joined, they are an
    MRD v2 file that ``mrd.BinaryMrdReader`` reads.
    """

    def __init__(self) -> None:
        import mrd

        self._sink = _Sink()
        self._writer = mrd.BinaryMrdWriter(self._sink)

    def _take(self) -> bytes:
        self._writer._stream.flush()
        return self._sink.take()

    def begin(self, header: Any | None) -> bytes:
        """The stream start: magic, version, schema and ``header`` (``mrd.Header`` or None)."""
        self._writer.write_header(header)
        return self._take()

    def items(self, items: Iterable[Any]) -> bytes:
        """The bytes of ``items`` (``mrd.StreamItem``\\ s)."""
        items = list(items)
        if items:
            self._writer.write_data(items)
        return self._take()

    def end(self) -> bytes:
        """The end of the item stream (after which the stream is complete)."""
        if self._writer._state == 2:
            self._writer.write_data([])
        self._writer.close()
        return self._sink.take()


def _check_target(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)


def _write_stream(path: Path, header: Any, items: Iterable[Any]) -> None:
    import mrd

    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as fh:
        writer = mrd.BinaryMrdWriter(fh)
        writer.write_header(header)
        writer.write_data(items)
        writer.close()


def write_mrd2_raw(path: str | Path, raw: Any, *, force: bool = False) -> Path:
    """Write raw data as an MRD v2 file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file (``.mrd``).
    raw : RawData
        Header and acquisitions (noise scans are written first, as a scanner sends them).
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
        If a header enumeration has no MRD v2 counterpart.
    """
    return write_mrd2_acquisitions(path, raw.header, list(raw.noise) + list(raw.acquisitions),
                                   force=force)


def write_mrd2_acquisitions(path: str | Path, header: Any, acquisitions: list[Any], *,
                            force: bool = False) -> Path:
    """Write a header and acquisitions, in the given order, as an MRD v2 file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file (``.mrd``).
    header : ismrmrd.xsd.ismrmrdHeader or str
        ISMRMRD header (object or XML).
    acquisitions : list of ismrmrd.Acquisition
        Noise scans included.
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
        If the header does not parse or an enumeration has no MRD v2 counterpart.
    """
    import mrd

    path = Path(path)
    _check_target(path, force)
    mrd_header = header_to_mrd2(header)
    _write_stream(path, mrd_header, (mrd.StreamItem.Acquisition(acquisition_to_mrd2(a))
                                     for a in acquisitions))
    return path


def write_mrd2_images(path: str | Path, images: list[Any], header: Any = None,
                      force: bool = False) -> Path:
    """Write reconstructed images as an MRD v2 image file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file (``.mrd``).
    images : list of ReconImage or ismrmrd.Image
        ``ReconImage``\\ s are converted with their ``to_ismrmrd_image`` (array
        ``(channels, z, y, x)``, geometry in LPS mm, meta attributes), numbered from 1.
    header : ismrmrd.xsd.ismrmrdHeader or mrd.Header, optional
        Header written before the images (the raw data's, typically).
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
        If there are no images or a pixel type has no MRD v2 image type.
    """
    import mrd

    path = Path(path)
    if not images:
        raise RawDataError(f"{path}: no images to write")
    _check_target(path, force)
    if header is not None and not isinstance(header, mrd.Header):
        header = header_to_mrd2(header)
    items = []
    for i, im in enumerate(images):
        if hasattr(im, "to_ismrmrd_image"):
            meta = dict(im.meta)
            complex_data = np.iscomplexobj(im.data)
            im = im.to_ismrmrd_image(image_index=i + 1)
            im.image_type = 5 if complex_data else 1  # ISMRMRD IMTYPE_COMPLEX / _MAGNITUDE
            if "recon" in meta:  # the recon settings, as the streaming server sends them
                import json

                im.meta["mrharmony_recon"] = json.dumps(meta["recon"], default=str)
        items.append(image_to_mrd2(im))
    _write_stream(path, header, items)
    return path


def _heads_and_arrays(acqs: list[Any]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    from ismrmrd.hdf5 import acquisition_header_dtype

    heads = np.empty(len(acqs), dtype=acquisition_header_dtype)
    data, trajs = [], []
    for i, a in enumerate(acqs):
        heads[i] = np.frombuffer(bytes(a.getHead()), dtype=acquisition_header_dtype)[0]
        data.append(np.asarray(a.data, np.complex64))
        trajs.append(np.asarray(a.traj, np.float32))
    return heads, data, trajs


def convert_mrd(source: str | Path, output: str | Path, *, force: bool = False) -> Path:
    """Convert raw data between ISMRMRD HDF5 (MRD v1, ``.h5``) and MRD v2 (``.mrd``).

    The direction follows the input's content: an ISMRMRD file becomes MRD v2, an MRD v2
    file becomes ISMRMRD. Noise scans come first in the output, then the other
    acquisitions in file order.

    Parameters
    ----------
    source : str or Path
        ISMRMRD HDF5 or MRD v2 raw file.
    output : str or Path
        Output file: ``.mrd`` for an ISMRMRD source, ``.h5`` (or ``.hdf5``) for an MRD
        v2 source.
    force : bool
        Replace an existing output.

    Returns
    -------
    Path

    Raises
    ------
    RawDataError
        If the source is neither format, the output suffix does not match the
        direction, or the source is unreadable.
    FileExistsError
        If the output exists and ``force`` is false.
    """
    from mrharmony.formats.raw import read_raw, sniff_format, write_raw

    source, output = Path(source), Path(output)
    kind = sniff_format(source)
    if kind == "ismrmrd":
        if output.suffix != ".mrd":
            raise RawDataError(f"{output}: an ISMRMRD source converts to MRD v2; name the "
                               "output .mrd")
        return write_mrd2_raw(output, read_raw(source), force=force)
    if kind == "mrd2":
        if output.suffix not in (".h5", ".hdf5"):
            raise RawDataError(f"{output}: an MRD v2 source converts to ISMRMRD HDF5; name "
                               "the output .h5")
        raw = read_mrd2_raw(source)
        heads, data, trajs = _heads_and_arrays(list(raw.noise) + list(raw.acquisitions))
        return write_raw(output, header_to_xml(raw.header), heads, data, trajs,
                         force=force)
    raise RawDataError(f"{source}: {kind} raw data; `convert mrd` converts ISMRMRD HDF5 "
                       "and MRD v2 (use `convert twix` for Siemens files)")
