"""Learned harmonizers in ``mrharmony bench``: image translation, hallucination, hold-out.

Image-translation scenario (``image-translation``, documented in ``docs/bench.md``)
-----------------------------------------------------------------------------------
Paired traveling subjects: every subject of the bench's biology cohort (the same pool
slices as the other scenarios) is imaged at the three sites ``site-A`` (the target),
``site-B`` and ``site-C`` by the bench's own generator (:func:`~.bench.t1w_signal` and
:func:`~.bench.site_image`: per-site gain, power and offset, scan gain jitter, voxel
noise), in T1w and, for the multi-contrast CALAMITI, T2w (:func:`t2w_signal`, its own
site parameters). Subjects are split (seeded) into train / validation / test; the
learned image harmonizers are trained on the train and validation subjects only and
every method is judged on the held-out test subjects, harmonizing ``site-B`` and
``site-C`` to ``site-A``:

- ``ssim``, ``psnr`` (dB), ``mae`` (relative to the mean reference intensity) of the
  harmonized image against the same subject's image at the target site
  (:func:`mrharmony.harmonize.evaluate.image_similarity`, inside the head);
- ``site_accuracy`` etc.: the bench's CV site classifier on the tissue means of the
  held-out images (target-site images as acquired, the others harmonized), ``icc``
  over the held-out subjects, and the biology metrics when at least
  :data:`MIN_BIOLOGY_SUBJECTS` subjects are held out;
- the hallucination test (:func:`hallucination_metrics`): one lesion per held-out
  phantom (never in training), imaged at the source sites, harmonized, and compared
  with the noise-free image of the same lesioned phantom at the target site.

Classical image methods (``zscore``, ``nyul`` ...) map intensities to their own standard
scale, not to a site; their reference is the same method applied to the target-site
image (as the other scenarios' truth is the method applied to site-free images).

Feature-level learned methods in ``--quick`` (:func:`run_feature_holdout`): one fit on a
training split of the subjects, evaluated on the held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import StudyError

__all__ = ["CONTRAST_TOL", "LESION_SCALE", "SPURIOUS_MAX", "TARGET_SITE", "TRANSLATION",
           "TranslationData", "build_translation", "edge_band", "hallucination_metrics",
           "insert_lesion", "lesion_contrast", "run_feature_holdout", "run_translation",
           "t2w_signal"]

TRANSLATION = "image-translation"
TRANSLATION_SITES = ("site-A", "site-B", "site-C")
TARGET_SITE = "site-A"
T2W_TR_MS, T2W_TE_MS = 3000.0, 90.0
#: Lesion T1, T2 and T2* relative to the subject's mean white-matter value (PD: WM's).
LESION_SCALE = 1.25
LESION_RADIUS = 2.0          # pixels
#: Hallucination test: lesion contrast kept within this fraction ...
CONTRAST_TOL = 0.10
#: ... and spurious energy outside the true edges at most this (see hallucination_metrics).
SPURIOUS_MAX = 2e-3
MIN_BIOLOGY_SUBJECTS = 8
TEST_FRACTION, VALIDATION_FRACTION = 0.35, 0.10
HOLDOUT_FRACTION = 0.4       # feature-level learned methods in --quick


def t2w_signal(t1_ms: np.ndarray, t2_ms: np.ndarray, pd_: np.ndarray) -> np.ndarray:
    """Spin-echo T2w signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (TR 3000, TE 90 ms).

    Scaled so that white matter (T1 900 ms, T2 70 ms, PD 0.7) is 1000; voxels with
    T1 or T2 <= 0 give 0.

    Returns
    -------
    ndarray (float32)
    """
    t1 = np.where(t1_ms > 0, t1_ms, np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        decay = np.where(t2_ms > 0, np.exp(-T2W_TE_MS / np.maximum(t2_ms, 1e-6)), 0.0)
    s = pd_ * (1 - np.exp(-T2W_TR_MS / t1)) * decay
    s_wm = 0.7 * (1 - np.exp(-T2W_TR_MS / 900.0)) * np.exp(-T2W_TE_MS / 70.0)
    return np.nan_to_num(1000.0 * s / s_wm).astype(np.float32)


# ------------------------------------------------------------------- hallucination
def edge_band(labels: np.ndarray) -> np.ndarray:
    """True edges: voxels with a 4-neighbour of another label (a 2-voxel band).

    Parameters
    ----------
    labels : ndarray
        ``(H, W)`` or ``(N, H, W)`` integer labels (tissues and lesion).

    Returns
    -------
    ndarray of bool, same shape
    """
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, bool)
    for ax in (-2, -1):
        d = np.diff(lab, axis=ax) != 0
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= d
        out[tuple(hi)] |= d
    return out


def insert_lesion(maps: dict[str, np.ndarray], labels: np.ndarray, *,
                  scale: float = LESION_SCALE, radius: float = LESION_RADIUS
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Insert a disc lesion deep in the white matter of one slice.

    The disc (``radius`` pixels, at most the WM depth minus one pixel, at least 1) is
    centred on the WM voxel farthest from any other tissue; its T1, T2 and T2* are
    ``scale`` times the slice's mean WM values, its PD the mean WM PD.

    Parameters
    ----------
    maps : dict
        ``pd``, ``t1_ms``, ``t2_ms``, ``t2star_ms`` of the slice ``(H, W)``.
    labels : ndarray
        ``(H, W)``: 1 CSF, 2 GM, 3 WM.

    Returns
    -------
    maps, labels, lesion
        New maps, labels with the lesion as 4, the lesion mask.

    Raises
    ------
    StudyError
        No white matter in the slice.
    """
    from scipy.ndimage import distance_transform_edt

    wm = labels == 3
    if not wm.any():
        raise StudyError("insert_lesion: no white matter in the slice")
    depth = distance_transform_edt(wm)
    cy, cx = np.unravel_index(int(np.argmax(depth)), wm.shape)
    r = float(np.clip(min(radius, depth.max() - 1.0), 1.0, None))
    yy, xx = np.mgrid[:wm.shape[0], :wm.shape[1]]
    lesion = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & wm
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in maps.items()}
    for name in ("t1_ms", "t2_ms", "t2star_ms"):
        out[name][lesion] = scale * float(np.mean(maps[name][wm]))
    out["pd"][lesion] = float(np.mean(maps["pd"][wm]))
    lab = labels.copy()
    lab[lesion] = 4
    return out, lab, lesion


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, labels: np.ndarray) -> float:
    """``mean(lesion) / mean(WM) - 1``, WM = label 3 more than one voxel from the lesion."""
    from scipy.ndimage import binary_dilation

    ref = (labels == 3) & ~binary_dilation(lesion)
    if not ref.any():
        ref = (labels == 3) & ~lesion
    denom = float(np.mean(image[ref]))
    return float(np.mean(image[lesion])) / denom - 1.0 if denom != 0 else float("nan")


