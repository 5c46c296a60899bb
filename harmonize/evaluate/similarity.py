"""Image-level evaluation: similarity to a traveling subject's reference scan."""

from __future__ import annotations

from typing import Any

import numpy as np

from mrharmony.errors import HarmonizeError

from ..image import as_array, resolve_mask

__all__ = ["image_similarity"]


def image_similarity(image: Any, reference: Any, *, mask: Any | None = None,
                     data_range: float | None = None) -> dict[str, float]:
    """PSNR (dB), SSIM and MAE of an image against a reference (same grid).

    PSNR and MAE use the voxels in ``mask`` (default: all); SSIM is the mean of
    skimage's local SSIM map over the mask away from the border (window 7, or the largest
    odd size that fits; without a mask this is skimage's mean SSIM).
    ``data_range`` defaults to the reference's (max - min) inside the mask.
    """
    from skimage.metrics import structural_similarity

    a = np.squeeze(as_array(image, name="image").astype(np.float64))
    r = np.squeeze(as_array(reference, name="reference").astype(np.float64))
    if a.shape != r.shape:
        raise HarmonizeError(f"image: shape {a.shape} differs from reference {r.shape}")
    inside = np.ones(r.shape, bool) if mask is None else np.squeeze(
        resolve_mask(np.squeeze(as_array(reference)), np.squeeze(as_array(mask))))
    dr = float(np.ptp(r[inside])) if data_range is None else float(data_range)
    if not dr > 0:
        raise HarmonizeError("data_range: must be > 0 (reference is constant in the mask)")
    err = a[inside] - r[inside]
    mse = float(np.mean(err**2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(dr**2 / mse))
    win = min(7, *(s if s % 2 else s - 1 for s in r.shape))
    if win < 3:
        raise HarmonizeError(f"image: shape {r.shape} too small for SSIM (need >= 3 voxels "
                             "per axis)")
    _, smap = structural_similarity(a, r, data_range=dr, win_size=win, full=True)
    pad = (win - 1) // 2  # skimage averages the map away from the border; so do we
    interior = np.zeros(r.shape, bool)
    interior[tuple(slice(pad, s - pad) for s in r.shape)] = True
    sel = inside & interior if (inside & interior).any() else inside
    return {"psnr_db": psnr, "ssim": float(smap[sel].mean()),
            "mae": float(np.mean(np.abs(err)))}
