"""Pipeline: quantitative maps across series, backends, ISMRMRD image output."""

from __future__ import annotations

import numpy as np
import pytest
from test_recon_io import make_acquisitions, make_header, write_raw

from mrharmony.errors import ReconError
from mrharmony.formats.raw import RawData
from mrharmony.recon import reconstruct
from mrharmony.recon.cartesian import fft_c
from mrharmony.recon.pipeline import resolve_backend

pytest.importorskip("mrharmony.recon.maps", reason="quantitative maps not built yet")

N = 32


def _disc(t_true: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:N, :N] - N // 2
    inside = x**2 + y**2 < (N // 3) ** 2
    return inside, np.where(inside, t_true, 0.0)


def test_t2_map_from_multi_echo_series(tmp_path):
    te_ms = (10.0, 30.0, 50.0, 70.0, 90.0)
    inside, _ = _disc(80.0)
    header = make_header(N, N, coils=1, te_ms=te_ms)
    acqs = []
    for echo, te in enumerate(te_ms):
        img = (inside * np.exp(-te / 80.0)).astype(np.complex64)
        acqs += make_acquisitions(fft_c(img[None], axes=(1, 2)), contrast=echo)
    raw = RawData(header=header, acquisitions=acqs)
    images = reconstruct(raw, backend="numpy", maps="t2")
    t2 = [im for im in images if im.meta.get("map") == "t2_ms"]
    assert len(t2) == 1 and len(images) == len(te_ms) + 1
    # noise-free mono-exponential decay: T2 recovered to 1 % in the disc interior
    core = inside & (np.hypot(*(np.mgrid[:N, :N] - N // 2)) < N // 4)
    np.testing.assert_allclose(t2[0].data[:, :, 0][core], 80.0, rtol=0.01)


def test_t1_map_from_inversion_series_uses_set_as_ti_index():
    ti_ms = (50.0, 150.0, 400.0, 800.0, 1600.0, 3200.0)
    inside, _ = _disc(900.0)
    header = make_header(N, N, coils=1, ti_ms=ti_ms)
    acqs = []
    for s, ti in enumerate(ti_ms):
        sig = abs(1 - 2 * np.exp(-ti / 900.0))  # magnitude IR signal, long TR
        acqs += make_acquisitions(fft_c((inside * sig).astype(np.complex64)[None],
                                        axes=(1, 2)), set_=s)
    images = reconstruct(RawData(header=header, acquisitions=acqs), backend="numpy", maps="t1")
    t1 = next(im for im in images if im.meta.get("map") == "t1_ms")
    core = np.hypot(*(np.mgrid[:N, :N] - N // 2)) < N // 4
    np.testing.assert_allclose(t1.data[:, :, 0][core], 900.0, rtol=0.02)
    assert [im.meta["ti_ms"] for im in images if "map" not in im.meta] == list(ti_ms)


def test_maps_need_a_series_and_the_header_values():
    header = make_header(N, N, coils=1)
    acqs = make_acquisitions(np.ones((1, N, N), np.complex64))
    with pytest.raises(ReconError, match="at least 2"):
        reconstruct(RawData(header=header, acquisitions=acqs), backend="numpy", maps="t2")
    with pytest.raises(ReconError, match="maps 'x1'"):
        reconstruct(RawData(header=header, acquisitions=acqs), backend="numpy", maps="x1")


def test_backend_auto_is_numpy_without_gpu_and_cupy_is_refused():
    from mrharmony.backend import cupy_available

    if cupy_available():
        assert resolve_backend("auto") == "cupy"
    else:
        assert resolve_backend("auto") == "numpy"
        with pytest.raises(ReconError, match="CuPy"):
            resolve_backend("cupy")


@pytest.mark.gpu
def test_cupy_backend_matches_numpy():
    from mrharmony.backend import cupy_available

    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import sigpy as sp
    import sigpy.mri as mr

    img = sp.shepp_logan((64, 64)).astype(np.complex64)
    mps = mr.birdcage_maps((4, 64, 64)).astype(np.complex64)
    k = fft_c(mps * img, axes=(1, 2))
    mask = np.zeros(64, bool)
    mask[::2] = True
    mask[20:44] = True
    header = make_header(64, 64, coils=4)
    acqs = make_acquisitions(k, lines=np.flatnonzero(mask))
    raw = RawData(header=header, acquisitions=acqs)
    a = reconstruct(raw, method="sense", backend="numpy")[0].data
    b = reconstruct(raw, method="sense", backend="cupy")[0].data
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4


def test_cli_maps_write_one_file_per_quantity(tmp_path):
    from mrharmony.cli import main

    te_ms = (10.0, 40.0, 70.0)
    inside, _ = _disc(60.0)
    acqs = []
    for echo, te in enumerate(te_ms):
        img = (inside * np.exp(-te / 60.0)).astype(np.complex64)
        acqs += make_acquisitions(fft_c(img[None], axes=(1, 2)), contrast=echo)
    p = write_raw(tmp_path / "me.h5", make_header(N, N, coils=1, te_ms=te_ms), acqs)
    out = tmp_path / "me.nii.gz"
    assert main(["recon", str(p), "-o", str(out), "--maps", "t2", "--backend", "numpy"]) == 0
    import nibabel as nib

    assert nib.load(out).shape == (N, N, 1, 3)
    assert nib.load(tmp_path / "me_t2_ms.nii.gz").shape == (N, N, 1)
    assert (tmp_path / "me_t2_ms.json").exists()


def test_epi_dispatches_to_epi_recon_and_combines_coils():
    pytest.importorskip("mrharmony.recon.epi", reason="EPI recon not built yet")
    epi = pytest.importorskip("test_recon_epi", reason="EPI test data builders not present")
    from mrharmony.recon import reconstruct_acquisitions

    acqs, img, sens = epi.make_epi()
    header = epi.make_header()
    images = reconstruct_acquisitions(header, acqs, method="auto", backend="numpy")
    assert len(images) == 1 and images[0].meta["recon"]["method"] == "epi"
    rec = images[0].data[:, :, 0]
    ref = np.sqrt(np.sum(np.abs(sens * img[None]) ** 2, axis=0))
    s = np.vdot(rec, ref) / np.vdot(rec, rec)
    # ramp regridding + ghost correction inside recon.epi; sum of squares here
    assert np.linalg.norm(s * rec - ref) / np.linalg.norm(ref) < 0.02


def _radial_case(n_spokes: int = 48):
    nc_tests = pytest.importorskip("test_recon_noncartesian")
    from mrharmony.recon.noncartesian import radial_coords

    n = nc_tests.N
    traj = radial_coords(n_spokes, 2 * n, n).reshape(n_spokes, 2 * n, 2)
    data = nc_tests.shepp_logan_kspace(traj.reshape(-1, 2)).reshape(1, n_spokes, 2 * n)
    return nc_tests.make_header("radial", n_spokes), nc_tests.make_acquisitions(data, traj)


def test_options_a_method_does_not_take_are_refused():
    from mrharmony.recon import reconstruct_acquisitions

    header = make_header(N, N, coils=1)
    acqs = make_acquisitions(np.ones((1, N, N), np.complex64))
    with pytest.raises(ReconError, match=r"method 'fft' does not take option\(s\) lamda"):
        reconstruct_acquisitions(header, acqs, method="fft", backend="numpy", lamda=1e-3)
    # auto resolves to fft on fully sampled data: checked against what it chose
    with pytest.raises(ReconError, match=r"'fft' \(from 'auto'\).*max_iter"):
        reconstruct_acquisitions(header, acqs, method="auto", backend="numpy", max_iter=3)
    with pytest.raises(ReconError, match="l1_lambda: no method takes"):
        reconstruct_acquisitions(header, acqs, method="cs", backend="numpy", l1_lambda=1e-3)
    r_header, r_acqs = _radial_case()
    with pytest.raises(ReconError, match=r"'nufft' \(from 'auto'\).*lamda"):
        reconstruct_acquisitions(r_header, r_acqs, backend="numpy", lamda=1e-3)


def test_noncartesian_takes_the_same_methods_and_options():
    from mrharmony.recon import reconstruct_acquisitions

    header, acqs = _radial_case()
    grid = reconstruct_acquisitions(header, acqs, backend="numpy")[0]
    out = {}
    for method in ("sense", "cs", "tv"):
        im = reconstruct_acquisitions(header, acqs, method=method, backend="numpy",
                                      lamda=1e-3, max_iter=5)[0]
        # the options reach the recon (and the sidecar), never dropped
        assert im.meta["recon"] | {"lamda": 1e-3, "max_iter": 5} == im.meta["recon"]
        assert im.meta["recon"]["method"] == method
        out[method] = np.abs(im.data[:, :, 0])
    ref = np.abs(grid.data[:, :, 0])
    for method, img in out.items():  # all close to the gridding image (1 coil, 48 spokes)
        s = np.vdot(img, ref) / np.vdot(img, img)
        assert np.linalg.norm(s * img - ref) / np.linalg.norm(ref) < 0.1, method


def test_bart_refuses_what_it_cannot_run():
    from mrharmony.recon import reconstruct_acquisitions
    from mrharmony.recon.bart import bart_available

    if not bart_available():
        pytest.skip("the 'bart' executable is missing")
    header, acqs = _radial_case(8)
    with pytest.raises(ReconError, match="backend 'bart': radial data are not supported"):
        reconstruct_acquisitions(header, acqs, method="sense", backend="bart")
    c_header = make_header(N, N, coils=1)
    c_acqs = make_acquisitions(np.ones((1, N, N), np.complex64))
    images = reconstruct_acquisitions(c_header, c_acqs, method="fft", backend="bart")
    # an FFT recon has no bart step: the sidecar says where it ran
    assert images[0].meta["recon"]["backend"] == "numpy"
    assert images[0].meta["recon"]["backend_requested"] == "bart"
