"""EPI: ramp-sampling regridding, line reversal and navigator ghost correction.

Lines are synthesised by an exact DFT of a known pixel image at the ramp-sampled kx
positions, with a known odd/even error on the reversed lines (a kx shift, i.e. a linear
phase in x, plus a constant phase), and three navigators at ky = -1/FOV as our EPI
builder writes them.
"""

from __future__ import annotations

import ismrmrd
import ismrmrd.xsd as mrd
import numpy as np
import pytest

from mrharmony.errors import ReconError
from mrharmony.recon.epi import fit_ghost_phase, ramp_trajectory, reconstruct_epi

from metrics import nrmse

NX, NY, OS = 48, 40, 2
FOV_MM = 240.0
N_NAV = 3
# Readout trapezoid (s): ramps sampled, ADC over the whole line.
RAMP, FLAT, DELAY, DWELL = 200e-6, 280e-6, 20e-6, 6.25e-6


def _image() -> np.ndarray:
    x, y = np.meshgrid(np.linspace(-1, 1, NX), np.linspace(-1, 1, NY), indexing="ij")
    img = ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1).astype(float)
    img -= 0.5 * (((x - 0.2) / 0.2) ** 2 + (y / 0.4) ** 2 < 1)
    img += 0.3 * np.exp(-((x + 0.3) ** 2 + (y + 0.3) ** 2) / 0.02)
    return img * np.exp(1j * 0.5 * x)  # smooth background phase


