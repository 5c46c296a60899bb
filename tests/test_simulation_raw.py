"""ISMRMRD raw data from virtual sites: header, acquisitions, geometry, noise, native flavour."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import ismrmrd
import ismrmrd.xsd as mrd
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from mrharmony.errors import RawDataError, SimulationError
from mrharmony.formats.raw import acquisition_table, write_raw
from mrharmony.phantoms import Phantom
from mrharmony.sequences import build, write_seq
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation import load_site, simulate_raw
from mrharmony.simulation.cli import sequence_file
from mrharmony.simulation.raw import receive_model
from mrharmony.simulation.site import site_from_mapping

from conftest import CORPUS
from seqtools import simulate_protocol

FOV_MM, N = 256.0, 32


def make_phantom(n: int = 64, *, nz: int = 1, offset_mm=(10.0, -20.0, 0.0)) -> Phantom:
    """An asymmetric object (an 'L' and a disc) placed off-centre: orientation and
    position errors of any axis show up in the reconstruction."""
    pd = np.zeros((n, n, nz), np.float32)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pd[(i > n * 0.2) & (i < n * 0.35) & (j > n * 0.2) & (j < n * 0.8)] = 1.0
    pd[(i > n * 0.2) & (i < n * 0.7) & (j > n * 0.2) & (j < n * 0.3)] = 0.8
    pd[(i - n * 0.65) ** 2 + (j - n * 0.65) ** 2 < (n * 0.1) ** 2] = 0.6
    dx = FOV_MM / n
    affine = np.diag([dx, dx, 5.0, 1.0])
    affine[:3, 3] = np.asarray(offset_mm) - [dx * (n // 2), dx * (n // 2), 5.0 * (nz // 2)]
    obj = pd > 0
    zero = np.zeros_like(pd)
    return Phantom(
        pd=pd, t1_ms=np.where(obj, 800.0, 1.0), t2_ms=np.where(obj, 80.0, 1.0),
        t2star_ms=np.where(obj, 60.0, 1.0), adc_mm2_s=zero, b0_hz=zero,
        labels=obj.astype(np.int16), label_names={1: "object"}, affine=affine, field_t=3.0,
        name="asymmetric",
    )


def gre(**kw):
    spec = {"builder": "gre2d", "name": "gre-test", "fov_mm": [FOV_MM, FOV_MM], "matrix": [N, N],
            "slice_thickness_mm": 5, "te_ms": 5, "tr_ms": 12, "flip_deg": 15,
            "readout_bandwidth_hz_per_px": 260, "dummy_scans": 20, "rf_spoiling_inc_deg": 0.0}
    spec.update(kw)
    return protocol_from_mapping(spec)


def prisma_variant(**tables) -> object:
    data = load_site("siemens-prisma-3t").to_mapping()
    for key, value in tables.items():
        data[key] = {**data[key], **value}
    return site_from_mapping(data, source="test-site")


def read(path):
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        header = mrd.CreateFromDocument(ds.read_xml_header())
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    return header, acqs


def is_noise(a) -> bool:
    return a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)


def fft_recon(acqs, n_lines: int) -> np.ndarray:
    """Plain FFT per coil, root-sum-of-squares; index n//2 is the ISMRMRD position."""
    img = [a for a in acqs if not is_noise(a)]
    k = np.zeros((img[0].data.shape[0], img[0].data.shape[1], n_lines), complex)
    for a in img:
        k[:, :, a.idx.kspace_encode_step_1] = a.data
    x = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(1, 2))), axes=(1, 2))
    return np.sqrt(np.sum(np.abs(x) ** 2, axis=0))