def hallucination_metrics(harmonized: np.ndarray, truth: np.ndarray, labels: np.ndarray,
                          lesion: np.ndarray) -> dict[str, Any]:
    """Lesion contrast change and spurious structure of harmonized lesion images.

    Parameters
    ----------
    harmonized : ndarray
        ``(N, H, W)`` (or ``(H, W)``) harmonized source-site images with a lesion.
    truth : ndarray
        The same lesioned phantoms imaged at the target site without noise (same units).
    labels : ndarray
        Labels with the lesion as its own label (edges include its boundary).
    lesion : ndarray of bool
        Lesion masks.

    Returns
    -------
    dict
        ``lesion_contrast_error``: mean over images of ``|c_harm / c_truth - 1|`` with
        ``c = mean(lesion) / mean(WM around) - 1`` (:func:`lesion_contrast`);
        ``lesion_contrast_error_max``; ``spurious_energy``: energy of ``harmonized -
        truth`` outside the true edges (:func:`edge_band`), after removing each label's
        mean difference there (a uniform tissue intensity error is a calibration miss,
        counted by MAE, not a structure), relative to the energy of the truth in the same
        voxels (pooled over images); ``hallucination_pass``: contrast error <=
        :data:`CONTRAST_TOL` and spurious energy <= :data:`SPURIOUS_MAX`.
    """
    h = np.asarray(harmonized, np.float64)
    t = np.asarray(truth, np.float64)
    lab = np.asarray(labels)
    les = np.asarray(lesion, bool)
    if h.ndim == 2:
        h, t, lab, les = h[None], t[None], lab[None], les[None]
    if not (h.shape == t.shape == lab.shape == les.shape):
        raise StudyError(f"hallucination_metrics: shapes differ {h.shape}, {t.shape}, "
                         f"{lab.shape}, {les.shape}")
    errs = []
    num = den = 0.0
    for hi, ti, li, mi in zip(h, t, lab, les, strict=True):
        ct = lesion_contrast(ti, mi, li)
        ch = lesion_contrast(hi, mi, li)
        errs.append(abs(ch / ct - 1.0) if ct != 0 else float("nan"))
        outside = ~edge_band(li)
        d = hi - ti
        for code in np.unique(li[outside]):
            sel = outside & (li == code)
            d[sel] -= d[sel].mean()
        num += float(np.sum(d[outside] ** 2))
        den += float(np.sum(ti[outside] ** 2))
    err = float(np.mean(errs))
    spur = num / den if den > 0 else float("nan")
    ok = bool(np.isfinite(err) and np.isfinite(spur) and err <= CONTRAST_TOL
              and spur <= SPURIOUS_MAX)
    return {"lesion_contrast_error": err, "lesion_contrast_error_max": float(np.max(errs)),
            "spurious_energy": spur, "hallucination_pass": ok}


