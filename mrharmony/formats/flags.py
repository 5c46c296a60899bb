"""ISMRMRD/MRD acquisition flags and the Pulseq label → encoding-counter map.

The one place the bit numbers are spelled. Flag numbers are 1-based bit positions as in
the ISMRMRD specification (``ACQ_IS_NOISE_MEASUREMENT = 19`` is bit 18 of ``flags``);
MRD v2 keeps the same bit positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "FLAGS",
    "LABEL_COUNTERS",
    "NOT_IMAGING",
    "PARALLEL_LABEL_FLAGS",
    "flag_mask",
    "has_flag",
]

#: ISMRMRD acquisition flag name (without ``ACQ_``) → 1-based bit number.
FLAGS: dict[str, int] = {
    "FIRST_IN_ENCODE_STEP1": 1, "LAST_IN_ENCODE_STEP1": 2,
    "FIRST_IN_ENCODE_STEP2": 3, "LAST_IN_ENCODE_STEP2": 4,
    "FIRST_IN_AVERAGE": 5, "LAST_IN_AVERAGE": 6,
    "FIRST_IN_SLICE": 7, "LAST_IN_SLICE": 8,
    "FIRST_IN_CONTRAST": 9, "LAST_IN_CONTRAST": 10,
    "FIRST_IN_PHASE": 11, "LAST_IN_PHASE": 12,
    "FIRST_IN_REPETITION": 13, "LAST_IN_REPETITION": 14,
    "FIRST_IN_SET": 15, "LAST_IN_SET": 16,
    "FIRST_IN_SEGMENT": 17, "LAST_IN_SEGMENT": 18,
    "IS_NOISE_MEASUREMENT": 19,
    "IS_PARALLEL_CALIBRATION": 20,
    "IS_PARALLEL_CALIBRATION_AND_IMAGING": 21,
    "IS_REVERSE": 22,
    "IS_NAVIGATION_DATA": 23,
    "IS_PHASECORR_DATA": 24,
    "LAST_IN_MEASUREMENT": 25,
    "IS_HPFEEDBACK_DATA": 26,
    "IS_DUMMYSCAN_DATA": 27,
    "IS_RTFEEDBACK_DATA": 28,
    "IS_SURFACECOILCORRECTIONSCAN_DATA": 29,
    "IS_PHASE_STABILIZATION_REFERENCE": 30,
    "IS_PHASE_STABILIZATION": 31,
    "COMPRESSION1": 53, "COMPRESSION2": 54, "COMPRESSION3": 55, "COMPRESSION4": 56,
    "USER1": 57, "USER2": 58, "USER3": 59, "USER4": 60,
    "USER5": 61, "USER6": 62, "USER7": 63, "USER8": 64,
}  # fmt: skip

#: Flags of acquisitions that carry no image data (left out of every reconstruction).
NOT_IMAGING: tuple[str, ...] = (
    "IS_HPFEEDBACK_DATA", "IS_DUMMYSCAN_DATA", "IS_RTFEEDBACK_DATA",
    "IS_SURFACECOILCORRECTIONSCAN_DATA", "IS_PHASE_STABILIZATION_REFERENCE",
    "IS_PHASE_STABILIZATION",
)  # fmt: skip

#: Pulseq label (LABELSET/LABELINC) → ISMRMRD ``idx`` encoding counter.
LABEL_COUNTERS: dict[str, str] = {
    "LIN": "kspace_encode_step_1", "PAR": "kspace_encode_step_2", "SLC": "slice",
    "ECO": "contrast", "SET": "set", "REP": "repetition", "AVG": "average",
    "PHS": "phase", "SEG": "segment",
}  # fmt: skip

#: Pulseq parallel-imaging flag labels ``(REF, IMA)`` → ISMRMRD acquisition flag: a
#: calibration (ACS) line that is also imaging data, and a line of a separate reference
#: scan (calibration only). ``(0, *)`` is plain imaging data.
PARALLEL_LABEL_FLAGS: dict[tuple[int, int], str] = {
    (1, 1): "IS_PARALLEL_CALIBRATION_AND_IMAGING",
    (1, 0): "IS_PARALLEL_CALIBRATION",
}


def flag_mask(*names: str | int) -> np.uint64:
    """Bit mask of one or more flags, given by name (``"IS_REVERSE"``) or number (22).

    Parameters
    ----------
    *names : str or int
        Flag names from :data:`FLAGS` (an ``ACQ_`` prefix is accepted) or 1-based numbers.

    Returns
    -------
    numpy.uint64
    """
    mask = 0
    for name in names:
        if isinstance(name, str):
            key = name.removeprefix("ACQ_")
            if key not in FLAGS:
                raise KeyError(f"unknown ISMRMRD acquisition flag {name!r}")
            number = FLAGS[key]
        else:
            number = int(name)
        mask |= 1 << (number - 1)
    return np.uint64(mask)


def has_flag(flags: Any, name: str | int) -> Any:
    """Whether ``flags`` (an int, or an array of them) has flag ``name`` set.

    Returns a bool for a scalar and a boolean array for an array.
    """
    mask = int(flag_mask(name))
    if isinstance(flags, np.ndarray):
        return (flags.astype(np.uint64) & np.uint64(mask)) != 0
    return bool(int(flags) & mask)
