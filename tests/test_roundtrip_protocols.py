"""Every example protocol, for one scanner of each vendor, round-trips through files.

For each protocol of ``examples/protocols/`` and one scanner per vendor (Siemens Prisma
3 T, GE SIGNA Premier 3 T, Philips Ingenia 1.5 T, United Imaging uMR 790 3 T), simulated
at the site of the same vendor and field strength:

    mrharmony seq build  ->  mrharmony simulate  ->  mrharmony recon
    ->  NIfTI (nibabel)  ->  compared with the phantom in world (RAS mm) coordinates.

The Siemens runs keep the site's thermal noise (seeded: noise scans, prewhitening); the
others use ``--no-noise`` so that the numbers measure the chain, not the SNR.

The phantom and the protocols are small so that the whole file runs in a few minutes:

- Protocols: a copy of each example TOML with a 32-pixel matrix (the builder, the
  trajectory, the contrast parameters and the slice count stay those of the example;
  spiral interleaves and radial spokes are scaled with the matrix; EPI runs a second time
  with ramp sampling, ``epi-ramp``). 2-D protocols get
  slices 6 mm apart (thickness kept, gap = 6 mm - thickness) so that every slice centre
  holds one phantom plane.
- RF-spoiled gradient echoes (gre2d, gre3d, radial, spiral, mprage) run with TR (MPRAGE:
  echo spacing) long enough and with several isochromats per voxel at stratified heights
  through the voxel (``--isochromats``): a spoiled steady state needs intravoxel dephasing, and
  with one isochromat per voxel the residual transverse coherence changes from TR to TR,
  which spreads PE ghosts / spiral swirls over the image (measured: 20 % of the image
  energy outside the object for gre2d at TR 12 ms, 1 isochromat). gre2d gets 32: with 8
  or 16 the CSF coherences left at TR 40 ms move the object's centroid by 1.0-1.2 voxels
  at some sites (tests/test_simulation_consistency.py measures the line-to-line error).
  EPI and bSSFP get 4 isochromats: with one, the long-T2 CSF of the previous slice is
  never dephased and shows in the next slice (10 % of the energy for EPI). This is a limit
  of the discrete-isochromat simulation, not of the reconstruction.
- Phantom: the MR Shepp-Logan phantom (Gach 2008) at the site's field. 2-D protocols:
  one plane (2.75 mm voxels) per slice centre (planes from different heights of the 3-D
  phantom), each plane moved along x by a different amount (11 mm from slice to slice) so
  that swapped slices are seen. 3-D protocols: the 3-D phantom on a 4.5 mm grid. The
  object is off-centre (x 14, y 12, z 20 mm for 3-D) so that a flipped axis or a wrong
  affine moves it by at least two voxels.

"Matches the phantom" (tolerances below, in ``TOL``): the phantom's label maps are
resampled onto the image grid in world coordinates (fraction of each image voxel covered
by each tissue, ``F_l``). For every volume the image magnitude is fitted as
``sum_l c_l F_l`` (a per-tissue contrast: the phantom's expected contrast-weighted signal,
whatever the weighting) and

- every object voxel of the phantom lies inside the image FOV (no aliasing by prescription);
- the correlation of the magnitude with the fitted phantom signal over all volumes is high
  (geometry, contrast per tissue; blurring, ghosts and artefacts lower it);
- the energy outside the object (dilated by one voxel) is a small fraction of the image
  energy (catches aliasing, N/2 ghosts, wrong FOV, swirls, a shifted image);
- the centroid of the object mask of each slice (3-D: of the volume) is within one voxel
  of the fitted phantom's, per axis (catches flips, shifts, wrong slice order, a wrong
  affine; masks, not intensities, so that coil shading does not move it);
- the Dice overlap of the thresholded image and the thresholded phantom signal is high
  (catches wrong FOV / scaling and blank images).

Multi-volume series are also checked for order and weighting from the fitted tissue
signals: DWI (b = 0 first, then CSF and GM attenuated as exp(-b ADC)), multi-echo SE (GM
decays with T2 faster than CSF) and IR-SE (GM nulls at the TI nearest T1 ln 2).

Each round trip also checks that the same criteria reject the image flipped along each
axis, shifted by two voxels along y, and a blank image.

Runtime: about 2 minutes with ``pytest -n 2`` on 2 cores (48 round trips).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrharmony.cli import main
from mrharmony.phantoms import load_phantom, make_shepp_logan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "protocols"

PROTOCOLS = ("gre2d", "gre3d", "irse", "mese", "tse", "mprage", "bssfp", "epi", "dwi_epi",
             "radial", "spiral", "epi-ramp")

#: Variants: name -> (example protocol, changes); EPI also with ramp sampling.
VARIANTS = {"epi-ramp": ("epi", {"ramp_sampling": True})}

#: vendor -> (scanner profile, site preset of the same vendor and field, field in T)
VENDORS = {
    "siemens": ("siemens-prisma", "siemens-prisma-3t", 3.0),
    "ge": ("ge-signa-premier", "ge-premier-3t", 3.0),
    "philips": ("philips-ingenia-1.5t", "philips-ingenia-1.5t", 1.5),
    "uih": ("uih-umr790", "uih-umr790-3t", 3.0),
}

#: Changes to each example protocol (everything else is the example's own).
SMALL: dict[str, dict] = {
    "gre2d": {"matrix": [32, 32], "fov_mm": [220, 220], "tr_ms": 40},
    "gre3d": {"matrix": [32, 32, 10], "fov_mm": [220, 220, 200], "tr_ms": 40},
    "irse": {"matrix": [32, 32], "fov_mm": [220, 220]},
    "mese": {"matrix": [32, 32], "fov_mm": [220, 220], "n_echoes": 4},
    "tse": {"matrix": [32, 32], "fov_mm": [220, 220]},
    "mprage": {"matrix": [32, 28, 10], "fov_mm": [256, 224, 200], "echo_spacing_ms": 30},
    "bssfp": {"matrix": [32, 32], "fov_mm": [220, 220]},
    "epi": {"matrix": [32, 32], "fov_mm": [220, 220]},
    "dwi_epi": {"matrix": [32, 32], "fov_mm": [220, 220]},
    "radial": {"matrix": [32, 32], "fov_mm": [220, 220], "tr_ms": 40, "n_spokes": 51},
    "spiral": {"matrix": [32, 32], "fov_mm": [220, 220], "tr_ms": 40, "n_interleaves": 4},
}

#: Vendors simulated with the site's (seeded) thermal noise, so that noise scans and
#: prewhitening are part of every protocol's round trip; the others are noiseless, so that
#: the comparison measures the chain, not the SNR (the 1.5 T site's noise floor alone puts
#: 25 % of a 32-pixel spiral's energy outside the object).
NOISY = {"siemens"}

#: Isochromats per voxel (stratified through the voxel) of the RF-spoiled sequences.
ISOCHROMATS = {"gre2d": 32, "radial": 8, "spiral": 8, "gre3d": 4, "mprage": 4, "epi": 4,
               "bssfp": 4}

SLICE_SPACING_MM = 6.0
SHIFT_MM = np.array([14.0, 12.0, 0.0])
SHIFT_3D_MM = np.array([14.0, 12.0, 20.0])
PLANE_STEP_VOX = 4  # planes move 4 phantom voxels (11 mm) along x from slice to slice

#: Acceptance criteria (see the module docstring).
TOL = {
    "corr_min": 0.80,  # correlation of |image| with the fitted phantom signal
    "outside_max": 0.15,  # fraction of image energy outside the object grown by 1 voxel
    "centroid_vox": 1.0,  # centroid distance per axis, in image voxels
    "dice_min": 0.80,  # Dice of the thresholded image vs the thresholded phantom signal
}
MASK_LEVEL = 0.3  # threshold: fraction of the 95th percentile inside the object


# --------------------------------------------------------------------------- inputs


def _toml(data: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in data.items())


def small_protocol(name: str, out_dir: Path) -> Path:
    """A copy of ``examples/protocols/<name>.toml`` with the changes of ``SMALL``."""
    example, extra = VARIANTS.get(name, (name, {}))
    data = tomllib.loads((EXAMPLES / f"{example}.toml").read_text())
    data.update(SMALL[example])
    data.update(extra)
    if len(data["matrix"]) == 2:
        data["slice_gap_mm"] = SLICE_SPACING_MM - float(data["slice_thickness_mm"])
    path = out_dir / f"{name}.toml"
    path.write_text(_toml(data))
    return path


def _planes_phantom(field_t: float, n_planes: int):
    """Shepp-Logan planes at the slice centres of ``n_planes`` slices 6 mm apart."""
    keys = ("pd", "t1_ms", "t2_ms", "t2star_ms", "adc_mm2_s", "b0_hz", "labels")
    planes, names = [], {}
    for i in range(n_planes):
        ph = make_shepp_logan(field_t, matrix=64, fov_mm=176.0, slice_index=20 + 2 * i)
        roll = round(PLANE_STEP_VOX * (i - (n_planes - 1) / 2))
        planes.append({k: np.roll(getattr(ph, k), roll, axis=0) for k in keys})
        names.update(ph.label_names)
    maps = {k: np.concatenate([p[k] for p in planes], axis=2) for k in keys}
    affine = ph.affine.copy()
    affine[2, 2] = SLICE_SPACING_MM
    affine[2, 3] = -SLICE_SPACING_MM * (n_planes - 1) / 2
    affine[:3, 3] += SHIFT_MM
    return dataclasses.replace(ph, affine=affine, label_names=names, **maps)


def _volume_phantom(field_t: float):
    ph = make_shepp_logan(field_t, matrix=32, fov_mm=144.0, three_d=True)
    affine = ph.affine.copy()
    affine[:3, 3] += SHIFT_3D_MM
    return dataclasses.replace(ph, affine=affine)


@pytest.fixture(scope="module")
def phantom_dirs(tmp_path_factory) -> dict:
    """Phantom folders by (field, kind): kind 2 / 3 planes, or "3d"."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for field in sorted({v[2] for v in VENDORS.values()}):
        for kind in (2, 3, "3d"):
            ph = _volume_phantom(field) if kind == "3d" else _planes_phantom(field, kind)
            out[field, kind] = ph.save(root / f"sl-{field:g}t-{kind}")
    return out