# --------------------------------------------------------------------- the scenario
@dataclass
class TranslationData:
    """Images of the image-translation scenario.

    Attributes
    ----------
    dataset : ImageDataset
        Train and validation subjects, T1w and T2w at every site (what learned methods see).
    train_t1w, train_labels, train_sites : ndarray
        The training T1w images (target site first) for fitting classical methods.
    test : dict
        site -> ``(n_test, H, W)`` measured T1w images of the held-out subjects.
    test_labels : ndarray
    target_free : ndarray
        Noise-free target-site T1w images of the held-out subjects (biology truth).
    lesion_src : dict
        Source site -> measured T1w images of the lesioned held-out phantoms.
    lesion_truth : ndarray
        Noise-free target-site images of the lesioned phantoms.
    lesion_labels, lesion_masks : ndarray
    subjects : DataFrame
        Held-out subjects: ``subject, age, diagnosis, sex``.
    splits : dict
        Subjects per split.
    site_effects : dict
    """

    dataset: Any
    train_t1w: np.ndarray
    train_labels: np.ndarray
    train_sites: np.ndarray
    test: dict[str, np.ndarray]
    test_labels: np.ndarray
    target_free: np.ndarray
    lesion_src: dict[str, np.ndarray]
    lesion_truth: np.ndarray
    lesion_labels: np.ndarray
    lesion_masks: np.ndarray
    subjects: pd.DataFrame
    splits: dict[str, int] = field(default_factory=dict)
    site_effects: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        """The non-target sites."""
        return [s for s in TRANSLATION_SITES if s != TARGET_SITE]


