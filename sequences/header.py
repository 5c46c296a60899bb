"""ISMRMRD headers from a protocol + scanner, or from a `.seq` file with our definitions.

The header describes what a reconstruction needs: encoded and reconstructed spaces,
encoding limits (from the Pulseq labels when present, else from the matrix), the
trajectory kind, sequence parameters (TE/TR/TI in ms, flip angle, diffusion scheme) and
the system (vendor, model, field strength, receiver channels, Larmor frequency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ismrmrd.xsd as mrd
import numpy as np
import pypulseq as pp

from mrharmony.errors import SequenceFileError
from mrharmony.sequences.protocol import Protocol, load_protocol
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T, ScannerProfile, load_scanner

__all__ = ["ismrmrd_header", "ismrmrd_header_xml"]

_TRAJECTORIES = {
    "cartesian": mrd.trajectoryType.CARTESIAN,
    "epi": mrd.trajectoryType.EPI,
    "radial": mrd.trajectoryType.RADIAL,
    "goldenangle": mrd.trajectoryType.GOLDENANGLE,
    "spiral": mrd.trajectoryType.SPIRAL,
}

_LABEL_LIMITS = {
    "LIN": "kspace_encoding_step_1",
    "PAR": "kspace_encoding_step_2",
    "SLC": "slice",
    "ECO": "contrast",
    "SET": "set",
    "REP": "repetition",
    "AVG": "average",
    "PHS": "phase",
    "SEG": "segment",
}


def _values(defs: dict[str, Any], key: str) -> np.ndarray | None:
    if key not in defs:
        return None
    return np.atleast_1d(np.asarray(defs[key]))


def _first(defs: dict[str, Any], key: str, default: Any = None) -> Any:
    v = _values(defs, key)
    return default if v is None else v[0]


def _label_ranges(seq: pp.Sequence) -> dict[str, tuple[int, int]]:
    try:
        labels = seq.evaluate_labels(evolution="adc")
    except Exception:  # third-party files with unusual label use
        return {}
    out = {}
    for name, values in labels.items():
        values = np.atleast_1d(values)
        if values.size and name in _LABEL_LIMITS:
            out[name] = (int(values.min()), int(values.max()))
    return out


def ismrmrd_header(
    source: Protocol | pp.Sequence | str | Path,
    scanner: ScannerProfile | str | None = None,
    *,
    receiver_channels: int = 1,
) -> mrd.ismrmrdHeader:
    """Build an ISMRMRD header for a sequence.

    Parameters
    ----------
    source : Protocol, pypulseq.Sequence, or path
        A protocol (or protocol ``.toml``), which is built on ``scanner`` first; a built
        sequence; or a ``.seq`` file carrying our ``[DEFINITIONS]``.
    scanner : ScannerProfile or str, optional
        Required for a protocol; for a sequence, overrides its ``Scanner`` definition.
    receiver_channels : int
        Number of receive coils.

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader

    Raises
    ------
    SequenceFileError
        If a `.seq` lacks the definitions a header needs (``FOV``, ``MatrixSize``).
    ConfigError
        If a protocol is given without a scanner.
    """
    from mrharmony.errors import ConfigError
    from mrharmony.sequences.io import build, read_seq

    if isinstance(source, str | Path) and Path(source).suffix == ".toml":
        source = load_protocol(source)
    if isinstance(source, Protocol):
        if scanner is None:
            raise ConfigError("scanner: a protocol needs a scanner to become a header")
        seq = build(source, scanner)
    elif isinstance(source, pp.Sequence):
        seq = source
    else:
        seq = read_seq(source)
    defs = dict(seq.definitions)
    for key in ("FOV", "MatrixSize"):
        if key not in defs:
            raise SequenceFileError(
                f"{source if not isinstance(source, pp.Sequence) else 'sequence'}: "
                f"[DEFINITIONS] lacks {key}, which an ISMRMRD header needs"
            )
    profile = load_scanner(scanner) if scanner is not None else None
    if profile is None and "Scanner" in defs:
        try:
            profile = load_scanner(str(_first(defs, "Scanner")))
        except Exception:
            profile = None

    fov_mm = np.asarray(_values(defs, "FOV"), dtype=float) * 1e3
    matrix = np.asarray(_values(defs, "MatrixSize"), dtype=float).astype(int)
    fov_mm = np.resize(fov_mm, 3)
    matrix = np.concatenate([matrix, np.ones(3 - matrix.size, dtype=int)])[:3]
    os_ = int(_first(defs, "ReadoutOversampling", 1))
    trajectory = str(_first(defs, "Trajectory", "cartesian")).lower()
    if trajectory == "radial" and str(_first(defs, "AngleOrdering", "")).lower() == "golden":
        trajectory = "goldenangle"

    encoded = mrd.encodingSpaceType(
        matrixSize=mrd.matrixSizeType(x=int(matrix[0] * os_), y=int(matrix[1]), z=int(matrix[2])),
        fieldOfView_mm=mrd.fieldOfViewMm(
            x=float(fov_mm[0] * os_), y=float(fov_mm[1]), z=float(fov_mm[2])
        ),
    )
    recon = mrd.encodingSpaceType(
        matrixSize=mrd.matrixSizeType(x=int(matrix[0]), y=int(matrix[1]), z=int(matrix[2])),
        fieldOfView_mm=mrd.fieldOfViewMm(
            x=float(fov_mm[0]), y=float(fov_mm[1]), z=float(fov_mm[2])
        ),
    )
    ranges = _label_ranges(seq)
    limits = mrd.encodingLimitsType()
    default_ranges = {
        "LIN": (0, int(matrix[1]) - 1),
        "PAR": (0, int(matrix[2]) - 1),
        "SLC": (0, int(_first(defs, "NumberOfSlices", 1)) - 1),
        "ECO": (0, len(_values(defs, "TE") if "TE" in defs else [0]) - 1),
    }
    for label_name, attr in _LABEL_LIMITS.items():
        lo_hi = ranges.get(label_name, default_ranges.get(label_name))
        if lo_hi is None:
            continue
        lo, hi = lo_hi
        center = (hi + 1) // 2 if label_name in ("LIN", "PAR") and trajectory in (
            "cartesian", "epi"
        ) else 0
        setattr(limits, attr, mrd.limitType(minimum=lo, maximum=hi, center=center))
    limits.kspace_encoding_step_0 = mrd.limitType(
        minimum=0, maximum=int(matrix[0] * os_) - 1, center=int(matrix[0] * os_) // 2
    )
    traj_type = _TRAJECTORIES.get(trajectory, mrd.trajectoryType.OTHER)
    encoding = mrd.encodingType(
        encodedSpace=encoded,
        reconSpace=recon,
        encodingLimits=limits,
        trajectory=traj_type,
    )
    if traj_type not in (mrd.trajectoryType.CARTESIAN,):
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

    b0 = float(profile.field_strength_t) if profile else float(_first(defs, "B0", 0.0) or 0.0)
    system = mrd.acquisitionSystemInformationType(
        systemVendor=profile.vendor if profile else str(_first(defs, "Vendor", "unknown")),
        systemModel=profile.model if profile else str(_first(defs, "Scanner", "unknown")),
        systemFieldStrength_T=b0,
        receiverChannels=int(receiver_channels),
    )
    header = mrd.ismrmrdHeader(
        version=2,
        acquisitionSystemInformation=system,
        experimentalConditions=mrd.experimentalConditionsType(
            H1resonanceFrequency_Hz=round(GAMMA_HZ_PER_T * b0)
        ),
        encoding=[encoding],
        sequenceParameters=params,
    )
    return header


def ismrmrd_header_xml(
    source: Protocol | pp.Sequence | str | Path,
    scanner: ScannerProfile | str | None = None,
    *,
    receiver_channels: int = 1,
) -> str:
    """Serialise :func:`ismrmrd_header` to ISMRMRD XML text."""
    return mrd.ToXML(ismrmrd_header(source, scanner, receiver_channels=receiver_channels))
