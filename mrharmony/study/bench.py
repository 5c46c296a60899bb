"""``mrharmony bench``: every harmonizer on named scenarios with exactly known biology.

Data model (documented in ``docs/bench.md``)
--------------------------------------------
Subjects come from two virtual cohorts (:func:`mrharmony.phantoms.make_cohort`, seeded):
a *biology* cohort with the default effects (``patient_fraction`` 0.4) and a *null*
cohort whose age and diagnosis effects are all zero. Their features are measured from the
phantoms by :meth:`~mrharmony.phantoms.cohort.Cohort.ground_truth` (volumes, tissue and
regional relaxation values), plus ``N_NULL_FEATURES`` synthetic biology-free features
``null_XX`` (a seeded value per subject, independent of every covariate).

Feature level. Scan ``i`` of subject ``k`` at site ``s`` measures feature ``j`` as::

    x = delta_sj * t_kj + gamma_sj + kappa_s * noise_j * eps_i,     eps ~ N(0, 1)

with ``t`` the site-free truth, ``delta_sj = 1 + N(0, SITE_SCALE_SD)`` (a scanner that
reads a feature a few percent high), ``gamma_sj ~ N(0, SITE_SHIFT_SD * sd_j)`` (an
offset), ``kappa_s = exp(N(0, SITE_NOISE_LOG_SD))`` (site noise level), ``noise_j =
NOISE_SD * sd_j`` and ``sd_j`` the pool SD of the feature (at least 1 % of its mean). The
site effects are centred over the sites (mean ``delta`` 1, mean ``gamma`` 0), so the
site-free truth is the average scanner, the scale a harmonizer without a reference site
aims at.

Image level. One axial slice (MNI z = 10 mm) of each subject's 3-D phantom on the cohort
grid becomes a T1w-like image by the spoiled-gradient-echo steady state
``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE / T2*)`` (TR 20 ms, a = 25 deg, TE
4 ms, ``E1 = exp(-TR / T1)``), scaled so that white matter is about 1000. Each site maps
intensities non-linearly, ``I_s = g_s * 1000 * (I / 1000) ** p_s + b_s`` (gain, power,
offset; centred over sites), each scan gets a gain jitter (SD ``SCAN_GAIN_SD``) and
Gaussian voxel noise. No Bloch simulation (too slow for a benchmark). The features are
the mean intensities inside the true CSF, GM and WM label masks.

Truth
-----
Analysis model ``feature ~ 1 + age + patient + male`` (OLS,
:func:`mrharmony.harmonize.evaluate.association_effects`). For an effect whose truth is
zero by construction (``null_XX`` features; ``icv_ml``, which follows head size only;
every feature of the null cohort) the truth is 0. Otherwise the truth is the *sample
truth*: the same OLS on the site-free, noise-free values of the same scans (for image
methods: the same method applied to the site-free images), what a perfect single-scanner
study of these subjects would find. An effect below ``ZERO_STD_BETA`` standard
deviations in that site-free fit is zero by construction up to the float32 precision of
the phantom maps (e.g. whole-tissue T1 and diagnosis, which acts only inside the region)
and counts as null too. Effects counted in ``effect_bias`` and ``coverage`` ("primary")
are those with ``|t| >= PRIMARY_T`` in the site-free fit.

Learned harmonizers (registry ``learned=True``, the ``learn`` extra): the image-level ones
are trained and judged in the ``image-translation`` scenario only
(:mod:`mrharmony.study.bench_learned`, with the hallucination test); the feature-level ones
run in the feature scenarios, refitted in every CV fold in the full run, and in ``--quick``
fitted once on a training split of the subjects and judged on the held-out rows
(:func:`~mrharmony.study.bench_learned.run_feature_holdout`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError, StudyError

__all__ = [
    "FEATURE_METHODS",
    "IMAGE_METHODS",
    "SCENARIOS",
    "BenchConfig",
    "BenchResult",
    "Scenario",
    "bench_methods",
    "build_scenario",
    "default_cache_dir",
    "load_pool",
    "run_bench",
]

BENCH_VERSION = 2           # 2: pools store the slice's PD/T1/T2/T2* maps
N_NULL_FEATURES = 10
SITE_SCALE_SD = 0.02
SITE_SHIFT_SD = 0.8
SITE_NOISE_LOG_SD = 0.25
NOISE_SD = 0.5
PRIMARY_T = 5.0
ZERO_STD_BETA = 1e-3
SCAN_GAIN_SD = 0.02
IMAGE_NOISE = 10.0          # voxel noise SD, image units (WM ~ 1000)
SITE_GAIN_SD = 0.15
SITE_POWER_SD = 0.10
SITE_OFFSET_SD = 30.0
TR_MS, FLIP_DEG, TE_MS = 20.0, 25.0, 4.0
N_SPLITS = 5

BIO_FEATURES = ("gm_volume_ml", "wm_volume_ml", "csf_volume_ml", "icv_ml",
                "region_gm_volume_ml", "gm_t1_ms", "wm_t1_ms", "gm_t2_ms", "wm_t2_ms",
                "region_t1_ms", "region_t2_ms")
IMAGE_FEATURES = ("csf_mean", "gm_mean", "wm_mean")
#: Quantitative maps of the pool slices (Phantom attributes).
MAP_NAMES = ("pd", "t1_ms", "t2_ms", "t2star_ms")
EFFECTS = {"age": "age", "diagnosis": "patient"}
#: Features whose age and diagnosis effects are zero by construction in every cohort.
NULL_BY_CONSTRUCTION = ("icv_ml",)

SCENARIOS: dict[str, str] = {
    "traveling": "every subject scanned at every site (3 sites)",
    "confounded-age": "one site scans mostly the young, the other mostly the old",
    "confounded-diagnosis": "one site scans most of the patients",
    "imbalanced": "a small site and a large one",
    "null-effect": "no true age or diagnosis effect; site effects only",
    "unseen-site": "harmonizer fitted without site C; site C transformed where possible",
    "image-translation": "paired traveling-subject images at 3 sites; image methods (learned "
                         "and classical) harmonize held-out subjects to site-A; lesion "
                         "hallucination test",
}

#: Feature-level methods: name -> (registry name or None for raw, pass covariates).
FEATURE_METHODS: dict[str, tuple[str | None, bool]] = {
    "raw": (None, False),
    "combat": ("combat", True),
    "combat-nocov": ("combat", False),
    "covbat": ("covbat", True),
    "gam": ("gam", True),
    "mean": ("mean", False),
}
#: Image-level methods (``raw-image``: features of the unharmonized images).
IMAGE_METHODS = ("raw-image", "zscore", "histogram", "nyul", "whitestripe", "ravel")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run (``quick`` or ``full``).

    Attributes
    ----------
    name : str
    voxel_size_mm : float
        Cohort grid (mm); the image slices are on it.
    pool : int
        Subjects of the biology cohort.
    null_pool : int
        Subjects of the null cohort.
    sizes : dict
        Subjects per scenario (``traveling``: per site, every site).
    small_site : int
        Subjects of the small site in ``imbalanced``.
    """

    name: str
    voxel_size_mm: float
    pool: int
    null_pool: int
    sizes: dict[str, int] = field(default_factory=dict)
    small_site: int = 6


