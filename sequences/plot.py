"""Plots of a sequence: RF/gradient/ADC waveforms over a time window and the k-space path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pypulseq as pp

from mrharmony.fileio import atomic_path
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T

__all__ = ["plot_sequence"]


def plot_sequence(
    seq: pp.Sequence,
    path: str | Path,
    *,
    time_range_ms: tuple[float, float] | None = None,
    title: str | None = None,
    max_kspace_points: int = 200_000,
) -> Path:
    """Save a PNG with the waveforms (RF, Gx, Gy, Gz, ADC) and the k-space trajectory.

    Parameters
    ----------
    seq : pypulseq.Sequence
        The sequence to draw.
    path : str or Path
        Output PNG file (written atomically).
    time_range_ms : (float, float), optional
        Window of the waveform panels in ms; default: the first TR (from the ``TR``
        definition), else the first 50 ms.
    title : str, optional
        Figure title; default the ``Name`` definition.
    max_kspace_points : int
        ADC samples drawn in the k-space panel at most (evenly thinned).

    Returns
    -------
    Path
        The written PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = float(seq.duration()[0])
    t_adc_all, _ = seq.adc_times()
    if time_range_ms is None:
        tr = seq.definitions.get("TR")
        span = float(np.atleast_1d(tr)[0]) if tr is not None else 50e-3
        span = min(duration, max(span, 1e-3))
        # The first TR that acquires data (dummy scans have no ADC).
        first = float(t_adc_all[0]) if len(t_adc_all) else 0.0
        t0 = min(np.floor(first / span) * span, max(duration - span, 0.0))
        t1 = min(duration, t0 + span)
    else:
        t0, t1 = time_range_ms[0] * 1e-3, time_range_ms[1] * 1e-3
    waves = seq.waveforms(append_RF=True, time_range=[t0, t1])
    k_adc, k_all, *_ = seq.calculate_kspace()

    fig = plt.figure(figsize=(13, 7), constrained_layout=True)
    grid = fig.add_gridspec(5, 2, width_ratios=[2.2, 1])
    labels = ["RF (Hz)", "Gx (mT/m)", "Gy (mT/m)", "Gz (mT/m)"]
    order = [3, 0, 1, 2]
    ax0 = None
    for row, (idx, lab) in enumerate(zip(order, labels, strict=True)):
        ax = fig.add_subplot(grid[row, 0], sharex=ax0)
        ax0 = ax0 or ax
        w = np.asarray(waves[idx])
        if w.size and w.shape[-1]:
            values = np.abs(w[1]) if idx == 3 else np.real(w[1]) / GAMMA_HZ_PER_T * 1e3
            ax.plot(np.real(w[0]) * 1e3, values, lw=0.8)
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    ax_adc = fig.add_subplot(grid[4, 0], sharex=ax0)
    in_window = (t_adc_all >= t0) & (t_adc_all <= t1)
    ax_adc.plot(t_adc_all[in_window] * 1e3, np.ones(in_window.sum()), "|", ms=8)
    ax_adc.set_yticks([])
    ax_adc.set_ylabel("ADC")
    ax_adc.set_xlabel("time (ms)")
    ax_adc.set_xlim(t0 * 1e3, t1 * 1e3)

    ax_k = fig.add_subplot(grid[:, 1])
    step = max(1, k_adc.shape[1] // max_kspace_points)
    ax_k.plot(k_all[0][:: max(1, k_all.shape[1] // max_kspace_points)],
              k_all[1][:: max(1, k_all.shape[1] // max_kspace_points)], lw=0.3, color="0.7")
    ax_k.plot(k_adc[0][::step], k_adc[1][::step], ".", ms=1, color="C3")
    ax_k.set_aspect("equal")
    ax_k.set_xlabel("kx (1/m)")
    ax_k.set_ylabel("ky (1/m)")
    ax_k.set_title("k-space (ADC samples red)")
    name = title or str(np.atleast_1d(seq.definitions.get("Name", ["sequence"]))[0])
    fig.suptitle(f"{name}: {duration:.3f} s, {len(seq.block_events)} blocks")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
