"""Atlas-prior PV segmentation against the phantoms' known tissue fractions.

Images are built from known CSF/GM/WM fraction maps (the MNI brain phantom and two
cohort subjects, 3 mm), T1w-like contrast as the PV-weighted mix of class intensities
(CSF 0.25, GM 0.60, WM 0.90), Gaussian noise at SNR 20 (GM / sigma), a smooth
multiplicative bias field (about +-35 %), and the affine moved to isocentre (as the study
runner does), so the priors must be registered. The plain 1-D 3-class GMM hard count
(the study's previous segmentation) is measured side by side.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.segment import segment_tissues
from mrharmony.phantoms import make_cohort
from mrharmony.phantoms.brain import brain_fractions

VOXEL_MM = 3.0
LEVELS = {"csf": 0.25, "gm": 0.60, "wm": 0.90}
SNR = 20.0


def _synthetic(fr, *, seed: int, bias: float = 0.3) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    img = sum(LEVELS[k] * getattr(fr, k).astype(np.float64) for k in LEVELS)
    shape = img.shape
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    img = img * np.exp(bias * (0.6 * g[0] + 0.4 * g[1] ** 2 - 0.5 * g[2] * g[0]))
    img = np.abs(img + rng.normal(0.0, LEVELS["gm"] / SNR, shape))
    aff = np.array(fr.affine, dtype=np.float64)
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    aff[:3, 3] -= centre  # at isocentre: the priors must be registered
    return nib.Nifti1Image(img.astype(np.float32), aff)


def _gmm_hard_counts(image: nib.Nifti1Image) -> dict[str, float]:
    """The baseline: 1-D 3-class GMM on intensity, hard labels counted (mL)."""
    v = np.asarray(image.dataobj, dtype=np.float64)
    head = v > 0.1 * np.percentile(v, 99)
    x = v[head].reshape(-1, 1)
    gmm = GaussianMixture(3, random_state=0).fit(x)
    order = np.argsort(gmm.means_.ravel())
    lab = gmm.predict(x)
    voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    return {n: float(np.sum(lab == order[i])) * voxel_ml
            for i, n in enumerate(("csf", "gm", "wm"))}


@pytest.fixture(scope="module")
def template_case():
    fr = brain_fractions(voxel_size_mm=VOXEL_MM)
    image = _synthetic(fr, seed=11)
    return fr.volumes_ml(), segment_tissues(image), _gmm_hard_counts(image)


@pytest.fixture(scope="module")
def atrophy_case():
    """One subject (same anatomy, sex and head scale) at 20 and at 80 years."""
    out = {}
    for age in (20.0, 80.0):
        cohort = make_cohort(1, 7, age_range=(age, age), voxel_size_mm=VOXEL_MM,
                             effects={"patient_fraction": 0.0})
        fr = cohort.fractions(0)
        image = _synthetic(fr, seed=int(age))
        out[age] = (fr.volumes_ml(), segment_tissues(image).volumes_ml,
                    _gmm_hard_counts(image))
    return out


def test_volumes_match_the_true_partial_volumes(template_case):
    true, seg, gmm = template_case
    err = {k: seg.volumes_ml[k] / true[k] - 1 for k in ("csf", "gm", "wm")}
    gmm_err = {k: gmm[k] / true[k] - 1 for k in ("csf", "gm", "wm")}
    print("relative errors: segment_tissues", err, "GMM hard counts", gmm_err)
    # measured (3 mm, SNR 20, bias, 40 iterations): GM and WM within 5 %, CSF +15 %
    # (GMM: GM -3.9 %, WM +10 %, CSF +56 %). CSF is diffuse in this phantom (3 mL of
    # it lies in voxels with more than 90 % CSF), so its pure intensity is weakly
    # identified; it is only required to beat the baseline.
    assert abs(err["gm"]) < 0.05
    assert abs(err["wm"]) < 0.05
    assert abs(err["csf"]) < 0.5 * abs(gmm_err["csf"])
    total = sum(abs(seg.volumes_ml[k] - true[k]) for k in ("csf", "gm", "wm"))
    total_gmm = sum(abs(gmm[k] - true[k]) for k in ("csf", "gm", "wm"))
    assert total < 0.5 * total_gmm
    assert seg.registration_r2 > 0.9
    # fractions are PV maps that sum to at most 1 per voxel
    s = sum(seg.fractions[k] for k in ("csf", "gm", "wm"))
    assert float(s.max()) <= 1.0 + 1e-5 and float(s.min()) >= 0.0


def test_atrophy_gm_difference_has_the_right_sign_and_size(atrophy_case):
    (t20, s20, g20), (t80, s80, g80) = atrophy_case[20.0], atrophy_case[80.0]
    true_d = t80["gm"] - t20["gm"]
    seg_d = s80["gm"] - s20["gm"]
    gmm_d = g80["gm"] - g20["gm"]
    print(f"GM difference 80 y - 20 y: true {true_d:.0f} mL, segment_tissues {seg_d:.0f} mL,"
          f" GMM {gmm_d:.0f} mL")
    # measured: true -180 mL, segment_tissues -146 mL (-19 %), GMM -137 mL (-24 %)
    assert true_d < -100
    assert seg_d < 0
    assert abs(seg_d - true_d) < 0.25 * abs(true_d)


def _brain_image():
    fr = brain_fractions(voxel_size_mm=6.0)
    return _synthetic(fr, seed=1, bias=0.0)


def test_bad_inputs_are_refused():
    img = _brain_image()
    data = np.asarray(img.dataobj)
    with pytest.raises(HarmonizeError, match="constant"):
        segment_tissues(nib.Nifti1Image(np.ones_like(data), img.affine))
    with pytest.raises(HarmonizeError, match="needs its affine"):
        segment_tissues(data)
    with pytest.raises(HarmonizeError, match="NaN"):
        bad = data.copy()
        bad[0, 0, 0] = np.nan
        segment_tissues(bad, affine=img.affine)
    with pytest.raises(HarmonizeError, match="singular"):
        segment_tissues(data, affine=np.zeros((4, 4)))
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    mask = nib.Nifti1Image((data > 0.1).astype(np.uint8), shifted)
    with pytest.raises(HarmonizeError, match="affine differs"):
        segment_tissues(img, mask)
    with pytest.raises(HarmonizeError, match="shape"):
        segment_tissues(img, np.ones((3, 3, 3), bool))
    with pytest.raises(HarmonizeError, match="no voxel"):
        segment_tissues(img, np.zeros(data.shape, bool))
    with pytest.raises(HarmonizeError, match="priors"):
        segment_tissues(img, priors="talairach")
    with pytest.raises(HarmonizeError, match="n_iter"):
        segment_tissues(img, n_iter=0)
    noise = np.abs(np.random.default_rng(0).normal(size=data.shape)).astype(np.float32)
    with pytest.raises(HarmonizeError, match="no brain"):
        segment_tissues(nib.Nifti1Image(noise, img.affine))
