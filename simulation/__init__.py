"""Simulation: run any Pulseq file on a phantom at a virtual site and write ISMRMRD raw data.

Typical use::

    from mrharmony.simulation import load_site, simulate_raw

    simulate_raw("gre.seq", "phantoms/brain", "siemens-prisma-3t", "raw.h5", seed=1)

The Bloch engine loads on first use, so importing this package is cheap: ``simulate`` and
``SpinSystem`` are re-exported lazily. The Pulseq reader lives in :mod:`mrharmony.formats.pulseq`.
"""

from __future__ import annotations

import importlib
from typing import Any

from mrharmony.simulation.site import Site, list_sites, load_site

__all__ = [
    "Site",
    "SpinSystem",
    "list_sites",
    "load_site",
    "simulate",
    "simulate_raw",
]

_LAZY = {
    "simulate_raw": "mrharmony.simulation.raw",
    "simulate": "mrharmony.simulation.engine",
    "SpinSystem": "mrharmony.simulation.spins",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrharmony.simulation' has no attribute {name!r}")