def phantom_on_recon_grid(ph: Phantom, position_lps, n: int, dx: float) -> np.ndarray:
    """The phantom PD (box-averaged to the recon voxel) at the recon voxel centres."""
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    lps = np.stack([(ii - n // 2) * dx, (jj - n // 2) * dx, np.zeros((n, n))], -1).reshape(-1, 3)
    ras = (lps + position_lps) * [-1.0, -1.0, 1.0]
    vox = (np.linalg.inv(ph.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3]
    k = round(dx / ph.voxel_size_mm[0])
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(ph.pd[:, :, 0], k)
    return map_coordinates(smooth, vox[:2], order=1).reshape(n, n)


def corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def centre_of_mass(img: np.ndarray, dx: float) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    w = img / img.sum()
    return dx * np.array([((ii - img.shape[0] // 2) * w).sum(),
                          ((jj - img.shape[1] // 2) * w).sum()])


# ------------------------------------------------------------------ headers and writer


def _rec(t, labels, n=8, rotation=None):
    return SimpleNamespace(t_start_s=t, num_samples=n, dwell_s=1e-5, labels=labels,
                           rotation=rotation)


def test_acquisition_table_flags_and_counters():
    recs = []
    for slc in range(2):
        recs.append(_rec(len(recs) * 0.01, {"SLC": slc, "NAV": 1, "REV": 1}))  # navigator
        for lin in range(4):
            recs.append(_rec(len(recs) * 0.01, {"SLC": slc, "LIN": lin, "REV": lin % 2}))
    heads = acquisition_table(recs, n_coils=3, slice_positions_mm=np.array([-3.0, 3.0]))

    def has(i, name):
        return bool(int(heads["flags"][i]) & (1 << (getattr(ismrmrd, f"ACQ_{name}") - 1)))

    assert heads["idx"]["slice"].tolist() == [0] * 5 + [1] * 5
    assert heads["idx"]["kspace_encode_step_1"].tolist() == [0, 0, 1, 2, 3] * 2
    assert has(0, "IS_PHASECORR_DATA") and has(0, "IS_REVERSE")
    assert not has(0, "FIRST_IN_SLICE") and has(1, "FIRST_IN_SLICE")
    assert has(1, "FIRST_IN_ENCODE_STEP1") and has(4, "LAST_IN_ENCODE_STEP1")
    assert has(4, "LAST_IN_SLICE") and has(9, "LAST_IN_SLICE") and has(9, "LAST_IN_MEASUREMENT")
    assert not has(4, "LAST_IN_MEASUREMENT") and has(9, "LAST_IN_REPETITION")
    assert [has(i, "IS_REVERSE") for i in range(1, 5)] == [False, True, False, True]
    np.testing.assert_allclose(heads["position"][:, 2], [-3.0] * 5 + [3.0] * 5)
    np.testing.assert_allclose(heads["slice_dir"], [[0, 0, 1]] * 10)
    assert heads["channel_mask"][0, 0] == 0b111 and heads["active_channels"][0] == 3
    assert heads["sample_time_us"][0] == pytest.approx(10.0)
    rot = np.array([[0, 1.0, 0], [-1.0, 0, 0], [0, 0, 1.0]])
    rotated = acquisition_table([_rec(0.0, {}, rotation=rot)], n_coils=1)
    np.testing.assert_allclose(rotated["read_dir"][0], rot[:, 0])
    np.testing.assert_allclose(rotated["phase_dir"][0], rot[:, 1])
    with pytest.raises(RawDataError, match="LIN"):
        acquisition_table([_rec(0.0, {"LIN": 70000})], n_coils=1)


def test_write_ismrmrd_roundtrip_is_atomic_and_refuses_overwrite(tmp_path):
    recs = [_rec(0.01 * i, {"LIN": i}, n=6) for i in range(3)]
    heads = acquisition_table(recs, n_coils=2, trajectory_dims=2)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((2, 6)) + 1j * rng.standard_normal((2, 6))).astype(np.complex64)
            for _ in recs]
    trajs = [rng.standard_normal((6, 2)).astype(np.float32) for _ in recs]
    header = mrd.ToXML(mrd.ismrmrdHeader(
        experimentalConditions=mrd.experimentalConditionsType(H1resonanceFrequency_Hz=1),
        encoding=[mrd.encodingType(
            encodedSpace=mrd.encodingSpaceType(matrixSize=mrd.matrixSizeType(x=6, y=3, z=1),
                                               fieldOfView_mm=mrd.fieldOfViewMm(x=1, y=1, z=1)),
            reconSpace=mrd.encodingSpaceType(matrixSize=mrd.matrixSizeType(x=6, y=3, z=1),
                                             fieldOfView_mm=mrd.fieldOfViewMm(x=1, y=1, z=1)),
            encodingLimits=mrd.encodingLimitsType(), trajectory=mrd.trajectoryType.RADIAL)]))
    path = write_raw(tmp_path / "x.h5", header, heads, data, trajs)
    _, acqs = read(path)
    for a, d, t in zip(acqs, data, trajs, strict=True):
        np.testing.assert_array_equal(a.data, d)
        np.testing.assert_array_equal(a.traj, t)
    assert [a.idx.kspace_encode_step_1 for a in acqs] == [0, 1, 2]
    with pytest.raises(FileExistsError, match="exists"):
        write_raw(path, header, heads, data, trajs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]  # no temporary left


# ------------------------------------------------------------------ simulated scans


@pytest.fixture(scope="module")
def single_channel_scan(tmp_path_factory):
    """A 32x32 GRE of the asymmetric phantom at a one-channel Prisma (B0/B1/gradient errors
    and noise on), so that the plain FFT magnitude is the object (no coil shading)."""
    ph = make_phantom()
    site = prisma_variant(coil={"channels": 1})
    path = simulate_protocol(gre(), ph, site, tmp_path_factory.mktemp("raw") / "gre.h5", seed=3)
    return ph, path


def test_fft_recon_geometry_matches_the_phantom(single_channel_scan):
    ph, path = single_channel_scan
    header, acqs = read(path)
    img = [a for a in acqs if not is_noise(a)]
    position = np.asarray(img[0].position, dtype=float)
    np.testing.assert_allclose(img[0].read_dir, [1, 0, 0])
    np.testing.assert_allclose(img[0].phase_dir, [0, 1, 0])
    fov = header.encoding[0].reconSpace.fieldOfView_mm
    assert (fov.x, fov.y) == (FOV_MM, FOV_MM)
    dx = FOV_MM / N
    recon = fft_recon(acqs, N)
    ref = phantom_on_recon_grid(ph, position, N, dx)
    # Orientation: the right image correlates well, mirrored ones do not (measured
    # r = 0.92 vs 0.42 / 0.45 for the x / y flips, noise and B1 shading included).
    r = corr(recon, ref)
    assert r > 0.85
    assert r > corr(recon[::-1], ref) + 0.2 and r > corr(recon[:, ::-1], ref) + 0.2
    # Position: centre of mass within one recon voxel (8 mm) of the phantom's (measured
    # 4.6 / 3.5 mm: the magnitude noise floor pulls the image's centre of mass inwards).
    np.testing.assert_allclose(centre_of_mass(recon, dx), centre_of_mass(ref, dx), atol=dx)


def test_brain_phantom_gre_geometry_matches_the_phantom(tmp_path):
    """The MNI brain (axial slice at z = 0, 4 mm voxels) at a one-channel Prisma: plain
    FFT of the raw data lands on the phantom. The brain is nearly left-right symmetric,
    so orientation is judged on the anterior-posterior axis (measured: r = 0.88 vs 0.55
    mirrored A-P) and position by the centre of mass (measured offset ~3 mm)."""
    from mrharmony.phantoms.brain import make_brain_phantom

    ph = make_brain_phantom(3.0, voxel_size_mm=4.0, three_d=False, slice_z_mm=0.0)
    site = prisma_variant(coil={"channels": 1})
    _, acqs = read(simulate_protocol(gre(), ph, site, tmp_path / "brain.h5", seed=3))
    img = [a for a in acqs if not is_noise(a)]
    dx = FOV_MM / N
    recon = fft_recon(acqs, N)
    ref = phantom_on_recon_grid(ph, np.asarray(img[0].position, dtype=float), N, dx)
    r = corr(recon, ref)
    assert r > 0.8 and r > corr(recon[:, ::-1], ref) + 0.2
    np.testing.assert_allclose(centre_of_mass(recon, dx), centre_of_mass(ref, dx), atol=dx)


def test_header_and_acquisitions_are_complete(single_channel_scan):
    _, path = single_channel_scan
    header, acqs = read(path)
    system = header.acquisitionSystemInformation
    assert system.systemFieldStrength_T == 3.0 and system.receiverChannels == 1
    assert [c.coilName for c in system.coilLabel] == ["BODY"]
    assert system.systemVendor == "Siemens" and system.stationName == "siemens-prisma-3t"
    assert 0.9 < system.relativeReceiverNoiseBandwidth < 1.0  # raised-cosine filter
    assert header.experimentalConditions.H1resonanceFrequency_Hz == round(42.576e6 * 3)
    assert header.sequenceParameters.TE[0] == pytest.approx(5.0, rel=0.01)
    assert header.encoding[0].encodedSpace.matrixSize.x == N
    user = {p.name: p.value for p in header.userParameters.userParameterString}
    assert user["site"] == "siemens-prisma-3t" and user["native"] == "False"
    noise = [a for a in acqs if is_noise(a)]
    assert noise and all(is_noise(a) for a in acqs[:len(noise)])  # noise scans first
    img = acqs[len(noise):]
    assert len(img) == N and not any(is_noise(a) for a in img)
    assert sorted(a.idx.kspace_encode_step_1 for a in img) == list(range(N))
    assert img[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE)
    assert img[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
    assert img[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    assert img[0].center_sample == N // 2 and img[0].sample_time_us > 0


@pytest.mark.skipif(shutil.which("ismrmrd_recon_cartesian_2d") is None,
                    reason="Debian ismrmrd-tools not installed")
def test_cpp_ismrmrd_tools_read_the_file(single_channel_scan, tmp_path):
    _, path = single_channel_scan
    copy = tmp_path / "copy.h5"  # the C++ recon writes its image into the file
    shutil.copy(path, copy)
    out = subprocess.run(["ismrmrd_recon_cartesian_2d", str(copy)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert f"Encoding Matrix Size        : [{N}, {N}, 1]" in out.stdout


def test_same_seed_same_raw_data_and_noise_statistics(tmp_path):
    ph = make_phantom(32)
    site = prisma_variant(coil={"channels": 8})
    proto = gre(matrix=[16, 16], fov_mm=[FOV_MM, FOV_MM])
    a = simulate_protocol(proto, ph, site, tmp_path / "a.h5", seed=5)
    b = simulate_protocol(proto, ph, site, tmp_path / "b.h5", seed=5)
    c = simulate_protocol(proto, ph, site, tmp_path / "c.h5", seed=6)
    (_, acq_a), (_, acq_b), (hc, acq_c) = read(a), read(b), read(c)
    da = np.concatenate([x.data for x in acq_a], axis=1)
    db = np.concatenate([x.data for x in acq_b], axis=1)
    dc = np.concatenate([x.data for x in acq_c], axis=1)
    np.testing.assert_array_equal(da, db)  # same seed: bit-identical
    diff = da - dc
    assert np.abs(diff).max() > 0
    # Different seeds differ by noise only: the noise scans' covariance has the coil
    # model's correlation structure (3 % tolerance on 4096 samples ~ 3 sigma).
    noise = np.concatenate([x.data for x in acq_c if is_noise(x)], axis=1)
    cov = noise @ noise.conj().T / noise.shape[1]
    corr_est = np.abs(cov) / np.sqrt(np.outer(np.diag(cov).real, np.diag(cov).real))
    psi = receive_model(site, ph).psi
    np.testing.assert_allclose(corr_est, np.abs(psi), atol=0.06)
    sigma = {p.name: p.value for p in hc.userParameters.userParameterDouble}[
        "noise_sigma_per_sample"]
    # per-channel noise power 2 sigma^2 before the readout filter, times its noise bandwidth
    rel_bw = hc.acquisitionSystemInformation.relativeReceiverNoiseBandwidth
    np.testing.assert_allclose(np.diag(cov).real, 2 * sigma**2 * rel_bw, rtol=0.1)


def test_native_flavour_uses_vendor_choices(tmp_path):
    ph = make_phantom(32)
    site = load_site("philips-ingenia-1.5t")
    proto = gre(matrix=[16, 16])
    native = simulate_protocol(proto, ph, site, tmp_path / "native.h5", native=True, noise=False)
    hn, _ = read(native)
    strings = {p.name: p.value for p in hn.userParameters.userParameterString}
    doubles = {p.name: p.value for p in hn.userParameters.userParameterDouble}
    assert strings["native"] == "True" and strings["kspace_filter"] == "hamming"
    assert strings["native_rf_shape"] == "sinc-hamming"
    assert strings["prescan_normalize"] == "True"
    assert doubles["native_rf_spoiling_inc_deg"] == 150.0
    assert doubles["native_rf_time_bw_product"] == 3.0
    seq = write_seq(build(proto, site.profile), tmp_path / "shared.seq")
    with pytest.raises(SimulationError, match="native flavour needs the protocol"):
        sequence_file(seq, site, native=True, workdir=tmp_path)
    # the native build is the vendor's: its .seq differs from the shared one
    native_seq, info = sequence_file(proto, site, native=True, workdir=tmp_path / "nat")
    assert native_seq.read_bytes() != seq.read_bytes()
    assert info == {"native_rf_shape": "sinc-hamming", "native_slice_profile":
                    site.native.slice_profile, "native_rf_time_bw_product": 3.0,
                    "native_rf_spoiling_inc_deg": 150.0}


def test_simulate_raw_runs_seq_files_only(tmp_path):
    """A protocol (object or TOML) is built by the sequence library, never by simulate_raw."""
    ph = make_phantom(16)
    toml = tmp_path / "gre.toml"
    toml.write_text('builder = "gre2d"\nname = "g"\n')
    for source in (gre(matrix=[16, 16]), toml):
        with pytest.raises(SimulationError, match=r"runs a Pulseq \.seq file"):
            simulate_raw(source, ph, "siemens-prisma-3t", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_native_kspace_filter_is_the_hamming_window(tmp_path):
    """With the vendor's sequence choices equal to the protocol's, native minus plain is
    exactly the k-space apodisation: 0.54 + 0.46 cos(pi |k| / k_max)."""
    ph = make_phantom(32)
    data = load_site("philips-ingenia-1.5t").to_mapping()
    data["native"].update(rf_time_bw_product=4.0, rf_spoiling_inc_deg=0.0,
                          rf_shape="sinc-hanning", spoiler_cycles_per_voxel=2.0,
                          crusher_cycles_per_slice=4.0, prescan_normalize=False)
    site = site_from_mapping(data)
    proto = gre(matrix=[16, 16])
    plain = simulate_protocol(proto, ph, site, tmp_path / "plain.h5", noise=False)
    native = simulate_protocol(proto, ph, site, tmp_path / "native.h5", native=True, noise=False)
    kp = np.stack([a.data for a in read(plain)[1] if not is_noise(a)], axis=1)
    kn = np.stack([a.data for a in read(native)[1] if not is_noise(a)], axis=1)
    lines, samples = np.meshgrid(np.arange(16) - 8, np.arange(16) - 8, indexing="ij")
    k_norm = np.sqrt(lines**2 + samples**2) / 8.0
    expected = 0.54 + 0.46 * np.cos(np.pi * np.clip(k_norm, 0, 1))
    big = np.abs(kp) > 1e-3 * np.abs(kp).max()  # ratios of well-measured samples only
    # k positions come from the gradient waveforms: on the grid to ~1e-3 cycles/FOV.
    np.testing.assert_allclose((kn / kp)[big].real,
                               np.broadcast_to(expected, kp.shape)[big], atol=2e-3)
    np.testing.assert_allclose((kn / kp)[big].imag, 0.0, atol=2e-3)


def test_radial_trajectory_in_cycles_per_fov(tmp_path):
    ph = make_phantom(32)
    proto = protocol_from_mapping({
        "builder": "radial", "name": "radial-test", "fov_mm": [FOV_MM, FOV_MM],
        "matrix": [16, 16], "slice_thickness_mm": 5, "te_ms": 5, "tr_ms": 12, "flip_deg": 10,
        "n_spokes": 8, "readout_bandwidth_hz_per_px": 260,
    })
    site = prisma_variant(coil={"channels": 1}, gradients={"delay_us": [0.0, 0.0, 0.0]})
    path = simulate_protocol(proto, ph, site, tmp_path / "radial.h5", noise=False)
    header, acqs = read(path)
    user = {p.name: p.value for p in header.userParameters.userParameterString}
    assert user["trajectory_units"] == "cycles_per_fov"
    img = [a for a in acqs if not is_noise(a)]
    assert all(a.trajectory_dimensions == 2 for a in img)
    traj = np.concatenate([a.traj for a in img])
    kmax = np.abs(traj).max(axis=0)
    # spokes span k = -N/2 .. N/2 in cycles/FOV (N = 16), to the readout's sampling
    assert np.linalg.norm(traj, axis=1).max() == pytest.approx(8.0, abs=0.6)
    assert kmax.max() <= 8.6
    for a in img:
        assert np.linalg.norm(a.traj[a.center_sample]) < 0.6  # centre sample near k = 0


def test_gre3d_partitions_map_to_the_phantom(tmp_path):
    """3D: readout x, phase y, partition z (LPS); a z-asymmetric object comes back unflipped
    (measured r = 0.90 vs 0.65 mirrored in z)."""
    n, nz = 32, 8
    pd = np.zeros((n, n, nz), np.float32)
    i, j, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(nz), indexing="ij")
    pd[(i > 6) & (i < 12) & (j > 6) & (j < 26) & (k > 1) & (k < 7)] = 1.0
    pd[(i > 6) & (i < 22) & (j > 6) & (j < 10) & (k > 1) & (k < 3)] = 0.7
    affine = np.diag([8.0, 8.0, 16.0, 1.0])
    affine[:3, 3] = [5.0 - 8 * 16, -10.0 - 8 * 16, 7.0 - 16 * 4]
    obj = pd > 0
    zero = np.zeros_like(pd)
    ph = Phantom(pd=pd, t1_ms=np.where(obj, 800.0, 1.0), t2_ms=np.where(obj, 80.0, 1.0),
                 t2star_ms=np.where(obj, 60.0, 1.0), adc_mm2_s=zero, b0_hz=zero,
                 labels=obj.astype(np.int16), label_names={1: "o"}, affine=affine, field_t=3.0)
    proto = protocol_from_mapping({
        "builder": "gre3d", "name": "gre3d-test", "fov_mm": [256, 256, 128],
        "matrix": [64, 32, 8], "te_ms": 5, "tr_ms": 12, "flip_deg": 10,
        "readout_bandwidth_hz_per_px": 260, "dummy_scans": 20, "rf_spoiling_inc_deg": 0.0,
    })
    site = prisma_variant(coil={"channels": 1})
    _, acqs = read(simulate_protocol(proto, ph, site, tmp_path / "gre3d.h5", noise=False))
    img = [a for a in acqs if not is_noise(a)]
    k3 = np.zeros((img[0].number_of_samples, 32, 8), complex)
    for a in img:
        k3[:, a.idx.kspace_encode_step_1, a.idx.kspace_encode_step_2] = a.data[0]
    recon = np.abs(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k3))))
    recon = recon.reshape(32, 2, 32, 8).mean(axis=1)  # 64 readout samples -> 8 mm voxels
    a_, b_, c_ = np.meshgrid(np.arange(32), np.arange(32), np.arange(8), indexing="ij")
    lps = np.stack([(a_ - 16) * 8.0, (b_ - 16) * 8.0, (c_ - 4) * 16.0], -1).reshape(-1, 3)
    lps += np.asarray(img[0].position)
    ras = lps * [-1.0, -1.0, 1.0]
    vox = (np.linalg.inv(affine) @ np.c_[ras, np.ones(len(ras))].T)[:3]
    ref = map_coordinates(pd, vox, order=1).reshape(32, 32, 8)
    r = corr(recon, ref)
    assert r > 0.85
    for flipped in (recon[::-1], recon[:, ::-1], recon[:, :, ::-1]):
        assert r > corr(flipped, ref) + 0.15


def test_third_party_radial_file_gets_a_header_from_its_kspace(tmp_path):
    """A JEMRIS-written radial .seq without our definitions: FOV (given in mm by that
    writer), matrix from k_max, non-Cartesian with trajectories."""
    path = CORPUS / "11_koma_v12_radial_JEMRIS.seq"
    if not path.exists():
        pytest.skip("pulseq corpus not available")
    ph = make_phantom(32)
    header, acqs = read(simulate_raw(path, ph, "ge-mr750-3t", tmp_path / "j.h5", noise=False))
    enc = header.encoding[0]
    assert enc.trajectory == mrd.trajectoryType.OTHER
    assert enc.reconSpace.fieldOfView_mm.x == pytest.approx(32.0)
    assert enc.reconSpace.matrixSize.x == enc.reconSpace.matrixSize.y == 32
    img = [a for a in acqs if not is_noise(a)]
    assert all(a.trajectory_dimensions == 2 and a.active_channels == 8 for a in img)
    assert np.abs(np.concatenate([a.traj for a in img])).max() <= 16.5  # cycles/FOV


def test_third_party_cartesian_file_gets_counters_from_its_kspace(tmp_path):
    """An unlabelled Cartesian spin echo (mrphys writer): one line per phase-encoding step,
    counters 0..N-1 from k, limits centred on k = 0 (this writer encodes -N/2+1..N/2)."""
    path = CORPUS / "02_mrphys_se_2D_sms_spr.seq"
    if not path.exists():
        pytest.skip("pulseq corpus not available")
    site = prisma_variant(coil={"channels": 1})
    header, acqs = read(simulate_raw(path, make_phantom(16), site, tmp_path / "se.h5",
                                     noise=False))
    enc = header.encoding[0]
    assert enc.trajectory == mrd.trajectoryType.CARTESIAN
    n = enc.encodedSpace.matrixSize.y
    lines = sorted(a.idx.kspace_encode_step_1 for a in acqs if not is_noise(a))
    assert lines == list(range(n))
    assert enc.encodingLimits.kspace_encoding_step_1.center in (n // 2 - 1, n // 2)