# --------------------------------------------------------------------------- comparison


def label_fractions(phantom, shape: tuple, affine: np.ndarray) -> tuple[np.ndarray, int]:
    """Fraction of each image voxel covered by each tissue label, and object voxels
    of the phantom that fall outside the image grid."""
    lab = np.asarray(phantom.labels).reshape(-1)
    ijk = np.indices(phantom.shape).reshape(3, -1)
    world = phantom.affine[:3, :3] @ ijk + phantom.affine[:3, 3:4]
    inv = np.linalg.inv(affine)
    vox = np.rint(inv[:3, :3] @ world + inv[:3, 3:4]).astype(int)
    inside = np.all((vox >= 0) & (vox < np.array(shape)[:, None]), axis=0)
    flat = np.ravel_multi_index(vox[:, inside], shape)
    size = int(np.prod(shape))
    counts = np.bincount(flat, minlength=size)
    labels = [int(v) for v in np.unique(lab) if v > 0]
    fr = np.stack([np.bincount(flat, weights=(lab[inside] == v).astype(float), minlength=size)
                   for v in labels]) / np.maximum(counts, 1)
    outside = int(np.sum(~inside & (lab > 0)))
    return fr.reshape((len(labels), *shape)), outside


def _filled(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], -1)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ijk = np.indices(mask.shape).reshape(mask.ndim, -1)
    return (ijk * mask.reshape(-1)).sum(1) / mask.sum()