def _draw_sites(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .bench import SITE_GAIN_SD, SITE_OFFSET_SD, SITE_POWER_SD

    n = len(TRANSLATION_SITES)
    gain = np.exp(SITE_GAIN_SD * rng.standard_normal(n))
    gain /= np.exp(np.log(gain).mean())
    power = 1.0 + SITE_POWER_SD * rng.standard_normal(n)
    power += 1.0 - power.mean()
    offset = SITE_OFFSET_SD * rng.standard_normal(n)
    offset -= offset.mean()
    return gain, power, offset


def build_translation(pool: Any, cfg: Any, seed: int) -> TranslationData:
    """Draw the subjects, splits, site effects and images of ``image-translation``.

    Parameters
    ----------
    pool : Pool
        The bench's biology pool (with its slice maps).
    cfg : BenchConfig
        ``sizes["image-translation"]`` subjects (default 24, at most the pool).
    seed : int

    Returns
    -------
    TranslationData

    Raises
    ------
    StudyError
        Fewer than 4 subjects (train, validation and two held out are needed), or a pool
        without its maps.
    """
    from mrharmony.harmonize.learned.data import ImageDataset

    from .bench import IMAGE_NOISE, SCAN_GAIN_SD, site_image, t1w_signal

    if not pool.maps:
        raise StudyError("image-translation: the pool has no slice maps (regenerate it)")
    n = min(int(cfg.sizes.get(TRANSLATION, 24)), len(pool.truth))
    if n < 4:
        raise StudyError(f"image-translation: needs at least 4 subjects, got {n}")
    rng = np.random.default_rng([seed, 77, 1])
    pick = np.sort(rng.choice(len(pool.truth), size=n, replace=False))
    n_test = max(2, round(TEST_FRACTION * n))
    n_val = max(1, round(VALIDATION_FRACTION * n))
    if n - n_test - n_val < 1:
        n_test = n - n_val - 1
    order = rng.permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test:n_test + n_val]] = "validation"
    srng = np.random.default_rng([seed, 77, 2])
    params = {"t1w": _draw_sites(srng), "t2w": _draw_sites(srng)}
    irng = np.random.default_rng([seed, 77, 3])
    labels = pool.labels[pick]
    maps = {k: v[pick] for k, v in pool.maps.items()}
    free = {"t1w": pool.images[pick].astype(np.float64),
            "t2w": t2w_signal(maps["t1_ms"], maps["t2_ms"], maps["pd"]).astype(np.float64)}
    truth = pool.truth.iloc[pick].reset_index(drop=True)
    subj = truth["subject"].astype(str).to_numpy()

    def measure(images: np.ndarray, labs: np.ndarray, contrast: str, k: int) -> np.ndarray:
        g, p, b = (a[k] for a in params[contrast])
        jitter = 1.0 + SCAN_GAIN_SD * irng.standard_normal(len(images))
        return site_image(images, labs, g * jitter, p, b,
                          noise=IMAGE_NOISE * irng.standard_normal(images.shape))

    measured = {(c, s): measure(free[c], labels, c, k)
                for c in ("t1w", "t2w") for k, s in enumerate(TRANSLATION_SITES)}
    keep = split != "test"
    ims, sites, subjects, contrasts, splits = [], [], [], [], []
    for (c, s), im in measured.items():
        ims.append(im[keep])
        sites += [s] * int(keep.sum())
        subjects += list(subj[keep])
        contrasts += [c] * int(keep.sum())
        splits += list(split[keep])
    dataset = ImageDataset.from_arrays(np.concatenate(ims), site=sites, subject=subjects,
                                       contrast=contrasts, split=splits)
    dataset.info = {"sites": {s: {} for s in TRANSLATION_SITES}}
    tr = split == "train"
    train_t1w = np.concatenate([measured[("t1w", s)][tr] for s in TRANSLATION_SITES])
    train_labels = np.concatenate([labels[tr]] * len(TRANSLATION_SITES))
    train_sites = np.repeat(np.array(TRANSLATION_SITES, dtype=object), int(tr.sum()))
    te = np.flatnonzero(split == "test")
    test = {s: measured[("t1w", s)][te] for s in TRANSLATION_SITES}
    k_t = TRANSLATION_SITES.index(TARGET_SITE)
    g_t, p_t, b_t = (a[k_t] for a in params["t1w"])
    target_free = site_image(free["t1w"][te], labels[te], g_t, p_t, b_t)
    # lesions: held-out phantoms only
    les_free, les_labels, les_masks = [], [], []
    for i in te:
        m, lab, les = insert_lesion({k: v[i] for k, v in maps.items()}, labels[i])
        les_free.append(t1w_signal(m["t1_ms"], m["t2star_ms"], m["pd"]))
        les_labels.append(lab)
        les_masks.append(les)
    les_free_a = np.stack(les_free).astype(np.float64)
    les_lab_a = np.stack(les_labels)
    lesion_src = {s: measure(les_free_a, les_lab_a, "t1w", TRANSLATION_SITES.index(s))
                  for s in TRANSLATION_SITES if s != TARGET_SITE}
    lesion_truth = site_image(les_free_a, les_lab_a, g_t, p_t, b_t)
    effects = {"sites": list(TRANSLATION_SITES), "target": TARGET_SITE,
               **{f"{c}_{n_}": v.tolist() for c, (g, p, b) in params.items()
                  for n_, v in (("gain", g), ("power", p), ("offset", b))}}
    return TranslationData(
        dataset=dataset, train_t1w=train_t1w, train_labels=train_labels,
        train_sites=train_sites, test=test, test_labels=labels[te], target_free=target_free,
        lesion_src=lesion_src, lesion_truth=lesion_truth, lesion_labels=les_lab_a,
        lesion_masks=np.stack(les_masks),
        subjects=truth.iloc[te][["subject", "age", "diagnosis", "sex"]].reset_index(drop=True),
        splits={k: int((split == k).sum()) for k in ("train", "validation", "test")},
        site_effects=effects)


