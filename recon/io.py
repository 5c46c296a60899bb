"""Raw data into k-space: split noise scans, prewhiten, sort into k-space arrays.

Raw data arrive as :class:`mrharmony.formats.raw.RawData` (read by
:func:`mrharmony.formats.raw.load_raw` from ISMRMRD, MRD v2 or twix + ``.seq``).
:func:`sort_cartesian` places Cartesian readouts into ``(coils, kx, ky, kz)`` arrays per
``(slice, contrast, repetition, set)`` using the counters, honouring the flags:
noise scans, navigator and phase-correction lines (left out), reversed lines (flipped),
parallel-calibration lines (calibration buffer only) and parallel calibration *and*
imaging lines (both). Averages are averaged. Asymmetric echoes are placed so that
``center_sample`` lands on ``kx = nx // 2``.

Sorting works on stacked arrays (it runs for every slice a streaming server receives):
flags and counters are read once into integer arrays, the readouts of a buffer are
stacked once (in bounded chunks), prewhitened with one batched matrix product and
placed with one slice or fancy index per readout window. The results are bit-identical
to a line-by-line loop (``tests/test_recon_io_fast.py`` checks that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.errors import RawDataError, ReconError
from mrharmony.formats.flags import NOT_IMAGING, flag_mask
from mrharmony.formats.raw import encoded_offsets, encoding_of

__all__ = [
    "CalibrationLines",
    "CartesianBuffer",
    "apply_prewhitening",
    "check_not_empty",
    "noise_prewhitener",
    "sort_cartesian",
    "split_special",
]

_NOT_IMAGING = flag_mask(*NOT_IMAGING)
_NAVIGATION = flag_mask("IS_NAVIGATION_DATA", "IS_PHASECORR_DATA")
_NOISE = flag_mask("IS_NOISE_MEASUREMENT")
_CALIB = flag_mask("IS_PARALLEL_CALIBRATION")
_CALIB_AND_IMAGING = flag_mask("IS_PARALLEL_CALIBRATION_AND_IMAGING")
_REVERSE = flag_mask("IS_REVERSE")


_ROLES = ("noise", "navigation", "other", "imaging")  # split_special's keys, by role code


def _flags_array(acquisitions: list[Any]) -> np.ndarray:
    """The ``flags`` field of every acquisition, read once (uint64, one per acquisition)."""
    return np.fromiter(
        (int(a.flags) for a in acquisitions), dtype=np.uint64, count=len(acquisitions)
    )


def _role_codes(flags: np.ndarray) -> np.ndarray:
    """Index into :data:`_ROLES` per acquisition; noise wins over navigation over other."""
    role = np.full(flags.shape, 3, np.int8)
    role[(flags & _NOT_IMAGING) != 0] = 2
    role[(flags & _NAVIGATION) != 0] = 1
    role[(flags & _NOISE) != 0] = 0
    return role


def split_special(acquisitions: list[Any]) -> dict[str, list[Any]]:
    """Split acquisitions by role: ``noise``, ``navigation`` (incl. phase correction),
    ``other`` (feedback, dummy scans) and ``imaging``.

    The flags are read once into an array and classified vectorised; every list keeps
    the input order.
    """
    out: dict[str, list[Any]] = {name: [] for name in _ROLES}
    lists = [out[name] for name in _ROLES]
    roles = _role_codes(_flags_array(acquisitions)).tolist()
    for a, role in zip(acquisitions, roles, strict=True):
        lists[role].append(a)
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


def _whiten(stack: np.ndarray, whitener: np.ndarray, *, what: str) -> np.ndarray:
    """``whitener @ stack[i]`` for every readout of a ``(n, coils, samples)`` stack.

    One batched :func:`numpy.matmul` (the same BLAS product per readout as a loop, so
    the result is bit-identical to one); complex64 out.
    """
    if whitener.shape != (stack.shape[1], stack.shape[1]):
        raise RawDataError(
            f"noise scans: the prewhitening matrix is {whitener.shape[0]} x "
            f"{whitener.shape[1]} channels, {what} have {stack.shape[1]} channels"
        )
    return np.matmul(whitener, stack).astype(np.complex64, copy=False)


def apply_prewhitening(acquisitions: list[Any], whitener: np.ndarray | None) -> list[Any]:
    """Return copies of the acquisitions with ``whitener @ data`` (identity when None).

    Readouts of equal shape are stacked once and whitened with one batched matrix
    product (bit-identical to a product per readout).

    Raises
    ------
    RawDataError
        If an acquisition's channel count differs from the whitener's.
    """
    import ismrmrd

    if whitener is None:
        return list(acquisitions)
    datas = [np.asarray(a.data) for a in acquisitions]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, d in enumerate(datas):
        by_shape.setdefault(d.shape, []).append(i)
    white: list[Any] = [None] * len(datas)
    for index in by_shape.values():
        stack = _whiten(np.stack([datas[i] for i in index]), whitener,
                        what=f"acquisition {index[0]}")
        for j, i in enumerate(index):
            white[i] = stack[j]
    return [
        ismrmrd.Acquisition(a.getHead(), data=d, trajectory=a.traj)
        for a, d in zip(acquisitions, white, strict=True)
    ]


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


@dataclass
class CalibrationLines:
    """Every parallel-calibration line of one ``(slice, contrast, repetition, set)``.

    Lines flagged ``IS_PARALLEL_CALIBRATION`` *or* ``IS_PARALLEL_CALIBRATION_AND_IMAGING``
    (the ACS lines, wherever they sit), averaged per cell; what a parallel-imaging
    reconstruction calibrates on. Keys that hold only calibration lines (a separate
    reference scan) have one too.

    Attributes
    ----------
    kspace : numpy.ndarray
        complex64 ``(coils, nx, ny, nz)``, zeros where no calibration line was measured.
    mask : numpy.ndarray
        bool ``(ny, nz)``.
    readout_mask : numpy.ndarray
        bool ``(nx,)``.
    """

    kspace: np.ndarray
    mask: np.ndarray
    readout_mask: np.ndarray


def sort_cartesian(header: Any, acquisitions: list[Any]) -> dict[tuple[int, int, int, int], Any]:
    """Sort Cartesian acquisitions into k-space buffers.

    Counters and flags are read once into integer arrays, the readouts of a buffer are
    stacked once and placed with fancy indexing (repeated lines, i.e. averages, are
    summed in acquisition order and divided by their count, as a line-by-line loop
    would).

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
    acquisitions : list of ismrmrd.Acquisition
        Imaging and calibration lines (noise and navigators are ignored here).

    Returns
    -------
    dict
        ``(slice, contrast, repetition, set) -> CartesianBuffer``, in order of first
        appearance.

    Raises
    ------
    RawDataError
        If a line falls outside the encoded matrix, readouts are longer than it, lines
        have different channel counts, or a buffer has only calibration lines.
    """
    return _sort_cartesian(header, split_special(acquisitions)["imaging"])


# columns of _line_table
_SAMPLES, _CENTRE, _CHANNELS, _STEP1, _STEP2 = range(5)
_KEY = slice(5, 9)  # slice, contrast, repetition, set


def _line_table(lines: list[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Header fields of every line, read once, and the lines' data arrays.

    Returns ``(table, data)``: ``table`` is ``(n, 9)`` int64 with the columns named
    above (samples and channels from the data's shape, which the header fields
    ``number_of_samples``/``active_channels`` describe), ``data`` the ``(channels,
    samples)`` arrays.
    """
    data = [np.asarray(a.data) for a in lines]
    bad = next((i for i, d in enumerate(data) if d.ndim != 2), None)
    if bad is not None:
        raise RawDataError(
            f"imaging line {bad}: data of shape {data[bad].shape}, expected (channels, samples)"
        )
    rows = [
        (d.shape[1], a.center_sample, d.shape[0], i.kspace_encode_step_1,
         i.kspace_encode_step_2, i.slice, i.contrast, i.repetition, i.set)
        for a, d in zip(lines, data, strict=True)
        for i in (a.idx,)
    ]
    return np.array(rows, dtype=np.int64).reshape(len(lines), 9), data


