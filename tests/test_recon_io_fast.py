"""The vectorised Cartesian sort and prewhitening against a plain line-by-line loop.

``reference_sort`` below is the straightforward loop over readouts (one ``+=`` per line,
then division by the line count); the vectorised :func:`mrharmony.recon.io.sort_cartesian`
must give exactly the same buffers (``np.array_equal``, no tolerance: the same float
operations in the same order) and raise the same errors, for scans with reversed
lines, readout oversampling, asymmetric echoes, partial and interleaved coverage,
averages, separate and in-line calibration lines, navigators, partitions and several
slices, contrasts, repetitions and sets.
"""

from __future__ import annotations

import ismrmrd
import ismrmrd.xsd as mrd
import numpy as np
import pytest
from test_recon_io import make_header

from mrharmony.errors import RawDataError
from mrharmony.recon import io as recon_io
from mrharmony.recon.io import (
    _cell_index,
    _sort_cartesian,
    apply_prewhitening,
    noise_prewhitener,
    sort_cartesian,
    split_special,
)

FLAG_NOISE, FLAG_CALIB, FLAG_CALIB_AND_IMAGING, FLAG_REVERSE = 19, 20, 21, 22
FLAG_NAVIGATION, FLAG_PHASECORR, FLAG_DUMMYSCAN = 23, 24, 27
NOT_IMAGING = (26, 27, 28, 29, 30, 31)


def has(a, flag: int) -> bool:
    return bool(int(a.flags) & (1 << (flag - 1)))


def reference_split(acqs):
    out = {"noise": [], "navigation": [], "other": [], "imaging": []}
    for a in acqs:
        if has(a, FLAG_NOISE):
            out["noise"].append(a)
        elif has(a, FLAG_NAVIGATION) or has(a, FLAG_PHASECORR):
            out["navigation"].append(a)
        elif any(has(a, f) for f in NOT_IMAGING):
            out["other"].append(a)
        else:
            out["imaging"].append(a)
    return out


def reference_sort(header, acqs):
    """Line-by-line sort: (slice, contrast, repetition, set) -> (k, mask, kc, cmask, ro, ref)."""
    lines = reference_split(acqs)["imaging"]
    enc = header.encoding[0]
    ny, nz = int(enc.encodedSpace.matrixSize.y), int(enc.encodedSpace.matrixSize.z or 1)
    offsets = []
    for name, n in (("kspace_encoding_step_1", ny), ("kspace_encoding_step_2", nz)):
        lim = getattr(enc.encodingLimits, name, None)
        offsets.append(n // 2 - (n // 2 if lim is None or lim.center is None else lim.center))
    oy, oz = offsets
    nx = max(int(enc.encodedSpace.matrixSize.x), max(int(a.number_of_samples) for a in lines))
    nc = int(lines[0].active_channels)
    groups = {}
    for a in lines:
        groups.setdefault((a.idx.slice, a.idx.contrast, a.idx.repetition, a.idx.set), []).append(a)
    out = {}
    for key, group in groups.items():
        k = np.zeros((nc, nx, ny, nz), np.complex64)
        counts = np.zeros((ny, nz), np.int32)
        kc, ccounts, ro = None, np.zeros((ny, nz), np.int32), np.zeros(nx, bool)
        for a in group:
            ns = int(a.number_of_samples)
            centre = int(a.center_sample) if a.center_sample else ns // 2
            start = nx // 2 - centre
            if start < 0 or start + ns > nx:
                raise RawDataError(
                    f"slice {key[0]} line {a.idx.kspace_encode_step_1}: {ns} samples with "
                    f"centre {centre} do not fit the encoded readout of {nx}")
            data = a.data[:, ::-1] if has(a, FLAG_REVERSE) else a.data
            y, z = a.idx.kspace_encode_step_1 + oy, a.idx.kspace_encode_step_2 + oz
            if not (0 <= y < ny and 0 <= z < nz):
                raise RawDataError(
                    f"slice {key[0]}: line ({a.idx.kspace_encode_step_1}, "
                    f"{a.idx.kspace_encode_step_2}) is outside the encoded matrix {ny} x {nz}")
            if has(a, FLAG_CALIB) and not has(a, FLAG_CALIB_AND_IMAGING):
                kc = np.zeros_like(k) if kc is None else kc
                kc[:, start:start + ns, y, z] += data
                ccounts[y, z] += 1
                continue
            k[:, start:start + ns, y, z] += data
            counts[y, z] += 1
            ro[start:start + ns] = True
        mask = counts > 0
        if not mask.any():
            raise RawDataError(f"slice {key[0]}: only calibration lines, no imaging lines")
        k[:, :, mask] /= counts[mask][None, None, :]
        cmask = None
        if kc is not None:
            cmask = ccounts > 0
            kc[:, :, cmask] /= ccounts[cmask][None, None, :]
        out[key] = (k, mask, kc, cmask, ro, group[0])
    return out


def line(rng, nc: int, ns: int, *, y: int, z: int = 0, centre: int = 0, key=(0, 0, 0, 0),
         flags=()):
    data = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns)))
    a = ismrmrd.Acquisition.from_array(data.astype(np.complex64))
    a.idx.kspace_encode_step_1, a.idx.kspace_encode_step_2 = y, z
    a.idx.slice, a.idx.contrast, a.idx.repetition, a.idx.set = key
    a.center_sample = centre
    a.sample_time_us = 5.0
    for f in flags:
        a.set_flag(f)
    return a


