"""Learned image harmonizers (DeepHarmony, MISPEL) on a small traveling-subject set.

Most tests use the analytic set of :func:`mrharmony.harmonize.learned.data.synthetic_dataset`
(random label maps, a spin-echo signal equation per site: seconds, no Bloch simulation),
32x32 T1w slices of 8 subjects at two sites. One ``slow`` test builds a tiny dataset with
the toolkit's own builder (:func:`mrharmony.study.dataset.build_dataset`: cohort
phantoms, Bloch simulation, recon) and checks its structure.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from mrharmony.errors import HarmonizeError, ModelFileError  # noqa: E402
from mrharmony.harmonize.learned.base import load_harmonizer  # noqa: E402
from mrharmony.harmonize.learned.data import (  # noqa: E402
    SYNTHETIC_SITES,
    foreground,
    load_dataset,
    robust_scale,
    synthetic_dataset,
)
from mrharmony.harmonize.learned.paired import DeepHarmony, Mispel  # noqa: E402

SITES = ("site-a", "site-b")


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return synthetic_dataset(n_subjects=8, matrix=32, contrasts=("t1w",), seed=3,
                             sites={s: SYNTHETIC_SITES[s] for s in SITES})


@pytest.mark.slow
def test_simulated_dataset_is_paired_split_by_subject_and_has_truth(tmp_path):
    from mrharmony.study.dataset import DatasetConfig, build_dataset

    sites = ("siemens-prisma-3t", "philips-ingenia-1.5t")
    cfg = DatasetConfig(sites=sites, n_subjects=5, seed=3, matrix=32, slices=1,
                        contrasts=("t1w",), isochromats_per_voxel=16, voxel_size_mm=4.0,
                        val_fraction=0.2, test_fraction=0.2)
    data = load_dataset(build_dataset(tmp_path / "data", cfg))
    t = data.table
    assert data.images.shape == (10, 32, 32)
    assert data.sites == list(sites)
    # every subject at both sites, and each subject in exactly one split
    assert (t.groupby("subject")["site"].nunique() == 2).all()
    assert (t.groupby("subject")["split"].nunique() == 1).all()
    assert set(t["split"]) == {"train", "validation", "test"}
    assert data.paired(list(sites), split="train").shape == (3, 2)
    # the truth lies on the image grid: brain voxels (labels > 0) are the bright ones
    for i in range(len(t)):
        brain = data.truth["labels"][i] > 0
        img = data.images[i] / robust_scale(data.images[i])
        assert img[brain].mean() > 4 * img[~brain].mean()


def _ssim(a, b):
    from skimage.metrics import structural_similarity

    s = robust_scale(b)
    return structural_similarity(a / s, b / s, data_range=float(b.max() - b.min()) / s)


def test_training_reduces_the_loss_and_saving_round_trips_exactly(data, tmp_path):
    m = DeepHarmony(base=8, depth=2, epochs=6, seed=0, device="cpu").fit(data)
    log = m.training_
    assert log["train_loss"][-1] < 0.8 * log["train_loss"][0]
    assert log["fingerprint"].startswith("sha256:")
    m.save(tmp_path / "dh")
    again = load_harmonizer(tmp_path / "dh", device="cpu")
    assert isinstance(again, DeepHarmony) and again.training_ == m.training_
    x = data.images[data.rows(site=SITES[1])]
    np.testing.assert_array_equal(again.transform(x, SITES[1]), m.transform(x, SITES[1]))
    # the same seed on the same machine gives the same weights
    twin = DeepHarmony(base=8, depth=2, epochs=6, seed=0, device="cpu").fit(data)
    np.testing.assert_array_equal(twin.transform(x, SITES[1]), m.transform(x, SITES[1]))
    with pytest.raises(HarmonizeError, match="site 'nowhere' was not in the training data"):
        m.transform(x, "nowhere")


def test_mispel_round_trips_and_harmonizes_to_any_site(data, tmp_path):
    m = Mispel(base=8, depth=2, epochs=4, step2_epochs=3, seed=0, device="cpu").fit(data)
    assert m.training_["step1"]["train_loss"][-1] < m.training_["step1"]["train_loss"][0]
    m.save(tmp_path / "mi")
    again = load_harmonizer(tmp_path / "mi", device="cpu")
    x = data.images[data.rows(site=SITES[0])]
    for target in SITES:
        np.testing.assert_array_equal(again.transform(x, SITES[0], target=target),
                                      m.transform(x, SITES[0], target=target))


def test_load_refuses_wrong_and_corrupt_folders(data, tmp_path):
    with pytest.raises(ModelFileError, match="not a learned model"):
        load_harmonizer(tmp_path)
    m = DeepHarmony(base=4, depth=1, epochs=1, device="cpu").fit(data)
    m.save(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="unreadable weights"):
        load_harmonizer(tmp_path / "m")
    m.save(tmp_path / "m2")
    cfg = (tmp_path / "m2" / "config.json")
    cfg.write_text(cfg.read_text().replace('"deepharmony"', '"mispel"', 1))
    with pytest.raises(ModelFileError, match="options do not fit Mispel"):
        load_harmonizer(tmp_path / "m2")
    cfg.write_text(cfg.read_text().replace('"mispel"', '"nonsense"', 1))
    with pytest.raises(ModelFileError, match="unknown learned method 'nonsense'"):
        load_harmonizer(tmp_path / "m2")


def test_a_paired_method_beats_histogram_matching_on_held_out_subjects(data):
    """SSIM to the same held-out subject's image at the target site: DeepHarmony (trained
    here) against histogram matching to a target-site training image."""
    from mrharmony.harmonize.image import match_histogram

    src, tgt = SITES[1], SITES[0]
    dh = DeepHarmony(base=8, depth=2, epochs=80, patience=80, target_site=tgt, seed=0,
                     device="cpu").fit(data)
    pairs = data.paired([src, tgt], split="test")
    ref = data.images[data.rows(site=tgt, split="train")[0]]
    scores = {"none": [], "histogram": [], "deepharmony": []}
    for i, j in pairs:
        x, truth = data.images[i], data.images[j]
        hm = match_histogram(x, ref, mask=foreground(x), reference_mask=foreground(ref))
        scores["none"].append(_ssim(x * robust_scale(truth) / robust_scale(x), truth))
        scores["histogram"].append(_ssim(hm, truth))
        scores["deepharmony"].append(_ssim(dh.transform(x, src), truth))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    assert mean["deepharmony"] > mean["histogram"] + 0.02, mean
