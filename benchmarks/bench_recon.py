"""Benchmark: our Cartesian recon vs BART, SigPy and pygrappa on the same data (CPU).

256 x 256 Shepp-Logan, 8 birdcage coils (``--coils``), R = 2 (``--accel``) with 24
calibration lines, complex noise. Runs side by side: ESPIRiT (``bart ecalib`` / SigPy
``EspiritCalib`` / ours), CG-SENSE (``bart pics -l2`` / SigPy ``SenseRecon`` / ours),
L1-wavelet 50 iterations (``bart pics -R W -i 50`` / ours FISTA), TV 50 iterations (SigPy
``TotalVariationRecon`` / ours FISTA + FGP), and GRAPPA (pygrappa ``mdgrappa`` / ours;
pygrappa is not a dependency: ``pip install pygrappa`` to run it). Reports the best of
``--repeat`` wall times, accuracy (NRMSE vs the fully sampled SENSE image after
scaling; GRAPPA: root-sum-of-squares vs that of the fully sampled k-space) and the ratio
of the fastest peer to ours (> 1: we are faster).

Usage: ``python benchmarks/bench_recon.py [--quick] [--repeat N] [--size N] [--coils N]
[--accel R]`` (issue 17's case: ``--coils 32 --accel 3``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _nrmse(a, ref):
    a = np.asarray(a).ravel()
    ref = np.asarray(ref).ravel()
    s = np.vdot(a, ref) / np.vdot(a, a)
    return float(np.linalg.norm(s * a - ref) / np.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 x 128, one repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8, help="birdcage coils")
    parser.add_argument("--accel", type=int, default=2, help="undersampling factor R")
    args = parser.parse_args(argv)
    n = 128 if args.quick else args.size
    repeat = 1 if args.quick else args.repeat

    import sigpy as sp
    import sigpy.mri as mr

    from mrharmony.recon import bart as B
    from mrharmony.recon.cartesian import fft_c
    from mrharmony.recon.coils import espirit_maps
    from mrharmony.recon.parallel import grappa, sense_cg, sense_l1_wavelet, sense_tv

    nc, acs, accel = args.coils, 24, args.accel
    rng = np.random.default_rng(0)
    img = sp.shepp_logan((n, n)).astype(np.complex64)
    mps = mr.birdcage_maps((nc, n, n)).astype(np.complex64)
    k = fft_c(mps * img, axes=(1, 2))
    k += (1e-3 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(
        np.complex64)
    mask = np.zeros(n, bool)
    mask[::accel] = True
    mask[n // 2 - acs // 2 : n // 2 + acs // 2] = True
    ku = k * mask[None, None, :]
    have_bart = B.bart_available()
    rows = []

    t_ours, maps = _best(lambda: espirit_maps(ku, (n, n), calib_width=acs), repeat)
    t_sp, _ = _best(lambda: mr.app.EspiritCalib(ku, calib_width=acs, show_pbar=False).run(),
                    repeat)
    t_b = _best(lambda: B.ecalib(ku, calib_width=acs), repeat)[0] if have_bart else None
    rows.append(("ESPIRiT maps", t_ours, t_b, t_sp, None))

    ref = sense_cg(k, maps, np.ones((1, n)), max_iter=50)
    t_ours, x = _best(lambda: sense_cg(ku, maps, mask[None, :], max_iter=30), repeat)
    t_sp, xs = _best(lambda: mr.app.SenseRecon(ku, maps, max_iter=30, show_pbar=False).run(),
                     repeat)
    acc = f"ours {_nrmse(x, ref):.4f} sigpy {_nrmse(xs, ref):.4f}"
    if have_bart:
        t_b, xb = _best(lambda: B.pics(ku, maps, l2=1e-4), repeat)
        acc += f" bart {_nrmse(xb, ref):.4f}"
    else:
        t_b = None
    rows.append(("CG-SENSE (l2)", t_ours, t_b, t_sp, acc))

    t_ours, x = _best(lambda: sense_l1_wavelet(ku, maps, mask[None, :], max_iter=50), repeat)
    acc = f"ours {_nrmse(x, ref):.4f}"
    if have_bart:
        t_b, xb = _best(lambda: B.pics(ku, maps, l1_wavelet=0.001, iterations=50), repeat)
        acc += f" bart {_nrmse(xb, ref):.4f}"
    else:
        t_b = None
    rows.append(("L1-wavelet 50 it", t_ours, t_b, None, acc))

    t_ours, x = _best(lambda: sense_tv(ku, maps, mask[None, :], max_iter=50), repeat)
    acc = f"ours {_nrmse(x, ref):.4f}"
    lam_sp = 3e-4 * float(np.abs(np.sum(np.conj(maps) * np.fft.ifftshift(np.fft.ifft2(
        np.fft.ifftshift(ku, axes=(1, 2)), norm="ortho"), axes=(1, 2)), axis=0)).max())
    t_sp, xs = _best(lambda: mr.app.TotalVariationRecon(
        ku, maps, lam_sp, weights=mask[None, :].astype(np.float32) * np.ones((n, 1)),
        max_iter=50, show_pbar=False).run(), 1)
    acc += f" sigpy {_nrmse(xs, ref):.4f}"
    rows.append(("TV 50 it", t_ours, None, t_sp, acc))

    cal = k[:, :, n // 2 - acs // 2 : n // 2 + acs // 2]
    full_rss = np.sqrt(np.sum(np.abs(np.fft.ifftshift(np.fft.ifft2(np.fft.ifftshift(
        k, axes=(1, 2)), norm="ortho"), axes=(1, 2))) ** 2, axis=0))

    def rss(kspace):
        im = np.fft.ifftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(1, 2)), norm="ortho"),
                              axes=(1, 2))
        return np.sqrt(np.sum(np.abs(im) ** 2, axis=0))

    t_ours, kg = _best(lambda: grappa(ku, cal, mask=mask), repeat)
    acc = f"ours {_nrmse(rss(kg), full_rss):.4f}"
    try:
        from pygrappa import mdgrappa
    except ImportError:
        t_pg = None
    else:
        ku_last = np.moveaxis(ku, 0, -1)
        cal_last = np.moveaxis(cal, 0, -1)
        t_pg, kp = _best(lambda: mdgrappa(ku_last, cal_last, kernel_size=(5, 5), coil_axis=-1),
                         repeat)
        acc += f" pygrappa {_nrmse(rss(np.moveaxis(kp, -1, 0)), full_rss):.4f}"
    rows.append(("GRAPPA", t_ours, t_pg, None, acc))

    print(f"recon benchmark: {n}x{n}, {nc} coils, R={accel}, {acs} ACS lines, "
          f"best of {repeat}")
    print("(the 'bart s' column holds pygrappa for the GRAPPA row)")
    print(f"{'step':<18}{'ours s':>9}{'bart s':>9}{'sigpy s':>9}{'peer/ours':>11}  accuracy")
    for name, t_o, t_b, t_s, acc in rows:
        peers = [t for t in (t_b, t_s) if t is not None]
        ratio = f"{min(peers) / t_o:10.2f}x" if peers else f"{'-':>11}"
        fb = f"{t_b:9.3f}" if t_b is not None else f"{'-':>9}"
        fs = f"{t_s:9.3f}" if t_s is not None else f"{'-':>9}"
        print(f"{name:<18}{t_o:9.3f}{fb}{fs}{ratio}  {acc or ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
