"""CycleGAN (unpaired) and CALAMITI (disentangling) on an analytic traveling-subject set.

The data (:func:`mrharmony.harmonize.learned.data.synthetic_dataset`) are random label
maps imaged with a spin-echo signal equation per site (different TR/TE, field, gain,
blur, noise): 32x32, no Bloch simulation, so the module runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from mrharmony.errors import HarmonizeError  # noqa: E402
from mrharmony.harmonize.learned.base import load_harmonizer  # noqa: E402
from mrharmony.harmonize.learned.data import foreground, synthetic_dataset  # noqa: E402
from mrharmony.harmonize.learned.disentangle import Calamiti  # noqa: E402
from mrharmony.harmonize.learned.unpaired import CycleGAN  # noqa: E402

SRC, TGT = "site-b", "site-a"


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return synthetic_dataset(n_subjects=8, matrix=32, seed=5, n_validation=1, n_test=2)


def _w1_to_target(images, data, contrast="t1w"):
    """Wasserstein-1 distance between the foreground intensities of ``images`` and of
    the target site's training images, in units of the target's robust maximum."""
    from scipy.stats import wasserstein_distance

    ref = data.images[data.rows(site=TGT, contrast=contrast, split="train")]
    scale = np.percentile(ref[np.stack([foreground(r) for r in ref])], 99)
    a = np.concatenate([im[foreground(im)] for im in images])
    b = ref[np.stack([foreground(r) for r in ref])]
    return wasserstein_distance(a / scale, b / scale)


@pytest.fixture(scope="module")
def cyclegan(data):
    return CycleGAN(source_site=SRC, target_site=TGT, base=4, n_blocks=2, disc_base=8,
                    epochs=60, batch_size=2, patience=60, seed=0, device="cpu").fit(data)


def test_cyclegan_reduces_the_cycle_loss_and_moves_histograms_to_the_target(cyclegan, data):
    cyc = cyclegan.training_["losses"]["cycle_identity"]
    assert np.mean(cyc[-5:]) < 0.5 * cyc[0], cyc
    x = data.images[data.rows(site=SRC, contrast="t1w", split="test")]
    # "none": the source images only rescaled to the target unit (what the base class does)
    from mrharmony.harmonize.learned.data import robust_scale

    none = np.stack([im / robust_scale(im) for im in x]) * cyclegan.scales_[TGT]
    before, after = _w1_to_target(none, data), _w1_to_target(cyclegan.transform(x, SRC), data)
    assert after < 0.9 * before, (before, after)  # measured: 0.122 -> 0.100


def test_cyclegan_round_trips_exactly_and_refuses_other_sites(cyclegan, data, tmp_path):
    cyclegan.save(tmp_path / "cg")
    again = load_harmonizer(tmp_path / "cg", device="cpu")
    assert isinstance(again, CycleGAN) and again.training_ == cyclegan.training_
    x = data.images[data.rows(site=SRC, contrast="t1w")]
    np.testing.assert_array_equal(again.transform(x, SRC), cyclegan.transform(x, SRC))
    y = data.images[data.rows(site=TGT, contrast="t1w")]
    np.testing.assert_array_equal(again.transform(y, TGT, target=SRC),
                                  cyclegan.transform(y, TGT, target=SRC))
    with pytest.raises(HarmonizeError, match="translates between site-b and 'site-a' only"):
        cyclegan.transform(x, "site-c")
    with pytest.raises(HarmonizeError, match="source and target site are both"):
        CycleGAN(source_site=TGT, target_site=TGT, epochs=1, device="cpu").fit(data)


@pytest.fixture(scope="module")
def calamiti(data):
    return Calamiti(target_site=TGT, base=8, depth=2, epochs=60, batch_size=4, patience=60,
                    seed=0, device="cpu").fit(data)


def _beta_disagreement(model, data):
    """Mean |beta(T1w) - beta(T2w)| of the test subjects' pairs (same site and slice)."""
    x1, x2, _ = model._pairs(data, "test")
    with torch.no_grad():
        return float((model.beta(x1) - model.beta(x2)).abs().mean())


def test_calamiti_reduces_the_loss_and_shares_anatomy_between_contrasts(calamiti, data):
    loss = calamiti.training_["train_loss"]
    assert np.mean(loss[-5:]) < 0.5 * loss[0], loss
    untrained = Calamiti(target_site=TGT, base=8, depth=2, epochs=1, batch_size=4, seed=0,
                         device="cpu").fit(data)
    assert _beta_disagreement(calamiti, data) < 0.5 * _beta_disagreement(untrained, data)


def _wm_csf_ratio(image, labels):
    return float(image[labels == 3].mean() / image[labels == 1].mean())


@pytest.mark.xfail(strict=True, reason="known shortfall: the small CALAMITI does not yet "
                   "transfer the target site's contrast (docs/learned.md)")
def test_calamiti_moves_the_contrast_towards_the_target_site(calamiti, data):
    """T2w images of the held-out subjects from site-b harmonized to site-a: the WM/CSF
    intensity ratio (true labels) moves towards site-a's image of the same subject."""
    gaps_before, gaps_after = [], []
    for i, j in data.paired([SRC, TGT], contrast="t2w", split="test"):
        labels = data.truth["labels"][i]
        out = calamiti.transform(data.images[i], SRC, contrast="t2w")
        ref = _wm_csf_ratio(data.images[j], labels)
        gaps_before.append(abs(_wm_csf_ratio(data.images[i], labels) - ref))
        gaps_after.append(abs(_wm_csf_ratio(out, labels) - ref))
    assert np.mean(gaps_after) < 0.5 * np.mean(gaps_before), (gaps_before, gaps_after)


def test_calamiti_round_trips_exactly(calamiti, data, tmp_path):
    calamiti.save(tmp_path / "ca")
    again = load_harmonizer(tmp_path / "ca", device="cpu")
    assert isinstance(again, Calamiti) and again.training_ == calamiti.training_
    x = data.images[data.rows(site=SRC, contrast="t1w")]
    for target in data.sites:
        np.testing.assert_array_equal(again.transform(x, SRC, target=target),
                                      calamiti.transform(x, SRC, target=target))
    with pytest.raises(HarmonizeError, match="not one of the trained contrasts"):
        calamiti.transform(x, SRC, contrast="flair")
