"""Side-by-side PNG of a phantom's maps (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.fileio import atomic_path
from mrharmony.phantoms.phantom import Phantom

__all__ = ["DEFAULT_MAPS", "plot_phantom"]

DEFAULT_MAPS = ("pd", "t1_ms", "t2_ms", "t2star_ms", "adc_mm2_s", "b0_hz", "labels")
_TITLES = {"pd": "PD", "t1_ms": "T1 (ms)", "t2_ms": "T2 (ms)", "t2star_ms": "T2* (ms)",
           "adc_mm2_s": "ADC (mm$^2$/s)", "b0_hz": "B0 (Hz)", "labels": "labels",
           "chemical_shift_ppm": "chemical shift (ppm)"}


def plot_phantom(phantom: Phantom, out_png: str | os.PathLike[str], *,
                 slice_index: int | None = None, maps: tuple[str, ...] = DEFAULT_MAPS,
                 force: bool = False, dpi: int = 100) -> Path:
    """Write the maps of one axial slice side by side as a PNG.

    Parameters
    ----------
    phantom : Phantom
        The phantom.
    out_png : path
        Output file (written atomically).
    slice_index : int, optional
        Slice along the third axis (default: the middle slice).
    maps : tuple of str, optional
        Map names to show, in order.
    force : bool, optional
        Overwrite an existing file.
    dpi : int, optional
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out_png)
    if out.exists() and not force:
        raise PhantomError(f"{out}: exists (use --force / force=True to replace it)")
    available = phantom.maps()
    unknown = [m for m in maps if m not in available]
    if unknown:
        raise PhantomError(f"maps: {unknown} not in this phantom (has {sorted(available)})")
    nz = phantom.shape[2]
    k = nz // 2 if slice_index is None else int(slice_index)
    if not 0 <= k < nz:
        raise PhantomError(f"slice_index: {k} outside [0, {nz - 1}]")
    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 3.0), squeeze=False)
    for ax, key in zip(axes[0], maps, strict=True):
        img = np.asarray(available[key][:, :, k], dtype=np.float64)
        shown = np.where(phantom.mask[:, :, k], img, np.nan) if key not in ("pd", "labels") \
            else img
        cmap = "tab20" if key == "labels" else ("gray" if key == "pd" else "viridis")
        # array axis 0 is x (R), axis 1 is y (A): show x to the right, y upwards
        handle = ax.imshow(shown.T, origin="lower", cmap=cmap, interpolation="nearest")
        ax.set_title(_TITLES.get(key, key), fontsize=9)
        ax.set_axis_off()
        fig.colorbar(handle, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{phantom.name or 'phantom'}  {phantom.field_t:g} T  slice {k}/{nz}",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return out
