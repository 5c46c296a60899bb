"""Numerical phantoms with exactly known ground truth.

- :class:`Phantom` / :func:`load_phantom`: per-voxel tissue maps saved as NIfTI + JSON.
- :func:`make_system_phantom`: ISMRM/NIST system phantom T1/T2 arrays (1.5 T, 3 T).
- :func:`make_diffusion_phantom`: NIST/QIBA PVP diffusion phantom (reference ADC).
- :func:`make_brain_phantom`: MNI152 brain from nilearn's packaged template, 0.55-7 T.
- :func:`make_shepp_logan`: MR Shepp-Logan (Gach 2008).
- :func:`make_uniform_phantom`: a uniform doped-water sphere or cylinder (scanner checks).
- :func:`make_cohort` / :class:`Cohort`: virtual traveling-subject cohorts.

Only :mod:`~mrharmony.phantoms.phantom` is imported eagerly (the simulator needs just
the type); the generators load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from mrharmony.phantoms.phantom import Phantom, load_phantom

_LAZY = {
    "TissueFractions": "brain",
    "make_brain_phantom": "brain",
    "mix_tissues": "brain",
    "Cohort": "cohort",
    "CohortEffects": "cohort",
    "Subject": "cohort",
    "make_cohort": "cohort",
    "make_diffusion_phantom": "diffusion",
    "pvp_adc_mm2_s": "diffusion",
    "plot_phantom": "plot",
    "TissueValues": "relaxation",
    "tissue_values": "relaxation",
    "make_shepp_logan": "shepp_logan",
    "make_uniform_phantom": "uniform",
    "make_system_phantom": "system",
    "system_reference": "system",
}

__all__ = ["Phantom", "load_phantom", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"mrharmony.phantoms.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'mrharmony.phantoms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