QUICK = BenchConfig("quick", 4.0, 40, 30,
                    {"traveling": 12, "confounded-age": 40, "confounded-diagnosis": 40,
                     "imbalanced": 40, "null-effect": 30, "unseen-site": 36,
                     "image-translation": 24}, small_site=6)
FULL = BenchConfig("full", 3.0, 210, 120,
                   {"traveling": 30, "confounded-age": 160, "confounded-diagnosis": 160,
                    "imbalanced": 210, "null-effect": 120, "unseen-site": 150,
                    "image-translation": 60}, small_site=10)


def default_cache_dir() -> Path:
    """``$MRHARMONY_CACHE/bench``, else ``$XDG_CACHE_HOME/mrharmony/bench`` (~/.cache)."""
    root = os.environ.get("MRHARMONY_CACHE")
    if root:
        return Path(root) / "bench"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mrharmony" / "bench"


# ---------------------------------------------------------------------------- the pool
@dataclass
class Pool:
    """Subjects of one cohort: ground truth, site-free image slices and labels."""

    truth: pd.DataFrame
    images: np.ndarray     # (n, nx, ny) float32 site-free T1w-like slice
    labels: np.ndarray     # (n, nx, ny) int8: 0 background, 1 CSF, 2 GM, 3 WM
    null: bool
    #: ``pd``, ``t1_ms``, ``t2_ms``, ``t2star_ms`` of the slice, each ``(n, nx, ny)``
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def _cohort_effects(null: bool) -> dict[str, float]:
    effects = {"patient_fraction": 0.4}
    if null:
        effects.update(gm_slope_ml_per_year=0.0, t1_drift_pct_per_year=0.0,
                       t2_drift_pct_per_year=0.0, diagnosis_region_gm_loss_pct=0.0,
                       diagnosis_t1_pct=0.0, diagnosis_t2_pct=0.0)
    return effects


def t1w_signal(t1_ms: np.ndarray, t2star_ms: np.ndarray, pd_: np.ndarray) -> np.ndarray:
    """Spoiled gradient-echo steady state (TR 20 ms, 25 deg, TE 4 ms), WM near 1000.

    Parameters
    ----------
    t1_ms, t2star_ms : ndarray
        Relaxation times (ms); voxels with T1 <= 0 give 0.
    pd_ : ndarray
        Proton density (0..1).

    Returns
    -------
    ndarray (float32)
    """
    a = np.deg2rad(FLIP_DEG)
    t1 = np.where(t1_ms > 0, t1_ms, np.inf)
    e1 = np.exp(-TR_MS / t1)
    with np.errstate(invalid="ignore", divide="ignore"):
        decay = np.where(t2star_ms > 0, np.exp(-TE_MS / np.maximum(t2star_ms, 1e-6)), 0.0)
    s = pd_ * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * decay
    # WM of the 3 T template (T1 ~ 900 ms, PD 0.7, T2* ~ 50 ms) -> ~1000
    e1w = np.exp(-TR_MS / 900.0)
    s_wm = 0.7 * np.sin(a) * (1 - e1w) / (1 - np.cos(a) * e1w) * np.exp(-TE_MS / 50.0)
    return np.nan_to_num(1000.0 * s / s_wm).astype(np.float32)


