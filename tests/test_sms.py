"""Simultaneous multi-slice (SMS) gre2d: multiband pulse, CAIPI, header, simulation, recon.

The physics case: a 3-D phantom (32 x 32 in-plane, 1.25 mm voxels through z) with two
distinct objects, a disc + square in the slice at z = -15 mm and a cross (0.8 PD) in the
slice at z = +15 mm, scanned with gre2d (5 mm slices, 25 mm gap, 32 x 32, TR 1000 ms, one
dummy scan) on a 16-channel site (philips-ingenia-1.5t), noise off. Measured (this file's
setup): the simulated collapsed k-space equals the sum of the two single-band references
with the CAIPI phase to NRMSE 0.0014 (FOV/2) and 0.0012 (FOV/4; the opposite sign 0.73);
slice-SENSE NRMSE against the separate single-band simulation 0.007 / 0.008, split-slice
GRAPPA 0.021 / 0.015; leakage (energy of one slice's object in the other reconstructed
slice) below 1e-3 for both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.formats.flags import has_flag
from mrharmony.formats.header import header_to_xml, parse_ismrmrd_header
from mrharmony.formats.layout import layout_from_seq
from mrharmony.formats.pulseq import read_pulseq
from mrharmony.sequences import build
from mrharmony.sequences.builders._sms import band_phases
from mrharmony.sequences.io import write_seq
from mrharmony.sequences.protocol import protocol_from_mapping

SITE = "philips-ingenia-1.5t"  # 16 receive channels
N, FOV = 32, 220.0
BASE = {"builder": "gre2d", "name": "sms", "fov_mm": [FOV, FOV], "matrix": [N, N],
        "slice_thickness_mm": 5, "slice_gap_mm": 25, "n_slices": 2, "te_ms": 5,
        "tr_ms": 1000, "flip_deg": 30, "dummy_scans": 1}
GAMMA = 42.576e6


def _nrmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------ protocol and refusals


def test_protocol_keys_defaults_and_refusals():
    p = protocol_from_mapping({**BASE, "multiband_factor": 2})
    assert p.caipi_shift_fraction == 0.5 and p.reference_lines == N
    assert protocol_from_mapping(BASE).caipi_shift_fraction == 0.0
    bad = [({"n_slices": 3, "multiband_factor": 2}, "n_slices"),
           ({"multiband_factor": 2, "caipi_shift": 0.3}, "caipi_shift"),
           ({"caipi_shift": 0.5}, "caipi_shift"),
           ({"multiband_factor": 2, "acceleration": 2}, "multiband_factor"),
           ({"multiband_factor": 2, "fat_suppression": "water_excitation"}, "multiband_factor"),
           ({"multiband_factor": 2, "multiband_reference_lines": 40}, "multiband_reference_lines")]
    for changes, key in bad:
        with pytest.raises(ProtocolError, match=key):
            protocol_from_mapping({**BASE, **changes})
    with pytest.raises(ValueError, match="multiband_factor"):
        protocol_from_mapping({**BASE, "n_slices": 5, "multiband_factor": 5})


def test_multiband_pulse_above_peak_b1_is_refused_naming_the_limit(tmp_path):
    # 90 deg, 2 ms sinc: 11.6 uT per band; MB 2 sums to 23.2 uT > 20 uT (max_b1_ut)
    p = protocol_from_mapping({**BASE, "flip_deg": 90, "multiband_factor": 2})
    with pytest.raises(ProtocolError, match=r"multiband_factor.*23\.2 uT.*20 uT.*max_b1_ut"):
        build(p, "siemens-prisma")
    # the single-band protocol is fine
    build(protocol_from_mapping({**BASE, "flip_deg": 90}), "siemens-prisma")


def test_wong_phases_lower_the_peak_b1_of_mb3():
    base = {**BASE, "n_slices": 3, "multiband_factor": 3, "caipi_shift": 0.0}
    zero = build(protocol_from_mapping({**base, "multiband_phases": "zero"}), "siemens-prisma")
    wong = build(protocol_from_mapping({**base, "multiband_phases": "wong"}), "siemens-prisma")
    b1_zero = float(zero.get_definition("MultibandPeakB1"))
    b1_wong = float(wong.get_definition("MultibandPeakB1"))
    sb = build(protocol_from_mapping(BASE), "siemens-prisma")
    rf = next(sb.get_block(i).rf for i in sb.block_events if sb.get_block(i).rf is not None)
    single = float(np.max(np.abs(rf.signal))) / GAMMA * 1e6
    # in-phase bands add at the pulse centre: MB x the single band
    assert b1_zero == pytest.approx(3 * single, rel=1e-3)
    assert b1_wong < 0.85 * b1_zero
    assert np.allclose(band_phases(3, "wong"), [0.0, 0.73, 4.602])


# ------------------------------------------------------------------ pulse, labels, header


def _built(tmp_path: Path, **changes):
    p = protocol_from_mapping({**BASE, **changes})
    seq = build(p, SITE)
    path = tmp_path / "s.seq"
    write_seq(seq, path)
    return p, seq, read_pulseq(path)


def test_multiband_pulse_excites_both_slices_with_the_caipi_phase(tmp_path):
    """Small-tip profile (Fourier transform of the played B1(t) at the select gradient):
    peaks at both slice positions of the group, of equal height, nothing between them,
    and slice 2's phase relative to slice 1 is the CAIPI phase 2 pi shift m of its line."""
    _, _, ps = _built(tmp_path, multiband_factor=2, caipi_shift=0.25)
    t_rf, blocks, uses = ps.rf_times()
    exc = [i for i, u in enumerate(uses) if u == "excitation"]
    n_ref = 2 * (N + 1)  # the single-band reference: 2 slices x (dummy + 32 lines)
    mb = exc[n_ref:]
    assert len(mb) == N + 1
    t_g, g = ps.gradient_waveforms_concat()
    gz = float(np.interp(t_rf[mb[0]], t_g, g[:, 2]))  # select gradient, Hz/m
    z = np.linspace(-30e-3, 30e-3, 241)
    for line in (0, 1, 2):  # centred line m; the first MB excitation is the dummy
        rf = ps.rf_library[int(ps.event_ids()[int(blocks[mb[1 + N // 2 + line]]), 0])]
        t_abs = np.asarray(rf.t_s)
        t = t_abs - rf.center_s
        sig = np.asarray(rf.signal_hz) * np.exp(
            1j * (rf.phase_offset_rad + 2 * np.pi * rf.freq_offset_hz * t_abs))
        dt = float(np.median(np.diff(t_abs)))
        # small tip: M_xy(z) ~ 2 pi sum B1(t) exp(-i 2 pi gz z t) dt (B1 in Hz)
        prof = (sig[None, :] * np.exp(-2j * np.pi * gz * z[:, None] * t[None, :])).sum(1) * dt
        flip = 2 * np.pi * np.abs(prof)
        at = {pos: int(np.argmin(np.abs(z - pos))) for pos in (-15e-3, 0.0, 15e-3)}
        assert flip[at[-15e-3]] == pytest.approx(math.radians(30), rel=0.03)
        assert flip[at[15e-3]] == pytest.approx(math.radians(30), rel=0.03)
        assert flip[at[0.0]] < 0.02 * flip[at[15e-3]]
        dphi = np.angle(prof[at[15e-3]] / prof[at[-15e-3]])
        expected = np.angle(np.exp(2j * np.pi * 0.25 * line))
        assert abs(np.angle(np.exp(1j * (dphi - expected)))) < 0.02


def test_labels_flags_and_header_state_the_slice_groups(tmp_path):
    _, _, ps = _built(tmp_path, n_slices=4, multiband_factor=2, caipi_shift=0.25,
                      multiband_reference_lines=16)
    lay = layout_from_seq(ps, n_coils=4)
    header = parse_ismrmrd_header(header_to_xml(lay.header))
    par = header.encoding[0].parallelImaging
    assert par.multiband.multiband_factor == 2 and par.multiband.deltaKz == 0.25
    assert par.multiband.spacing[0].dZ == [60.0]  # slices 0 and 2: 2 x 30 mm apart
    assert par.calibrationMode.value == "separate"
    user = {u.name: u.value for u in header.userParameters.userParameterDouble}
    assert user["MultibandGroups"] == 2 and user["CaipiShift"] == 0.25
    assert [user[f"MultibandSlicePosition_{s}"] for s in range(4)] == [-45, -15, 15, 45]
    cal = has_flag(lay.heads["flags"], "IS_PARALLEL_CALIBRATION")
    idx = lay.heads["idx"]
    assert cal.sum() == 4 * 16 and (~cal).sum() == 2 * N
    assert sorted(set(idx["slice"][cal].tolist())) == [0, 1, 2, 3]
    assert sorted(set(idx["slice"][~cal].tolist())) == [0, 1]  # the groups
    assert sorted(set(idx["kspace_encode_step_1"][cal].tolist())) == list(range(8, 24))
    assert not has_flag(lay.heads["flags"], "IS_PARALLEL_CALIBRATION_AND_IMAGING").any()


# ------------------------------------------------------------------ simulation and recon


def _phantom():
    from mrharmony.phantoms import Phantom

    dz = 1.25
    zc = np.arange(-24, 25) * dz
    x = (np.arange(N) - N // 2 + 0.5) * FOV / N
    xx, yy = np.meshgrid(x, x, indexing="ij")
    a = ((xx + 30) ** 2 + (yy - 10) ** 2 < 45**2) | ((np.abs(xx - 55) < 15)
                                                     & (np.abs(yy + 50) < 15))
    b = ((np.abs(xx) < 12) & (np.abs(yy) < 70)) | ((np.abs(yy - 20) < 12) & (np.abs(xx) < 70))
    aff = np.diag([FOV / N, FOV / N, dz, 1.0])
    aff[:3, 3] = [x[0], x[0], zc[0]]

    def make(with_a: bool, with_b: bool, name: str):
        pd = np.zeros((N, N, zc.size), np.float32)
        for k, zk in enumerate(zc):
            if with_a and abs(zk + 15) <= 2.5:
                pd[:, :, k] = a
            if with_b and abs(zk - 15) <= 2.5:
                pd[:, :, k] = 0.8 * b
        one = np.ones_like(pd)
        return Phantom(pd=pd, t1_ms=800 * one, t2_ms=60 * one, t2star_ms=50 * one,
                       adc_mm2_s=1e-3 * one, b0_hz=0 * one, labels=(pd > 0).astype(np.int16),
                       label_names={1: "object"}, affine=aff, field_t=1.5, name=name)

    return make(True, True, "ab"), make(True, False, "a"), make(False, True, "b")


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    from mrharmony.simulation.raw import simulate_raw

    out = tmp_path_factory.mktemp("sms")
    both, only_a, only_b = _phantom()
    files = {}
    for name, extra in (("sb", {}), ("mb2", {"multiband_factor": 2}),
                        ("mb2q", {"multiband_factor": 2, "caipi_shift": 0.25})):
        seq = build(protocol_from_mapping({**BASE, **extra}), SITE)
        write_seq(seq, out / f"{name}.seq")
        for ph in ((both, only_a, only_b) if name == "mb2" else (both,)):
            files[name, ph.name] = simulate_raw(out / f"{name}.seq", ph, SITE,
                                                out / f"{name}-{ph.name}.h5", noise=False)
    return out, files


def _sorted(path):
    from mrharmony.formats.raw import load_raw
    from mrharmony.recon.sms import sort_sms

    raw = load_raw(path)
    groups, refs, _, _ = sort_sms(raw.header, list(raw.acquisitions))
    return raw, groups, refs


def test_simulated_collapsed_data_is_the_caipi_sum_of_the_slices(sims):
    """The simulator excites both slices together: the collapsed k-space is the sum of the
    single-band references (same file), slice 2 with exp(-i 2 pi shift m) (the Pulseq RF
    phase enters the data conjugated, recon.sms.CAIPI_SIGN); in the image, slice 2 is
    rolled by +shift x N along phase (FOV/4 here: the sign is visible)."""
    from mrharmony.recon.cartesian import ifft_c
    from mrharmony.recon.sms import caipi_shifts, collapse

    for name, shift in (("mb2", 0.5), ("mb2q", 0.25)):
        _, groups, refs = _sorted(sims[1][name, "ab"])
        assert set(groups) == {0} and set(refs) == {0, 1}
        model = collapse(np.stack([refs[0], refs[1]]), shift)
        assert _nrmse(groups[0], model) < 0.005
        wrong = collapse(np.stack([refs[0], refs[1]]), -shift)
        if shift != 0.5:
            assert _nrmse(groups[0], wrong) > 0.5
        img = ifft_c(groups[0], axes=(-2, -1))
        d = int(caipi_shifts(2, shift, N)[1])
        assert d == round(shift * N)
        parts = [ifft_c(refs[s], axes=(-2, -1)) for s in (0, 1)]
        assert _nrmse(img, parts[0] + np.roll(parts[1], d, axis=-1)) < 0.005
        assert _nrmse(img, parts[0] + parts[1]) > 0.3


@pytest.mark.parametrize("method", ["sense", "grappa"])
def test_slice_separation_leakage_and_nrmse(sims, method):
    """Separate the two slices; NRMSE against the separate single-band simulation's
    FFT/RSS recon < 0.05; leakage (energy of slice A's object in reconstructed slice B
    and vice versa, from files where only one slice holds an object, with the calibration
    of the two-object file) < 5 %."""
    from mrharmony.formats.raw import load_raw
    from mrharmony.recon.cartesian import ifft_c
    from mrharmony.recon.coils import sos
    from mrharmony.recon.pipeline import reconstruct
    from mrharmony.recon.sms import reference_maps, slice_grappa, slice_sense

    _, files = sims
    sb = {im.slice: np.abs(im.data[..., 0]) for im in reconstruct(load_raw(files["sb", "ab"]),
                                                                   method="fft")}
    images = reconstruct(load_raw(files["mb2", "ab"]), method=method)
    assert [im.slice for im in images] == [0, 1]
    assert [float(im.position[2]) for im in images] == [-15.0, 15.0]
    for im in images:
        assert im.meta["recon"]["method"] == f"slice-{method}"
        assert _nrmse(np.abs(im.data[..., 0]), sb[im.slice]) < 0.05
    _, _, refs = _sorted(files["mb2", "ab"])
    ref = np.stack([refs[0], refs[1]]).astype(np.complex128)
    lines = np.ones(N, bool)

    def separate(k):
        if method == "sense":
            return np.abs(slice_sense(ifft_c(k, axes=(-2, -1)), reference_maps(ref, lines), 0.5))
        kj = slice_grappa(k, ref, lines, 0.5)
        return np.stack([sos(ifft_c(kj[j], axes=(-2, -1))) for j in range(2)])

    for only, own, other in (("a", 0, 1), ("b", 1, 0)):
        _, groups, _ = _sorted(files["mb2", only])
        out = separate(groups[0].astype(np.complex128))
        leakage = float(np.sum(out[other] ** 2) / np.sum(out[own] ** 2))
        assert leakage < 0.05, (only, leakage)


def test_cli_build_simulate_recon_of_an_sms_protocol(tmp_path):
    import nibabel as nib

    from mrharmony.cli import main

    both, _, _ = _phantom()
    ph_dir = both.save(tmp_path / "ph")
    toml = tmp_path / "sms.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n"
                            for k, v in {**BASE, "multiband_factor": 2}.items()))
    assert main(["seq", "build", str(toml), "--scanner", SITE, "-o",
                 str(tmp_path / "sms.seq")]) == 0
    assert main(["simulate", str(tmp_path / "sms.seq"), str(ph_dir), "--site", SITE, "-o",
                 str(tmp_path / "sms.h5"), "--no-noise"]) == 0
    out = tmp_path / "sms.nii.gz"
    assert main(["recon", str(tmp_path / "sms.h5"), "-o", str(out), "--method", "sense"]) == 0
    img = np.asarray(nib.load(out).dataobj, dtype=np.float64)
    assert img.shape[:3] == (N, N, 2)
    side = json.loads(out.with_name("sms.json").read_text())
    settings = side["ReconstructionSettings"]
    assert settings["method"] == "slice-sense" and settings["multiband_factor"] == 2
    # each slice holds its own object: the cross is 0.8 PD and narrower than the disc
    energy = np.sum(img**2, axis=(0, 1))
    assert energy[0] > 1.5 * energy[1]
    # methods SMS data do not support are refused in one line, exit 2
    assert main(["recon", str(tmp_path / "sms.h5"), "-o", str(tmp_path / "x.nii.gz"),
                 "--method", "cs"]) == 2
