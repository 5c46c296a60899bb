"""From a Pulseq sequence to the ISMRMRD layout of its raw data (header + acquisition table).

A ``.seq`` file determines everything about its raw data except the samples: the encoded
and reconstructed spaces, the trajectory, which ADC is which k-space line, which lines
are reversed or navigators. :func:`layout_from_seq` derives that once, for whoever brings
the samples: the simulator (:func:`mrharmony.simulation.raw.simulate_raw`) and the
converter of scanner data (:mod:`mrharmony.formats.twix`) write the same files from it.

- :func:`header_from_seq` — the ISMRMRD header: from our ``[DEFINITIONS]`` (``FOV``,
  ``MatrixSize``, ``Trajectory``, ``TE``/``TR``/``TI``, diffusion scheme, EPI ramp
  parameters) when the file has them, else derived from its k-space
  (:func:`minimal_header_from_seq`).
- Counters come from the file's labels (LIN, PAR, SLC, ECO, SET, REP, AVG, PHS, SEG, NAV,
  REV) or, for a Cartesian file without ``LIN``/``PAR`` labels, from each readout's
  k-space position (phase index ``round(k·FOV)``, reversed lines from the readout
  direction); :attr:`AcquisitionLayout.counters_source` says which. ``REF``/``IMA`` labels
  become the parallel-calibration flags (:data:`~mrharmony.formats.flags.PARALLEL_LABEL_FLAGS`);
  ``Acceleration``/``CalibrationMode`` definitions the header's ``parallelImaging``
  (``MultibandFactor``/``CaipiShift``/``MultibandGroups``: its ``multiband`` element and
  the user parameters SMS recon needs, :mod:`mrharmony.recon.sms`); the
  LIN/PAR limits of a Cartesian file span the full ``MatrixSize`` (centre
  ``kSpaceCenterLine``/``kSpaceCenterPartition``, else ``n // 2``) even when lines were
  left out.
- Non-Cartesian trajectories are given in cycles per reconstructed FOV on the logical
  (read, phase, slice) axes, so the Cartesian grid points are the integers
  ``-N/2 .. N/2-1`` (the recon / SigPy convention).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.errors import SequenceFileError
from mrharmony.formats.raw import acquisition_table, adc_rotations

__all__ = [
    "GAMMA_BAR_HZ_PER_T",
    "AcquisitionLayout",
    "excitation_thickness_m",
    "header_from_seq",
    "kspace_cycles_per_fov",
    "layout_from_seq",
    "logical_kspace",
    "minimal_header_from_seq",
    "readout_reversed",
]

_LOG = logging.getLogger("mrharmony.formats")

#: Proton gyromagnetic ratio / 2π (Hz/T), the value Pulseq and the scanner profiles use.
GAMMA_BAR_HZ_PER_T = 42.576e6

_LABEL_LIMITS = {
    "LIN": "kspace_encoding_step_1", "PAR": "kspace_encoding_step_2", "SLC": "slice",
    "ECO": "contrast", "SET": "set", "REP": "repetition", "AVG": "average",
    "PHS": "phase", "SEG": "segment",
}  # fmt: skip


def _values(defs: dict[str, Any], key: str) -> np.ndarray | None:
    if key not in defs:
        return None
    return np.atleast_1d(np.asarray(defs[key], dtype=float))


def _first(defs: dict[str, Any], key: str, default: Any = None) -> Any:
    value = defs.get(key, default)
    return value[0] if isinstance(value, np.ndarray) and value.size else value


def _system(mrd: Any, *, vendor: str | None, model: str | None, field_t: float | None,
            defs: dict[str, Any], n_coils: int) -> tuple[Any, float]:
    b0 = float(field_t) if field_t is not None else float(_first(defs, "B0", 0.0) or 0.0)
    system = mrd.acquisitionSystemInformationType(
        systemVendor=vendor if vendor is not None else str(_first(defs, "Vendor", "unknown")),
        systemModel=model if model is not None else str(_first(defs, "Scanner", "unknown")),
        systemFieldStrength_T=b0,
        receiverChannels=int(n_coils),
    )
    return system, b0


def _label_ranges(seq: Any) -> dict[str, tuple[int, int]]:
    records = seq.adc_records()
    out = {}
    for name in _LABEL_LIMITS:
        values = np.array([r.labels.get(name, 0) for r in records], dtype=np.int64)
        if values.size and name in seq.used_labels:
            out[name] = (int(values.min()), int(values.max()))
    return out


def _parallel_imaging(mrd: Any, defs: dict[str, Any]) -> Any:
    """``parallelImaging`` from the ``Acceleration`` / ``CalibrationMode`` definitions
    (None when the file states no acceleration above 1)."""
    acc = _values(defs, "Acceleration")
    mb = int(_first(defs, "MultibandFactor", 1) or 1)
    if (acc is None or not np.any(acc > 1)) and mb <= 1:
        return None
    acc = np.concatenate([acc if acc is not None else np.ones(0), np.ones(2)])[:2].astype(int)
    mode = str(_first(defs, "CalibrationMode", "separate" if mb > 1 else "embedded")).lower()
    modes = {m.value: m for m in mrd.calibrationModeType}
    parallel = mrd.parallelImagingType(
        accelerationFactor=mrd.accelerationFactorType(
            kspace_encoding_step_1=int(acc[0]), kspace_encoding_step_2=int(acc[1])),
        calibrationMode=modes.get(mode, mrd.calibrationModeType.OTHER),
    )
    if mb > 1:
        parallel.multiband = _multiband(mrd, defs, mb)
    return parallel


def _multiband_positions_mm(defs: dict[str, Any]) -> np.ndarray:
    return np.atleast_1d(np.asarray(defs.get("SlicePositions", [0.0]), dtype=float)) * 1e3


def _multiband(mrd: Any, defs: dict[str, Any], mb: int) -> Any:
    """``parallelImaging.multiband`` of an SMS file: the factor, the slice distance within
    a group (``spacing.dZ``, mm), the CAIPI shift as ``deltaKz`` (a fraction of the phase
    FOV per slice: RF-phase CAIPI, not blips) and a separable single-band calibration."""
    pos = _multiband_positions_mm(defs)
    groups = int(_first(defs, "MultibandGroups", max(pos.size // mb, 1)))
    dz = float(pos[groups] - pos[0]) if pos.size > groups else 0.0
    return mrd.multibandType(
        spacing=[mrd.multibandSpacingType(dZ=[dz] * (mb - 1))],
        deltaKz=float(_first(defs, "CaipiShift", 0.0)),
        multiband_factor=mb,
        calibration=mrd.multibandCalibrationType.SEPARABLE2_D,
        calibration_encoding=0,
    )


def _multiband_user_parameters(mrd: Any, defs: dict[str, Any]) -> list[Any]:
    """User parameters recon needs for slice separation: the factor, CAIPI shift (fraction
    of the phase FOV per slice of a group), group count and each true slice's position
    (``MultibandSlicePosition_<s>``, mm along the slice axis; group ``g`` holds slices
    ``g + j G``)."""
    mb = int(_first(defs, "MultibandFactor", 1) or 1)
    if mb <= 1:
        return []
    pos = _multiband_positions_mm(defs)
    out = [mrd.userParameterDoubleType(name=name, value=float(_first(defs, key, default)))
           for name, key, default in (("MultibandFactor", "MultibandFactor", mb),
                                      ("CaipiShift", "CaipiShift", 0.0),
                                      ("MultibandGroups", "MultibandGroups", pos.size // mb),
                                      ("MultibandPeakB1_uT", "MultibandPeakB1", 0.0))]
    out += [mrd.userParameterDoubleType(name=f"MultibandSlicePosition_{s}", value=float(p))
            for s, p in enumerate(pos)]
    return out


def _sequence_user_parameters(mrd: Any, defs: dict[str, Any]) -> Any:
    """The header's user parameters taken from the sequence definitions (or None).

    Fat suppression (chemsat / water_excitation), what a stimulated-echo T2 fit needs of a
    spin-echo train's pulses (refocusing flip, time-bandwidth product, apodization) and
    what slice separation needs of a simultaneous multi-slice scan.
    """
    strings = [mrd.userParameterStringType(name="FatSuppression",
                                           value=str(_first(defs, "FatSuppression")))
               ] if "FatSuppression" in defs else []
    doubles = [mrd.userParameterDoubleType(name=k, value=float(_first(defs, k)))
               for k in ("RefocusingFlipAngle", "RfTimeBwProduct", "RfApodization") if k in defs]
    doubles += _multiband_user_parameters(mrd, defs)
    if not (strings or doubles):
        return None
    return mrd.userParametersType(userParameterString=strings, userParameterDouble=doubles)


def header_from_seq(
    seq: Any,
    *,
    n_coils: int = 1,
    vendor: str | None = None,
    model: str | None = None,
    field_t: float | None = None,
) -> Any:
    """The ISMRMRD header of a sequence's raw data.

    Parameters
    ----------
    seq : PulseqSequence
        From :func:`mrharmony.formats.pulseq.read_pulseq`.
    n_coils : int
        Receive channels.
    vendor, model : str, optional
        System vendor and model (default: the file's ``Vendor``/``Scanner`` definitions).
    field_t : float, optional
        Main field (T) (default: the file's ``B0`` definition); sets the Larmor frequency.

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader
        From the file's ``FOV``/``MatrixSize`` definitions (mrharmony and many other
        writers), else :func:`minimal_header_from_seq`.
    """
    import ismrmrd.xsd as mrd

    defs = dict(seq.definitions)
    if "FOV" not in defs or "MatrixSize" not in defs:
        return minimal_header_from_seq(seq, n_coils=n_coils, vendor=vendor, model=model,
                                       field_t=field_t)
    fov_mm = np.resize(np.asarray(_values(defs, "FOV"), dtype=float), 3)
    if fov_mm.max() <= 1.0:  # metres per the specification; some writers store mm
        fov_mm = fov_mm * 1e3
    matrix = np.asarray(_values(defs, "MatrixSize"), dtype=float).astype(int)
    matrix = np.concatenate([matrix, np.ones(3 - min(matrix.size, 3), dtype=int)])[:3]
    matrix = np.maximum(matrix, 1)
    os_ = int(_first(defs, "ReadoutOversampling", 1) or 1)
    trajectory = str(_first(defs, "Trajectory", "cartesian")).lower()
    if trajectory == "radial" and str(_first(defs, "AngleOrdering", "")).lower() == "golden":
        trajectory = "goldenangle"
    kinds = {"cartesian": mrd.trajectoryType.CARTESIAN, "epi": mrd.trajectoryType.EPI,
             "radial": mrd.trajectoryType.RADIAL, "goldenangle": mrd.trajectoryType.GOLDENANGLE,
             "spiral": mrd.trajectoryType.SPIRAL}
    traj_type = kinds.get(trajectory, mrd.trajectoryType.OTHER)

    encoded = mrd.encodingSpaceType(
        matrixSize=mrd.matrixSizeType(x=int(matrix[0] * os_), y=int(matrix[1]), z=int(matrix[2])),
        fieldOfView_mm=mrd.fieldOfViewMm(x=float(fov_mm[0] * os_), y=float(fov_mm[1]),
                                         z=float(fov_mm[2])),
    )
    recon = mrd.encodingSpaceType(
        matrixSize=mrd.matrixSizeType(x=int(matrix[0]), y=int(matrix[1]), z=int(matrix[2])),
        fieldOfView_mm=mrd.fieldOfViewMm(x=float(fov_mm[0]), y=float(fov_mm[1]),
                                         z=float(fov_mm[2])),
    )
    ranges = _label_ranges(seq)
    limits = mrd.encodingLimitsType()
    default_ranges = {
        "LIN": (0, int(matrix[1]) - 1),
        "PAR": (0, int(matrix[2]) - 1),
        "SLC": (0, int(_first(defs, "NumberOfSlices", 1)) - 1),
        "ECO": (0, len(_values(defs, "TE") if "TE" in defs else [0]) - 1),
    }
    cartesian_like = trajectory in ("cartesian", "epi")
    centre_keys = {"LIN": "kSpaceCenterLine", "PAR": "kSpaceCenterPartition"}
    for label_name, attr in _LABEL_LIMITS.items():
        lo_hi = ranges.get(label_name, default_ranges.get(label_name))
        if lo_hi is None:
            continue
        lo, hi = lo_hi
        center = 0
        if label_name in centre_keys and cartesian_like:
            # the limits describe the full matrix, also when lines were left out
            # (acceleration, partial Fourier): its centre stays the k-space centre
            full = default_ranges[label_name]
            lo, hi = min(lo, full[0]), max(hi, full[1])
            center = int(_first(defs, centre_keys[label_name], (hi + 1) // 2))
        setattr(limits, attr, mrd.limitType(minimum=lo, maximum=hi, center=center))
    limits.kspace_encoding_step_0 = mrd.limitType(
        minimum=0, maximum=int(matrix[0] * os_) - 1, center=int(matrix[0] * os_) // 2
    )
    encoding = mrd.encodingType(encodedSpace=encoded, reconSpace=recon, encodingLimits=limits,
                                trajectory=traj_type)
    if traj_type != mrd.trajectoryType.CARTESIAN:
        encoding.trajectoryDescription = mrd.trajectoryDescriptionType(
            identifier=f"mrharmony-{trajectory}",
            comment="k-space positions are given per acquisition (trajectory arrays)",
        )
        # what a reconstruction needs when the acquisitions carry no trajectory arrays
        encoding.trajectoryDescription.userParameterDouble = [
            mrd.userParameterDoubleType(name=k, value=float(_first(defs, k)))
            for k in ("RampSampling", "ReadoutRampTime", "ReadoutFlatTime", "ADCDelayInLine",
                      "ADCDwell", "AngleIncrement") if k in defs
        ]
    if "EchoTrainLength" in defs:
        encoding.echoTrainLength = int(_first(defs, "EchoTrainLength"))
    parallel = _parallel_imaging(mrd, defs)
    if parallel is not None:
        encoding.parallelImaging = parallel

    params = mrd.sequenceParametersType()
    if "TR" in defs:
        params.TR = [float(v) * 1e3 for v in _values(defs, "TR")]
    if "TE" in defs:
        params.TE = [float(v) * 1e3 for v in _values(defs, "TE")]
    if "TI" in defs:
        params.TI = [float(v) * 1e3 for v in _values(defs, "TI")]
    if "FlipAngle" in defs:
        params.flipAngle_deg = [float(_first(defs, "FlipAngle"))]
    if "EchoSpacing" in defs:
        params.echo_spacing = [float(_first(defs, "EchoSpacing")) * 1e3]
    params.sequence_type = str(_first(defs, "Builder", _first(defs, "Name", "unknown")))
    bvals = _values(defs, "BValues")
    dirs = _values(defs, "DiffusionDirections")
    if bvals is not None and dirs is not None and dirs.size == 3 * bvals.size:
        vecs = np.asarray(dirs, dtype=float).reshape(-1, 3)
        params.diffusion = [
            mrd.diffusionType(
                gradientDirection=mrd.gradientDirectionType(
                    rl=float(v[0]), ap=float(v[1]), fh=float(v[2])
                ),
                bvalue=float(b),
            )
            for b, v in zip(bvals.astype(float), vecs, strict=True)
        ]
    system, b0 = _system(mrd, vendor=vendor, model=model, field_t=field_t, defs=defs,
                         n_coils=n_coils)
    header = mrd.ismrmrdHeader(
        version=2,
        acquisitionSystemInformation=system,
        experimentalConditions=mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(GAMMA_BAR_HZ_PER_T * b0)
        ),
        encoding=[encoding],
        sequenceParameters=params,
    )
    header.userParameters = _sequence_user_parameters(mrd, defs)
    return header


def logical_kspace(seq: Any, records: list[Any] | None = None) -> np.ndarray:
    """k-space (1/m) of every ADC sample on the logical axes (read, phase, slice).

    Parameters
    ----------
    seq : PulseqSequence
    records : list of ADCRecord, optional
        ``seq.adc_records()`` (passed to avoid recomputing them).

    Returns
    -------
    ndarray
        (total_samples, 3) float64: the physical k-space rotated back by each block's
        ROTATIONS quaternion (identity where none).
    """
    records = seq.adc_records() if records is None else records
    k = np.asarray(seq.kspace_at_adc(), dtype=np.float64)
    rot, rotated = adc_rotations(records)
    if not rotated:
        return k
    ns = np.array([r.num_samples for r in records])
    per_sample = np.repeat(rot, ns, axis=0)  # (samples, 3, 3)
    return np.einsum("sji,sj->si", per_sample, k)


def kspace_cycles_per_fov(seq: Any, records: list[Any], header: Any) -> np.ndarray:
    """k of every ADC sample on the logical axes, in cycles per reconstructed FOV.

    Returns
    -------
    ndarray
        (total_samples, 3) float64: ``k[1/m] * FOV[m]`` with the header's reconSpace FOV.
    """
    fov = header.encoding[0].reconSpace.fieldOfView_mm
    fov_m = np.array([fov.x, fov.y, fov.z], dtype=np.float64) * 1e-3
    return logical_kspace(seq, records) * fov_m[None, :]


def _median_step(values: np.ndarray) -> float:
    """Median spacing of the distinct values (k-space steps), 0 for fewer than two."""
    distinct = np.unique(np.round(np.asarray(values, dtype=np.float64), 6))
    steps = np.diff(distinct)
    return float(np.median(steps)) if steps.size else 0.0


def excitation_thickness_m(seq: Any) -> float:
    """Slice thickness (m) of the first slice-selective excitation: the full width at half
    maximum of its RF spectrum over its slice-select gradient (0 if there is none)."""
    t_rf, blocks, uses = seq.rf_times()
    exc = [i for i, u in enumerate(uses) if u in ("excitation", "undefined")]
    if not exc:
        return 0.0
    t_g, g = seq.gradient_waveforms_concat()
    grad = np.array([np.interp(t_rf[exc[0]], t_g, g[:, a]) for a in range(3)])
    rf = seq.rf_library[int(seq.event_ids()[int(blocks[exc[0]]), 0])]
    if not np.linalg.norm(grad) > 0 or rf.signal_hz.size < 2:
        return 0.0
    dt = float(np.median(np.diff(rf.t_s)))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft(rf.signal_hz, 16 * 1024)))
    above = np.flatnonzero(spectrum >= 0.5 * spectrum.max())
    fwhm_hz = (above[-1] - above[0] + 1) / (16 * 1024 * dt)
    return float(fwhm_hz / np.linalg.norm(grad))


def minimal_header_from_seq(
    seq: Any,
    *,
    n_coils: int = 1,
    vendor: str | None = None,
    model: str | None = None,
    field_t: float | None = None,
) -> Any:
    """Header for a file without our definitions: FOV and matrix from its k-space.

    The FOV is the file's ``FOV`` definition (metres per the Pulseq specification; values
    above 1 are taken as millimetres, as some older writers store them), else the inverse
    of the readout's k-space step. The matrix is the ``MatrixSize`` definition, else
    ``2 k_max FOV`` per logical axis (2D unless most readouts have a partition k at
    their in-plane k-space centre). A file whose every ADC is a straight line along the
    readout with constant phase/partition k (to 10 % of a k-space step) is Cartesian;
    anything else is ``other`` (non-Cartesian, trajectories written).

    Parameters are those of :func:`header_from_seq`.

    Raises
    ------
    SequenceFileError
        If the sequence has no ADC.
    """
    import ismrmrd.xsd as mrd

    records = seq.adc_records()
    if not records:
        raise SequenceFileError("the sequence has no ADC events: no raw-data layout")
    k = logical_kspace(seq, records)
    ns = np.array([r.num_samples for r in records])
    offsets = np.concatenate(([0], np.cumsum(ns)))
    defs = seq.definitions
    fov = np.resize(np.atleast_1d(np.asarray(defs.get("FOV", [0.0]), dtype=float)), 3)
    if fov.max() > 1.0:
        fov = fov * 1e-3
    steps = np.abs(np.diff(k[: offsets[1], 0])) if ns[0] > 1 else np.zeros(1)
    step = float(np.median(steps[steps > 0])) if np.any(steps > 0) else 0.0
    starts, ends = offsets[:-1], offsets[1:] - 1
    centre = starts + np.array([int(np.argmin(np.linalg.norm(k[a:b + 1, :2], axis=1)))
                                for a, b in zip(starts, ends, strict=True)])
    if not np.all(fov[:2] > 0):
        # read FOV from the sample spacing, phase FOV from the phase-encoding step
        fov[0] = 1.0 / step if step > 0 else 0.256
        dky = _median_step(k[centre, 1])
        fov[1] = 1.0 / dky if dky > 0 else fov[0]
    # 3D when most readouts sit off kz = 0 at their in-plane k-space centre (partition
    # encoding); a few stray ADCs (e.g. sync readouts without excitation) do not count.
    dkz = _median_step(k[centre, 2])
    three_d = dkz > 0 and np.mean(np.abs(k[centre, 2]) >= 0.5 * dkz) > 0.5
    if not fov[2] > 0:
        fov[2] = (1.0 / dkz if three_d else excitation_thickness_m(seq)) or fov[0]
    kmax = np.max(np.abs(k), axis=0)
    matrix = np.maximum(2 * np.round(kmax * fov), 1).astype(int)
    if not three_d:
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
        fieldOfView_mm=mrd.fieldOfViewMm(x=float(fov[0] * 1e3), y=float(fov[1] * 1e3),
                                         z=float(fov[2] * 1e3)),
    )
    limits = mrd.encodingLimitsType(
        kspace_encoding_step_1=mrd.limitType(minimum=0, maximum=int(matrix[1]) - 1,
                                             center=int(matrix[1]) // 2),
        kspace_encoding_step_2=mrd.limitType(minimum=0, maximum=int(matrix[2]) - 1,
                                             center=int(matrix[2]) // 2),
    )
    encoding = mrd.encodingType(
        encodedSpace=enc, reconSpace=copy.deepcopy(enc), encodingLimits=limits,
        trajectory=mrd.trajectoryType.CARTESIAN if cartesian else mrd.trajectoryType.OTHER,
    )
    params = mrd.sequenceParametersType(sequence_type=str(defs.get("Name", "unknown")))
    for key, attr in (("TE", "TE"), ("TR", "TR"), ("TI", "TI")):
        values = _values(defs, key)
        if values is not None:
            setattr(params, attr, [float(v) * 1e3 for v in values])  # s -> ms
    system, b0 = _system(mrd, vendor=vendor, model=model, field_t=field_t, defs=defs,
                         n_coils=n_coils)
    header = mrd.ismrmrdHeader(
        version=2,
        acquisitionSystemInformation=system,
        experimentalConditions=mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(GAMMA_BAR_HZ_PER_T * b0)
        ),
        encoding=[encoding],
        sequenceParameters=params,
    )
    header.userParameters = _sequence_user_parameters(mrd, defs)
    return header


def _derived_labels(records: list[Any], k_cyc: np.ndarray, enc: Any) -> list[Any]:
    """Records with LIN/PAR/REV from their k-space (for files without LIN/PAR labels).

    The phase (partition) index is ``round(k * FOV) + N/2`` on the FFT grid
    ``-N/2 .. N/2-1`` (k = 0 at index ``N/2``, the limits' ``center``). Writers differ:
    lines ``-N/2+1 .. N/2`` put the last one at ``+N/2``, which on the N-point pixel grid
    is the same Nyquist line as ``-N/2``, so indices wrap modulo N when the lines span
    at most N of them (a partial-Fourier subset included).
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
        if n <= 1:
            counters.append(np.zeros_like(idx))
            continue
        if int(idx.max()) - int(idx.min()) < n:
            counters.append((idx + n // 2) % n)
        else:  # more lines than the matrix: keep the central N
            counters.append(np.clip(idx + n // 2, 0, n - 1))
        setattr(enc.encodingLimits, limit,
                mrd.limitType(minimum=0, maximum=n - 1, center=n // 2))
    rev = (k_cyc[first + ns - 1, 0] < k_cyc[first, 0]).astype(int)  # EPI: reversed lines
    return [
        dataclasses.replace(r, labels={**r.labels, "LIN": int(a), "PAR": int(b), "REV": int(c)})
        if dataclasses.is_dataclass(r) else r
        for r, a, b, c in zip(records, counters[0], counters[1], rev, strict=True)
    ]


def _parallel_flags(records: list[Any], heads: np.ndarray) -> None:
    """Calibration flags from the ``REF`` / ``IMA`` labels (``formats.flags``), in place."""
    from mrharmony.formats.flags import PARALLEL_LABEL_FLAGS, flag_mask

    ref = np.array([int(r.labels.get("REF", 0) > 0) for r in records], dtype=np.int64)
    if not ref.any():
        return
    ima = np.array([int(r.labels.get("IMA", 0) > 0) for r in records], dtype=np.int64)
    for (r, i), name in PARALLEL_LABEL_FLAGS.items():
        heads["flags"][(ref == r) & (ima == i)] |= flag_mask(name)


def _excitation_period(seq: Any, records: list[Any]) -> np.ndarray:
    """Per ADC, the index of the excitation (RF ``excitation``/``undefined``) it follows."""
    t_rf, _, uses = seq.rf_times()
    exc = np.array([u in ("excitation", "undefined") for u in uses], dtype=bool)
    t_exc = np.asarray(t_rf)[exc] if len(uses) else np.zeros(0)
    return np.searchsorted(t_exc, [r.t_start_s for r in records], side="right")


def readout_reversed(k: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """Per ADC, whether its readout runs towards negative k (k in cycles per FOV, ``ns``
    samples per ADC)."""
    off = np.concatenate(([0], np.cumsum(ns)))
    return k[off[1:] - 1, 0] < k[off[:-1], 0]


def _readout_spaces(enc: Any, k: np.ndarray, ns: int, seq: Any) -> None:
    """Encoded x = all ``ns`` samples; recon x = the ``.seq``'s matrix over its FOV.

    The recon matrix is the ``MatrixSize`` definition, else ``2 round(k_max)`` (k in
    cycles per FOV). When a readout has more samples than that (readout oversampling,
    ramp sampling) every sample stays: the encoded space is ``ns`` points over
    ``FOV / dk`` (``dk`` the median sample step, the flat top's) and recon crops.
    """
    if k.size == 0 or ns < 2:
        return
    given = seq.definitions.get("MatrixSize")
    kmax = float(np.max(np.abs(k[:, 0])))
    n = (int(np.atleast_1d(given)[0]) if given is not None
         else max(1, 2 * int(np.floor(kmax + 0.5))))
    steps = np.abs(np.diff(k[:ns, 0]))
    steps = steps[steps > 1e-6]
    if n >= ns - 1 or steps.size == 0:
        return
    dk = float(np.median(steps))  # cycles per recon FOV
    es = copy.deepcopy(enc.encodedSpace)
    rs = copy.deepcopy(enc.reconSpace)
    es.matrixSize.x = int(ns)
    es.fieldOfView_mm.x = float(rs.fieldOfView_mm.x) / min(dk, 1.0)
    rs.matrixSize.x = n
    enc.encodedSpace, enc.reconSpace = es, rs
    _LOG.info("readout: %d samples encoded (step %.3g cycles/FOV), %d reconstructed", ns, dk,
              n)


def excitation_offsets_mm(seq: Any, records: list[Any]) -> np.ndarray:
    """Per ADC, where its excitation put the slice: offset (mm) along the ADC's slice axis.

    The last excitation pulse (use ``excitation`` or ``undefined``) before each ADC
    selects the plane ``r . G = f`` (Pulseq: ``freq_offset = gamma G z0``, gradients in
    Hz/m), i.e. the point ``f G / |G|^2``; its component along the ADC's slice direction
    (third column of its rotation, z without one) is returned. ADCs without a preceding
    excitation, or after a non-selective one, get 0.

    Returns
    -------
    ndarray
        (n_adc,) float64 offsets in mm.
    """
    out = np.zeros(len(records))
    t_rf, blocks, uses = seq.rf_times()
    exc = np.array([u in ("excitation", "undefined") for u in uses], dtype=bool)
    if not exc.any():
        return out
    t_exc = np.asarray(t_rf)[exc]
    rf_ids = seq.event_ids()[np.asarray(blocks)[exc], 0]
    lib = seq.rf_library
    freq = np.array([lib[int(i)].freq_offset_hz for i in rf_ids], dtype=np.float64)
    t_g, g = seq.gradient_waveforms_concat()
    grad = np.stack([np.interp(t_exc, t_g, g[:, a]) for a in range(3)], axis=1)
    g2 = np.sum(grad**2, axis=1)
    point_m = np.where(g2[:, None] > 0, freq[:, None] * grad / np.where(g2 > 0, g2, 1)[:, None],
                       0.0)
    which = np.searchsorted(t_exc, [r.t_start_s for r in records], side="right") - 1
    rot, _ = adc_rotations(records)
    has = which >= 0
    out[has] = np.einsum("ij,ij->i", point_m[which[has]], rot[has, :, 2]) * 1e3
    return np.round(out, 4)


def _slices_and_repeats(seq: Any, records: list[Any], enc: Any, *, derive_slices: bool,
                        derive_repeats: bool) -> tuple[list[Any], np.ndarray | None]:
    """Slice positions from the RF (and, for unlabelled files, SLC), then ECO/REP for
    readouts that would otherwise share every counter (they would be averaged away).

    Returns the records (labels completed) and the slice offsets (mm) per SLC index, or
    None when the file is single-slice.
    """
    import ismrmrd.xsd as mrd

    used = set(seq.used_labels)
    offsets = excitation_offsets_mm(seq, records)
    nav = np.array([bool(r.labels.get("NAV", 0)) for r in records])
    img_off = offsets[~nav] if (~nav).any() else offsets
    positions = None
    if derive_slices and np.unique(img_off).size > 1:
        if "SLC" in used:
            slc = np.array([r.labels.get("SLC", 0) for r in records])
            positions = np.array([float(np.median(offsets[slc == k])) if np.any(slc == k)
                                  else 0.0 for k in range(int(slc.max()) + 1)])
        else:
            positions, slc = np.unique(offsets, return_inverse=True)
            records = [dataclasses.replace(r, labels={**r.labels, "SLC": int(k)})
                       for r, k in zip(records, slc, strict=True)]
        enc.encodingLimits.slice = mrd.limitType(minimum=0, maximum=len(positions) - 1,
                                                 center=0)
        _LOG.info("%d slices from the excitations' frequency offsets", len(positions))
    if derive_repeats:
        period = _excitation_period(seq, records)
        lab = np.array([[r.labels.get(n, 0) for n in ("LIN", "PAR", "SLC")] for r in records])
        for name, scope in (("ECO", period), ("REP", None)):
            if name in used:
                continue
            key = lab if scope is None else np.column_stack([lab, scope])
            _, inv = np.unique(key, axis=0, return_inverse=True)
            count = np.zeros(inv.max() + 1, np.int64) if inv.size else np.zeros(0, np.int64)
            occ = np.zeros(inv.size, np.int64)
            for i, k in enumerate(inv.ravel().tolist()):  # occurrence index of each key
                occ[i] = count[k]
                count[k] += 1
            occ[nav] = 0
            if occ.max(initial=0) > 0:
                records = [dataclasses.replace(r, labels={**r.labels, name: int(o)})
                           for r, o in zip(records, occ, strict=True)]
                limit = "contrast" if name == "ECO" else "repetition"
                setattr(enc.encodingLimits, limit,
                        mrd.limitType(minimum=0, maximum=int(occ.max()), center=0))
                _LOG.info("readouts repeating a line %s: %s counter from their order",
                          "within one excitation" if name == "ECO" else "across excitations",
                          name)
            lab = np.column_stack([lab, occ])
    return records, positions


def _refine_cartesian(seq: Any, records: list[Any], heads: np.ndarray, header: Any,
                      k: np.ndarray) -> list[np.ndarray] | None:
    """What only the k-space of a Cartesian file tells: which readouts run backwards (a
    ``REV`` label that contradicts the gradient is overruled, with a warning), whether the
    file is EPI (one excitation reads several phase-encoded lines of both polarities;
    trajectories are then given so recon regrids ramp samples), and readouts with more
    samples than the matrix (oversampling, ramp sampling: all samples kept, the encoded
    space holds them, recon crops). ``heads`` and ``header`` are updated in place.

    Returns
    -------
    list of ndarray or None
        Per ADC (kx, ky) trajectories in cycles per FOV when the file is EPI, else None.
    """
    import ismrmrd.xsd as mrd

    from mrharmony.formats.flags import flag_mask, has_flag

    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    off = np.concatenate(([0], np.cumsum(ns)))
    rev = readout_reversed(k, ns)
    labelled = np.array([bool(r.labels.get("REV", 0)) for r in seq.adc_records()])
    if "REV" in seq.used_labels and np.any(labelled != rev):
        _LOG.warning("%d readout(s) are labelled REV against their readout gradient's "
                     "direction (or the reverse); the gradient decides", int(np.sum(
                         labelled != rev)))
    heads["flags"] &= ~flag_mask("IS_REVERSE")
    heads["flags"][rev] |= flag_mask("IS_REVERSE")
    is_nav = has_flag(heads["flags"], "IS_PHASECORR_DATA")
    enc = header.encoding[0]
    trajs = None
    period = _excitation_period(seq, records)
    lines = heads["idx"]["kspace_encode_step_1"]
    img = ~is_nav
    # EPI: one excitation reads several phase-encoded lines with both polarities (a
    # bipolar multi-echo readout of one line per excitation stays Cartesian)
    if any(len(set(rev[sel].tolist())) == 2 and len(set(lines[sel].tolist())) > 1
           for sel in (img & (period == p) for p in np.unique(period))):
        enc.trajectory = mrd.trajectoryType.EPI
        k2 = k[:, :2].astype(np.float32)
        trajs = [k2[off[i]:off[i + 1]] for i in range(len(records))]
        heads["trajectory_dimensions"] = 2
        heads["center_sample"] = [int(np.argmin(np.abs(k[off[i]:off[i + 1], 0])))
                                  for i in range(len(records))]
        _LOG.info("readouts of both polarities per excitation: EPI (trajectories from the "
                  "sequence's k-space)")
    if img.any():
        _readout_spaces(enc, k[~np.repeat(is_nav, ns)], int(ns[np.argmax(img)]), seq)
    return trajs


@dataclass
class AcquisitionLayout:
    """The raw-data layout of a sequence, without samples.

    Attributes
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Encoding, limits, trajectory, sequence parameters, system (to be completed by the
        writer: coil labels, site or scanner).
    records : list of ADCRecord
        The sequence's ADCs in playing order, with the labels the counters came from.
    heads : ndarray
        ``ismrmrd.hdf5.acquisition_header_dtype``, one per ADC: counters, flags, geometry
        (:func:`mrharmony.formats.raw.acquisition_table`).
    k_cyc : ndarray or None
        (total_samples, 3) logical k-space in cycles per FOV, when it was computed.
    trajectories : list of ndarray or None
        Per ADC, float32 ``(num_samples, dims)`` in cycles per FOV (non-Cartesian only).
    counters_source : {"labels", "k-space"}
        Where LIN/PAR/REV came from.
    cartesian : bool
        Whether the header's trajectory is Cartesian.
    """

    header: Any
    records: list[Any]
    heads: np.ndarray
    k_cyc: np.ndarray | None
    trajectories: list[np.ndarray] | None
    counters_source: str
    cartesian: bool

    @property
    def trajectory_dims(self) -> int:
        """Trajectory dimensions per sample (0 for Cartesian)."""
        return 0 if self.trajectories is None else int(self.trajectories[0].shape[1])


def layout_from_seq(
    seq: Any,
    *,
    n_coils: int,
    header: Any | None = None,
    need_kspace: bool = False,
    vendor: str | None = None,
    model: str | None = None,
    field_t: float | None = None,
) -> AcquisitionLayout:
    """The ISMRMRD layout of a sequence's raw data.

    Parameters
    ----------
    seq : PulseqSequence
        From :func:`mrharmony.formats.pulseq.read_pulseq`.
    n_coils : int
        Receive channels (``active_channels`` of every acquisition).
    header : ismrmrd.xsd.ismrmrdHeader, optional
        Use this header instead of :func:`header_from_seq` (it is modified in place
        when counters come from k-space: the encoding limits' centres).
    need_kspace : bool
        Compute :attr:`AcquisitionLayout.k_cyc` even for a labelled Cartesian file
        (the simulator's native k-space filters need it).
    vendor, model, field_t
        Passed to :func:`header_from_seq`.

    Returns
    -------
    AcquisitionLayout

    Raises
    ------
    SequenceFileError
        If the sequence has no ADC.
    RawDataError
        If a label does not fit its ISMRMRD counter.
    """
    import ismrmrd.xsd as mrd

    records = seq.adc_records()
    if not records:
        raise SequenceFileError("the sequence has no ADC events: no raw-data layout")
    if header is None:
        header = header_from_seq(seq, n_coils=n_coils, vendor=vendor, model=model,
                                 field_t=field_t)
    enc = header.encoding[0]
    cartesian = enc.trajectory in (mrd.trajectoryType.CARTESIAN,)
    unlabelled = len(records) > 1 and all(
        len({r.labels.get(name, 0) for r in records}) == 1 for name in ("LIN", "PAR")
    )
    k_cyc = (kspace_cycles_per_fov(seq, records, header)
             if need_kspace or not cartesian or unlabelled else None)
    source = "labels"
    if cartesian and unlabelled and k_cyc is not None:
        records = _derived_labels(records, k_cyc, enc)
        source = "k-space"
    _LOG.info("counters from the sequence's %s", "labels" if source == "labels"
              else "k-space (the file has no LIN/PAR labels)")
    traj_dims = 0 if cartesian else (3 if enc.reconSpace.matrixSize.z > 1 else 2)
    ns = np.array([r.num_samples for r in records], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(ns)))
    slice_pos = None
    defs = seq.definitions
    two_d = enc.reconSpace.matrixSize.z == 1
    if "SlicePositions" in defs and two_d:
        slice_pos = np.atleast_1d(np.asarray(defs["SlicePositions"], dtype=float)) * 1e3
    else:  # files that do not state their slices: from the RF; unlabelled repeats: ECO/REP
        records, slice_pos = _slices_and_repeats(
            seq, records, enc, derive_slices=two_d,
            derive_repeats=source == "k-space")
    centers = None
    if k_cyc is not None and traj_dims:
        kabs = np.linalg.norm(k_cyc, axis=1)
        centers = np.array([int(np.argmin(kabs[offsets[i]:offsets[i + 1]]))
                            for i in range(len(records))])
    heads = acquisition_table(records, n_coils=n_coils, slice_positions_mm=slice_pos,
                              center_samples=centers, trajectory_dims=traj_dims)
    _parallel_flags(records, heads)
    trajs = None
    if traj_dims and k_cyc is not None:
        k32 = k_cyc[:, :traj_dims].astype(np.float32)
        trajs = [k32[offsets[i]:offsets[i + 1]] for i in range(len(records))]
    # files that do not state everything (no labels, REV labels to check, no matrix):
    # ask their k-space (the same for the simulator and the converter)
    if cartesian and (k_cyc is not None or "REV" in seq.used_labels
                      or "MatrixSize" not in defs):
        if k_cyc is None:
            k_cyc = kspace_cycles_per_fov(seq, records, header)
        trajs = _refine_cartesian(seq, records, heads, header, k_cyc)
        cartesian = trajs is None
    return AcquisitionLayout(header=header, records=records, heads=heads, k_cyc=k_cyc,
                             trajectories=trajs, counters_source=source, cartesian=cartesian)