def messy_scan(seed: int = 0, *, nc: int = 3, nx: int = 16, ny: int = 12, nz: int = 4):
    """Header (2x readout oversampling, off-centre ky/kz limits) and a shuffled scan of
    two slices x two contrasts x two repetitions (+ one set) with every complication."""
    rng = np.random.default_rng(seed)
    header = make_header(nx, ny, nz=nz, os_=2, coils=nc, center_y=ny // 2 - 2)
    header.encoding[0].encodingLimits.kspace_encoding_step_2 = mrd.limitType(
        minimum=0, maximum=nz - 2, center=nz // 2 - 1)
    ex = 2 * nx  # encoded readout
    acqs = []
    keys = [(s, c, r, 0) for s in range(2) for c in range(2) for r in range(2)] + [(1, 0, 0, 1)]
    for gi, key in enumerate(keys):
        # partial coverage: every group misses some lines, a few a whole ky block
        steps1 = [y for y in range(ny - 2) if (y + gi) % 5 != 0 and not (gi == 3 and y < 4)]
        for y in steps1:
            for z in range(nz - 1):
                flags = [FLAG_REVERSE] if (y + z) % 3 == 0 else []
                if gi % 2 and y == 5:
                    flags.append(FLAG_CALIB_AND_IMAGING)
                # asymmetric echo on some lines (own readout window), centre 0 = ns // 2
                if (y + gi) % 4 == 1:
                    acqs.append(line(rng, nc, 3 * ex // 4, y=y, z=z, centre=ex // 4, key=key,
                                     flags=flags))
                else:
                    acqs.append(line(rng, nc, ex, y=y, z=z, centre=0 if z else ex // 2,
                                     key=key, flags=flags))
        # averages: some cells two or three times, reversed or not, other window too
        for y, n_more in ((1, 1), (6, 2), (7, 1)):
            for rep in range(n_more):
                flags = [FLAG_REVERSE] if rep % 2 == 0 else []
                ns, centre = (ex, ex // 2) if rep < 1 else (3 * ex // 4, ex // 4)
                acqs.append(line(rng, nc, ns, y=y, z=1, centre=centre, key=key, flags=flags))
        # separate calibration lines (one of them twice), a navigator, a dummy scan
        if gi in (0, 5):
            for y in (4, 5, 5, 6):
                acqs.append(line(rng, nc, ex, y=y, z=0, key=key, flags=[FLAG_CALIB]))
        acqs.append(line(rng, nc, ex, y=0, key=key, flags=[FLAG_NAVIGATION]))
        acqs.append(line(rng, nc, ex, y=ny + 50, key=key, flags=[FLAG_DUMMYSCAN]))
    order = rng.permutation(len(acqs))
    return header, [acqs[i] for i in order]


def assert_same_buffers(ours, ref):
    assert list(ours) == list(ref)  # same keys, in order of first appearance
    for key, buf in ours.items():
        k, mask, kc, cmask, ro, first = ref[key]
        assert buf.kspace.dtype == np.complex64 and buf.kspace.flags.c_contiguous
        # exact: same float operations in the same order as the loop
        assert np.array_equal(buf.kspace, k), key
        assert np.array_equal(buf.mask, mask) and np.array_equal(buf.readout_mask, ro)
        assert (buf.calib is None) == (kc is None) and (buf.calib_mask is None) == (cmask is None)
        if kc is not None:
            assert np.array_equal(buf.calib, kc) and np.array_equal(buf.calib_mask, cmask)
        assert buf.reference is first


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_sort_equals_line_loop(seed):
    header, acqs = messy_scan(seed)
    ref = reference_sort(header, acqs)
    ours = sort_cartesian(header, acqs)
    assert len(ours) == 9
    # the scan really exercises averages, calibration and readout windows
    assert any(b.calib is not None for b in ours.values())
    assert not all(b.mask.all() for b in ours.values())
    assert_same_buffers(ours, ref)


def test_fused_prewhitening_equals_whitened_copies_then_loop():
    header, acqs = messy_scan(2)
    rng = np.random.default_rng(3)
    nc = 3
    noise = rng.standard_normal((nc, 4000)) + 1j * rng.standard_normal((nc, 4000))
    mix = np.array([[1.0, 0.3, 0.0], [0.2, 1.5, 0.1], [0.0, 0.4, 0.8]])
    noise_acq = ismrmrd.Acquisition.from_array((mix @ noise).astype(np.complex64))
    noise_acq.set_flag(FLAG_NOISE)
    noise_acq.sample_time_us = 5.0
    w = noise_prewhitener([noise_acq], dwell_us=5.0)
    # the batched product is bit-identical to one product per readout
    white = apply_prewhitening(acqs, w)
    for a, b in zip(acqs, white, strict=True):
        assert np.array_equal(b.data, (w @ a.data).astype(np.complex64))
        assert b.data.dtype == np.complex64 and b.getHead() == a.getHead()
    ref = reference_sort(header, white)
    ours = _sort_cartesian(header, split_special(acqs)["imaging"], whitener=w)
    # the fused path keeps the original acquisitions as references
    ref = {key: (*v[:5], next(a for a, b in zip(acqs, white, strict=True) if b is v[5]))
           for key, v in ref.items()}
    assert_same_buffers(ours, ref)


def test_split_special_equals_loop():
    rng = np.random.default_rng(4)
    flag_sets = [(), (FLAG_NOISE,), (FLAG_NAVIGATION,), (FLAG_PHASECORR,), (FLAG_DUMMYSCAN,),
                 (FLAG_NOISE, FLAG_NAVIGATION), (FLAG_NAVIGATION, 26), (29,), (FLAG_REVERSE,),
                 (FLAG_CALIB,), (31, FLAG_CALIB_AND_IMAGING), (64,)]
    acqs = [line(rng, 2, 4, y=i, flags=flag_sets[i % len(flag_sets)]) for i in range(40)]
    ours, ref = split_special(acqs), reference_split(acqs)
    assert list(ours) == list(ref)
    for name in ref:
        assert [id(a) for a in ours[name]] == [id(a) for a in ref[name]], name
    assert split_special([]) == {"noise": [], "navigation": [], "other": [], "imaging": []}


@pytest.mark.parametrize("chunk_bytes", [1, 2000])
def test_chunked_stacking_equals_line_loop(monkeypatch, chunk_bytes):
    # 1 byte: one readout per chunk; 2000 bytes: 2-3 readouts (3 coils x 24-32 samples)
    monkeypatch.setattr(recon_io, "_CHUNK_BYTES", chunk_bytes)
    header, acqs = messy_scan(9)
    assert_same_buffers(sort_cartesian(header, acqs), reference_sort(header, acqs))


def test_ordered_and_undersampled_lines_equal_line_loop():
    """Descending, ascending-by-2 (R = 2) and centre-out orders: the slice fast path."""
    rng = np.random.default_rng(10)
    nc, nx, ny = 2, 8, 16
    header = make_header(nx, ny, coils=nc)
    orders = {
        (0, 0, 0, 0): list(range(ny - 1, -1, -1)),  # down to line 0 (slice stop None)
        (0, 1, 0, 0): list(range(ny - 1, 2, -3)),   # down in steps of 3, not to 0
        (1, 0, 0, 0): list(range(0, ny, 2)),        # R = 2
        (1, 0, 1, 0): [8, 7, 9, 6, 10, 5, 11],      # centre-out (fancy indexing)
        (2, 0, 0, 0): [4],                          # a single line
    }
    acqs = [line(rng, nc, nx, y=y, key=key, flags=[FLAG_REVERSE] if y % 3 else [])
            for key, ys in orders.items() for y in ys]
    assert_same_buffers(sort_cartesian(header, acqs), reference_sort(header, acqs))
    assert _cell_index(np.array([15, 14, 13])) == slice(15, 12, -1)
    assert _cell_index(np.array([2, 1, 0])) == slice(2, None, -1)
    assert isinstance(_cell_index(np.array([3, 3])), np.ndarray)


def corrupt(kind: str):
    """A messy scan with bad lines: two per kind in the first buffer, so the message
    must name the first in acquisition order."""
    header, acqs = messy_scan(5)
    rng = np.random.default_rng(6)
    imaging = [a for a in acqs if not (has(a, FLAG_NAVIGATION) or has(a, FLAG_DUMMYSCAN))]
    first = [a for a in imaging if a.idx.slice == imaging[0].idx.slice
             and a.idx.contrast == imaging[0].idx.contrast
             and a.idx.repetition == imaging[0].idx.repetition and a.idx.set == imaging[0].idx.set]
    if kind == "ky":
        first[7].idx.kspace_encode_step_1 = 41
        first[3].idx.kspace_encode_step_1 = 40
    elif kind == "kz":
        first[9].idx.kspace_encode_step_2 = 3  # offset 1 -> z = 4 = nz
        first[12].idx.kspace_encode_step_2 = 7
    elif kind == "readout":
        first[11].center_sample = 2  # a line centred at 2 overruns the end of 32 samples
        first[3].center_sample = 1
    elif kind == "mixed":
        first[4].idx.kspace_encode_step_1 = 40
        first[2].center_sample = 1
        imaging[-1].idx.kspace_encode_step_1 = 44
    elif kind == "calib-only":
        acqs = [a for a in acqs if a.idx.slice == 0 or has(a, FLAG_NAVIGATION)]
        acqs += [line(rng, 3, 32, y=4, key=(5, 0, 0, 0), flags=[FLAG_CALIB])]
    return header, acqs


@pytest.mark.parametrize("kind", ["ky", "kz", "readout", "mixed", "calib-only"])
def test_errors_match_the_loop(kind):
    header, acqs = corrupt(kind)
    with pytest.raises(RawDataError) as ref:
        reference_sort(header, acqs)
    with pytest.raises(RawDataError) as ours:
        sort_cartesian(header, acqs)
    # the same first offending line (in the loop's order) and the same message
    assert str(ours.value) == str(ref.value)


def test_channel_mismatches_are_rawdataerrors():
    header, acqs = messy_scan(7)
    rng = np.random.default_rng(8)
    odd = line(rng, 2, 32, y=3, key=(0, 0, 0, 0))
    with pytest.raises(RawDataError, match="2 channels, the first has 3"):
        sort_cartesian(header, [*acqs, odd])
    w = np.eye(4, dtype=np.complex64)
    with pytest.raises(RawDataError, match=r"4 x 4 channels, .* have 3 channels"):
        apply_prewhitening(acqs, w)
    with pytest.raises(RawDataError, match="4 x 4 channels"):
        _sort_cartesian(header, split_special(acqs)["imaging"], whitener=w)
    with pytest.raises(RawDataError, match="no imaging acquisitions"):
        sort_cartesian(header, [a for a in acqs if has(a, FLAG_NAVIGATION)])