def load_pool(n: int, seed: int, *, null: bool, voxel_size_mm: float,
              cache_dir: str | os.PathLike[str] | None = None,
              progress: bool = False) -> Pool:
    """Ground truth and site-free image slices of ``n`` cohort subjects (cached).

    Parameters
    ----------
    n : int
        Subjects (the first ``n`` of the seeded cohort).
    seed : int
        Cohort seed.
    null : bool
        The null cohort (no age or diagnosis effect).
    voxel_size_mm : float
        Cohort grid (mm).
    cache_dir : path, optional
        Folder of cached pools (default :func:`default_cache_dir`); a pool is stored under
        the SHA-256 of its parameters and reused by later runs.
    progress : bool
        Show a progress bar while generating.

    Returns
    -------
    Pool
    """
    from mrharmony.fileio import atomic_path
    from mrharmony.phantoms.cohort import make_cohort
    from mrharmony.phantoms.phantom import Phantom

    effects = _cohort_effects(null)
    key = hashlib.sha256(json.dumps(
        {"v": BENCH_VERSION, "n": n, "seed": seed, "vox": voxel_size_mm, "effects": effects,
         "signal": [TR_MS, FLIP_DEG, TE_MS]}, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"pool-{'null' if null else 'bio'}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            truth = pd.read_json(io.StringIO(str(z["truth"])), orient="split")
            return Pool(truth, z["images"], z["labels"], null,
                        {k: z[k] for k in MAP_NAMES})
    cohort = make_cohort(n, seed, effects=effects, voxel_size_mm=voxel_size_mm)
    images, labels = [], []
    maps: dict[str, list[np.ndarray]] = {k: [] for k in MAP_NAMES}
    with tempfile.TemporaryDirectory(prefix="mrharmony-bench-") as tmp:
        truth = cohort.ground_truth(field_t=3.0, progress=progress, phantom_dir=tmp)
        for sid in truth["subject"]:
            ph = Phantom.load(Path(tmp) / sid)
            z_mm = ph.affine[2, 2] * np.arange(ph.shape[2]) + ph.affine[2, 3]
            k = int(np.argmin(np.abs(z_mm - 10.0)))
            images.append(t1w_signal(ph.t1_ms[..., k], ph.t2star_ms[..., k], ph.pd[..., k]))
            for name in MAP_NAMES:
                maps[name].append(np.asarray(getattr(ph, name)[..., k], np.float32))
            lab = np.zeros(ph.labels.shape[:2], np.int8)
            for code, name in ph.label_names.items():
                lab[ph.labels[..., k] == code] = {"csf": 1, "gm": 2, "wm": 3}.get(name, 0)
            labels.append(lab)
    pool = Pool(truth, np.stack(images), np.stack(labels), null,
                {k: np.stack(v) for k, v in maps.items()})
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp_path, open(tmp_path, "wb") as fh:
        np.savez_compressed(fh, truth=np.array(truth.to_json(orient="split")),
                            images=pool.images, labels=pool.labels, **pool.maps)
    return pool


def site_image(free: np.ndarray, labels: np.ndarray, gain: Any, power: Any, offset: Any,
               noise: np.ndarray | None = None) -> np.ndarray:
    """A site's image of site-free slices: ``g * 1000 * (I / 1000) ** p + b (+ noise)``.

    Parameters
    ----------
    free : ndarray
        Site-free slices ``(n, nx, ny)`` (WM near 1000).
    labels : ndarray
        Labels ``(n, nx, ny)``; the background (0) is set to 0.
    gain, power, offset : float or ndarray
        Per-image gain (scan jitter included), power and offset (image units).
    noise : ndarray, optional
        Additive noise ``(n, nx, ny)`` (image units); none for a noise-free image.

    Returns
    -------
    ndarray (float64)
    """
    def col(v: Any) -> np.ndarray:
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (len(free),))[:, None, None]

    img = col(gain) * 1000.0 * np.power(np.clip(free, 0, None) / 1000.0, col(power)) + col(offset)
    if noise is not None:
        img = img + noise
    return np.where(labels > 0, img, 0.0)


# ------------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    """One scenario: scans, their covariates, site-free and measured data.

    Attributes
    ----------
    name : str
    scans : DataFrame
        One row per scan: ``subject, site, age, diagnosis, sex`` (+ ``pool_index``).
    truth : DataFrame
        Site-free feature values per scan (feature level).
    measured : DataFrame
        Feature values with site effects and noise.
    images_free, images : ndarray
        Site-free and measured image slices per scan ``(n, nx, ny)``.
    labels : ndarray
        True labels per scan.
    unseen_site : str or None
        The site no harmonizer is fitted on (``unseen-site``).
    null : bool
        Every effect's truth is zero.
    site_effects : dict
        The drawn site parameters (for the report).
    """

    name: str
    scans: pd.DataFrame
    truth: pd.DataFrame
    measured: pd.DataFrame
    images_free: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    unseen_site: str | None
    null: bool
    site_effects: dict[str, Any]

    @property
    def covariates(self) -> pd.DataFrame:
        """Harmonizer covariates: ``age`` (years), ``diagnosis``, ``sex`` (strings)."""
        return self.scans[["age", "diagnosis", "sex"]].reset_index(drop=True)

    @property
    def model(self) -> pd.DataFrame:
        """Analysis design: ``age``, ``patient`` (0/1), ``male`` (0/1)."""
        return pd.DataFrame({"age": self.scans["age"].to_numpy(float),
                             "patient": (self.scans["diagnosis"] == "patient").to_numpy(float),
                             "male": (self.scans["sex"] == "M").to_numpy(float)})


def _null_features(truth: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 99])
    z = rng.standard_normal((len(truth), N_NULL_FEATURES))
    return pd.DataFrame(100.0 + 10.0 * z, columns=[f"null_{j + 1:02d}"
                                                   for j in range(N_NULL_FEATURES)])


def _assign(name: str, pool: Pool, cfg: BenchConfig, rng: np.random.Generator
            ) -> tuple[list[tuple[int, str]], str | None]:
    """(pool index, site) per scan, and the unseen site."""
    n_pool = len(pool.truth)
    size = min(cfg.sizes.get(name, n_pool), n_pool)
    pick = np.sort(rng.choice(n_pool, size=size, replace=False))
    truth = pool.truth.iloc[pick]
    if name == "traveling":
        return [(int(i), s) for i in pick for s in ("site-A", "site-B", "site-C")], None
    if name == "confounded-age":
        age = truth["age"].to_numpy()
        p_young = 1.0 / (1.0 + np.exp((age - np.median(age)) / 5.0))
        sites = np.where(rng.random(size) < p_young, "site-young", "site-old")
        return list(zip(pick.tolist(), sites.tolist(), strict=False)), None
    if name == "confounded-diagnosis":
        patient = (truth["diagnosis"] == "patient").to_numpy()
        p_a = np.where(patient, 0.85, 0.3)
        sites = np.where(rng.random(size) < p_a, "site-A", "site-B")
        return list(zip(pick.tolist(), sites.tolist(), strict=False)), None
    if name == "imbalanced":
        small = rng.choice(size, size=cfg.small_site, replace=False)
        sites = np.full(size, "site-large", dtype=object)
        sites[small] = "site-small"
        return list(zip(pick.tolist(), sites.tolist(), strict=False)), None
    if name == "null-effect":
        sites = np.array(["site-A", "site-B"])[rng.permutation(size) % 2]
        return list(zip(pick.tolist(), sites.tolist(), strict=False)), None
    if name == "unseen-site":
        sites = np.array(["site-A", "site-B", "site-C"])[rng.permutation(size) % 3]
        return list(zip(pick.tolist(), sites.tolist(), strict=False)), "site-C"
    raise StudyError(f"scenario: unknown {name!r} (one of {', '.join(SCENARIOS)})")


def build_scenario(name: str, bio: Pool, null_pool: Pool, cfg: BenchConfig, seed: int
                   ) -> Scenario:
    """Draw the scans and apply the seeded site effects of scenario ``name``.

    Parameters
    ----------
    name : str
        One of :data:`SCENARIOS`.
    bio, null_pool : Pool
        The biology and null cohorts.
    cfg : BenchConfig
    seed : int
        Benchmark seed (each scenario adds its own index).

    Returns
    -------
    Scenario
    """
    if name not in SCENARIOS:
        raise StudyError(f"scenario: unknown {name!r} (one of {', '.join(SCENARIOS)})")
    index = list(SCENARIOS).index(name)
    rng = np.random.default_rng([seed, index, 1])
    pool = null_pool if name == "null-effect" else bio
    pairs, unseen = _assign(name, pool, cfg, rng)
    idx = np.array([p for p, _ in pairs])
    site = np.array([s for _, s in pairs], dtype=object)
    t = pool.truth
    scans = pd.DataFrame({"subject": t["subject"].to_numpy()[idx], "site": site,
                          "age": t["age"].to_numpy(float)[idx],
                          "diagnosis": t["diagnosis"].to_numpy()[idx],
                          "sex": t["sex"].to_numpy()[idx], "pool_index": idx})
    feats = pd.concat([t[list(BIO_FEATURES)].reset_index(drop=True),
                       _null_features(t, seed + (1 if pool.null else 0))], axis=1)
    sd = np.maximum(feats.std(ddof=1).to_numpy(), 0.01 * np.abs(feats.mean().to_numpy()))
    truth = feats.iloc[idx].reset_index(drop=True)
    sites = sorted(pd.unique(site))
    srng = np.random.default_rng([seed, index, 2])
    p = feats.shape[1]
    delta = 1.0 + SITE_SCALE_SD * srng.standard_normal((len(sites), p))
    delta += 1.0 - delta.mean(axis=0)
    gamma = SITE_SHIFT_SD * sd * srng.standard_normal((len(sites), p))
    gamma -= gamma.mean(axis=0)
    kappa = np.exp(SITE_NOISE_LOG_SD * srng.standard_normal(len(sites)))
    s_idx = np.array([sites.index(s) for s in site])
    eps = srng.standard_normal(truth.shape)
    measured = (delta[s_idx] * truth.to_numpy() + gamma[s_idx]
                + kappa[s_idx, None] * NOISE_SD * sd * eps)
    measured = pd.DataFrame(measured, columns=truth.columns)
    # image level
    gain = np.exp(SITE_GAIN_SD * srng.standard_normal(len(sites)))
    gain /= np.exp(np.log(gain).mean())
    power = 1.0 + SITE_POWER_SD * srng.standard_normal(len(sites))
    power += 1.0 - power.mean()
    offset = SITE_OFFSET_SD * srng.standard_normal(len(sites))
    offset -= offset.mean()
    free = pool.images[idx].astype(np.float64)
    labels = pool.labels[idx]
    irng = np.random.default_rng([seed, index, 3])
    jitter = 1.0 + SCAN_GAIN_SD * irng.standard_normal(len(idx))
    img = site_image(free, labels, gain[s_idx] * jitter, power[s_idx], offset[s_idx],
                     noise=IMAGE_NOISE * irng.standard_normal(free.shape))
    effects = {"sites": sites, "feature_scale": delta.tolist(), "feature_shift": gamma.tolist(),
               "noise_scale": kappa.tolist(), "image_gain": gain.tolist(),
               "image_power": power.tolist(), "image_offset": offset.tolist()}
    return Scenario(name, scans, truth, measured, free.astype(np.float32),
                    img.astype(np.float32), labels, unseen, pool.null, effects)


# ------------------------------------------------------------------------- methods
def bench_methods() -> tuple[list[str], dict[str, str]]:
    """Runnable method names (feature and image level) and the skipped ones with reasons.

    Learned harmonizers (registry ``learned=True``) run when PyTorch (the ``learn`` extra)
    and their module import; otherwise they are listed as skipped with the reason.
    """
    import importlib

    from mrharmony.harmonize.learned import require_torch
    from mrharmony.harmonize.registry import HARMONIZERS, learned_harmonizers

    names = list(FEATURE_METHODS) + list(IMAGE_METHODS)
    skipped: dict[str, str] = {}
    for name in learned_harmonizers():
        spec = HARMONIZERS[name]
        module = spec.target.split(":")[0]
        try:
            require_torch()
            importlib.import_module(module)
            spec.load()
        except Exception as exc:
            skipped[name] = f"not importable: {type(exc).__name__}: {exc}".splitlines()[0]
            continue
        names.append(name)
    return names, skipped


class _Adapter:
    """A feature harmonizer as the benchmark runs it (covariates on/off, unseen site)."""

    def __init__(self, make: Callable[[], Any], use_cov: bool, unseen: str | None) -> None:
        self.make, self.use_cov, self.unseen = make, use_cov, unseen

    def fit(self, X: Any, batch: Any, covariates: Any = None) -> _Adapter:
        b = np.asarray(batch, dtype=object)
        cov = covariates if self.use_cov else None
        self.h = self.make()
        seen = b != self.unseen if self.unseen is not None else np.ones(len(b), bool)
        self.h.fit(X[seen], pd.Series(b[seen], index=X.index[seen]),
                   covariates=None if cov is None else cov[seen])
        if not seen.all():
            if not hasattr(self.h, "add_batch"):
                raise _NotApplicable("cannot transform a site it was not fitted on")
            try:
                self.h.add_batch(X[~seen], pd.Series(b[~seen], index=X.index[~seen]),
                                 covariates=None if cov is None else cov[~seen])
            except HarmonizeError as exc:  # the method's own refusal, e.g. CovBat's PCA
                raise _NotApplicable(str(exc).splitlines()[0]) from None
        return self

    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        return self.h.transform(X, batch, covariates=covariates if self.use_cov else None)


class _NotApplicable(Exception):
    pass


def _feature_factory(method: str, seed: int, quick: bool) -> tuple[Callable[[], Any], bool]:
    from mrharmony.harmonize.registry import HARMONIZERS, harmonizer_options, make_harmonizer

    if method in FEATURE_METHODS:
        reg, use_cov = FEATURE_METHODS[method]
        return (lambda: make_harmonizer(reg)), use_cov
    spec = HARMONIZERS[method]
    opts: dict[str, Any] = {}
    known = harmonizer_options(method)
    if "seed" in known:
        opts["seed"] = seed
    if "device" in known:
        opts["device"] = "cpu"
    if quick:
        opts.update(getattr(spec.load(), "QUICK", {}))
    return (lambda: make_harmonizer(spec.name, **opts)), True


def _image_features(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    out = {}
    for code, name in zip((1, 2, 3), IMAGE_FEATURES, strict=False):
        m = labels == code
        out[name] = (images * m).sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1)
    return pd.DataFrame(out)


def _harmonize_images(method: str, images: np.ndarray, labels: np.ndarray, fit_rows: np.ndarray,
                      model: pd.DataFrame) -> np.ndarray:
    """Apply image method ``method`` to every image (fitted on ``fit_rows``)."""
    from mrharmony.harmonize.image import NyulNormalizer, Ravel, match_histogram, whitestripe
    from mrharmony.harmonize.image import zscore as zscore_image

    masks = labels > 0
    if method == "raw-image":
        return images.astype(np.float64)
    if method == "zscore":
        return np.stack([zscore_image(im, mask=m) for im, m in zip(images, masks, strict=False)])
    if method == "whitestripe":
        return np.stack([whitestripe(im, mask=m) for im, m in zip(images, masks, strict=False)])
    if method == "histogram":
        ref = int(np.flatnonzero(fit_rows)[0])
        return np.stack([match_histogram(im, images[ref], mask=m, reference_mask=masks[ref])
                         for im, m in zip(images, masks, strict=False)])
    if method == "nyul":
        nyul = NyulNormalizer()
        nyul.fit([images[i] for i in np.flatnonzero(fit_rows)],
                 [masks[i] for i in np.flatnonzero(fit_rows)])
        return np.stack([nyul.transform(im, mask=m) for im, m in zip(images, masks, strict=False)])
    if method == "ravel":
        if not fit_rows.all():
            raise _NotApplicable("RAVEL estimates its factors from the whole image set "
                                 "(no transform of new images)")
        ws = np.stack([whitestripe(im, mask=m) for im, m in zip(images, masks, strict=False)])
        union = masks.any(axis=0)
        csf = labels == 1
        control = csf.all(axis=0)
        if control.sum() < 10:
            control = csf.mean(axis=0) >= 0.5
        ws = np.where(union, ws, 0.0)
        out = Ravel(n_factors=1).fit_transform(list(ws), mask=union, control_mask=control,
                                               covariates=model.to_numpy())
        return np.stack(out)
    raise StudyError(f"method: unknown image method {method!r}")


# ------------------------------------------------------------------------- metrics
def _effects(X: pd.DataFrame, model: pd.DataFrame) -> dict[str, pd.DataFrame]:
    from scipy import stats

    from mrharmony.harmonize.evaluate import association_effects

    out = {}
    for effect, var in EFFECTS.items():
        e = association_effects(X.reset_index(drop=True), model, var)
        dof = e["n"] - model.shape[1] - 1
        half = stats.t.ppf(0.975, dof) * e["se"]
        out[effect] = e.assign(ci_low=e["beta"] - half, ci_high=e["beta"] + half)
    return out


def _is_null(sc: Scenario, feature: str) -> bool:
    return sc.null or feature.startswith("null_") or feature in NULL_BY_CONSTRUCTION


def _biology(sc: Scenario, method: str, X: pd.DataFrame, truth_X: pd.DataFrame
             ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    model = sc.model
    est = _effects(X, model)
    tru = _effects(truth_X, model)
    records, rel, rel_by, covered, fp = [], [], {e: [] for e in EFFECTS}, [], []
    for effect in EFFECTS:
        for feature in X.columns:
            e = est[effect].loc[feature]
            # zero by construction: declared, or exactly no effect in the site-free data
            # (e.g. whole-tissue T1 and diagnosis, which acts only inside the region)
            null = _is_null(sc, feature) or not abs(float(
                tru[effect].loc[feature, "std_beta"])) > ZERO_STD_BETA
            true = 0.0 if null else float(tru[effect].loc[feature, "beta"])
            primary = (not null) and abs(float(tru[effect].loc[feature, "t"])) >= PRIMARY_T
            rec = {"scenario": sc.name, "method": method, "effect": effect, "feature": feature,
                   "true": true, "estimate": float(e["beta"]), "ci_low": float(e["ci_low"]),
                   "ci_high": float(e["ci_high"]), "p": float(e["p"]),
                   "kind": "null" if null else ("primary" if primary else "weak")}
            records.append(rec)
            if null:
                fp.append(float(e["p"]) < 0.05)
            elif primary:
                r = (rec["estimate"] - true) / true
                rel.append(r)
                rel_by[effect].append(r)
                covered.append(rec["ci_low"] <= true <= rec["ci_high"])
    nan = float("nan")
    summary = {
        "effect_bias": float(np.mean(rel)) if rel else nan,
        "effect_abs_error": float(np.mean(np.abs(rel))) if rel else nan,
        "age_bias": float(np.mean(rel_by["age"])) if rel_by["age"] else nan,
        "diagnosis_bias": float(np.mean(rel_by["diagnosis"])) if rel_by["diagnosis"] else nan,
        "coverage": float(np.mean(covered)) if covered else nan,
        "false_positive_rate": float(np.mean(fp)) if fp else nan,
        "n_effects": len(rel), "n_null_tests": len(fp),
    }
    return records, summary


def _icc(sc: Scenario, X: pd.DataFrame) -> float:
    from mrharmony.harmonize.evaluate import icc

    if sc.name != "traveling":
        return float("nan")
    cols = [c for c in X.columns if not _is_null(sc, c)]
    table = icc(X[cols].reset_index(drop=True), sc.scans["subject"].to_numpy(),
                sc.scans["site"].to_numpy())
    return float(np.nanmean(table["icc2_1"]))


def _site_scores(X: pd.DataFrame, sc: Scenario, harmonizer: Any, seed: int) -> dict[str, float]:
    from mrharmony.harmonize.evaluate import site_discriminability

    d = site_discriminability(X.reset_index(drop=True), sc.scans["site"].to_numpy(),
                              covariates=sc.covariates, harmonizer=harmonizer,
                              n_splits=N_SPLITS, n_permutations=0, seed=seed)
    return {"site_accuracy": d.accuracy, "site_balanced_accuracy": d.balanced_accuracy,
            "site_chance": d.chance_accuracy}


def _run_feature(sc: Scenario, method: str, seed: int, quick: bool
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    X = sc.measured
    if method == "raw":
        H = X
        site = _site_scores(X, sc, None, seed)
    else:
        make, use_cov = _feature_factory(method, seed, quick)
        adapter = _Adapter(make, use_cov, sc.unseen_site)
        batch = pd.Series(sc.scans["site"].to_numpy(), name="site")
        H = adapter.fit(X, batch, sc.covariates).transform(X, batch, sc.covariates)
        H = pd.DataFrame(np.asarray(H, dtype=float), columns=X.columns)
        site = _site_scores(X, sc, lambda: _Adapter(make, use_cov, sc.unseen_site), seed)
    records, summary = _biology(sc, method, H, sc.truth)
    return {**site, "icc": _icc(sc, H), **summary}, records


def _run_image(sc: Scenario, method: str, seed: int) -> tuple[dict[str, Any],
                                                             list[dict[str, Any]]]:
    fit_rows = (sc.scans["site"] != sc.unseen_site).to_numpy()
    model = sc.model
    H = _image_features(_harmonize_images(method, sc.images, sc.labels, fit_rows, model),
                        sc.labels)
    T = _image_features(_harmonize_images(method, sc.images_free, sc.labels, fit_rows, model),
                        sc.labels)
    site = _site_scores(H, sc, None, seed)
    records, summary = _biology(sc, method, H, T)
    return {**site, "icc": _icc(sc, H), **summary}, records


# ---------------------------------------------------------------------------- run
@dataclass
class BenchResult:
    """Leaderboard records, biology records and run information."""

    leaderboard: list[dict[str, Any]]
    biology: list[dict[str, Any]]
    info: dict[str, Any]


_METRICS = ("site_accuracy", "site_balanced_accuracy", "site_chance", "icc", "effect_bias",
            "effect_abs_error", "age_bias", "diagnosis_bias", "coverage",
            "false_positive_rate", "ssim", "psnr", "mae", "lesion_contrast_error",
            "spurious_energy")


def _level(method: str) -> str:
    from mrharmony.harmonize.registry import HARMONIZERS

    if method in IMAGE_METHODS:
        return "image"
    spec = HARMONIZERS.get(method)
    return spec.level if spec is not None and method not in FEATURE_METHODS else "features"


def _learned(method: str) -> bool:
    from mrharmony.harmonize.registry import HARMONIZERS

    spec = HARMONIZERS.get(method)
    return method not in FEATURE_METHODS and spec is not None and spec.learned


def _compatible(scenario: str, method: str) -> bool:
    """image-translation: image methods only; other scenarios: all but learned image ones."""
    if scenario == "image-translation":
        return _level(method) == "image"
    return not (_level(method) == "image" and _learned(method))


def run_bench(*, scenarios: Sequence[str] | None = None, methods: Sequence[str] | None = None,
              seed: int = 0, quick: bool = True, config: BenchConfig | None = None,
              cache_dir: str | os.PathLike[str] | None = None,
              progress: bool = False,
              learned_options: dict[str, dict[str, Any]] | None = None) -> BenchResult:
    """Run the benchmark.

    Parameters
    ----------
    scenarios : sequence of str, optional
        Names from :data:`SCENARIOS` (default: all).
    methods : sequence of str, optional
        Method names (default: every runnable one, see :func:`bench_methods`); ``raw``
        and ``raw-image`` are the unharmonized baselines.
    seed : int
        Seed of the cohorts, the scenario draws, the site effects and the CV folds.
    quick : bool
        :data:`QUICK` sizes (minutes on 2 cores) or :data:`FULL`.
    config : BenchConfig, optional
        Explicit sizes (overrides ``quick``).
    cache_dir : path, optional
        Pool cache (see :func:`load_pool`).
    progress : bool
        Progress bars on stderr.
    learned_options : dict, optional
        Extra constructor options per learned image method (e.g. fewer epochs in tests),
        on top of its ``QUICK`` options in a quick run.

    Returns
    -------
    BenchResult

    Raises
    ------
    StudyError
        Unknown scenario or method.
    """
    t0 = time.perf_counter()
    cfg = config or (QUICK if quick else FULL)
    scen = list(SCENARIOS) if not scenarios else list(dict.fromkeys(scenarios))
    bad = [s for s in scen if s not in SCENARIOS]
    if bad:
        raise StudyError(f"--scenarios: unknown {', '.join(bad)} (one of "
                         f"{', '.join(SCENARIOS)})")
    runnable, skipped = bench_methods()
    known = runnable + list(skipped)
    meth = list(runnable) if not methods else list(dict.fromkeys(methods))
    bad = [m for m in meth if m not in known]
    if bad:
        raise StudyError(f"--methods: unknown {', '.join(bad)} (one of {', '.join(known)})")
    if not 0 <= seed < 2**31:
        raise StudyError(f"--seed: {seed} must be in [0, 2**31)")
    quick_cfg = cfg.name != "full"
    if not methods and quick_cfg:
        # a quick run stays in minutes on 2 cores: learned image models (tens of minutes
        # each there) run only when named in --methods
        from mrharmony.harmonize.registry import HARMONIZERS

        for name in [m for m in meth if m in HARMONIZERS and HARMONIZERS[m].learned
                     and HARMONIZERS[m].level == "image"]:
            meth.remove(name)
            skipped[name] = ("not in a quick run by default (trains for tens of minutes on "
                             "2 cores); name it in --methods")
    if not methods:
        meth += list(skipped)
    need_bio = any(s != "null-effect" for s in scen)
    t_pool = time.perf_counter()
    bio = (load_pool(cfg.pool, seed, null=False, voxel_size_mm=cfg.voxel_size_mm,
                     cache_dir=cache_dir, progress=progress) if need_bio else None)
    nul = (load_pool(cfg.null_pool, seed + 1, null=True, voxel_size_mm=cfg.voxel_size_mm,
                     cache_dir=cache_dir, progress=progress)
           if "null-effect" in scen else None)
    pool_s = time.perf_counter() - t_pool
    tasks = [(s, m) for s in scen for m in meth if _compatible(s, m)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="bench", unit="run")
    leaderboard, biology = [], []
    built: dict[str, Any] = {}
    for s, m in tasks:
        if s not in built:
            if s == "image-translation":
                from mrharmony.study.bench_learned import build_translation

                built[s] = build_translation(bio, cfg, seed)
            else:
                built[s] = build_scenario(s, bio if bio is not None else nul,
                                          nul if nul is not None else bio, cfg, seed)
        sc = built[s]
        if bar is not None:
            bar.set_postfix_str(f"{s} / {m}")
        level = _level(m)
        learned = _learned(m)
        holdout = learned and level == "features" and quick_cfg
        evaluation = ("held-out subjects" if s == "image-translation" else
                      "hold-out" if holdout else "cv" if level == "features" else "all images")
        rec: dict[str, Any] = {"scenario": s, "method": m, "level": level, "learned": learned,
                               "evaluation": evaluation, "status": "ok", "reason": "",
                               **{k: float("nan") for k in _METRICS},
                               "hallucination_pass": None}
        if s == "image-translation":
            n_scans, n_sites = len(sc.subjects) * len(sc.test), len(sc.test)
        else:
            n_scans, n_sites = len(sc.scans), int(sc.scans["site"].nunique())
        t1 = time.perf_counter()
        if m in skipped:
            rec.update(status="skipped", reason=skipped[m])
        else:
            try:
                if s == "image-translation":
                    from mrharmony.study.bench_learned import run_translation

                    metrics, bio_recs = run_translation(
                        sc, m, seed, quick_cfg, learned=learned,
                        options=(learned_options or {}).get(m))
                elif level == "image":
                    metrics, bio_recs = _run_image(sc, m, seed)
                elif holdout:
                    from mrharmony.study.bench_learned import run_feature_holdout

                    metrics, bio_recs = run_feature_holdout(sc, m, seed, quick_cfg)
                    n_scans = metrics.pop("n_scans")
                else:
                    metrics, bio_recs = _run_feature(sc, m, seed, quick_cfg)
                rec.update(metrics)
                biology.extend(bio_recs)
            except _NotApplicable as exc:
                rec.update(status="not applicable", reason=str(exc))
            except HarmonizeError as exc:
                rec.update(status="failed", reason=str(exc).splitlines()[0])
        rec.update(n_scans=n_scans, n_sites=n_sites,
                   seconds=round(time.perf_counter() - t1, 3))
        leaderboard.append(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    info = {"version": BENCH_VERSION, "config": cfg.name, "seed": seed,
            "scenarios": {s: SCENARIOS[s] for s in scen}, "methods": meth,
            "skipped": skipped, "voxel_size_mm": cfg.voxel_size_mm,
            "pool_subjects": {"biology": cfg.pool if bio is not None else 0,
                              "null": cfg.null_pool if nul is not None else 0},
            "scans": {s: (len(built[s].scans) if isinstance(built[s], Scenario)
                          else built[s].splits) for s in built},
            "site_effects": {s: built[s].site_effects for s in built},
            "pool_seconds": round(pool_s, 2),
            "seconds": round(time.perf_counter() - t0, 2)}
    return BenchResult(leaderboard, biology, info)


def jsonable(value: Any) -> Any:
    """NaN/inf -> None and NumPy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value
