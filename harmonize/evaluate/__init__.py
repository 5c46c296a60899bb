"""Evaluation of harmonization: site effects removed, biology kept.

Feature inputs are samples x features (pandas DataFrame or 2-D array, float64 stats);
``batch`` holds one site label per sample. Every function returns pandas objects indexed
by feature name so that before/after tables line up.

The harmonizer is refitted inside every cross-validation fold of
:func:`site_discriminability` (never a table harmonized on all scans).

Modules (every name is also importable from this package):

- :mod:`.discriminability` -- :func:`site_discriminability`, :class:`Discriminability`
- :mod:`.site_tests` -- :func:`site_effect_tests`, :func:`ks_tests`
- :mod:`.agreement` -- :func:`icc`, :func:`cov_across_sites`, :func:`bland_altman`,
  :func:`bland_altman_sites`
- :mod:`.associations` -- :func:`association_effects`,
  :func:`preservation_of_associations`, :func:`spurious_association_test`
- :mod:`.similarity` -- :func:`image_similarity` (PSNR, SSIM, MAE of images)
- :mod:`.baseline` -- :class:`MeanCentering` (per-site location, the baseline harmonizer)
- :mod:`.tables` -- :func:`evaluate_tables` (all of the above on two wide tables),
  :func:`feature_columns`

Each module's docstring states its conventions (documented choices).
"""

from __future__ import annotations

from ._inputs import HarmonizerFactory
from .agreement import bland_altman, bland_altman_sites, cov_across_sites, icc
from .associations import (
    association_effects,
    preservation_of_associations,
    spurious_association_test,
)
from .baseline import MeanCentering
from .discriminability import Discriminability, site_discriminability
from .similarity import image_similarity
from .site_tests import ks_tests, site_effect_tests
from .tables import evaluate_tables, feature_columns

__all__ = [
    "Discriminability",
    "HarmonizerFactory",
    "MeanCentering",
    "association_effects",
    "bland_altman",
    "bland_altman_sites",
    "cov_across_sites",
    "evaluate_tables",
    "feature_columns",
    "icc",
    "image_similarity",
    "ks_tests",
    "preservation_of_associations",
    "site_discriminability",
    "site_effect_tests",
    "spurious_association_test",
]