def compare(mag: np.ndarray, fr: np.ndarray, two_d: bool) -> dict:
    """The numbers of the acceptance criteria for magnitude volumes ``(nx, ny, nz, nv)``.

    ``fr`` are the tissue fractions on the image grid (:func:`label_fractions`).
    """
    nv = mag.shape[-1]
    a = fr.reshape(fr.shape[0], -1).T
    fit = np.empty_like(mag)
    for v in range(nv):
        c, *_ = np.linalg.lstsq(a, mag[..., v].reshape(-1), rcond=None)
        fit[..., v] = (a @ c).reshape(mag.shape[:3])
    y, f = mag.reshape(-1), fit.reshape(-1)
    corr = float(np.corrcoef(y, f)[0, 1]) if y.std() > 0 and f.std() > 0 else 0.0
    support = fr.sum(0) > 0
    grow = np.ones((3, 3, 1) if two_d else (3, 3, 3), bool)
    grown = ndimage.binary_dilation(support, structure=grow)
    energy = float(np.sum(mag**2))
    outside = float(np.sum(mag[~grown] ** 2)) / energy if energy > 0 else 1.0
    # object masks: root-sum-of-squares over the volumes, thresholded, holes filled
    rss_img = np.sqrt((mag**2).sum(-1))
    rss_fit = np.sqrt((np.clip(fit, 0, None) ** 2).sum(-1))
    level = np.percentile(rss_img[support], 95)
    mask_img = _filled(rss_img > MASK_LEVEL * level) if level > 0 else np.zeros_like(support)
    mask_fit = _filled(rss_fit > MASK_LEVEL * np.percentile(rss_fit[support], 95))
    denom = mask_img.sum() + mask_fit.sum()
    dice = float(2 * np.sum(mask_img & mask_fit) / denom) if denom else 0.0
    # mask centroids per slice (2-D) or of the volume (3-D), per axis in voxels
    groups = [np.s_[:, :, k] for k in range(mag.shape[2])] if two_d else [np.s_[:, :, :]]
    worst = 0.0
    for g in groups:
        if not mask_fit[g].any():
            continue
        if not mask_img[g].any():
            worst = np.inf
            continue
        worst = max(worst, float(np.max(np.abs(_centroid(mask_img[g]) - _centroid(mask_fit[g])))))
    return {"corr": corr, "outside": outside, "centroid_vox": worst, "dice": dice}