def learned_image_model(method: str, seed: int, quick: bool,
                        options: dict[str, Any] | None = None) -> Any:
    """An unfitted learned image harmonizer: its ``QUICK`` options in ``quick``, target
    :data:`TARGET_SITE`, ``seed``, device ``auto``, then ``options`` on top."""
    from mrharmony.harmonize.registry import HARMONIZERS

    cls = HARMONIZERS[method].load()
    opts: dict[str, Any] = dict(getattr(cls, "QUICK", {})) if quick else {}
    opts.update(seed=seed, device="auto", target_site=TARGET_SITE)
    opts.update(options or {})
    return cls(**opts)


def _classical(method: str, data: TranslationData, stacks: list[np.ndarray],
               labels: list[np.ndarray]) -> list[np.ndarray]:
    """Apply a classical image method (fitted on the training images) to each stack."""
    from .bench import _harmonize_images

    n_fit = len(data.train_t1w)
    images = np.concatenate([data.train_t1w, *stacks])
    labs = np.concatenate([data.train_labels, *[np.where(lab > 3, 3, lab) for lab in labels]])
    fit_rows = np.zeros(len(images), bool)
    fit_rows[:n_fit] = True
    model = pd.DataFrame({"x": np.zeros(len(images))})
    out = _harmonize_images(method, images, labs, fit_rows, model)[n_fit:]
    pieces, start = [], 0
    for s in stacks:
        pieces.append(out[start:start + len(s)])
        start += len(s)
    return pieces


