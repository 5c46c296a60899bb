"""Independent measurements on built sequences (test oracles).

Nothing here reads the definitions a builder wrote: TE, TR and TI are measured from the
RF events and the k-space trajectory pypulseq computes from the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pypulseq as pp


@dataclass(frozen=True)
class RFEvent:
    t_center: float
    use: str
    freq_offset: float


def rf_events(seq: pp.Sequence) -> list[RFEvent]:
    """All RF pulses with their absolute centre time, use and frequency offset."""
    events = []
    t0 = 0.0
    for block_id in seq.block_events:
        block = seq.get_block(block_id)
        if block.rf is not None:
            rf = block.rf
            events.append(
                RFEvent(
                    t_center=t0 + rf.delay + pp.calc_rf_center(rf)[0],
                    use=getattr(rf, "use", "undefined"),
                    freq_offset=float(rf.freq_offset),
                )
            )
        t0 += seq.block_durations[block_id]
    return events


def _same_offset_intervals(events: list[RFEvent]) -> np.ndarray:
    by_offset: dict[float, list[float]] = {}
    for e in events:
        by_offset.setdefault(round(e.freq_offset, 1), []).append(e.t_center)
    gaps = [np.diff(ts) for ts in by_offset.values() if len(ts) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


@dataclass(frozen=True)
class Timing:
    te_s: float
    tr_s: float
    ti_s: tuple[float, ...]


def measure_timing(seq: pp.Sequence, k_tol: float | None = None) -> Timing:
    """Measure TE, TR and TIs of a sequence from its RF events and k-space.

    TE: minimum over ADC samples with |k| ~ 0 of (sample time - preceding excitation).
    TR: median interval between inversions at the same frequency offset if there are
    inversions, else between excitations at the same frequency offset.
    TI: for each inversion period containing a k-space-centre sample, (excitation that
    precedes the sample) - (inversion); unique values to 10 us.
    """
    k_adc, _, _, _, t_adc = seq.calculate_kspace()
    kmag = np.linalg.norm(k_adc, axis=0)
    if k_tol is None:
        fov = np.atleast_1d(seq.definitions.get("FOV", [0.256]))
        k_tol = 0.02 / float(np.max(fov))
    events = rf_events(seq)
    exc = np.array([e.t_center for e in events if e.use == "excitation"])
    inv = np.array([e.t_center for e in events if e.use == "inversion"])
    center_t = t_adc[kmag < k_tol]
    if center_t.size == 0:
        raise AssertionError("no ADC sample at the k-space centre")
    idx = np.searchsorted(exc, center_t) - 1
    valid = idx >= 0
    te = float(np.min(center_t[valid] - exc[idx[valid]]))
    if inv.size:
        intervals = _same_offset_intervals([e for e in events if e.use == "inversion"])
    else:
        intervals = _same_offset_intervals([e for e in events if e.use == "excitation"])
    tr = float(np.median(intervals)) if intervals.size else float("nan")
    tis: set[float] = set()
    if inv.size:
        for i_exc in idx[valid]:
            t_exc = exc[i_exc]
            i_inv = np.searchsorted(inv, t_exc) - 1
            if i_inv >= 0:
                tis.add(round(float(t_exc - inv[i_inv]), 5))
    return Timing(te_s=te, tr_s=tr, ti_s=tuple(sorted(tis)))


# --- pypulseq's own example scripts (a peer, installed by .ci/run, never committed) ---

PYPULSEQ_EXAMPLES_VERSION = "1.4.2"


def pypulseq_examples_dir():
    """Folder with pypulseq's example scripts, extracted by ``.ci/run`` from the pypulseq
    1.4.2 wheel on PyPI (the last wheel that ships them); None when absent."""
    import os
    from pathlib import Path

    env = os.environ.get("MRH_PYPULSEQ_EXAMPLES")
    default = Path(__file__).resolve().parents[1] / ".cache" / "pypulseq-examples"
    root = Path(env) if env else default
    return root if (root / "write_gre.py").is_file() else None


def run_pypulseq_example(script, seq_filename):
    """Run one pypulseq example script's ``main`` in this process, writing ``seq_filename``.

    It runs in ``seq_filename``'s folder: some scripts also write a fixed file name in
    the working directory (the MPRAGE ones), which must not land in the repository.
    """
    import contextlib
    import importlib.util
    import io
    import warnings

    spec = importlib.util.spec_from_file_location(f"pypulseq_example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    from pathlib import Path

    seq_filename = Path(seq_filename).resolve()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.chdir(seq_filename.parent):
        warnings.simplefilter("ignore")
        try:
            spec.loader.exec_module(module)
            module.main(plot=False, write_seq=True, seq_filename=str(seq_filename))
        finally:
            pp.Opts.reset_default()
    return seq_filename


def simulate_protocol(protocol, phantom, site, out_path, *, native: bool = False, **kwargs):
    """What ``mrharmony simulate PROTOCOL.toml`` does: build the protocol on the site's
    scanner (the vendor's flavour with ``native``), then ``simulate_raw`` the ``.seq``."""
    import tempfile

    from mrharmony.simulation import load_site, simulate_raw
    from mrharmony.simulation.cli import sequence_file

    site = load_site(site)
    with tempfile.TemporaryDirectory(prefix="mrharmony-test-") as work:
        seq, info = sequence_file(protocol, site, native=native, workdir=work)
        return simulate_raw(seq, phantom, site, out_path, native=native, header_info=info,
                            **kwargs)
