"""The one registry of harmonizers: name -> implementation, level, needs and options.

The CLI (``mrharmony harmonize combat``, ``harmonize image``, ``evaluate``), the study
runner and the benchmarks look harmonizers up here, so a new method is added in one
place and appears everywhere it applies::

    from mrharmony.harmonize.registry import make_harmonizer, feature_harmonizers
    feature_harmonizers(cross_sectional=True)   # ('combat', 'covbat', 'gam', 'mean')
    h = make_harmonizer("covbat", percent_var=0.9)
    h.fit_transform(features, site, covariates)

Feature harmonizers are classes with ``fit(X, batch, covariates)``, ``transform`` and
``fit_transform``; image harmonizers are functions of one image or normalizer classes
fitted on a set of images (see :mod:`mrharmony.harmonize.image`). Implementations are
imported only when used.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Literal

from mrharmony.errors import HarmonizeError

__all__ = [
    "HARMONIZERS",
    "HarmonizerSpec",
    "feature_harmonizers",
    "get_harmonizer",
    "harmonizer_class",
    "harmonizer_options",
    "image_harmonizers",
    "learned_harmonizers",
    "make_harmonizer",
]


@dataclass(frozen=True)
class HarmonizerSpec:
    """One registered harmonizer.

    Attributes
    ----------
    name : str
        The name used on the command line and in study TOML files.
    level : {"features", "image"}
        Feature tables (ROI volumes, mean values ...) or images.
    target : str
        ``"module:attribute"`` of the class (features) or function (image).
    summary : str
        One line for help texts.
    longitudinal : bool
        Needs repeated scans of subjects (a subject column); not usable on
        cross-sectional data such as a study's per-scan feature table.
    reference : str
        The publication or implementation it follows.
    family : str
        ``"combat"`` for the ComBat family (``mrharmony harmonize combat --method``).
    learned : bool
        A learned (PyTorch) harmonizer from :mod:`mrharmony.harmonize.learned`: needs the
        ``learn`` extra, is trained with ``mrharmony harmonize train`` and stored as a
        model folder.
    """

    name: str
    level: Literal["features", "image"]
    target: str
    summary: str
    longitudinal: bool = False
    reference: str = ""
    family: str = ""
    learned: bool = False

    def load(self) -> Any:
        """The class or function (imports its module)."""
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


_SPECS = (
    HarmonizerSpec("combat", "features", "mrharmony.harmonize.combat:ComBat",
                   "ComBat: location/scale per site with empirical Bayes",
                   reference="Johnson et al. 2007; Fortin et al. 2018 (neuroCombat)",
                   family="combat"),
    HarmonizerSpec("covbat", "features", "mrharmony.harmonize.combat_variants:CovBat",
                   "CovBat: ComBat, then ComBat on the principal components of the residuals",
                   reference="Chen et al. 2022 (CovBat)", family="combat"),
    HarmonizerSpec("gam", "features", "mrharmony.harmonize.combat_variants:ComBatGAM",
                   "ComBat-GAM: non-linear (spline) covariate effects",
                   reference="Pomponio et al. 2020 (neuroHarmonize)", family="combat"),
    HarmonizerSpec("longitudinal", "features",
                   "mrharmony.harmonize.combat_variants:LongitudinalComBat",
                   "longitudinal ComBat: linear mixed model with a subject random intercept",
                   longitudinal=True, reference="Beer et al. 2020 (longCombat)",
                   family="combat"),
    HarmonizerSpec("mean", "features", "mrharmony.harmonize.evaluate:MeanCentering",
                   "per-site mean centring (a baseline)"),
    HarmonizerSpec("zscore", "image", "mrharmony.harmonize.image:zscore",
                   "z-score of the intensities inside the mask"),
    HarmonizerSpec("histogram", "image", "mrharmony.harmonize.image:match_histogram",
                   "histogram matching to a reference image"),
    HarmonizerSpec("nyul", "image", "mrharmony.harmonize.image:NyulNormalizer",
                   "piecewise-linear landmark normalisation", reference="Nyul et al. 2000"),
    HarmonizerSpec("whitestripe", "image", "mrharmony.harmonize.image:whitestripe",
                   "normal-appearing white matter stripe", reference="Shinohara et al. 2014"),
    HarmonizerSpec("ravel", "image", "mrharmony.harmonize.image:Ravel",
                   "RAVEL: unwanted variation from a control region",
                   reference="Fortin et al. 2016"),
    # Learned harmonizers (optional extra ``learn``; trained on the toolkit's own virtual
    # traveling subjects, see mrharmony.harmonize.learned).
    HarmonizerSpec("deepcombat", "features", "mrharmony.harmonize.learned.feature:DeepComBat",
                   "DeepComBat: conditional VAE with ComBat in the latent space",
                   reference="Hu et al. 2023 (DeepComBat)", learned=True),
    HarmonizerSpec("deepresbat", "features", "mrharmony.harmonize.learned.feature:DeepResBat",
                   "DeepResBat: learned covariate effects, ComBat on the residuals",
                   reference="An et al. 2024 (DeepResBat)", learned=True),
    HarmonizerSpec("deepharmony", "image", "mrharmony.harmonize.learned.paired:DeepHarmony",
                   "DeepHarmony: U-Net from a source site to a target site (paired)",
                   reference="Dewey et al. 2019 (DeepHarmony)", learned=True),
    HarmonizerSpec("mispel", "image", "mrharmony.harmonize.learned.paired:Mispel",
                   "MISPEL: site-specific encoders/decoders with a shared embedding (paired)",
                   reference="Torbati et al. 2023 (MISPEL)", learned=True),
    HarmonizerSpec("cyclegan", "image", "mrharmony.harmonize.learned.unpaired:CycleGAN",
                   "CycleGAN-style two-site translation (unpaired)",
                   reference="Zhu et al. 2017; Modanwal et al. 2020", learned=True),
    HarmonizerSpec("calamiti", "image", "mrharmony.harmonize.learned.disentangle:Calamiti",
                   "CALAMITI-style anatomy/contrast disentangling from T1w/T2w pairs",
                   reference="Zuo et al. 2021 (CALAMITI)", learned=True),
)

#: Every registered harmonizer by name.
HARMONIZERS: dict[str, HarmonizerSpec] = {s.name: s for s in _SPECS}


def _learned_ok(spec: HarmonizerSpec, learned: bool | None) -> bool:
    return learned is None or spec.learned == learned


def feature_harmonizers(*, cross_sectional: bool = False, family: str | None = None,
                        learned: bool | None = False) -> tuple[str, ...]:
    """Names of the feature-level harmonizers.

    Parameters
    ----------
    cross_sectional : bool
        Only those that need no subject column (one scan per subject and site).
    family : str, optional
        Only those of this family (``"combat"``).
    learned : bool or None
        ``False`` (default): the classical ones; ``True``: only the learned ones
        (``learn`` extra); ``None``: all.
    """
    return tuple(s.name for s in _SPECS if s.level == "features"
                 and not (cross_sectional and s.longitudinal)
                 and (family is None or s.family == family) and _learned_ok(s, learned))


def image_harmonizers(*, learned: bool | None = False) -> tuple[str, ...]:
    """Names of the image-level harmonizers (``learned`` as in :func:`feature_harmonizers`)."""
    return tuple(s.name for s in _SPECS if s.level == "image" and _learned_ok(s, learned))


def learned_harmonizers() -> tuple[str, ...]:
    """Names of the learned harmonizers (feature and image level)."""
    return tuple(s.name for s in _SPECS if s.learned)


def get_harmonizer(name: str, *, level: str | None = None) -> HarmonizerSpec:
    """The registered harmonizer ``name``.

    Raises
    ------
    HarmonizeError
        Unknown name, or a harmonizer of another level than ``level``.
    """
    spec = HARMONIZERS.get(name)
    if spec is None or (level is not None and spec.level != level):
        names = feature_harmonizers(learned=None) if level == "features" else (
            image_harmonizers(learned=None) if level == "image" else tuple(HARMONIZERS))
        raise HarmonizeError(f"unknown harmonizer {name!r} (one of {', '.join(names)})")
    return spec


def harmonizer_class(name: str) -> Any:
    """The class of the feature harmonizer ``name``."""
    return get_harmonizer(name, level="features").load()


def harmonizer_options(name: str) -> dict[str, Any]:
    """Keyword options of harmonizer ``name`` with their defaults."""
    obj = get_harmonizer(name).load()
    params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    out: dict[str, Any] = {}
    for p in params.values():
        if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"
                                         and p.default is not p.empty):
            out[p.name] = None if p.default is p.empty else p.default
    if inspect.isclass(obj):  # options a subclass passes on to its base (**kwargs)
        for base in obj.__mro__[1:]:
            if "__init__" in vars(base) and base is not object:
                for p in inspect.signature(base.__init__).parameters.values():
                    if p.kind is p.KEYWORD_ONLY and p.name not in out:
                        out[p.name] = None if p.default is p.empty else p.default
    return out


def make_harmonizer(name: str, **options: Any) -> Any:
    """A new, unfitted feature harmonizer ``name`` with ``options``.

    Raises
    ------
    HarmonizeError
        Unknown name, or an option the harmonizer does not take (never silently dropped).
    """
    cls = harmonizer_class(name)
    known = harmonizer_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise HarmonizeError(f"{name}: unknown option(s) {', '.join(unknown)} "
                             f"(it takes {', '.join(sorted(known)) or 'none'})")
    return cls(**options)
