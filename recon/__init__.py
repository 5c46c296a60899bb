"""Offline reconstruction of ISMRMRD data into images and maps.

Public entry points are imported lazily (so ``import mrharmony.recon`` stays cheap)::

    from mrharmony.formats.raw import load_raw
    from mrharmony.recon import reconstruct, write_nifti
    raw = load_raw("scan.h5")      # ISMRMRD, MRD v2, or twix with seq=...
    images = reconstruct(raw, method="auto", backend="auto")
    write_nifti(images, "scan.nii.gz")
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ReconImage", "reconstruct", "reconstruct_acquisitions", "write_nifti"]

_LAZY = {
    "reconstruct": "mrharmony.recon.pipeline",
    "reconstruct_acquisitions": "mrharmony.recon.pipeline",
    "write_nifti": "mrharmony.recon.output",
    "ReconImage": "mrharmony.recon.image",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mrharmony.recon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