def _groups(keys: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """``(key, line indices)`` per distinct row of ``keys``, keys in order of first
    appearance, indices ascending."""
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    members = np.split(
        np.argsort(inverse, kind="stable"),
        np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1],
    )
    return [(tuple(int(v) for v in uniq[g]), members[g]) for g in np.argsort(first)]


def _occurrence(cells: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries have the same value (0 for the first)."""
    order = np.argsort(cells, kind="stable")
    ordered = cells[order]
    pos = np.arange(cells.size)
    new = np.ones(cells.size, bool)
    new[1:] = ordered[1:] != ordered[:-1]
    rank = np.empty(cells.size, np.int64)
    rank[order] = pos - np.maximum.accumulate(np.where(new, pos, 0))
    return rank


_CHUNK_BYTES = 64 * 2**20  # readouts stacked at once by _place (complex64 bytes)


def _cell_index(cells: np.ndarray) -> slice | np.ndarray:
    """``cells`` as a slice when they are evenly spaced (a view, cheaper to assign
    through than fancy indexing), else unchanged."""
    if cells.size == 1:
        return slice(int(cells[0]), int(cells[0]) + 1)
    step = int(cells[1] - cells[0])
    if step == 0 or np.any(np.diff(cells) != step):
        return cells
    stop = int(cells[-1]) + step
    return slice(int(cells[0]), stop if stop >= 0 else None, step)


def _place(
    data: list[np.ndarray],
    index: np.ndarray,
    *,
    start: np.ndarray,
    samples: np.ndarray,
    cell: np.ndarray,
    reverse: np.ndarray,
    whitener: np.ndarray | None,
    shape: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place the lines ``index`` into a k-space buffer.

    Returns ``(kspace, counts, readout_mask)``: complex64 ``(coils, nx, ny, nz)``
    averaged over repeated lines, int32 ``(ny, nz)`` lines per cell, bool ``(nx,)``.
    The readouts are stacked per readout window (one for the usual equal-length lines),
    whitened with one batched product, flipped where reversed and assigned with one
    (fancy or, for evenly spaced lines, slice) index per window; the ``r``-th
    repetition of a cell is added in round ``r``, so every cell sums its lines in
    acquisition order, as a line-by-line loop does.
    """
    nc, nx, ny, nz = shape
    kspace = np.zeros((nc, nx, ny * nz), np.complex64)
    ro_mask = np.zeros(nx, bool)
    cells = cell[index]
    rank = _occurrence(cells)
    windows = np.stack([start[index], samples[index]], axis=1)
    per_window = []
    for s, ns in np.unique(windows, axis=0).tolist():
        per_window.append((s, ns, np.flatnonzero((windows[:, 0] == s) & (windows[:, 1] == ns))))
        ro_mask[s:s + ns] = True
    for r in range(int(rank.max()) + 1):
        for s, ns, sel in per_window:
            now = sel[rank[sel] == r]
            # stacked in chunks of <= _CHUNK_BYTES, so large 3-D scans need little extra memory
            step = max(1, _CHUNK_BYTES // (nc * ns * 8))
            for lo in range(0, now.size, step):
                part = now[lo:lo + step]
                lines = index[part]
                stack = np.stack([data[i] for i in lines])
                if whitener is not None:
                    stack = _whiten(stack, whitener, what=f"imaging line {int(lines[0])}")
                flip = reverse[lines]
                if flip.any():
                    stack[flip] = stack[flip][:, :, ::-1]
                target = _cell_index(cells[part])
                if r == 0:
                    kspace[:, s:s + ns, target] = stack.transpose(1, 2, 0)
                else:
                    kspace[:, s:s + ns, target] += stack.transpose(1, 2, 0)
    counts = np.bincount(cells, minlength=ny * nz).astype(np.int32)
    repeated = counts > 1
    if repeated.any():
        kspace[:, :, repeated] /= counts[repeated]
    return kspace.reshape(nc, nx, ny, nz), counts.reshape(ny, nz), ro_mask


def _sort_cartesian(
    header: Any,
    lines: list[Any],
    *,
    whitener: np.ndarray | None = None,
    calibration: dict[tuple[int, int, int, int], CalibrationLines] | None = None,
) -> dict[tuple[int, int, int, int], CartesianBuffer]:
    """:func:`sort_cartesian` of imaging/calibration ``lines`` (navigators and noise
    already split off), each readout multiplied by ``whitener`` first when given.

    With a ``calibration`` dict, every key with calibration lines (flagged
    ``IS_PARALLEL_CALIBRATION`` or ``..._AND_IMAGING``) gets a :class:`CalibrationLines`
    in it, and keys that hold only calibration lines (a separate reference scan) are
    kept there instead of raising."""
    if not lines:
        raise RawDataError("no imaging acquisitions to sort (only noise/navigator lines)")
    ny, nz, oy, oz = encoded_offsets(header, lines[0])
    enc = encoding_of(header, lines[0])
    table, data = _line_table(lines)
    flags = _flags_array(lines)
    samples = table[:, _SAMPLES]
    nx = max(int(enc.encodedSpace.matrixSize.x), int(samples.max()))
    nc = int(table[0, _CHANNELS])
    odd = np.flatnonzero(table[:, _CHANNELS] != nc)
    if odd.size:
        i = int(odd[0])
        raise RawDataError(
            f"imaging line {i} has {int(table[i, _CHANNELS])} channels, the first has {nc}"
        )
    centre = np.where(table[:, _CENTRE] > 0, table[:, _CENTRE], samples // 2)
    start = nx // 2 - centre
    y = table[:, _STEP1] + oy
    z = table[:, _STEP2] + oz
    bad = (start < 0) | (start + samples > nx) | (y < 0) | (y >= ny) | (z < 0) | (z >= nz)
    calib_only = ((flags & _CALIB) != 0) & ((flags & _CALIB_AND_IMAGING) == 0)
    calib_any = (flags & (_CALIB | _CALIB_AND_IMAGING)) != 0
    placement = {
        "start": start, "samples": samples, "cell": y * nz + z,
        "reverse": (flags & _REVERSE) != 0, "whitener": whitener,
        "shape": (nc, nx, ny, nz),
    }
    out = {}
    for key, members in _groups(table[:, _KEY]):
        wrong = members[bad[members]]
        if wrong.size:
            i = int(wrong[0])
            step1, step2 = int(table[i, _STEP1]), int(table[i, _STEP2])
            if start[i] < 0 or start[i] + samples[i] > nx:
                raise RawDataError(
                    f"slice {key[0]} line {step1}: {int(samples[i])} samples with "
                    f"centre {int(centre[i])} do not fit the encoded readout of {nx}"
                )
            raise RawDataError(
                f"slice {key[0]}: line ({step1}, {step2}) is outside the encoded matrix "
                f"{ny} x {nz}"
            )
        if calibration is not None:
            acs = members[calib_any[members]]
            if acs.size:
                ka, acounts, aro = _place(data, acs, **placement)
                calibration[key] = CalibrationLines(ka, acounts > 0, aro)
        imaging = members[~calib_only[members]]
        if not imaging.size:
            if calibration is not None:
                continue
            raise RawDataError(f"slice {key[0]}: only calibration lines, no imaging lines")
        k, counts, ro_mask = _place(data, imaging, **placement)
        kc = cmask = None
        calib = members[calib_only[members]]
        if calib.size:
            kc, ccounts, _ = _place(data, calib, **placement)
            cmask = ccounts > 0
        out[key] = CartesianBuffer(k, counts > 0, kc, cmask, ro_mask, lines[int(members[0])])
    return out


def check_not_empty(acquisitions: list[Any]) -> None:
    """Refuse acquisitions without samples or channels before they reach the recon.

    Parameters
    ----------
    acquisitions : list of ismrmrd.Acquisition

    Raises
    ------
    ReconError
        Naming the first acquisition with 0 samples or 0 active channels (the Cartesian
        sorter divides by ``samples x channels``).
    """
    for i, acq in enumerate(acquisitions):
        ns, nc = int(acq.number_of_samples), int(acq.active_channels)
        if ns == 0 or nc == 0:
            raise ReconError(
                f"acquisition {i} of the group (scan counter {int(acq.scan_counter)}, slice "
                f"{int(acq.idx.slice)}, line {int(acq.idx.kspace_encode_step_1)}) is empty: "
                f"{ns} samples x {nc} channels")
