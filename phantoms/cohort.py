"""Virtual traveling-subject cohorts with exactly known biology.

Each subject is the MNI152 brain (:mod:`mrharmony.phantoms.brain`) changed by smooth
deformations and relaxation drifts whose sizes are configured in
:class:`CohortEffects`. Everything is deterministic given ``(seed, subject index)``;
subjects are generated lazily (one at a time) so a cohort of any size fits in memory.

Covariates
----------
``age ~ Uniform(age_range)``, ``sex`` F/M with probability 1/2, ``diagnosis``
"patient" with probability ``patient_fraction`` (else "control"); drawn from
``numpy.random.default_rng([seed, index])``.

Effects (template coordinates ``y``, subject coordinates ``x``, brain centre ``c``)
----------------------------------------------------------------------------------
1. **Subject anatomy** (nuisance variability): ``y = c + (x - c) / h + d(x)`` with head
   scale ``h = (1 + head_size_sd * z) * (male_head_scale if male)``, ``z ~ N(0, 1)``
   (defaults 0.03 and 1.03), and ``d`` a random smooth displacement field (white noise
   smoothed by a Gaussian of ``shape_smoothness_mm`` = 20 mm, scaled to an RMS of
   ``shape_variability_mm`` = 1.5 mm inside the brain). The intracranial mask ``M``
   follows this map only. ``gm_reference_ml`` is the GM volume after this step.
2. **Diagnosis** (patients only): in the bilateral region of interest ``R`` (spheres of
   ``region_radius_mm`` = 12 mm at MNI (+-26, -22, -14) mm, hippocampus-like; weight
   ``rho`` = 1 inside, cosine taper to 0 over 4 mm, defined in template space so it
   follows the anatomy), a smooth partial-volume GM loss replaced by CSF,
   ``f_GM *= 1 - diagnosis_region_gm_loss_pct/100 * rho`` (default 15 %, so the GM
   volume inside ``R`` falls by exactly that fraction before ageing), and GM/WM
   ``T1 *= 1 + diagnosis_t1_pct/100 * rho`` (default 5 %), ``T2, T2* *= 1 +
   diagnosis_t2_pct/100 * rho`` (default 8 %).
3. **Ageing**: GM and WM are pulled towards ``c`` by the radial map
   ``y -> c + (y - c) * (1 + alpha * min(|y - c| / 75 mm, 1))`` (cortex moves most,
   ventricles least; the space freed inside ``M`` becomes CSF), with ``alpha`` solved
   per subject so that the realised GM volume equals
   ``gm_reference_ml + gm_slope_ml_per_year * (age - reference_age_years) - L``, where
   ``L`` is the subject's diagnosis GM loss (0 for controls)
   (default -3 mL/year, reference age 20 y; younger subjects need GM growth, which
   the map can give only where CSF leaves room). WM shrinks with the same map; its realised
   volume is reported. Tissue ``T1 *= 1 + t1_drift_pct_per_year/100 * (age - 20)``
   (default 0.10 %/y) and ``T2, T2* *= 1 + t2_drift_pct_per_year/100 * (age - 20)``
   (default 0.05 %/y) for GM and WM.

Use
---
``cohort.covariates()`` (cheap, no anatomy), ``cohort.phantom("sub-001", field_t=3.0,
matrix=None | N, three_d=True)``, ``cohort.fractions(i)``, ``cohort.ground_truth(field_t)``,
``cohort.true_age_slopes(field_t)`` and ``cohort.write(directory)`` (``cohort.json``,
``ground_truth.csv``, ``sub-XXX/`` phantoms). Subject phantoms live on the cohort grid
(``voxel_size_mm``, default 2 mm); ``matrix=N`` resamples them to an ``N**3`` cube over
240 mm (or one slice with ``three_d=False``).

Ground truth
------------
:meth:`Cohort.ground_truth` measures every volume from the deformed fractions (not from
the formulas), and regional relaxation means from the mixed maps, so the table is the
exact truth of the phantoms the simulator will scan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import brentq

from mrharmony.config import from_mapping, param, to_mapping
from mrharmony.errors import PhantomError
from mrharmony.fileio import atomic_directory
from mrharmony.phantoms.brain import (
    BRAIN_FOV_MM,
    TissueFractions,
    brain_fractions,
    fractions_grid,
    mix_tissues,
    resample_maps,
)
from mrharmony.phantoms.phantom import Phantom
from mrharmony.phantoms.relaxation import TISSUES, tissue_values

__all__ = ["Cohort", "CohortEffects", "Subject", "make_cohort"]

_RADIAL_SCALE_MM = 75.0
_TAPER_MM = 4.0
_VOLUME_RTOL = 1e-5


@dataclass(frozen=True)
class CohortEffects:
    """Sizes of the biological and nuisance effects of a virtual cohort."""

    gm_slope_ml_per_year: float = param(-3.0, doc="GM volume change per year of age",
                                        ge=-20.0, le=5.0)
    reference_age_years: float = param(20.0, doc="age of the unaltered template anatomy",
                                       ge=0.0, le=100.0)
    t1_drift_pct_per_year: float = param(0.10, doc="GM/WM T1 change per year of age (%)",
                                         ge=-2.0, le=2.0)
    t2_drift_pct_per_year: float = param(0.05, doc="GM/WM T2 change per year of age (%)",
                                         ge=-2.0, le=2.0)
    patient_fraction: float = param(0.3, doc="probability of diagnosis 'patient'",
                                    ge=0.0, le=1.0)
    diagnosis_region_gm_loss_pct: float = param(15.0, doc="GM volume loss in the region (%)",
                                                ge=0.0, le=60.0)
    diagnosis_t1_pct: float = param(5.0, doc="GM/WM T1 increase in the region (%)",
                                    ge=-50.0, le=100.0)
    diagnosis_t2_pct: float = param(8.0, doc="GM/WM T2 increase in the region (%)",
                                    ge=-50.0, le=100.0)
    region_radius_mm: float = param(12.0, doc="radius of each region sphere", unit="mm",
                                    ge=4.0, le=40.0)
    region_centre_mm: tuple[float, ...] = param((26.0, -22.0, -14.0),
                                                doc="MNI centre of the right region sphere "
                                                    "(mirrored in x)", unit="mm", length=3)
    head_size_sd: float = param(0.03, doc="SD of the relative head scale", ge=0.0, le=0.2)
    male_head_scale: float = param(1.03, doc="head scale of males relative to females",
                                   ge=0.8, le=1.3)
    shape_variability_mm: float = param(1.5, doc="RMS of the random smooth displacement",
                                        unit="mm", ge=0.0, le=10.0)
    shape_smoothness_mm: float = param(20.0, doc="Gaussian smoothing of that displacement",
                                       unit="mm", ge=2.0, le=100.0)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "cohort") -> CohortEffects:
        """Validate a mapping (e.g. a TOML table) into effects."""
        return from_mapping(cls, data, source=source)


@dataclass(frozen=True)
class Subject:
    """One virtual subject: id, covariates and nuisance head scale."""

    subject_id: str
    index: int
    age_years: float
    sex: str
    diagnosis: str
    head_scale: float


@dataclass
class _SubjectState:
    fractions: TissueFractions
    roi_weight: np.ndarray   # rho on the subject grid (template-space region, deformed)
    roi: np.ndarray          # region mask on the subject grid
    gm_reference_ml: float
    region_gm_reference_ml: float
    diagnosis_loss_ml: float
    alpha: float


class Cohort:
    """A virtual cohort; use :func:`make_cohort`.

    Attributes
    ----------
    subjects : list of Subject
    seed : int
    effects : CohortEffects
    voxel_size_mm : float
    """

    def __init__(self, n_subjects: int, seed: int, *, age_range: tuple[float, float],
                 effects: CohortEffects, voxel_size_mm: float,
                 age_normal: tuple[float, float] | None = None,
                 female_fraction: float = 0.5) -> None:
        self.seed = int(seed)
        self.effects = effects
        self.voxel_size_mm = float(voxel_size_mm)
        self.age_range = (float(age_range[0]), float(age_range[1]))
        self.age_normal = None if age_normal is None else (float(age_normal[0]),
                                                           float(age_normal[1]))
        self.female_fraction = float(female_fraction)
        self.subjects = [self._draw_subject(i) for i in range(n_subjects)]
        self._anatomy: tuple[TissueFractions, np.ndarray, np.ndarray] | None = None
        self._truth: dict[float, Any] = {}

    # The template anatomy is loaded on first use, so covariates() stays cheap.
    def _template(self) -> tuple[TissueFractions, np.ndarray, np.ndarray]:
        if self._anatomy is None:
            base = brain_fractions(voxel_size_mm=self.voxel_size_mm, three_d=True)
            base_sum = base.brain_fraction()
            ijk = np.array(ndi.center_of_mass(base_sum))
            centre = base.affine[:3, :3] @ ijk + base.affine[:3, 3]
            self._anatomy = (base, centre, base_sum > 0.5)
        return self._anatomy

    @property
    def _base(self) -> TissueFractions:
        return self._template()[0]

    @property
    def _centre_mm(self) -> np.ndarray:
        return self._template()[1]

    @property
    def _brain_mask(self) -> np.ndarray:
        return self._template()[2]

    # ----------------------------------------------------------- covariates
    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def _draw_subject(self, index: int) -> Subject:
        rng = self._rng(index, 0)
        if self.age_normal is None:
            age = float(rng.uniform(*self.age_range))
        else:  # normal, truncated to age_range (rejection; deterministic given the seed)
            mean, sd = self.age_normal
            age = float(np.clip(mean, *self.age_range))
            for _ in range(1000):
                draw = float(rng.normal(mean, sd))
                if self.age_range[0] <= draw <= self.age_range[1]:
                    age = draw
                    break
        sex = "M" if rng.random() < 1.0 - self.female_fraction else "F"
        diagnosis = "patient" if rng.random() < self.effects.patient_fraction else "control"
        scale = 1.0 + self.effects.head_size_sd * float(rng.standard_normal())
        if sex == "M":
            scale *= self.effects.male_head_scale
        return Subject(f"sub-{index + 1:03d}", index, age, sex, diagnosis, scale)

    def __len__(self) -> int:
        return len(self.subjects)

    def _subject(self, key: int | str) -> Subject:
        if isinstance(key, str):
            for s in self.subjects:
                if s.subject_id == key:
                    return s
            raise PhantomError(f"subject {key!r} is not in this cohort "
                               f"(sub-001 .. sub-{len(self.subjects):03d})")
        index = int(key)
        if not 0 <= index < len(self.subjects):
            raise PhantomError(f"subject index {index} outside [0, {len(self.subjects) - 1}]")
        return self.subjects[index]

    # ------------------------------------------------------------ anatomy
    def _template_coords(self, subject: Subject) -> np.ndarray:
        """Template position y (mm) of every subject voxel, (3, nx, ny, nz) float32."""
        aff = self._base.affine
        shape = self._base.shape
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        x = aff[:3, :3].astype(np.float32) @ ijk + aff[:3, 3:4].astype(np.float32)
        del ijk
        c = self._centre_mm.astype(np.float32)[:, None]
        y = c + (x - c) / np.float32(subject.head_scale)
        e = self.effects
        if e.shape_variability_mm > 0:
            rng = self._rng(subject.index, 1)
            noise = rng.standard_normal((3, *shape), dtype=np.float32)
            sigma = e.shape_smoothness_mm / self.voxel_size_mm
            d = np.stack([ndi.gaussian_filter(noise[k], sigma, mode="constant")
                          for k in range(3)])
            rms = float(np.sqrt(np.mean(np.sum(d[:, self._brain_mask] ** 2, axis=0))))
            if rms > 0:
                d *= np.float32(e.shape_variability_mm / rms)
            y += d.reshape(3, -1)
        return y.reshape(3, *shape)

    def _sample(self, arr: np.ndarray, y_mm: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self._base.affine)
        shape = y_mm.shape[1:]
        flat = y_mm.reshape(3, -1)
        idx = inv[:3, :3].astype(np.float32) @ flat + inv[:3, 3:4].astype(np.float32)
        return ndi.map_coordinates(arr, idx, order=1, mode="constant", cval=0.0,
                                   prefilter=False).reshape(shape).astype(np.float32)

    def _region(self, y_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Region weight rho(y) (1 inside, cosine taper) and the region mask (rho == 1)."""
        e = self.effects
        cr = np.array(e.region_centre_mm, dtype=np.float32)
        cl = cr * np.array([-1.0, 1.0, 1.0], dtype=np.float32)
        dr = np.sum((y_mm - cr[:, None, None, None]) ** 2, axis=0)
        dl = np.sum((y_mm - cl[:, None, None, None]) ** 2, axis=0)
        dist = np.sqrt(np.minimum(dr, dl))
        t = np.clip((dist - e.region_radius_mm) / _TAPER_MM, 0.0, 1.0)
        rho = (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)
        return rho, dist <= e.region_radius_mm

    def _tissue(self, y_mm: np.ndarray, mask: np.ndarray, alpha: float, gamma: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """GM, WM, region weight and region mask after ageing (alpha) and diagnosis (gamma)."""
        y = y_mm
        if alpha != 0.0:
            c = self._centre_mm.astype(np.float32)[:, None, None, None]
            r = np.sqrt(np.sum((y - c) ** 2, axis=0))
            w = np.minimum(r / np.float32(_RADIAL_SCALE_MM), 1.0)
            y = c + (y - c) * (1.0 + np.float32(alpha) * w)[None]
        gm = self._sample(self._base.gm, y)
        wm = self._sample(self._base.wm, y)
        rho, in_roi = self._region(y)
        if gamma != 0.0:
            gm *= 1.0 - np.float32(gamma) * rho
        tissue = gm + wm
        over = tissue > mask
        if np.any(over):
            scale = np.where(over, mask / np.maximum(tissue, 1e-12), 1.0).astype(np.float32)
            gm *= scale
            wm *= scale
        return gm, wm, rho, in_roi

    def _state(self, subject: Subject) -> _SubjectState:
        e = self.effects
        y = self._template_coords(subject)
        base = self._base
        mask = self._sample(base.brain_fraction(), y)
        vox_ml = base.voxel_volume_ml

        gm0, _, _, roi0 = self._tissue(y, mask, 0.0, 0.0)
        gm_ref = float(gm0.sum(dtype=np.float64) * vox_ml)
        region_ref = float(gm0[roi0].sum(dtype=np.float64) * vox_ml)
        gamma = 0.0
        loss = 0.0
        if subject.diagnosis == "patient":
            gamma = e.diagnosis_region_gm_loss_pct / 100.0
            gm1, _, _, _ = self._tissue(y, mask, 0.0, gamma)
            loss = gm_ref - float(gm1.sum(dtype=np.float64) * vox_ml)
            del gm1
        del gm0
        target = (gm_ref + e.gm_slope_ml_per_year * (subject.age_years - e.reference_age_years)
                  - loss)

        def total_gap(a: float) -> float:
            g, _, _, _ = self._tissue(y, mask, a, gamma)
            return float(g.sum(dtype=np.float64) * vox_ml) - target

        lo, hi = (0.0, 0.6) if target <= gm_ref - loss else (-0.25, 0.0)
        alpha = _solve(total_gap, lo, hi, "gm_slope_ml_per_year", scale=gm_ref)
        gm, wm, rho, roi = self._tissue(y, mask, alpha, gamma)
        csf = np.clip(mask - gm - wm, 0.0, 1.0).astype(np.float32)
        fractions = TissueFractions(csf, gm, wm, base.affine.copy())
        return _SubjectState(fractions, rho, roi, gm_ref, region_ref, loss, alpha)

    def fractions(self, subject: int | str) -> TissueFractions:
        """Deformed CSF/GM/WM fractions of a subject (0-based index or ``"sub-001"`` id)."""
        return self._state(self._subject(subject)).fractions

    # ---------------------------------------------------------- relaxation
    def _props(self, subject: Subject, rho: np.ndarray, field_t: float) -> dict[str, Any]:
        e = self.effects
        years = subject.age_years - e.reference_age_years
        f1 = 1.0 + e.t1_drift_pct_per_year / 100.0 * years
        f2 = 1.0 + e.t2_drift_pct_per_year / 100.0 * years
        props: dict[str, Any] = {}
        for tissue in TISSUES:
            v = tissue_values(tissue, field_t)
            if tissue == "csf":
                props[tissue] = v
                continue
            v = v.scaled(t1=f1, t2=f2)
            if subject.diagnosis == "patient":
                g1 = 1.0 + e.diagnosis_t1_pct / 100.0 * rho
                g2 = 1.0 + e.diagnosis_t2_pct / 100.0 * rho
                t1 = (v.t1_ms * g1).astype(np.float32)
                t2 = np.minimum(v.t2_ms * g2, t1).astype(np.float32)
                t2s = np.minimum(v.t2star_ms * g2, t2).astype(np.float32)
                props[tissue] = {"t1_ms": t1, "t2_ms": t2, "t2star_ms": t2s, "pd": v.pd,
                                 "adc_mm2_s": v.adc_mm2_s}
            else:
                props[tissue] = v
        return props

    def phantom(self, subject: int | str, *, field_t: float = 3.0, matrix: int | None = None,
                three_d: bool = True, slice_index: int | None = None,
                fov_mm: float = BRAIN_FOV_MM) -> Phantom:
        """The phantom of one subject at a field strength.

        Parameters
        ----------
        subject : int or str
            0-based index or subject id (``"sub-001"``).
        field_t : float, optional
            Field (T) of the tissue relaxation values.
        matrix : int, optional
            Resample to a ``matrix**3`` cube over ``fov_mm`` (as
            :func:`~mrharmony.phantoms.make_brain_phantom`); default: the cohort grid.
        three_d : bool, optional
            3-D (default) or one axial slice.
        slice_index : int, optional
            2-D: slice of the 3-D grid (default: MNI z = 10 mm).
        fov_mm : float, optional
            FOV of a ``matrix`` grid (mm).

        Returns
        -------
        Phantom
            With ``metadata["subject"]`` (covariates) and ``metadata["volumes_ml"]`` (of the
            returned grid).
        """
        s = self._subject(subject)
        state = self._state(s)
        if matrix is not None or not three_d:
            shape, affine = fractions_grid(state.fractions, matrix=matrix, fov_mm=fov_mm,
                                           three_d=three_d, slice_index=slice_index)
            maps = resample_maps({**state.fractions.as_dict(), "rho": state.roi_weight},
                                 state.fractions.affine, shape, affine)
            fractions = TissueFractions(maps["csf"], maps["gm"], maps["wm"], affine)
            state = _SubjectState(fractions, maps["rho"], maps["rho"] >= 0.5,
                                  state.gm_reference_ml, state.region_gm_reference_ml,
                                  state.diagnosis_loss_ml, state.alpha)
        elif slice_index is not None:
            raise PhantomError("slice_index: give a slice or three_d, not both")
        return self._phantom_from_state(s, state, field_t)

    def _phantom_from_state(self, subject: Subject, state: _SubjectState,
                            field_t: float) -> Phantom:
        meta = {
            "generator": "mrharmony.phantoms.make_cohort",
            "cohort_seed": self.seed,
            "subject": {"subject_id": subject.subject_id, "age_years": subject.age_years,
                        "sex": subject.sex, "diagnosis": subject.diagnosis,
                        "head_scale": subject.head_scale},
            "volumes_ml": state.fractions.volumes_ml(),
            "effects": _jsonable(to_mapping(self.effects)),
        }
        return mix_tissues(state.fractions, self._props(subject, state.roi_weight, field_t),
                           field_t=field_t, name=subject.subject_id, metadata=meta)

    # --------------------------------------------------------- ground truth
    def covariates(self) -> Any:
        """Covariates only (no anatomy is computed).

        Returns
        -------
        pandas.DataFrame
            Columns ``subject, age, sex, diagnosis``, one row per subject.
        """
        import pandas as pd

        return pd.DataFrame([{"subject": s.subject_id, "age": s.age_years, "sex": s.sex,
                              "diagnosis": s.diagnosis} for s in self.subjects])

    def true_age_slopes(self, field_t: float = 3.0) -> dict[str, float]:
        """Configured (true) per-year age slopes of the ground-truth features.

        Parameters
        ----------
        field_t : float, optional
            Field (T) of the relaxation slopes.

        Returns
        -------
        dict
            ``gm_volume_ml`` (mL/y) and ``gm_t1_ms, wm_t1_ms, gm_t2_ms, wm_t2_ms`` (ms/y)
            for pure tissue (controls, outside the diagnosis region).
        """
        e = self.effects
        out = {"gm_volume_ml": e.gm_slope_ml_per_year}
        for tissue in ("gm", "wm"):
            v = tissue_values(tissue, field_t)
            out[f"{tissue}_t1_ms"] = v.t1_ms * e.t1_drift_pct_per_year / 100.0
            out[f"{tissue}_t2_ms"] = v.t2_ms * e.t2_drift_pct_per_year / 100.0
        return out

    def ground_truth(self, *, field_t: float = 3.0, progress: bool = False,
                     phantom_dir: str | os.PathLike[str] | None = None,
                     force: bool = False) -> Any:
        """Per-subject ground-truth biology, measured from the generated phantoms.

        Parameters
        ----------
        field_t : float, optional
            Field (T) of the relaxation columns.
        progress : bool, optional
            Show a progress bar.
        phantom_dir : path, optional
            Also save each subject's phantom to ``phantom_dir / subject_id``.
        force : bool, optional
            Replace existing phantom directories.

        Returns
        -------
        pandas.DataFrame
            One row per subject: ``subject, age, sex, diagnosis, head_scale``,
            ``gm_volume_ml, wm_volume_ml, csf_volume_ml, icv_ml`` (realised),
            ``gm_reference_ml`` (GM before ageing/diagnosis), ``region_gm_volume_ml``,
            ``region_gm_reference_ml``, tissue parameters ``gm_t1_ms, wm_t1_ms, gm_t2_ms,
            wm_t2_ms`` (before partial volume), regional means of the mixed maps
            ``region_t1_ms, region_t2_ms`` and whole-GM means ``gm_mean_t1_ms``.
        """
        import pandas as pd

        key = float(field_t)
        if key in self._truth and phantom_dir is None:
            return self._truth[key].copy()
        rows = []
        for subject in _progress(self.subjects, progress, "cohort"):
            state = self._state(subject)
            ph = self._phantom_from_state(subject, state, field_t)
            if phantom_dir is not None:
                ph.save(Path(phantom_dir) / subject.subject_id, force=force)
            vols = state.fractions.volumes_ml()
            roi = state.roi
            in_roi_gm = state.fractions.gm[roi]
            vox = state.fractions.voxel_volume_ml
            props = self._props(subject, np.zeros(1, np.float32), field_t)
            gm_dom = ph.labels == 2
            rows.append({
                "subject": subject.subject_id, "age": subject.age_years, "sex": subject.sex,
                "diagnosis": subject.diagnosis, "head_scale": subject.head_scale,
                "gm_volume_ml": vols["gm"], "wm_volume_ml": vols["wm"],
                "csf_volume_ml": vols["csf"], "icv_ml": vols["icv"],
                "gm_reference_ml": state.gm_reference_ml,
                "region_gm_volume_ml": float(in_roi_gm.sum(dtype=np.float64) * vox),
                "region_gm_reference_ml": state.region_gm_reference_ml,
                "gm_t1_ms": _scalar(props["gm"], "t1_ms"),
                "wm_t1_ms": _scalar(props["wm"], "t1_ms"),
                "gm_t2_ms": _scalar(props["gm"], "t2_ms"),
                "wm_t2_ms": _scalar(props["wm"], "t2_ms"),
                "region_t1_ms": float(np.mean(ph.t1_ms[roi & ph.mask], dtype=np.float64)),
                "region_t2_ms": float(np.mean(ph.t2_ms[roi & ph.mask], dtype=np.float64)),
                "gm_mean_t1_ms": float(np.mean(ph.t1_ms[gm_dom], dtype=np.float64)),
                "diagnosis_gm_loss_ml": state.diagnosis_loss_ml,
                "ageing_alpha": state.alpha,
            })
        table = pd.DataFrame(rows)
        self._truth[key] = table
        return table.copy()

    def write(self, directory: str | os.PathLike[str], *, field_t: float = 3.0,
              phantoms: bool = True, force: bool = False, progress: bool = False) -> Path:
        """Write the cohort: ``cohort.json``, ``ground_truth.csv`` and phantom folders.

        Parameters
        ----------
        directory : path
            Output directory (must be empty or absent unless ``force``).
        field_t : float, optional
            Field (T) of the phantoms and relaxation columns.
        phantoms : bool, optional
            Also write ``sub-XXX/`` phantom directories (NIfTI + JSON each).
        force : bool, optional
            Replace an existing output directory.
        progress : bool, optional
            Show a progress bar.

        Returns
        -------
        pathlib.Path
        """
        out = Path(directory)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise PhantomError(f"{out}: exists and is not empty (use --force / "
                               "force=True to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(out) as tmp:
            table = self.ground_truth(field_t=field_t, progress=progress,
                                      phantom_dir=tmp if phantoms else None)
            table.to_csv(tmp / "ground_truth.csv", index=False)
            doc = {
                "format": "mrharmony-cohort", "version": 1, "seed": self.seed,
                "n_subjects": len(self.subjects), "age_range": list(self.age_range),
                "voxel_size_mm": self.voxel_size_mm, "field_t": float(field_t),
                "effects": _jsonable(to_mapping(self.effects)),
                "subjects": [vars(s) for s in self.subjects],
                "phantoms": bool(phantoms),
            }
            (tmp / "cohort.json").write_text(json.dumps(doc, indent=2) + "\n")
        return out


def _scalar(v: Any, key: str) -> float:
    return float(getattr(v, key)) if not isinstance(v, dict) else float(np.max(v[key]))


def _jsonable(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in mapping.items()}


def _progress(items: list[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="subject")


def _solve(fun: Any, lo: float, hi: float, what: str, *, scale: float) -> float:
    """Root of a monotone 1-D function in [lo, hi]; PhantomError if not bracketed."""
    f_lo, f_hi = fun(lo), fun(hi)
    if f_lo == 0.0:
        return lo
    if f_hi == 0.0:
        return hi
    if np.sign(f_lo) == np.sign(f_hi):
        raise PhantomError(f"{what}: the requested change is not reachable by the "
                           f"deformation (residuals {f_lo:.3g} and {f_hi:.3g} mL at its "
                           f"limits)")
    if abs(f_lo) <= _VOLUME_RTOL * scale:
        return lo
    return float(brentq(fun, lo, hi, xtol=1e-6, rtol=1e-9, maxiter=100))


def make_cohort(n_subjects: int, seed: int, *, age_range: tuple[float, float] = (20.0, 80.0),
                effects: CohortEffects | dict[str, Any] | None = None,
                voxel_size_mm: float = 2.0, age_normal: tuple[float, float] | None = None,
                female_fraction: float = 0.5) -> Cohort:
    """Virtual traveling-subject cohort with known biology (see the module docstring).

    Parameters
    ----------
    n_subjects : int
        Number of subjects, >= 1.
    seed : int
        Seed; the same seed gives the same cohort (covariates, anatomy, values).
    age_range : tuple of float, optional
        Uniform age range (years); with ``age_normal``, the range the normal ages are
        truncated to.
    effects : CohortEffects or mapping, optional
        Effect sizes (defaults documented on :class:`CohortEffects`).
    voxel_size_mm : float, optional
        Isotropic voxel size of the subject phantoms (mm); 2 mm by default, 3-4 mm for
        quick tests, 1 mm for full resolution.
    age_normal : (mean, sd) of float, optional
        Draw ages from a normal distribution (years) truncated to ``age_range``
        instead of uniformly.
    female_fraction : float, optional
        Probability that a subject is female (0.5 by default).

    Returns
    -------
    Cohort
        Subjects are generated lazily by :meth:`Cohort.phantom` / :meth:`Cohort.ground_truth`.

    Examples
    --------
    >>> cohort = make_cohort(4, seed=1, voxel_size_mm=4.0)
    >>> [s.subject_id for s in cohort.subjects]
    ['sub-001', 'sub-002', 'sub-003', 'sub-004']
    """
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) \
            or n_subjects < 1:
        raise PhantomError(f"n_subjects: {n_subjects!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed: {seed!r} must be an integer >= 0")
    lo, hi = (float(a) for a in age_range)
    if not 0 <= lo <= hi <= 110:
        raise PhantomError(f"age_range: {age_range} must satisfy 0 <= low <= high <= 110")
    if effects is None:
        effects = CohortEffects()
    data = effects if isinstance(effects, dict) else to_mapping(effects)
    try:
        checked = CohortEffects.from_mapping(dict(data))
    except ValueError as exc:
        raise PhantomError(f"effects: {exc}") from None
    if not 0.5 <= voxel_size_mm <= 8.0:
        raise PhantomError(f"voxel_size_mm: {voxel_size_mm} outside [0.5, 8] mm")
    if not 0.0 <= female_fraction <= 1.0:
        raise PhantomError(f"female_fraction: {female_fraction} outside [0, 1]")
    if age_normal is not None and not (lo <= float(age_normal[0]) <= hi
                                       and float(age_normal[1]) > 0):
        raise PhantomError(f"age_normal: {age_normal} needs a mean inside age_range "
                           f"{age_range} and a positive SD")
    return Cohort(int(n_subjects), int(seed), age_range=(lo, hi), effects=checked,
                  voxel_size_mm=voxel_size_mm, age_normal=age_normal,
                  female_fraction=female_fraction)