def run_translation(data: TranslationData, method: str, seed: int, quick: bool, *,
                    learned: bool, options: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Harmonize the held-out images with ``method`` and score them.

    Parameters
    ----------
    data : TranslationData
    method : str
        A classical image method (``raw-image``, ``zscore`` ...) or a learned one.
    seed : int
    quick : bool
        Learned methods train with their ``QUICK`` options.
    learned : bool
        ``method`` is a learned image harmonizer (trained here on ``data.dataset``).
    options : dict, optional
        Extra constructor options of a learned method.

    Returns
    -------
    metrics, biology records
    """
    from mrharmony.harmonize.evaluate import icc, image_similarity

    from .bench import N_SPLITS, Scenario, _biology, _image_features

    target, sources = TARGET_SITE, data.sources
    n = len(data.test_labels)
    if learned:
        model = learned_image_model(method, seed, quick, options)
        model.fit(data.dataset)
        harm = {s: model.transform(data.test[s], s) for s in sources}
        harm[target] = data.test[target]
        les = {s: model.transform(data.lesion_src[s], s) for s in sources}
        les_truth, bio_truth = data.lesion_truth, data.target_free
    else:
        order = list(TRANSLATION_SITES)
        stacks = [data.test[s] for s in order] + [data.lesion_src[s] for s in sources] + [
            data.lesion_truth, data.target_free]
        labs = [data.test_labels] * len(order) + [data.lesion_labels] * (len(sources) + 1) \
            + [data.test_labels]
        out = _classical(method, data, stacks, labs)
        harm = dict(zip(order, out[:len(order)], strict=True))
        les = dict(zip(sources, out[len(order):len(order) + len(sources)], strict=True))
        les_truth, bio_truth = out[-2], out[-1]
    sims = []
    for s in sources:
        for i in range(n):
            ref = harm[target][i]
            mask = data.test_labels[i] > 0
            m = image_similarity(harm[s][i], ref, mask=mask)
            scale = float(np.mean(np.abs(ref[mask])))
            sims.append((m["ssim"], m["psnr_db"], m["mae"] / scale if scale > 0 else np.nan))
    sim = np.array(sims, float)
    hall = hallucination_metrics(
        np.concatenate([les[s] for s in sources]),
        np.concatenate([les_truth] * len(sources)),
        np.concatenate([data.lesion_labels] * len(sources)),
        np.concatenate([data.lesion_masks] * len(sources)))
    # held-out images: site classifier, ICC, biology on their tissue means
    order = list(TRANSLATION_SITES)
    X = pd.concat([_image_features(harm[s], data.test_labels) for s in order],
                  ignore_index=True)
    scans = pd.concat([data.subjects.assign(site=s) for s in order], ignore_index=True)
    sc = Scenario(TRANSLATION, scans, X.iloc[:0], X.iloc[:0], np.empty(0), np.empty(0),
                  np.empty(0), None, False, {})
    nan = float("nan")
    site = {"site_accuracy": nan, "site_balanced_accuracy": nan, "site_chance": nan}
    if n >= 2:
        from mrharmony.harmonize.evaluate import site_discriminability

        d = site_discriminability(X, scans["site"].to_numpy(), harmonizer=None,
                                  n_splits=min(N_SPLITS, n), n_permutations=0, seed=seed)
        site = {"site_accuracy": d.accuracy, "site_balanced_accuracy": d.balanced_accuracy,
                "site_chance": d.chance_accuracy}
    table = icc(X, scans["subject"].to_numpy(), scans["site"].to_numpy())
    metrics: dict[str, Any] = {
        **site, "icc": float(np.nanmean(table["icc2_1"])),
        "ssim": float(np.mean(sim[:, 0])), "psnr": float(np.mean(sim[:, 1])),
        "mae": float(np.mean(sim[:, 2])),
        **{k: hall[k] for k in ("lesion_contrast_error", "spurious_energy",
                                "hallucination_pass")}}
    records: list[dict[str, Any]] = []
    if n >= MIN_BIOLOGY_SUBJECTS:
        T = pd.concat([_image_features(bio_truth, data.test_labels)] * len(order),
                      ignore_index=True)
        records, summary = _biology(sc, method, X, T)
        metrics.update(summary)
    return metrics, records


# ------------------------------------------------------- feature level, --quick hold-out
def holdout_rows(scans: pd.DataFrame, seed: int, fraction: float = HOLDOUT_FRACTION
                 ) -> np.ndarray:
    """Held-out rows: ``fraction`` of the subjects of each site x diagnosis group (by the
    subject's first site; all scans of a subject on the same side), at least one per
    group, so both sides keep every site and both diagnoses."""
    rng = np.random.default_rng([seed, 78])
    first = scans.groupby("subject", sort=True)[["site", "diagnosis"]].first()
    held: list[str] = []
    for _, subs in first.groupby(["site", "diagnosis"], sort=True):
        names = np.array(sorted(subs.index))
        k = max(1, round(fraction * len(names)))
        held += list(rng.permutation(names)[:k])
    return scans["subject"].isin(held).to_numpy()


def run_feature_holdout(sc: Any, method: str, seed: int, quick: bool
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A feature-level (learned) harmonizer fitted once on the training rows and judged on
    the held-out rows (:func:`holdout_rows`): site classifier (CV on the harmonized
    held-out rows, no refit), ICC and biology against the held-out rows' truth.

    Raises
    ------
    _NotApplicable
        The method cannot transform a site it was not fitted on (``unseen-site``).
    """
    import dataclasses

    from mrharmony.harmonize.evaluate import site_discriminability

    from .bench import N_SPLITS, _Adapter, _biology, _feature_factory, _icc

    test = holdout_rows(sc.scans, seed)
    train = ~test
    make, use_cov = _feature_factory(method, seed, quick)
    adapter = _Adapter(make, use_cov, sc.unseen_site)
    X = sc.measured
    batch = pd.Series(sc.scans["site"].to_numpy(), name="site")
    cov = sc.covariates
    Xtr, Xte = X[train], X[test]
    adapter.fit(Xtr, batch[train], cov[train])
    H = adapter.transform(Xte, batch[test], cov[test])
    H = pd.DataFrame(np.asarray(H, dtype=float), columns=X.columns).reset_index(drop=True)
    sub = dataclasses.replace(
        sc, scans=sc.scans[test].reset_index(drop=True),
        truth=sc.truth[test].reset_index(drop=True),
        measured=Xte.reset_index(drop=True))
    sites = sub.scans["site"].to_numpy()
    counts = pd.Series(sites).value_counts()
    nan = float("nan")
    site = {"site_accuracy": nan, "site_balanced_accuracy": nan, "site_chance": nan}
    if len(counts) > 1 and counts.min() >= 2:
        d = site_discriminability(H, sites, harmonizer=None,
                                  n_splits=int(min(N_SPLITS, counts.min())),
                                  n_permutations=0, seed=seed)
        site = {"site_accuracy": d.accuracy, "site_balanced_accuracy": d.balanced_accuracy,
                "site_chance": d.chance_accuracy}
    records, summary = _biology(sub, method, H, sub.truth)
    return {**site, "icc": _icc(sub, H), **summary, "n_scans": int(test.sum())}, records