def tissue_signal(mag: np.ndarray, fr: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Fitted signal of each tissue in every volume (the ``c_l`` of :func:`compare`)."""
    a = fr.reshape(fr.shape[0], -1).T
    c = np.linalg.lstsq(a, mag.reshape(-1, mag.shape[-1]), rcond=None)[0]  # (labels, nv)
    return dict(zip(names, c, strict=True))


def volume_order_problems(name: str, sig: dict[str, np.ndarray]) -> list[str]:
    """Physics of the volume series: the volumes are in protocol order with their weighting.

    Shepp-Logan tissues: CSF ADC 3.0e-3 mm2/s, T1 4.2 s, T2 2 s; gray matter ADC 0.8e-3,
    T1 1.29 s (3 T) / 1.00 s (1.5 T), T2 100 ms.
    """
    csf, gm = sig["csf"], sig["gray-matter"]
    bad = []
    if name == "dwi_epi":  # b = 0 first, then six directions at b = 1000 s/mm2
        r_csf, r_gm = csf[1:] / csf[0], gm[1:] / gm[0]
        # exp(-b ADC): CSF 0.05, GM 0.45 (partial volume and noise: wide bounds)
        if not (np.all(r_csf < 0.25) and np.all((r_gm > 0.25) & (r_gm < 0.75))):
            bad.append(f"DWI attenuation CSF {np.round(r_csf, 2)}, GM {np.round(r_gm, 2)}")
    elif name == "mese":  # echoes 12, 24, 36, 48 ms: GM decays (T2 100 ms), CSF hardly
        r_gm, r_csf = gm[3] / gm[1], csf[3] / csf[1]
        if not (0.6 < r_gm < 0.95 and r_csf > r_gm):
            bad.append(f"MESE echo 4 / echo 2: GM {r_gm:.2f}, CSF {r_csf:.2f}")
    elif name == "irse" and not (int(np.argmin(np.abs(gm))) == 2 and csf[0] > csf[2]):
        # TI 50, 200, 800, 2000 ms: GM nulls near TI = 800 ms (magnitude), CSF recovers
        bad.append(f"IR-SE GM {np.round(gm, 1)}, CSF {np.round(csf, 1)}")
    return bad


def failures(m: dict) -> list[str]:
    """The criteria that ``m`` (from :func:`compare`) misses."""
    bad = []
    if not m["corr"] >= TOL["corr_min"]:
        bad.append(f"correlation {m['corr']:.3f} < {TOL['corr_min']}")
    if not m["outside"] <= TOL["outside_max"]:
        bad.append(f"energy outside the object {m['outside']:.3f} > {TOL['outside_max']}")
    if not m["centroid_vox"] <= TOL["centroid_vox"]:
        bad.append(f"centroid off by {m['centroid_vox']:.2f} voxels > {TOL['centroid_vox']}")
    if not m["dice"] >= TOL["dice_min"]:
        bad.append(f"Dice {m['dice']:.3f} < {TOL['dice_min']}")
    return bad


# --------------------------------------------------------------------------- the round trip


def _run(argv: list[str]) -> None:
    code = main(argv)
    assert code == 0, f"mrharmony {' '.join(argv)} exited with {code}"


@pytest.mark.parametrize("vendor", list(VENDORS))
@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_round_trip(name, vendor, phantom_dirs, tmp_path):
    scanner, site, field = VENDORS[vendor]
    toml = small_protocol(name, tmp_path)
    n_slices = tomllib.loads(toml.read_text()).get("n_slices")
    two_d = n_slices is not None
    ph_dir = phantom_dirs[field, n_slices if two_d else "3d"]
    seq, raw, nii = (tmp_path / f"{name}.seq", tmp_path / f"{name}.h5",
                     tmp_path / f"{name}.nii.gz")

    _run(["seq", "build", str(toml), "--scanner", scanner, "-o", str(seq)])
    _run(["simulate", str(seq), str(ph_dir), "--site", site, "-o", str(raw), "--seed", "3",
          "--isochromats", str(ISOCHROMATS.get(VARIANTS.get(name, (name,))[0], 1)),
          "--noise" if vendor in NOISY else "--no-noise"])
    _run(["recon", str(raw), "-o", str(nii)])

    img = nib.load(nii)
    mag = np.abs(np.asarray(img.dataobj, dtype=np.float64))
    mag = mag[..., None] if mag.ndim == 3 else mag
    expected_volumes = {"irse": 4, "mese": 4, "dwi_epi": 7}.get(name, 1)
    assert mag.shape[-1] == expected_volumes
    assert mag.shape[2] == (n_slices if two_d else SMALL[name]["matrix"][2])
    assert np.all(np.isfinite(mag))
    phantom = load_phantom(ph_dir)
    fr, outside_fov = label_fractions(phantom, mag.shape[:3], img.affine)
    assert outside_fov == 0, f"{outside_fov} object voxels of the phantom outside the image"

    names = [phantom.label_names[int(v)] for v in np.unique(phantom.labels) if v > 0]
    order = volume_order_problems(name, tissue_signal(mag, fr, names))
    assert not order, f"{name} on {scanner}: {order}"

    m = compare(mag, fr, two_d)
    print(f"ROUNDTRIP {name} {vendor} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
    assert not failures(m), f"{name} on {scanner} at {site}: {failures(m)} ({m})"

    # The same criteria reject a flipped, a shifted and a blank image.
    for axis in (0, 1, 2) if not two_d else (0, 1):
        flipped = compare(np.flip(mag, axis=axis), fr, two_d)
        assert failures(flipped), f"flip along axis {axis} not detected: {flipped}"
    shifted = compare(np.roll(mag, 2, axis=1), fr, two_d)
    assert failures(shifted), f"a 2-voxel shift not detected: {shifted}"
    assert failures(compare(np.zeros_like(mag), fr, two_d))
