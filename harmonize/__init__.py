"""Retrospective harmonization: feature level (ComBat family), image level, evaluation.

Names are loaded lazily (on first attribute access) so that importing
:mod:`mrharmony.harmonize` stays cheap and a missing optional module only fails when the
name that needs it is used::

    from mrharmony.harmonize import ComBat
    harmonized = ComBat().fit_transform(features, site, covariates)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ComBat": "mrharmony.harmonize.combat:ComBat",
    "HarmonizeWarning": "mrharmony.harmonize.combat:HarmonizeWarning",
    "CovBat": "mrharmony.harmonize.combat_variants:CovBat",
    "ComBatGAM": "mrharmony.harmonize.combat_variants:ComBatGAM",
    "LongitudinalComBat": "mrharmony.harmonize.combat_variants:LongitudinalComBat",
    "TravelingComBat": "mrharmony.harmonize.combat_variants:TravelingComBat",
    "load_model": "mrharmony.harmonize.model_io:load_model",
    "save_model": "mrharmony.harmonize.model_io:save_model",
    "extract_roi_features": "mrharmony.harmonize.features:extract_roi_features",
    "site_discriminability": "mrharmony.harmonize.evaluate:site_discriminability",
    "evaluate_tables": "mrharmony.harmonize.evaluate:evaluate_tables",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