def _kx_forward(n: int) -> np.ndarray:
    """Independent kx: integrate the trapezoid numerically (cycles/FOV)."""
    t = np.linspace(0, 2 * RAMP + FLAT, 200001)
    g = np.interp(t, [0, RAMP, RAMP + FLAT, 2 * RAMP + FLAT], [0, 1, 1, 0])
    area = np.concatenate([[0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(t))])
    ts = DELAY + (np.arange(n) + 0.5) * DWELL
    a = np.interp(ts, t, area)
    span = np.interp(DELAY + n * DWELL, t, area) - np.interp(DELAY, t, area)
    return (a - a[n // 2]) * NX / span


def _lines(img, kx, ky, *, shift=0.0, phase=0.0):
    """Exact DFT of img at (kx + shift, ky), orthonormal over the (OS*NX, NY) grid."""
    u = (np.arange(NX) - NX // 2) / NX
    v = (np.arange(NY) - NY // 2) / NY
    ex = np.exp(-2j * np.pi * np.outer(kx + shift, u))
    ey = np.exp(-2j * np.pi * ky * v)
    return np.exp(1j * phase) * (ex @ img @ ey) / np.sqrt(OS * NX * NY)


def make_epi(*, ramp=True, shift=0.3, phase=0.4, n_coils=2, with_traj=True, seed=0,
             noise=0.0, sens=None):
    """Acquisitions and header of one EPI slice (navigators first, builder order);
    ``sens`` (coils, NX, NY) replaces the default x-only coil profiles."""
    rng = np.random.default_rng(seed)
    img = _image()
    x = np.linspace(-1, 1, NX)[:, None]
    if sens is None:
        sens = [np.exp(-((x - 0.8 * (-1) ** c) ** 2)) * np.ones((1, NY))
                for c in range(n_coils)]
    n = OS * NX
    kx_fwd = _kx_forward(n) if ramp else (np.arange(n) - n // 2) / OS
    kx_rev = kx_fwd[::-1]
    first_sign = 1 if (N_NAV + NY // 2) % 2 == 0 else -1
    acqs = []
    plan = [(True, NY // 2 - 1)] * N_NAV + [(False, j) for j in range(NY)]
    for m, (nav, line) in enumerate(plan):
        rev = first_sign * (1 if m % 2 == 0 else -1) < 0
        kx = kx_rev if rev else kx_fwd
        ky = line - NY // 2
        data = np.stack([
            _lines(img * s, kx, ky, shift=shift if rev else 0.0, phase=phase if rev else 0.0)
            for s in sens
        ])
        data = data + noise * (rng.standard_normal(data.shape)
                               + 1j * rng.standard_normal(data.shape))
        traj = None
        if with_traj:
            traj = np.stack([kx, np.full(n, ky)], axis=1).astype(np.float32)
        a = ismrmrd.Acquisition.from_array(data.astype(np.complex64), traj)
        a.idx.kspace_encode_step_1 = line
        a.center_sample = n // 2
        if rev:
            a.set_flag(ismrmrd.ACQ_IS_REVERSE)
        if nav:
            a.set_flag(ismrmrd.ACQ_IS_PHASECORR_DATA)
        acqs.append(a)
    return acqs, img, np.stack(sens)


def make_header(*, ramp_params: bool = False):
    desc = None
    if ramp_params:
        values = {"rampUpTime": RAMP * 1e6, "flatTopTime": FLAT * 1e6,
                  "rampDownTime": RAMP * 1e6, "acqDelayTime": DELAY * 1e6,
                  "dwellTime": DWELL * 1e6}
        desc = mrd.trajectoryDescriptionType(
            identifier="ConventionalEPI",
            userParameterDouble=[mrd.userParameterDoubleType(name=k, value=v)
                                 for k, v in values.items()])
    enc = mrd.encodingType(
        encodedSpace=mrd.encodingSpaceType(
            matrixSize=mrd.matrixSizeType(x=OS * NX, y=NY, z=1),
            fieldOfView_mm=mrd.fieldOfViewMm(x=OS * FOV_MM, y=FOV_MM, z=4.0)),
        reconSpace=mrd.encodingSpaceType(
            matrixSize=mrd.matrixSizeType(x=NX, y=NY, z=1),
            fieldOfView_mm=mrd.fieldOfViewMm(x=FOV_MM, y=FOV_MM, z=4.0)),
        encodingLimits=mrd.encodingLimitsType(
            kspace_encoding_step_1=mrd.limitType(minimum=0, maximum=NY - 1, center=NY // 2)),
        trajectory=mrd.trajectoryType("epi"),
        trajectoryDescription=desc,
    )
    return mrd.ismrmrdHeader(
        encoding=[enc],
        experimentalConditions=mrd.experimentalConditionsType(H1resonanceFrequency_Hz=1))


def test_ramp_sampled_epi_with_ghost_is_corrected():
    acqs, img, sens = make_epi()
    header = make_header()
    out = reconstruct_epi(header, acqs)
    assert out.shape == (2, NX, NY) and out.dtype == np.complex64
    truth = sens * img
    # Exact data, exact linear + constant ghost model: measured 5.4e-5 (the Tikhonov
    # bias of the ramp regridding); bound 5e-4.
    assert nrmse(out, truth) < 5e-4
    ghosted = reconstruct_epi(header, acqs, ghost_correction=False)
    assert nrmse(ghosted, truth) > 0.1  # the uncorrected N/2 ghost is large
    # Header-described ramp (no trajectories) gives the same image.
    acqs_nt, _, _ = make_epi(with_traj=False)
    out_hdr = reconstruct_epi(make_header(ramp_params=True), acqs_nt)
    assert nrmse(out_hdr, truth) < 5e-4


def test_noisy_epi_error_at_noise_level():
    acqs, img, sens = make_epi(noise=2e-3, seed=3)
    out = reconstruct_epi(make_header(), acqs)
    # Noise 2e-3 per sample and channel: measured NRMSE 0.008; bound 0.02.
    assert nrmse(out, sens * img) < 0.02


def test_uniform_epi_flips_reversed_lines_exactly():
    acqs, img, sens = make_epi(ramp=False, shift=0.0, phase=0.0, with_traj=False)
    out = reconstruct_epi(make_header(), acqs)
    # Uniform samples: regridding is the orthonormal iDFT, exact up to float32 data.
    assert nrmse(out, sens * img) < 1e-5


def test_ramp_trajectory_matches_numerical_integration():
    n = OS * NX
    kx = ramp_trajectory(n, NX, ramp_up_s=RAMP, flat_s=FLAT, ramp_down_s=RAMP,
                         adc_delay_s=DELAY, dwell_s=DWELL)
    np.testing.assert_allclose(kx, _kx_forward(n), atol=1e-6)  # cycles/FOV


def test_ghost_phase_fit_recovers_known_phase():
    rng = np.random.default_rng(1)
    n = 96
    x = np.arange(n) - n // 2
    mag = np.exp(-(x / 25.0) ** 2) * (1 + 0.2 * rng.standard_normal((3, n)))
    fwd = mag * np.exp(1j * rng.uniform(-3, 3, (3, 1)))
    rev = fwd * np.exp(1j * (0.7 - 0.05 * x))
    phi0, phi1 = fit_ghost_phase(fwd, rev)
    assert abs(phi0 - 0.7) < 1e-9 and abs(phi1 + 0.05) < 1e-9


def test_bad_input_raises_named_errors():
    acqs, _, _ = make_epi(n_coils=1)
    with pytest.raises(ReconError, match="no EPI imaging"):
        reconstruct_epi(make_header(), [a for a in acqs
                                        if a.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA)])
    acqs[5].idx.kspace_encode_step_1 = NY + 3
    with pytest.raises(ReconError, match="outside"):
        reconstruct_epi(make_header(), acqs)
    with pytest.raises(ReconError, match="backend"):
        reconstruct_epi(make_header(), acqs, backend="gpu")


@pytest.mark.parametrize("ramp", [False, True])
def test_conventions_of_our_epi_builder(ramp):
    """Lines, flags and k-space of sequences/builders/epi.py reconstruct to the object.

    k-space per sample from pypulseq's calculate_kspace (1/m, blips inside the ramps
    included), flags from the builder's NAV/REV/LIN labels, header from
    sequences/header.py; data by exact DFT of a pixel image at those positions.
    """
    from mrharmony.sequences.builders.epi import build_epi
    from mrharmony.sequences.header import ismrmrd_header
    from mrharmony.sequences.protocol import protocol_from_mapping
    from mrharmony.sequences.scanner import load_scanner

    fov, nx, ny, ns = (0.22, 0.20), 32, 24, 64
    protocol = protocol_from_mapping({
        "builder": "epi", "name": "t", "fov_mm": [fov[0] * 1e3, fov[1] * 1e3],
        "matrix": [nx, ny], "slice_thickness_mm": 4, "n_slices": 1, "te_ms": 30,
        "tr_ms": 200, "dummy_scans": 0, "ramp_sampling": ramp, "navigator_lines": 3,
        "readout_oversampling": 2})
    seq = build_epi(protocol, load_scanner("siemens-prisma"))
    k = seq.calculate_kspace()[0]
    labels = seq.evaluate_labels(evolution="adc")
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    img = (((x / 0.7) ** 2 + (y / 0.8) ** 2 < 1)
           - 0.5 * (((x - 0.2) / 0.2) ** 2 + (y / 0.4) ** 2 < 1)).astype(complex)
    px = (np.arange(nx) - nx // 2) * fov[0] / nx
    py = (np.arange(ny) - ny // 2) * fov[1] / ny
    kx, ky = k[0].reshape(-1, ns), k[1].reshape(-1, ns)
    with_traj, without = [], []
    for i in range(kx.shape[0]):
        e = np.exp(-2j * np.pi * (kx[i][:, None, None] * px[None, :, None]
                                  + ky[i][:, None, None] * py[None, None, :]))
        d = ((e * img[None]).sum((1, 2)) / np.sqrt(ns * ny))[None].astype(np.complex64)
        traj = np.stack([kx[i] * fov[0], ky[i] * fov[1]], 1).astype(np.float32)
        for acqs, t in ((with_traj, traj), (without, None)):
            a = ismrmrd.Acquisition.from_array(d, t)
            a.idx.kspace_encode_step_1 = int(labels["LIN"][i])
            a.center_sample = ns // 2
            if labels["REV"][i]:
                a.set_flag(ismrmrd.ACQ_IS_REVERSE)
            if labels["NAV"][i]:
                a.set_flag(ismrmrd.ACQ_IS_PHASECORR_DATA)
            acqs.append(a)
    header = ismrmrd_header(seq)
    out = reconstruct_epi(header, with_traj)[0]
    # Measured 1e-5 (flat top) and 4.8e-4 (ramp sampling: ky blips on the ramps ignored).
    assert nrmse(out, img) < (1e-4 if not ramp else 2e-3)
    if not ramp:  # uniform samples: the flip convention of reversed lines alone suffices
        assert nrmse(reconstruct_epi(header, without)[0], img) < 1e-4
    else:  # no trajectories: the builder's readout definitions in the header suffice
        names = ("RampSampling", "ReadoutRampTime", "ReadoutFlatTime", "ADCDelayInLine",
                 "ADCDwell")
        header.encoding[0].trajectoryDescription.userParameterDouble = [
            mrd.userParameterDoubleType(name=k, value=float(seq.definitions[k]))
            for k in names]
        # Measured 4.8e-4, as with the trajectories (4.8e-2 without the definitions).
        assert nrmse(reconstruct_epi(header, without)[0], img) < 2e-3


@pytest.mark.parametrize("method", ["cs", "tv", "nufft"])
def test_pipeline_refuses_a_method_the_epi_recon_does_not_run(method):
    """``--method X`` on EPI data is applied or refused, never silently ignored."""
    from mrharmony.recon.pipeline import reconstruct_acquisitions

    acqs, _, _ = make_epi()
    with pytest.raises(ReconError, match=rf"method '{method}' is not available for epi "
                                         r"data.*'auto', 'fft', 'grappa', 'sense'"):
        reconstruct_acquisitions(make_header(), acqs, method=method, backend="numpy")


def test_pipeline_runs_the_epi_recon_for_auto_and_fft():
    from mrharmony.recon.pipeline import reconstruct_acquisitions

    acqs, img, sens = make_epi()
    out = {m: reconstruct_acquisitions(make_header(), acqs, method=m, backend="numpy")[0]
           for m in ("auto", "fft")}
    assert np.array_equal(out["auto"].data, out["fft"].data)
    assert out["fft"].meta["recon"]["method"] == "epi"
    # the coil combination of the ghost-corrected coil images of reconstruct_epi
    coils = np.asarray(reconstruct_epi(make_header(), acqs))
    rss = np.sqrt((np.abs(coils) ** 2).sum(axis=0))
    assert nrmse(np.abs(np.squeeze(out["fft"].data)), np.squeeze(rss)) < 1e-6  # measured 2e-15
    # and the object: |img| x RSS of the sensitivities (measured 5.3e-5, ramp sampled)
    truth = np.abs(img) * np.sqrt((np.abs(sens) ** 2).sum(axis=0))
    assert nrmse(np.abs(np.squeeze(out["fft"].data)), truth) < 1e-3


def test_cli_refuses_a_method_on_epi_data_in_one_line(tmp_path, capsys):
    from mrharmony.cli import main
    from mrharmony.formats.header import header_to_xml

    acqs, _, _ = make_epi()
    raw = tmp_path / "epi.h5"
    ds = ismrmrd.Dataset(str(raw), "dataset", create_if_needed=True)
    ds.write_xml_header(header_to_xml(make_header()))
    for a in acqs:
        ds.append_acquisition(a)
    ds.close()
    out = tmp_path / "img.nii.gz"
    assert main(["recon", str(raw), "-o", str(out), "--method", "cs",
                 "--backend", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "method 'cs' is not available for epi data" in err
    assert not out.exists()
    assert main(["recon", str(raw), "-o", str(out), "--method", "fft",
                 "--backend", "numpy"]) == 0 and out.exists()


def _accelerated_epi(r: int = 2, acs: int = 16):
    """R-fold EPI of the test image with 4 coils (profiles along x and y) and a separate
    reference of ``acs`` central lines flagged ``IS_PARALLEL_CALIBRATION`` (no
    navigators of its own, as our builder plays it); also the fully sampled lines."""
    x, y = np.meshgrid(np.linspace(-1, 1, NX), np.linspace(-1, 1, NY), indexing="ij")
    sens = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.8)
                     * np.exp(1j * (0.3 * c + 0.4 * x * cy))
                     for c, (cx, cy) in enumerate([(0.9, 0), (-0.9, 0), (0, 0.9), (0, -0.9)])])
    full, img, sens = make_epi(sens=sens)
    keep = [a for a in full if a.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA)
            or (a.idx.kspace_encode_step_1 - NY // 2) % r == 0]
    ref = []
    for a in full:
        line = a.idx.kspace_encode_step_1
        if not a.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA) and abs(line - NY // 2 + 0.5) < acs / 2:
            b = ismrmrd.Acquisition(a.getHead(), data=a.data, trajectory=a.traj)
            b.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            ref.append(b)
    return full, ref + keep, img, sens


@pytest.mark.parametrize("method", ["grappa", "sense", "auto"])
def test_accelerated_epi_with_a_separate_reference_runs_parallel_imaging(method):
    """R = 2 EPI (ramp sampled, ghosted, 4 coils) with a 16-line reference scan: the
    lines go to Cartesian k-space and through GRAPPA / SENSE (``auto``: SENSE, as for
    Cartesian data), against the EPI recon of the fully sampled lines."""
    from mrharmony.recon.pipeline import reconstruct_acquisitions

    full, acc, _, _ = _accelerated_epi()
    header = make_header()
    ref = np.abs(np.squeeze(reconstruct_acquisitions(header, full, method="fft")[0].data))
    out = reconstruct_acquisitions(header, acc, method=method, backend="numpy")[0]
    settings = out.meta["recon"]
    assert settings["method"] == ("sense" if method == "auto" else method)
    assert settings["trajectory"] == "epi" and settings["acceleration"] == [2, 1]
    assert settings["calibration"]["lines"] == [16, 1]
    assert "navigators of the image" in settings["epi"]
    img = np.abs(np.squeeze(out.data))
    # measured: grappa 0.014, sense 0.002 (auto = sense); zero filling: 0.47
    assert nrmse(img, ref) < 0.05
    zero = np.abs(np.squeeze(reconstruct_acquisitions(header, acc, method="fft")[0].data))
    assert nrmse(zero, ref) > 0.2


def test_epi_kspace_inverts_to_the_epi_recon():
    """Fully sampled: the inverse FFT of :func:`epi_kspace` is :func:`reconstruct_epi`."""
    from mrharmony.recon.cartesian import ifft_c
    from mrharmony.recon.epi import epi_kspace

    acqs, _, _ = make_epi()
    ek = epi_kspace(make_header(), acqs)
    assert ek.mask.all() and ek.calibration is None
    coils = reconstruct_epi(make_header(), acqs)
    assert nrmse(ifft_c(ek.kspace, axes=(1, 2)), coils) < 1e-5  # measured ~1e-7 (float32)
